// metal_check.h: lets clang type-check MLX-generated Metal kernels in "C++ for OpenCL 2021" mode
// (flags in metal_check.py). Declarations only.
//
// Metal's address spaces become OpenCL's, and with the generic address space disabled, mixing them is
// an error here as it is on Metal: writing through a `const device` pointer, passing a `constant`
// input (MLX makes inputs under 8 elements `constant`) or a threadgroup array where a `device` pointer
// is expected. The Metal library declared below is the portable subset (kernels/prelude.py) plus
// what MLX's generated wrapper uses; a kernel reaching beyond it fails here first.
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#define device __global
#define threadgroup __local
#define constant __constant
#define thread
#define METAL_FUNC inline

typedef __bf16 bfloat;
typedef half float16_t;  // MLX's utils.h names
typedef bfloat bfloat16_t;
typedef char int8_t;
typedef uchar uint8_t;
typedef short int16_t;
typedef ushort uint16_t;
typedef int int32_t;
typedef uint uint32_t;
typedef long int64_t;
typedef ulong uint64_t;

// Stands for a threadgroup variable: OpenCL allows __local declarations only in kernel functions,
// which cannot be templates, so metal_check.py rewrites `threadgroup T x[N];` into a reference.
__local void* threadgroup_slot(int index);

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags flags);
template <typename T> T simd_sum(T x);
template <typename T> T simd_max(T x);
float exp(float x);
float exp2(float x);
float rsqrt(float x);
float cos(float x);
float sin(float x);
float max(float a, float b);
float min(float a, float b);
int max(int a, int b);
int min(int a, int b);
template <typename T, typename U> T as_type(U x);
}  // namespace metal
using namespace metal;
