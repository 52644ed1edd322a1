"""The two preludes that let one kernel body compile under Metal and under CUDA.

A body is written once in Metal spelling, restricted to a portable subset, and handed to MLX with
`METAL_PRELUDE` or `CUDA_PRELUDE` as its `header`. The subset (what both preludes provide):

- index names: `thread_index_in_threadgroup`, `thread_index_in_simdgroup`,
  `simdgroup_index_in_threadgroup`, `threadgroup_position_in_grid`, `threadgroups_per_grid`. MLX's
  Metal wrapper declares each one the body names; the CUDA prelude defines them over threadIdx/blockIdx.
- `threadgroup T name[N];` at the body's top level, `threadgroup_barrier(mem_flags::mem_threadgroup)`.
- `simd_sum`, `simd_max` over all 32 lanes: only in simdgroup-uniform control flow, with threadgroups
  a multiple of 32 threads (CUDA's full-mask shuffles need every lane).
- `metal::exp`, `metal::exp2`, `metal::rsqrt` on floats, `metal::max`, `metal::min` on floats and ints.
- `f32x4` and `load4(p)`: four consecutive elements as floats, p 8-byte aligned (vector loads on CUDA).
- inputs indexed through `<name>_shape[i]` / `<name>_strides[i]` (Metal: pointers, CUDA: arrays);
  no 0-d inputs (Metal passes them by reference, CUDA by pointer): pass shape-(1,) arrays, read x[0].
- `u32x4` and `load_words4(p)`: four consecutive uint32 words, p 16-byte aligned (one 128-bit load on
  CUDA); `float_to_bits(f)`: the uint whose bits are f's (Metal's as_type).
- `and_or(a, mask, bits)`: (a & mask) | bits, mask and bits compile-time constants (one LOP3 on CUDA,
  where the plain expression takes two); `f32x2` and `half_pair(u, mul, add)`: the two float16 halves
  of u, low first, each as h * mul + add computed in float16 (exact where the result is), as floats.
- `load_pairs8(p)`: eight consecutive 16-bit elements (float16 or bfloat16) as four words of raw bits, p
  16-byte aligned; `pack_low16(a, b)` / `pack_high16(a, b)`: the low (high) halves of a and b as one
  word, a's first (one PRMT on CUDA).
- `mma_16x8x16(T, d, a, b0, b1, lane)`, a statement: D (16x8) += A (16x16) B (16x8) with float d[4],
  uint a[4], T float16 or bfloat16, in NVIDIA's mma.sync m16n8k16 fragments: lane = 4g + t holds A's
  rows g, g + 8 at k 2t, 2t + 1 (a[0], a[1]) and k 2t + 8, 2t + 9 (a[2], a[3]) as 16-bit pairs, B's
  column g at the same k (b0, b1), D's rows g, g + 8 at columns 2t, 2t + 1 (d[0], d[1]; d[2], d[3]). One
  instruction on CUDA; on Metal 32 shuffles and float FMAs (correct and slow: the verification ladder
  runs it, Apple GPUs never do). All 32 lanes call it (simdgroup-uniform control flow).
- arithmetic in float: load with `static_cast<float>` or `load4`, store with `static_cast<T>`
  (CUDA's bf16/half operators are ambiguous in mixed expressions). No lambdas, no double, no std::.
- grid a multiple of the threadgroup: Metal launches exactly the grid, CUDA whole blocks.
"""

METAL_PRELUDE = r"""
struct f32x4 { float x, y, z, w; };
template <typename P> inline f32x4 load4(P p) {
  return f32x4{float(p[0]), float(p[1]), float(p[2]), float(p[3])};
}
struct u32x4 { uint v[4]; };
template <typename P> inline u32x4 load_words4(P p) {
  return u32x4{{uint(p[0]), uint(p[1]), uint(p[2]), uint(p[3])}};
}
inline uint float_to_bits(float f) { return as_type<uint>(f); }
inline uint and_or(uint a, uint mask, uint bits) { return (a & mask) | bits; }
struct f32x2 { float x, y; };
inline f32x2 half_pair(uint u, float mul, float add) {
  return f32x2{float(as_type<half>(ushort(u & 0xffffu)) * half(mul) + half(add)),
               float(as_type<half>(ushort(u >> 16)) * half(mul) + half(add))};
}
template <typename P> inline uint pair_bits(P p, int i) {
  return uint(as_type<ushort>(p[i])) | (uint(as_type<ushort>(p[i + 1])) << 16);
}
template <typename P> inline u32x4 load_pairs8(P p) {
  return u32x4{{pair_bits(p, 0), pair_bits(p, 2), pair_bits(p, 4), pair_bits(p, 6)}};
}
inline uint pack_low16(uint a, uint b) { return (a & 0xffffu) | (b << 16); }
inline uint pack_high16(uint a, uint b) { return (a >> 16) | (b & 0xffff0000u); }
template <typename T> inline float pair_dot(uint a, uint b) {
  return float(as_type<T>(ushort(a & 0xffffu))) * float(as_type<T>(ushort(b & 0xffffu))) +
         float(as_type<T>(ushort(a >> 16))) * float(as_type<T>(ushort(b >> 16)));
}
template <typename T>
inline f32x4 mma_shuffled(uint a0, uint a1, uint a2, uint a3, uint b0, uint b1, float d0, float d1, float d2,
                          float d3, uint lane) {
  const uint g = lane / 4, t = lane % 4;
  float acc[4] = {d0, d1, d2, d3};
  for (uint src = 0; src < 4; src++) {  // k 2 src, 2 src + 1, 2 src + 8, 2 src + 9: lanes 4 row + src hold them
    const uint ra[4] = {simd_shuffle(a0, ushort(4 * g + src)), simd_shuffle(a1, ushort(4 * g + src)),
                        simd_shuffle(a2, ushort(4 * g + src)), simd_shuffle(a3, ushort(4 * g + src))};
    const uint rb[2][2] = {{simd_shuffle(b0, ushort(8 * t + src)), simd_shuffle(b1, ushort(8 * t + src))},
                           {simd_shuffle(b0, ushort(8 * t + 4 + src)), simd_shuffle(b1, ushort(8 * t + 4 + src))}};
    for (int e = 0; e < 4; e++) {
      acc[e] += pair_dot<T>(ra[e / 2], rb[e & 1][0]) + pair_dot<T>(ra[2 + e / 2], rb[e & 1][1]);
    }
  }
  return f32x4{acc[0], acc[1], acc[2], acc[3]};
}
#define mma_16x8x16(T, d, a, b0, b1, lane) { \
  const f32x4 mma_ = mma_shuffled<T>(a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3], lane); \
  d[0] = mma_.x; d[1] = mma_.y; d[2] = mma_.z; d[3] = mma_.w; }
"""

CUDA_PRELUDE = r"""
typedef unsigned int uint;
#define threadgroup __shared__
#define threadgroup_barrier(flags) __syncthreads()
#define thread_index_in_threadgroup (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))
#define thread_index_in_simdgroup (thread_index_in_threadgroup % 32u)
#define simdgroup_index_in_threadgroup (thread_index_in_threadgroup / 32u)
#define threadgroup_position_in_grid blockIdx
#define threadgroups_per_grid gridDim

// Ascending xor butterfly: the same summation order as the CPU emulator (and, reportedly, Apple GPUs).
template <typename T> __device__ __forceinline__ T simd_sum(T x) {
  for (int o = 1; o < 32; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <typename T> __device__ __forceinline__ T simd_max(T x) {
  for (int o = 1; o < 32; o <<= 1) {
    T y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

namespace metal {
__device__ __forceinline__ float exp(float x) { return ::expf(x); }
__device__ __forceinline__ float exp2(float x) { return ::exp2f(x); }
__device__ __forceinline__ float rsqrt(float x) { return ::rsqrtf(x); }
__device__ __forceinline__ float max(float a, float b) { return ::fmaxf(a, b); }
__device__ __forceinline__ float min(float a, float b) { return ::fminf(a, b); }
__device__ __forceinline__ int max(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int min(int a, int b) { return a < b ? a : b; }
}  // namespace metal

struct f32x4 { float x, y, z, w; };
__device__ __forceinline__ f32x4 load4(const float* p) {
  float2 a = *reinterpret_cast<const float2*>(p), b = *reinterpret_cast<const float2*>(p + 2);  // 8-byte aligned
  return f32x4{a.x, a.y, b.x, b.y};
}
__device__ __forceinline__ f32x4 load4(const __nv_bfloat16* p) {
  uint2 u = *reinterpret_cast<const uint2*>(p);  // a bfloat16 is the top half of a float
  return f32x4{__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
               __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u)};
}
__device__ __forceinline__ f32x4 load4(const __half* p) {
  uint2 u = *reinterpret_cast<const uint2*>(p);
  float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
  float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
  return f32x4{a.x, a.y, b.x, b.y};
}
struct u32x4 { uint v[4]; };
__device__ __forceinline__ u32x4 load_words4(const uint* p) {
  uint4 u = *reinterpret_cast<const uint4*>(p);  // 16-byte aligned
  return u32x4{{u.x, u.y, u.z, u.w}};
}
__device__ __forceinline__ uint float_to_bits(float f) { return __float_as_uint(f); }
#define and_or(a, mask, bits) lop3_and_or<(mask), (bits)>(a)
template <uint MASK_, uint BITS_> __device__ __forceinline__ uint lop3_and_or(uint a) {
  uint d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(MASK_), "n"(BITS_));  // (a & b) | c
  return d;
}
struct f32x2 { float x, y; };
__device__ __forceinline__ f32x2 half_pair(uint u, float mul, float add) {
  __half2 h = __hfma2(*reinterpret_cast<__half2*>(&u), __float2half2_rn(mul), __float2half2_rn(add));
  float2 f = __half22float2(h);
  return f32x2{f.x, f.y};
}
template <typename P> __device__ __forceinline__ u32x4 load_pairs8(const P* p) {
  uint4 u = *reinterpret_cast<const uint4*>(p);  // 16-byte aligned
  return u32x4{{u.x, u.y, u.z, u.w}};
}
__device__ __forceinline__ uint pack_low16(uint a, uint b) { return __byte_perm(a, b, 0x5410); }
__device__ __forceinline__ uint pack_high16(uint a, uint b) { return __byte_perm(a, b, 0x7632); }
template <typename T> __device__ __forceinline__ void mma_sync(float (&d)[4], const uint (&a)[4], uint b0, uint b1);
#define MMA_SYNC(T, PTX_TYPE)                                                                                    \
  template <> __device__ __forceinline__ void mma_sync<T>(float (&d)[4], const uint (&a)[4], uint b0, uint b1) { \
    asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "     \
        "{%8,%9}, {%0,%1,%2,%3};"                                                                               \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                        \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                                        \
  }
MMA_SYNC(__nv_bfloat16, "bf16")
MMA_SYNC(__half, "f16")
#define mma_16x8x16(T, d, a, b0, b1, lane) mma_sync<T>(d, a, b0, b1)
"""
