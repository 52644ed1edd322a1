// metal_emu.h: run an MLX-generated Metal compute kernel on the CPU with Metal's execution model.
//
// The kernel is the exact source MLX generates (metal_source.py), attributes stripped and each
// `threadgroup T x[N];` turned into a slot of its threadgroup's memory; metal_emu.py writes the
// `dispatch` function that calls it with the thread-position attributes it asks for.
//
// - Dispatch as MLX's `dispatchThreads`: the grid counts threads, threadgroup = min(threadgroup, grid)
//   per dimension, threadgroups at the edges may be partial.
// - Every thread of a threadgroup is a fiber; a threadgroup's fibers run on one OS thread and switch
//   only at threadgroup_barrier and simd_* calls. Simdgroups move independently between barriers:
//   without a seed, the lowest ready thread runs next (one simdgroup races ahead of the others); with
//   a seed, a random one. Either way a missing barrier shows up as a read of unwritten memory.
// - Simdgroups are 32 consecutive thread indices. A simd_* call completes when all 32 lanes of the
//   simdgroup make the same call: the portable subset's rule, since CUDA's full-mask shuffles are
//   undefined otherwise. simd_sum adds in an ascending xor butterfly, as the CUDA prelude does.
// - Threadgroup memory and outputs start poisoned (0xFF bytes: NaN for floats, -1 for integers).
// Reported as errors (exit status 3): a barrier some threads never reach (an early return), threads
// waiting at different barriers, a simd_* call not made by a whole simdgroup, more than 32 KiB of
// threadgroup memory. Each device buffer ends at an inaccessible page: reading past it crashes.
#pragma once
// Only C headers: the emulator compiles every kernel configuration, and the C++ library would
// triple the time that takes.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef uint uint3 __attribute__((ext_vector_type(3)));
typedef _Float16 half;
typedef __bf16 bfloat;
typedef half float16_t;  // MLX's utils.h names
typedef bfloat bfloat16_t;

// float -> bfloat16, round to nearest even (the conversion libgcc 12 lacks).
extern "C" __attribute__((weak)) __bf16 __truncsfbf2(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __builtin_bit_cast(__bf16, uint16_t((u >> 16) | 0x40u));
  return __builtin_bit_cast(__bf16, uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16));
}

namespace metal_emu {

constexpr uint SIMD_WIDTH = 32;
constexpr size_t THREADGROUP_MEMORY = 32768;  // Apple GPUs
constexpr int MAX_THREADGROUP_VARIABLES = 64;
constexpr size_t STACK = 64 * 1024;

struct Thread {  // Metal's thread-position attributes, under their own names
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, threads_per_simdgroup;
};

void dispatch(const Thread& thread, void** buffers);  // written per kernel by metal_emu.py

enum class State { Ready, AtBarrier, AtSimd, Done };
struct Fiber;
using Combine = void (*)(Fiber* const* lanes);  // computes every lane's result of one simd_* call

struct Fiber {
  ucontext_t context;
  char* stack;
  Thread ids;
  State state;
  int line;  // source line of the barrier or simd_* call it waits at
  Combine combine;
  alignas(16) unsigned char operand[16], result[16];
};

struct Group {
  Fiber* fibers;
  uint size;
  void* memory[MAX_THREADGROUP_VARIABLES];  // threadgroup variables, by declaration order
  size_t memory_bytes;
  ucontext_t scheduler;
  void** buffers;
  uint current;
};
inline Group* group = nullptr;

[[noreturn]] inline void fail(const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::fputs("ERROR: ", stderr);
  std::vfprintf(stderr, format, args);
  std::fputs("\n", stderr);
  va_end(args);
  std::exit(3);
}

inline uint smaller(uint a, uint b) { return a < b ? a : b; }

inline void yield(State state, int line, Combine combine = nullptr) {
  Fiber& f = group->fibers[group->current];
  f.state = state;
  f.line = line;
  f.combine = combine;
  swapcontext(&f.context, &group->scheduler);
}

inline void start() {
  Fiber& f = group->fibers[group->current];
  dispatch(f.ids, group->buffers);
  f.state = State::Done;
  swapcontext(&f.context, &group->scheduler);
}

template <typename A>
A& threadgroup_slot(int index) {
  if (index >= MAX_THREADGROUP_VARIABLES) fail("more than %d threadgroup variables", MAX_THREADGROUP_VARIABLES);
  if (!group->memory[index]) {
    group->memory_bytes += sizeof(A);
    if (group->memory_bytes > THREADGROUP_MEMORY)
      fail("threadgroup memory of %zu bytes exceeds the 32 KiB of Apple GPUs", group->memory_bytes);
    group->memory[index] = std::aligned_alloc(16, (sizeof(A) + 15) / 16 * 16);
    std::memset(group->memory[index], 0xFF, sizeof(A));
  }
  return *static_cast<A*>(group->memory[index]);
}

#define METAL_EMU_AT(f) (f).ids.threadgroup_position_in_grid.x, (f).ids.threadgroup_position_in_grid.y, \
                        (f).ids.threadgroup_position_in_grid.z

// After a lane of simdgroup `first` yields: complete the simdgroup's simd_* call once all 32 lanes wait
// at it, fail if a lane waits at one that another lane will never make.
inline void settle_simdgroup(uint first) {
  Fiber* lanes = group->fibers + first;
  uint count = smaller(group->size - first, SIMD_WIDTH), waiting = 0, elsewhere = 0;
  for (uint l = 0; l < count; ++l) {
    waiting += lanes[l].state == State::AtSimd;
    elsewhere += lanes[l].state == State::Done || lanes[l].state == State::AtBarrier;
  }
  if (!waiting) return;
  const Fiber* w = lanes;
  while (w->state != State::AtSimd) ++w;
  if (elsewhere || (waiting == count && count < SIMD_WIDTH))
    fail("simd call at line %d in threadgroup (%u,%u,%u) is not made by all 32 lanes of its simdgroup "
         "(undefined with CUDA's full-mask shuffles)", w->line, METAL_EMU_AT(*w));
  if (waiting < count) return;  // lanes still running towards it
  for (uint l = 0; l < count; ++l)
    if (lanes[l].line != w->line || lanes[l].combine != w->combine)
      fail("lanes of a simdgroup in threadgroup (%u,%u,%u) wait at different simd calls (lines %d and %d)",
           METAL_EMU_AT(*w), w->line, lanes[l].line);
  Fiber* pointers[SIMD_WIDTH];
  for (uint l = 0; l < SIMD_WIDTH; ++l) pointers[l] = lanes + l;
  w->combine(pointers);
  for (uint l = 0; l < SIMD_WIDTH; ++l) lanes[l].state = State::Ready;
}

// Nothing can run: every thread is done or waits at a barrier. Release the barrier, or fail.
inline void release_barrier() {
  const Fiber* waiting = nullptr;
  uint done = 0;
  for (uint i = 0; i < group->size; ++i) {
    const Fiber& f = group->fibers[i];
    if (f.state == State::Done) {
      ++done;
    } else if (!waiting) {
      waiting = &f;
    } else if (f.line != waiting->line) {
      fail("threads of threadgroup (%u,%u,%u) wait at different barriers (lines %d and %d)", METAL_EMU_AT(f),
           waiting->line, f.line);
    }
  }
  if (done)
    fail("threadgroup_barrier at line %d in threadgroup (%u,%u,%u) is reached by %u of %u threads: the others "
         "returned (a hang on a GPU)", waiting->line, METAL_EMU_AT(*waiting), group->size - done, group->size);
  for (uint i = 0; i < group->size; ++i) group->fibers[i].state = State::Ready;
}

inline uint64_t next_random(uint64_t& state) {  // splitmix64
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline void run_group(uint3 grid, uint3 size, uint3 position, void** buffers, uint64_t* shuffle) {
  uint3 groups = (grid + size - 1) / size;
  uint3 actual = {smaller(size.x, grid.x - position.x * size.x), smaller(size.y, grid.y - position.y * size.y),
                  smaller(size.z, grid.z - position.z * size.z)};
  uint n = actual.x * actual.y * actual.z;
  Group g = {};
  g.buffers = buffers;
  g.size = n;
  g.fibers = new Fiber[n]();
  uint* order = new uint[n];  // the ready threads
  for (uint i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    uint3 local = {i % actual.x, i / actual.x % actual.y, i / (actual.x * actual.y)};
    f.ids = Thread{position * size + local, local, position, actual, groups, grid,
                   i, i % SIMD_WIDTH, i / SIMD_WIDTH, (n + SIMD_WIDTH - 1) / SIMD_WIDTH, SIMD_WIDTH};
    f.stack = static_cast<char*>(std::malloc(STACK));
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = STACK;
    f.context.uc_link = nullptr;
    makecontext(&f.context, start, 0);
  }
  group = &g;
  // Without a seed the lowest ready thread runs next, so a simdgroup runs ahead of the others until a
  // barrier stops it; with one, a random ready thread does.
  for (;;) {
    uint ready = 0, pick = n;
    for (uint i = 0; i < n; ++i) {
      if (g.fibers[i].state != State::Ready) continue;
      if (pick == n) pick = i;
      order[ready++] = i;
    }
    if (!ready) {
      bool all_done = true;
      for (uint i = 0; i < n; ++i) all_done &= g.fibers[i].state == State::Done;
      if (all_done) break;
      release_barrier();
      continue;
    }
    if (shuffle) pick = order[next_random(*shuffle) % ready];
    g.current = pick;
    swapcontext(&g.scheduler, &g.fibers[pick].context);
    settle_simdgroup(pick / SIMD_WIDTH * SIMD_WIDTH);
  }
  for (uint i = 0; i < n; ++i) std::free(g.fibers[i].stack);
  for (void* p : g.memory) std::free(p);
  delete[] g.fibers;
  delete[] order;
  group = nullptr;
}

// A buffer whose last byte (rounded up to 16) sits just before an inaccessible page.
inline char* guarded(size_t bytes) {
  size_t page = sysconf(_SC_PAGESIZE), used = (bytes + 15) / 16 * 16, span = (used + page - 1) / page * page;
  void* base = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED || mprotect(static_cast<char*>(base) + span, page, PROT_NONE)) fail("cannot map a buffer");
  return static_cast<char*>(base) + span - used;
}

constexpr int MAX_BUFFERS = 64;

// Usage: kernel DIR. DIR/launch holds "grid X Y Z", "threadgroup X Y Z", "seed S", then one line
// "buffer BYTES IS_OUTPUT" per buffer index; DIR/<index> holds its bytes, rewritten for outputs.
inline int main(int argc, char** argv) {
  if (argc != 2) return 2;
  char path[4096];
  std::snprintf(path, sizeof path, "%s/launch", argv[1]);
  FILE* launch = std::fopen(path, "r");
  uint g[3], t[3];
  unsigned long long seed;
  if (!launch || std::fscanf(launch, "grid %u %u %u threadgroup %u %u %u seed %llu", &g[0], &g[1], &g[2], &t[0],
                             &t[1], &t[2], &seed) != 7)
    fail("bad launch file");
  void* buffers[MAX_BUFFERS];
  size_t sizes[MAX_BUFFERS];
  int outputs[MAX_BUFFERS], count = 0;
  while (count < MAX_BUFFERS && std::fscanf(launch, " buffer %zu %d", &sizes[count], &outputs[count]) == 2) {
    buffers[count] = guarded(sizes[count]);
    std::snprintf(path, sizeof path, "%s/%d", argv[1], count);
    FILE* f = std::fopen(path, "rb");
    if (!f || std::fread(buffers[count], 1, sizes[count], f) != sizes[count]) fail("cannot read %s", path);
    std::fclose(f);
    ++count;
  }
  std::fclose(launch);
  uint3 grid = {g[0], g[1], g[2]}, size = {smaller(t[0], g[0]), smaller(t[1], g[1]), smaller(t[2], g[2])};
  uint3 groups = (grid + size - 1) / size;
  uint64_t state = seed;
  for (uint z = 0; z < groups.z; ++z)
    for (uint y = 0; y < groups.y; ++y)
      for (uint x = 0; x < groups.x; ++x) run_group(grid, size, uint3{x, y, z}, buffers, seed ? &state : nullptr);
  for (int i = 0; i < count; ++i) {
    if (!outputs[i]) continue;
    std::snprintf(path, sizeof path, "%s/%d", argv[1], i);
    FILE* f = std::fopen(path, "wb");
    std::fwrite(buffers[i], 1, sizes[i], f);
    std::fclose(f);
  }
  return 0;
}

template <typename T, typename Op>
void butterfly(Fiber* const* lanes) {
  T v[SIMD_WIDTH], next[SIMD_WIDTH];
  for (uint l = 0; l < SIMD_WIDTH; ++l) std::memcpy(&v[l], lanes[l]->operand, sizeof(T));
  for (uint offset = 1; offset < SIMD_WIDTH; offset <<= 1) {
    for (uint l = 0; l < SIMD_WIDTH; ++l) next[l] = Op()(v[l], v[l ^ offset]);
    for (uint l = 0; l < SIMD_WIDTH; ++l) v[l] = next[l];
  }
  for (uint l = 0; l < SIMD_WIDTH; ++l) std::memcpy(lanes[l]->result, &v[l], sizeof(T));
}

template <typename T, typename Op>
T simd_call(T x, int line) {
  static_assert(sizeof(T) <= 16, "simd operand too large");
  Fiber& f = group->fibers[group->current];
  std::memcpy(f.operand, &x, sizeof(T));
  yield(State::AtSimd, line, butterfly<T, Op>);
  std::memcpy(&x, f.result, sizeof(T));
  return x;
}

struct Add {
  template <typename T> T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T> T operator()(T a, T b) const { return b > a ? b : a; }
};

}  // namespace metal_emu

int main(int argc, char** argv) { return metal_emu::main(argc, argv); }

// ------------------------------------------------------------ the Metal standard library subset
namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline void threadgroup_barrier(mem_flags, int line = __builtin_LINE()) {
  metal_emu::yield(metal_emu::State::AtBarrier, line);
}
template <typename T> T simd_sum(T x, int line = __builtin_LINE()) { return metal_emu::simd_call<T, metal_emu::Add>(x, line); }
template <typename T> T simd_max(T x, int line = __builtin_LINE()) { return metal_emu::simd_call<T, metal_emu::Max>(x, line); }
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float cos(float x) { return __builtin_cosf(x); }
inline float sin(float x) { return __builtin_sinf(x); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }  // a NaN loses, as in Metal and CUDA
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
template <typename T, typename U> T as_type(U x) { return __builtin_bit_cast(T, x); }
}  // namespace metal
using namespace metal;

// Metal's address spaces and the kernel's own keywords mean nothing on the CPU.
#define METAL_FUNC inline
#define device
#define constant
#define thread
#define threadgroup
