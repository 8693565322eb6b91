// Launch geometry of the fused kernels (kernels.cu): shared by the CUDA host code
// (fused_kernels.cpp) and the CPU emulation the tests run the kernels under (emulate/), so both
// launch the same grids. Plain C++, no CUDA or libtorch.
#pragma once

#include <algorithm>
#include <cstdint>

namespace darkroom {

// Threads per block of the fused kernels (but the channels-last GroupNorm's, see its plan).
constexpr int64_t kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elements per 16-byte vector.
inline int64_t vector_width(int64_t element_size) { return 16 / element_size; }

struct GroupNormPlan {
  bool vectorized;      // the `_vec` kernels (16-byte loads and stores)
  int64_t slabs;        // (sample, group) pairs: the grids' y
  int64_t parts;        // blocks per slab of the statistics pass: its grid's x
  int64_t apply_parts;  // blocks per slab of the normalising pass: its grid's x
};

// `aligned`: every buffer the kernels touch starts on a 16-byte boundary.
inline GroupNormPlan plan_group_norm(int64_t samples, int64_t channels, int64_t groups,
                                     int64_t spatial, int64_t element_size, bool aligned,
                                     int64_t multiprocessors) {
  const int64_t width = vector_width(element_size);
  const bool vectorized = aligned && spatial % width == 0;
  const int64_t slabs = samples * groups;
  const int64_t slab_vectors = channels / groups * spatial / (vectorized ? width : 1);
  // Enough blocks to fill the GPU (the statistics of a few dozen slabs would leave most
  // multiprocessors idle with one block per slab), each thread still reading several vectors.
  const int64_t parts = std::clamp<int64_t>(
      std::min(ceil_div(4 * multiprocessors, slabs), slab_vectors / (2 * kThreads)), 1, 1024);
  const int64_t apply_parts = std::clamp<int64_t>(ceil_div(slab_vectors, 4 * kThreads), 1, 65535);
  return {vectorized, slabs, parts, apply_parts};
}

struct GroupNormNhwcPlan {
  bool supported;       // false: more than 1024 vectors per row or 1024 groups
  int64_t width;        // channels per thread (the `_v<width>` kernels), divides c / groups
  int64_t threads;      // per block: `c / width` per row × rows at a time
  int64_t parts;        // blocks per sample of the statistics pass: its grid's x
  int64_t apply_parts;  // blocks per sample of the normalising pass: its grid's x
};

// Channels-last `[n, c, h, w]` (`spatial` = h·w rows of `c` values).
inline GroupNormNhwcPlan plan_group_norm_nhwc(int64_t samples, int64_t channels, int64_t groups,
                                              int64_t spatial, int64_t element_size,
                                              bool aligned, int64_t multiprocessors) {
  const int64_t group_channels = channels / groups;
  int64_t width = vector_width(element_size);
  while (width > 1 &&
         (group_channels % width != 0 || (width * element_size == 16 && !aligned))) {
    width /= 2;
  }
  const int64_t columns = channels / width;
  if (columns > 1024 || groups > 1024) return {false, width, 0, 0, 0};
  const int64_t row_slots = std::max<int64_t>(1, kThreads / columns);
  const int64_t rows_per_part = 4 * row_slots;  // each thread still covers several rows
  const int64_t parts = std::clamp<int64_t>(
      std::min(ceil_div(4 * multiprocessors, samples), spatial / rows_per_part), 1, 1024);
  const int64_t apply_parts = std::clamp<int64_t>(ceil_div(spatial, rows_per_part), 1, 65535);
  return {true, width, columns * row_slots, parts, apply_parts};
}

struct AddLayerNormPlan {
  bool vectorized;
  int64_t blocks;  // one warp per row, kThreads / 32 rows per block
};

inline AddLayerNormPlan plan_add_layer_norm(int64_t rows, int64_t width, int64_t element_size,
                                            bool aligned) {
  const bool vectorized = aligned && width % vector_width(element_size) == 0;
  return {vectorized, std::max<int64_t>(1, ceil_div(rows, kThreads / 32))};
}

struct GegluPlan {
  bool vectorized;
  int64_t blocks;  // a grid-stride loop covers the rest
};

inline GegluPlan plan_geglu(int64_t rows, int64_t inner, int64_t element_size, bool aligned,
                            int64_t multiprocessors) {
  const int64_t width = vector_width(element_size);
  const bool vectorized = aligned && inner % width == 0;
  const int64_t vectors = rows * inner / (vectorized ? width : 1);
  return {vectorized, std::clamp<int64_t>(ceil_div(vectors, kThreads), 1, 32 * multiprocessors)};
}

}  // namespace darkroom
