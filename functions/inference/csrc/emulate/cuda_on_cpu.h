// Just enough of CUDA to run kernels.cu on the CPU, for tests on machines without a GPU: each
// block runs as `blockDim.x` OS threads (blocks one after another), with real barriers for
// __syncthreads and warp shuffles, so the kernels' indexing, partitioning and reductions run as
// written. Not fast; meant for small tensors.
#pragma once

#include <barrier>
#include <math.h>  // expf, erff, fmaxf, sqrtf in the global namespace, as in CUDA
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define DARKROOM_EMULATED 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
// Blocks run one at a time, so one static per variable serves as the block's shared memory.
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline uint3 blockDim;
inline uint3 gridDim;

namespace emulated {

struct Block {
  explicit Block(unsigned threads) : sync(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  struct Warp {
    std::barrier<> sync{32};
    float lanes[32];
  };
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline Block* block = nullptr;

// Runs `kernel(args...)` over a `grid_x × grid_y` grid of `threads`-thread blocks.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned grid_x, unsigned grid_y, unsigned threads, Args... args) {
  gridDim = {grid_x, grid_y, 1};
  blockDim = {threads, 1, 1};
  for (unsigned y = 0; y < grid_y; ++y) {
    for (unsigned x = 0; x < grid_x; ++x) {
      Block current(threads);
      block = &current;
      std::vector<std::thread> running;
      for (unsigned t = 0; t < threads; ++t) {
        running.emplace_back([=] {
          threadIdx = {t, 0, 0};
          blockIdx = {x, y, 0};
          kernel(args...);
        });
      }
      for (auto& thread : running) thread.join();
      block = nullptr;
    }
  }
}

}  // namespace emulated

inline void __syncthreads() { emulated::block->sync.arrive_and_wait(); }

// Every lane of the warp must call it (the kernels only shuffle in warp-uniform code).
inline float __shfl_down_sync(unsigned, float value, int offset) {
  auto& warp = *emulated::block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  warp.lanes[lane] = value;
  warp.sync.arrive_and_wait();
  const float result = lane + offset < 32 ? warp.lanes[lane + offset] : value;
  warp.sync.arrive_and_wait();
  return result;
}

// Every lane of the warp must call it.
inline float __shfl_sync(unsigned, float value, int source_lane) {
  auto& warp = *emulated::block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  warp.lanes[lane] = value;
  warp.sync.arrive_and_wait();
  const float result = warp.lanes[source_lane];
  warp.sync.arrive_and_wait();
  return result;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
