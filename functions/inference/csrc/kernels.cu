// Fused CUDA kernels for sequences libtorch runs as several kernels, each a full pass over
// memory: GroupNorm (statistics, fused parameters, apply) followed by SiLU, with the time
// embedding's per-channel addition before it; GEGLU (GELU of one half, times the other); and a
// residual addition followed by LayerNorm.
//
// Compiled at run time by NVRTC (csrc/cuda_graph.cpp, `darkroom_kernels_load`) for the device's
// architecture, so this file includes nothing: half-precision conversions are written out here.
// Every kernel computes in f32 and rounds once on the way out. `reference/compile_kernels.py`
// compiles it without a GPU, and emulate/ runs it on the CPU against libtorch (tests/kernels.rs),
// so neither syntax errors nor indexing mistakes wait for a GPU session to be found.
//
// Layout: GroupNorm takes `[n, c, *spatial]` contiguous tensors, where each (sample, group) is
// one contiguous slab of `c / groups × spatial` elements, or channels-last `[n, c, h, w]`
// tensors (the `_nhwc` kernels); GEGLU takes `[rows, 2 × inner]`; the residual LayerNorm
// `[rows, width]`.
// Kernels whose name ends in `_vec` read and write 16 bytes at a time: the host picks them only
// when `spatial` (GroupNorm), `inner` (GEGLU) or `width` (LayerNorm) is a multiple of the vector
// width and every pointer is 16-byte aligned.

typedef unsigned short bits16;
typedef long long i64;

struct Float32 {
  typedef float Storage;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

struct Float16 {
  typedef bits16 Storage;
#ifdef DARKROOM_EMULATED  // on the CPU, for the tests (emulate/cuda_on_cpu.h)
  static float load(bits16 v) {
    _Float16 h;
    memcpy(&h, &v, sizeof h);
    return static_cast<float>(h);
  }
  static bits16 store(float f) {
    const _Float16 h = static_cast<_Float16>(f);
    bits16 v;
    memcpy(&v, &h, sizeof v);
    return v;
  }
#else
  static __device__ __forceinline__ float load(bits16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ bits16 store(float f) {
    bits16 v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
  }
#endif
};

struct BFloat16 {
  typedef bits16 Storage;
  static __device__ __forceinline__ float load(bits16 v) {
    return __uint_as_float(static_cast<unsigned>(v) << 16);
  }
  // Round to nearest even, NaN kept quiet: libtorch's rounding for bf16.
  static __device__ __forceinline__ bits16 store(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return static_cast<bits16>((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<bits16>(u >> 16);
  }
};

// `V` consecutive elements as f32; one 16-byte transaction when `V` elements are 16 bytes.
template <class E, int V>
__device__ __forceinline__ void load_vector(const typename E::Storage* p, float (&out)[V]) {
  typedef typename E::Storage S;
  if constexpr (V * sizeof(S) == 16) {
    union {
      uint4 raw;
      S elements[V];
    } vector;
    vector.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = E::load(vector.elements[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = E::load(p[k]);
  }
}

template <class E, int V>
__device__ __forceinline__ void store_vector(typename E::Storage* p, const float (&in)[V]) {
  typedef typename E::Storage S;
  if constexpr (V * sizeof(S) == 16) {
    union {
      uint4 raw;
      S elements[V];
    } vector;
#pragma unroll
    for (int k = 0; k < V; ++k) vector.elements[k] = E::store(in[k]);
    *reinterpret_cast<uint4*>(p) = vector.raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = E::store(in[k]);
  }
}

// Count, mean and sum of squared deviations of a set of values (Welford), merged with Chan et
// al.'s formula: stable where E[x²] − E[x]² would cancel.
struct Moments {
  float count, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float count = a.count + b.count;
  if (count == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float weight = b.count / count;
  return {count, a.mean + delta * weight, a.m2 + b.m2 + delta * delta * a.count * weight};
}

// Lane 0 ends up with the warp's moments.
__device__ __forceinline__ Moments merge_warp(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Moments other = {__shfl_down_sync(0xffffffffu, m.count, offset),
                           __shfl_down_sync(0xffffffffu, m.mean, offset),
                           __shfl_down_sync(0xffffffffu, m.m2, offset)};
    m = merge(m, other);
  }
  return m;
}

// Thread 0 ends up with the block's moments (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ Moments merge_block(Moments m) {
  __shared__ Moments warps[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  m = merge_warp(m);
  if (lane == 0) warps[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < static_cast<int>(blockDim.x / 32) ? warps[lane] : Moments{0.f, 0.f, 0.f};
    m = merge_warp(m);
  }
  return m;
}

// The moments of `V` values.
template <int V>
__device__ __forceinline__ Moments vector_moments(const float (&v)[V]) {
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) sum += v[k];
  const float mean = sum / V;
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) m2 += (v[k] - mean) * (v[k] - mean);
  return {static_cast<float>(V), mean, m2};
}

// The slab of (sample, group) `blockIdx.y` is cut into `gridDim.x` parts of whole vectors.
__device__ __forceinline__ void part_of_slab(i64 slab, int vector, i64* begin, i64* end) {
  const i64 parts = gridDim.x;
  const i64 vectors = (slab / vector + parts - 1) / parts;
  *begin = blockIdx.x * vectors * vector;
  *end = min(*begin + vectors * vector, slab);
}

// Pass 1: the moments of each part of each slab, into `partial[(sample·groups + group)·parts +
// part]` as (count, mean, m2). `shift` (may be null): `[n, c]`, added to every element of its
// channel before the statistics, as the apply pass will.
template <class E, int V>
__device__ void group_norm_moments(const typename E::Storage* x, const typename E::Storage* shift,
                                   float* partial, i64 spatial, int channels, int groups) {
  const int slab_index = blockIdx.y;
  const int sample = slab_index / groups;
  const int group = slab_index % groups;
  const int group_channels = channels / groups;
  const i64 slab = static_cast<i64>(group_channels) * spatial;
  const typename E::Storage* values = x + slab_index * slab;
  i64 begin, end;
  part_of_slab(slab, V, &begin, &end);
  Moments m = {0.f, 0.f, 0.f};
  for (i64 i = begin + static_cast<i64>(threadIdx.x) * V; i < end;
       i += static_cast<i64>(blockDim.x) * V) {
    float v[V];
    load_vector<E, V>(values + i, v);
    float add = 0.f;
    if (shift != nullptr) {
      add = E::load(shift[sample * channels + group * group_channels + i / spatial]);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] += add;
    m = merge(m, vector_moments<V>(v));
  }
  m = merge_block(m);
  if (threadIdx.x == 0) {
    float* out = partial + (static_cast<i64>(slab_index) * gridDim.x + blockIdx.x) * 3;
    out[0] = m.count;
    out[1] = m.mean;
    out[2] = m.m2;
  }
}

// Pass 2: merges the slab's `parts` moments, then writes
// `y = act((x + shift) · rstd · weight + bias − mean · rstd · weight)` for its part of the slab;
// `act` is SiLU when `silu` is non-zero, else the identity.
template <class E, int V>
__device__ void group_norm_apply(const typename E::Storage* x, const typename E::Storage* shift,
                                 const typename E::Storage* weight,
                                 const typename E::Storage* bias, const float* partial,
                                 typename E::Storage* y, i64 spatial, int channels, int groups,
                                 int parts, float eps, int silu) {
  __shared__ float shared_mean, shared_rstd;
  const int slab_index = blockIdx.y;
  const int sample = slab_index / groups;
  const int group = slab_index % groups;
  const int group_channels = channels / groups;
  const i64 slab = static_cast<i64>(group_channels) * spatial;
  if (threadIdx.x < 32) {
    Moments m = {0.f, 0.f, 0.f};
    for (int p = threadIdx.x; p < parts; p += 32) {
      const float* q = partial + (static_cast<i64>(slab_index) * parts + p) * 3;
      m = merge(m, Moments{q[0], q[1], q[2]});
    }
    m = merge_warp(m);
    if (threadIdx.x == 0) {
      shared_mean = m.mean;
      shared_rstd = rsqrtf(fmaxf(m.m2 / m.count, 0.f) + eps);
    }
  }
  __syncthreads();
  const float mean = shared_mean;
  const float rstd = shared_rstd;
  const typename E::Storage* values = x + slab_index * slab;
  typename E::Storage* out = y + slab_index * slab;
  i64 begin, end;
  part_of_slab(slab, V, &begin, &end);
  for (i64 i = begin + static_cast<i64>(threadIdx.x) * V; i < end;
       i += static_cast<i64>(blockDim.x) * V) {
    const int channel = group * group_channels + static_cast<int>(i / spatial);
    const float scale = rstd * E::load(weight[channel]);
    float offset = E::load(bias[channel]) - mean * scale;
    if (shift != nullptr) offset += E::load(shift[sample * channels + channel]) * scale;
    float v[V];
    load_vector<E, V>(values + i, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float normed = v[k] * scale + offset;
      v[k] = silu != 0 ? normed / (1.f + expf(-normed)) : normed;
    }
    store_vector<E, V>(out + i, v);
  }
}

// Channels-last GroupNorm: `x` is a channels-last `[n, c, h, w]`, i.e. `[n, spatial, c]` in
// memory, so a group's elements are `c / groups` consecutive values in every one of `spatial`
// rows. A block covers one sample's rows `part_of_rows` with `c / V` threads per row (thread
// `t` owns the `V` channels from `(t mod c/V)·V`, all in one group as `V` divides `c / groups`)
// and `blockDim.x / (c / V)` rows at a time.
__device__ __forceinline__ void part_of_rows(i64 rows, i64* begin, i64* end) {
  const i64 per_part = (rows + gridDim.x - 1) / gridDim.x;
  *begin = blockIdx.x * per_part;
  *end = min(*begin + per_part, rows);
}

// Pass 1, channels-last: each group's moments over the block's rows, into
// `partial[(sample·groups + group)·parts + part]` as in the contiguous kernels.
template <class E, int V>
__device__ void group_norm_moments_nhwc(const typename E::Storage* x,
                                        const typename E::Storage* shift, float* partial,
                                        i64 spatial, int channels, int groups) {
  __shared__ Moments slots[1024];
  const int sample = blockIdx.y;
  const int columns = channels / V;
  const int column = threadIdx.x % columns;
  const int row_slot = threadIdx.x / columns;
  const int row_slots = blockDim.x / columns;
  i64 begin, end;
  part_of_rows(spatial, &begin, &end);
  float add[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    add[k] = shift != nullptr ? E::load(shift[sample * channels + column * V + k]) : 0.f;
  }
  Moments m = {0.f, 0.f, 0.f};
  const typename E::Storage* values = x + static_cast<i64>(sample) * spatial * channels;
  for (i64 row = begin + row_slot; row < end; row += row_slots) {
    float v[V];
    load_vector<E, V>(values + row * channels + column * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] += add[k];
    m = merge(m, vector_moments<V>(v));
  }
  slots[threadIdx.x] = m;
  __syncthreads();
  const int columns_per_group = channels / groups / V;
  for (int group = threadIdx.x; group < groups; group += blockDim.x) {
    Moments total = {0.f, 0.f, 0.f};
    for (int slot = 0; slot < row_slots; ++slot) {
      for (int k = 0; k < columns_per_group; ++k) {
        total = merge(total, slots[slot * columns + group * columns_per_group + k]);
      }
    }
    float* out =
        partial + (static_cast<i64>(sample * groups + group) * gridDim.x + blockIdx.x) * 3;
    out[0] = total.count;
    out[1] = total.mean;
    out[2] = total.m2;
  }
}

// Pass 2, channels-last: every group's mean and deviation for the block's sample (from the
// `parts` partial moments), each thread's `V` scales and offsets once, then its rows.
template <class E, int V>
__device__ void group_norm_apply_nhwc(const typename E::Storage* x,
                                      const typename E::Storage* shift,
                                      const typename E::Storage* weight,
                                      const typename E::Storage* bias, const float* partial,
                                      typename E::Storage* y, i64 spatial, int channels,
                                      int groups, int parts, float eps, int silu) {
  __shared__ float means[1024];
  __shared__ float rstds[1024];
  const int sample = blockIdx.y;
  for (int group = threadIdx.x; group < groups; group += blockDim.x) {
    Moments m = {0.f, 0.f, 0.f};
    for (int p = 0; p < parts; ++p) {
      const float* q = partial + (static_cast<i64>(sample * groups + group) * parts + p) * 3;
      m = merge(m, Moments{q[0], q[1], q[2]});
    }
    means[group] = m.mean;
    rstds[group] = rsqrtf(fmaxf(m.m2 / m.count, 0.f) + eps);
  }
  __syncthreads();
  const int columns = channels / V;
  const int column = threadIdx.x % columns;
  const int row_slot = threadIdx.x / columns;
  const int row_slots = blockDim.x / columns;
  const int group = column * V / (channels / groups);
  float scale[V], offset[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int channel = column * V + k;
    scale[k] = rstds[group] * E::load(weight[channel]);
    offset[k] = E::load(bias[channel]) - means[group] * scale[k];
    if (shift != nullptr) offset[k] += E::load(shift[sample * channels + channel]) * scale[k];
  }
  i64 begin, end;
  part_of_rows(spatial, &begin, &end);
  const i64 base = static_cast<i64>(sample) * spatial * channels + column * V;
  for (i64 row = begin + row_slot; row < end; row += row_slots) {
    float v[V];
    load_vector<E, V>(x + base + row * channels, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float normed = v[k] * scale[k] + offset[k];
      v[k] = silu != 0 ? normed / (1.f + expf(-normed)) : normed;
    }
    store_vector<E, V>(y + base + row * channels, v);
  }
}

// `sum = a + b` and `normed = layer_norm(sum)` over rows of `width` values: a transformer
// block's residual addition and the next sublayer's LayerNorm in one pass. One warp per row; the
// statistics are those of `sum` as stored (rounded to the storage precision), as libtorch's
// LayerNorm would read it back.
template <class E, int V>
__device__ void add_layer_norm(const typename E::Storage* a, const typename E::Storage* b,
                               const typename E::Storage* weight,
                               const typename E::Storage* bias, typename E::Storage* sum,
                               typename E::Storage* normed, i64 rows, int width, float eps) {
  const i64 row = static_cast<i64>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp: no block-wide synchronisation below
  const i64 start = row * width;
  Moments m = {0.f, 0.f, 0.f};
  for (int column = lane * V; column < width; column += 32 * V) {
    float x[V], y[V];
    load_vector<E, V>(a + start + column, x);
    load_vector<E, V>(b + start + column, y);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = E::load(E::store(x[k] + y[k]));
    store_vector<E, V>(sum + start + column, x);
    m = merge(m, vector_moments<V>(x));
  }
  m = merge_warp(m);
  const float mean = __shfl_sync(0xffffffffu, m.mean, 0);
  const float rstd = rsqrtf(fmaxf(__shfl_sync(0xffffffffu, m.m2 / m.count, 0), 0.f) + eps);
  for (int column = lane * V; column < width; column += 32 * V) {
    float x[V], w[V], c[V];
    load_vector<E, V>(sum + start + column, x);  // this lane's own stores above
    load_vector<E, V>(weight + column, w);
    load_vector<E, V>(bias + column, c);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = (x[k] - mean) * rstd * w[k] + c[k];
    store_vector<E, V>(normed + start + column, x);
  }
}

// `out[r, j] = in[r, j] · gelu(in[r, inner + j])` with the exact (erf) GELU.
template <class E, int V>
__device__ void geglu(const typename E::Storage* in, typename E::Storage* out, i64 rows,
                      i64 inner) {
  const i64 vectors = rows * inner / V;
  for (i64 k = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; k < vectors;
       k += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 i = k * V;
    const i64 row = i / inner;
    const i64 column = i - row * inner;
    const typename E::Storage* source = in + row * 2 * inner + column;
    float hidden[V], gate[V];
    load_vector<E, V>(source, hidden);
    load_vector<E, V>(source + inner, gate);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float g = gate[j];
      hidden[j] *= 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
    }
    store_vector<E, V>(out + i, hidden);
  }
}

#define DARKROOM_KERNELS(E, NAME, V, SUFFIX)                                                    \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      darkroom_group_norm_moments_##NAME##SUFFIX(const E::Storage* x, const E::Storage* shift, \
                                                 float* partial, i64 spatial, int channels,    \
                                                 int groups) {                                 \
    group_norm_moments<E, V>(x, shift, partial, spatial, channels, groups);                    \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) darkroom_group_norm_apply_##NAME##SUFFIX(  \
      const E::Storage* x, const E::Storage* shift, const E::Storage* weight,                  \
      const E::Storage* bias, const float* partial, E::Storage* y, i64 spatial, int channels,  \
      int groups, int parts, float eps, int silu) {                                            \
    group_norm_apply<E, V>(x, shift, weight, bias, partial, y, spatial, channels, groups,      \
                           parts, eps, silu);                                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      darkroom_geglu_##NAME##SUFFIX(const E::Storage* in, E::Storage* out, i64 rows,           \
                                    i64 inner) {                                               \
    geglu<E, V>(in, out, rows, inner);                                                         \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) darkroom_add_layer_norm_##NAME##SUFFIX(    \
      const E::Storage* a, const E::Storage* b, const E::Storage* weight,                      \
      const E::Storage* bias, E::Storage* sum, E::Storage* normed, i64 rows, int width,        \
      float eps) {                                                                             \
    add_layer_norm<E, V>(a, b, weight, bias, sum, normed, rows, width, eps);                   \
  }

DARKROOM_KERNELS(Float32, f32, 4, _vec)
DARKROOM_KERNELS(Float32, f32, 1, _scalar)
DARKROOM_KERNELS(Float16, f16, 8, _vec)
DARKROOM_KERNELS(Float16, f16, 1, _scalar)
DARKROOM_KERNELS(BFloat16, bf16, 8, _vec)
DARKROOM_KERNELS(BFloat16, bf16, 1, _scalar)

// Channels-last GroupNorm for each width `V` that can divide a group's channels.
#define DARKROOM_NHWC_KERNELS(E, NAME, V)                                                       \
  extern "C" __global__ void __launch_bounds__(1024)                                           \
      darkroom_group_norm_moments_nhwc_##NAME##_v##V(const E::Storage* x,                      \
                                                      const E::Storage* shift, float* partial, \
                                                      i64 spatial, int channels, int groups) { \
    group_norm_moments_nhwc<E, V>(x, shift, partial, spatial, channels, groups);               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(1024)                                           \
      darkroom_group_norm_apply_nhwc_##NAME##_v##V(                                            \
          const E::Storage* x, const E::Storage* shift, const E::Storage* weight,              \
          const E::Storage* bias, const float* partial, E::Storage* y, i64 spatial,            \
          int channels, int groups, int parts, float eps, int silu) {                          \
    group_norm_apply_nhwc<E, V>(x, shift, weight, bias, partial, y, spatial, channels, groups, \
                                parts, eps, silu);                                             \
  }

DARKROOM_NHWC_KERNELS(Float32, f32, 4)
DARKROOM_NHWC_KERNELS(Float32, f32, 2)
DARKROOM_NHWC_KERNELS(Float32, f32, 1)
DARKROOM_NHWC_KERNELS(Float16, f16, 8)
DARKROOM_NHWC_KERNELS(Float16, f16, 4)
DARKROOM_NHWC_KERNELS(Float16, f16, 2)
DARKROOM_NHWC_KERNELS(Float16, f16, 1)
DARKROOM_NHWC_KERNELS(BFloat16, bf16, 8)
DARKROOM_NHWC_KERNELS(BFloat16, bf16, 4)
DARKROOM_NHWC_KERNELS(BFloat16, bf16, 2)
DARKROOM_NHWC_KERNELS(BFloat16, bf16, 1)
