"""The two preludes that let one kernel body compile under Metal and under CUDA.

A body is written once in Metal spelling, restricted to a portable subset, and handed to MLX with
`METAL_PRELUDE` or `CUDA_PRELUDE` as its `header`. The subset (what both preludes provide):

- index names: `thread_index_in_threadgroup`, `thread_index_in_simdgroup`,
  `simdgroup_index_in_threadgroup`, `threadgroup_position_in_grid`, `threadgroups_per_grid`. MLX's
  Metal wrapper declares each one the body names; the CUDA prelude defines them over threadIdx/blockIdx.
- `threadgroup T name[N];` at the body's top level, `threadgroup_barrier(mem_flags::mem_threadgroup)`.
- `simd_sum`, `simd_max` over all 32 lanes: only in simdgroup-uniform control flow, with threadgroups
  a multiple of 32 threads (CUDA's full-mask shuffles need every lane).
- `metal::exp`, `metal::exp2`, `metal::rsqrt`, `metal::cos`, `metal::sin` on floats (CUDA: the accurate
  cosf/sinf, as MLX's own kernels, which NVRTC compiles without fast math), `metal::max`, `metal::min` on floats and ints.
- `f32x4` and `load4(p)`: four consecutive elements as floats, p 8-byte aligned (vector loads on CUDA).
- inputs indexed through `<name>_shape[i]` / `<name>_strides[i]` (Metal: pointers, CUDA: arrays);
  no 0-d inputs (Metal passes them by reference, CUDA by pointer): pass shape-(1,) arrays, read x[0].
- `u32x4` and `load_words4(p)`: four consecutive uint32 words, p 16-byte aligned (one 128-bit load on
  CUDA); `float_to_bits(f)`: the uint whose bits are f's (Metal's as_type).
- `and_or(a, mask, bits)`: (a & mask) | bits, mask and bits compile-time constants (one LOP3 on CUDA,
  where the plain expression takes two); `f32x2` and `half_pair(u, mul, add)`: the two float16 halves
  of u, low first, each as h * mul + add computed in float16 (exact where the result is), as floats.
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
__device__ __forceinline__ float cos(float x) { return ::cosf(x); }
__device__ __forceinline__ float sin(float x) { return ::sinf(x); }
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
"""
