// Runs one fused operation of kernels.cu on the CPU (cuda_on_cpu.h), choosing kernels by name
// and launching them with the geometry the CUDA host code uses (launch.h), on raw tensors in
// files: how tests/kernels.rs checks the kernels against libtorch on machines without a GPU.
//
//   run_kernels group_norm|group_norm_nhwc DTYPE SAMPLES CHANNELS GROUPS SPATIAL EPS SILU
//       MULTIPROCESSORS X SHIFT|- WEIGHT BIAS OUT
//   run_kernels geglu DTYPE ROWS INNER MULTIPROCESSORS IN OUT
//   run_kernels add_layer_norm DTYPE ROWS WIDTH EPS A B WEIGHT BIAS SUM NORMED
//
// DTYPE is f32, f16 or bf16; files hold the elements in native byte order (`group_norm_nhwc`:
// X and OUT channels-last, `[n, spatial, c]`). Prints the plan it launched, e.g.
// `vec parts=4 apply_parts=2`.

#include "cuda_on_cpu.h"

#include "../kernels.cu"
#include "../launch.h"

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <stdexcept>
#include <string>

namespace {

#define DARKROOM_ENTRY(KERNEL) {#KERNEL, reinterpret_cast<void*>(&KERNEL)}
#define DARKROOM_ENTRIES(NAME, SUFFIX)                         \
  DARKROOM_ENTRY(darkroom_group_norm_moments_##NAME##SUFFIX),  \
      DARKROOM_ENTRY(darkroom_group_norm_apply_##NAME##SUFFIX), \
      DARKROOM_ENTRY(darkroom_geglu_##NAME##SUFFIX),            \
      DARKROOM_ENTRY(darkroom_add_layer_norm_##NAME##SUFFIX)
#define DARKROOM_NHWC_ENTRIES(NAME, V)                             \
  DARKROOM_ENTRY(darkroom_group_norm_moments_nhwc_##NAME##_v##V), \
      DARKROOM_ENTRY(darkroom_group_norm_apply_nhwc_##NAME##_v##V)

// Every kernel of kernels.cu by name, as cudaLibraryGetKernel finds them.
const std::map<std::string, void*> kKernels = {
    DARKROOM_ENTRIES(f32, _vec),     DARKROOM_ENTRIES(f32, _scalar),
    DARKROOM_ENTRIES(f16, _vec),     DARKROOM_ENTRIES(f16, _scalar),
    DARKROOM_ENTRIES(bf16, _vec),    DARKROOM_ENTRIES(bf16, _scalar),
    DARKROOM_NHWC_ENTRIES(f32, 4),   DARKROOM_NHWC_ENTRIES(f32, 2),
    DARKROOM_NHWC_ENTRIES(f32, 1),   DARKROOM_NHWC_ENTRIES(f16, 8),
    DARKROOM_NHWC_ENTRIES(f16, 4),   DARKROOM_NHWC_ENTRIES(f16, 2),
    DARKROOM_NHWC_ENTRIES(f16, 1),   DARKROOM_NHWC_ENTRIES(bf16, 8),
    DARKROOM_NHWC_ENTRIES(bf16, 4),  DARKROOM_NHWC_ENTRIES(bf16, 2),
    DARKROOM_NHWC_ENTRIES(bf16, 1),
};

template <class F>
F kernel(const std::string& name) {
  const auto found = kKernels.find(name);
  if (found == kKernels.end()) throw std::runtime_error("no kernel " + name);
  return reinterpret_cast<F>(found->second);
}

// A file's bytes in 16-byte-aligned storage (the vector kernels' requirement).
struct Buffer {
  std::vector<uint4> words;
  size_t bytes = 0;
  void* data() { return words.data(); }
};

Buffer zeros(size_t bytes) {
  Buffer buffer;
  buffer.words.resize((bytes + 15) / 16);
  buffer.bytes = bytes;
  return buffer;
}

Buffer read(const std::string& path, size_t expected) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  if (bytes.size() != expected) {
    throw std::runtime_error(path + ": " + std::to_string(bytes.size()) + " bytes, expected " +
                             std::to_string(expected));
  }
  Buffer buffer = zeros(bytes.size());
  std::memcpy(buffer.data(), bytes.data(), bytes.size());
  return buffer;
}

void write(const std::string& path, Buffer& buffer) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(buffer.data()), static_cast<std::streamsize>(buffer.bytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

template <class S>
using Moments = void (*)(const S*, const S*, float*, i64, int, int);
template <class S>
using Apply = void (*)(const S*, const S*, const S*, const S*, const float*, S*, i64, int, int,
                       int, float, int);
template <class S>
using Geglu = void (*)(const S*, S*, i64, i64);
template <class S>
using AddLayerNorm = void (*)(const S*, const S*, const S*, const S*, S*, S*, i64, int, float);

template <class S>
void group_norm(char** argv, const std::string& dtype, bool nhwc) {
  const int64_t size = sizeof(S);
  const int64_t samples = std::stoll(argv[3]), channels = std::stoll(argv[4]);
  const int64_t groups = std::stoll(argv[5]), spatial = std::stoll(argv[6]);
  const float eps = std::stof(argv[7]);
  const int silu = std::stoi(argv[8]);
  const int64_t multiprocessors = std::stoll(argv[9]);
  const size_t bytes = static_cast<size_t>(samples * channels * spatial * size);
  Buffer x = read(argv[10], bytes);
  const bool shifted = std::string(argv[11]) != "-";
  Buffer shift = shifted ? read(argv[11], samples * channels * size) : zeros(0);
  Buffer weight = read(argv[12], channels * size);
  Buffer bias = read(argv[13], channels * size);
  Buffer y = zeros(bytes);
  const S* shift_ptr = shifted ? static_cast<const S*>(shift.data()) : nullptr;

  std::string names, plan_text;
  int64_t grid_y, parts, apply_parts, threads;
  if (nhwc) {
    const auto plan = darkroom::plan_group_norm_nhwc(samples, channels, groups, spatial, size,
                                                     true, multiprocessors);
    if (!plan.supported) throw std::runtime_error("rows too wide for the channels-last kernels");
    names = "nhwc_" + dtype + "_v" + std::to_string(plan.width);
    grid_y = samples, parts = plan.parts, apply_parts = plan.apply_parts, threads = plan.threads;
    plan_text = "v" + std::to_string(plan.width) + " threads=" + std::to_string(threads);
  } else {
    const auto plan = darkroom::plan_group_norm(samples, channels, groups, spatial, size, true,
                                                multiprocessors);
    names = dtype + (plan.vectorized ? "_vec" : "_scalar");
    grid_y = plan.slabs, parts = plan.parts, apply_parts = plan.apply_parts;
    threads = darkroom::kThreads;
    plan_text = plan.vectorized ? "vec" : "scalar";
  }
  std::vector<float> partial(static_cast<size_t>(samples * groups * parts * 3));
  emulated::launch(kernel<Moments<S>>("darkroom_group_norm_moments_" + names), parts, grid_y,
                   threads, static_cast<const S*>(x.data()), shift_ptr, partial.data(), spatial,
                   static_cast<int>(channels), static_cast<int>(groups));
  emulated::launch(kernel<Apply<S>>("darkroom_group_norm_apply_" + names), apply_parts, grid_y,
                   threads, static_cast<const S*>(x.data()), shift_ptr,
                   static_cast<const S*>(weight.data()), static_cast<const S*>(bias.data()),
                   static_cast<const float*>(partial.data()), static_cast<S*>(y.data()), spatial,
                   static_cast<int>(channels), static_cast<int>(groups),
                   static_cast<int>(parts), eps, silu);
  write(argv[14], y);
  std::printf("%s parts=%lld apply_parts=%lld\n", plan_text.c_str(),
              static_cast<long long>(parts), static_cast<long long>(apply_parts));
}

template <class S>
void geglu(char** argv, const std::string& dtype) {
  const int64_t size = sizeof(S);
  const int64_t rows = std::stoll(argv[3]), inner = std::stoll(argv[4]);
  const auto plan = darkroom::plan_geglu(rows, inner, size, true, std::stoll(argv[5]));
  Buffer in = read(argv[6], rows * 2 * inner * size);
  Buffer out = zeros(rows * inner * size);
  const std::string name = "darkroom_geglu_" + dtype + (plan.vectorized ? "_vec" : "_scalar");
  emulated::launch(kernel<Geglu<S>>(name), plan.blocks, 1, darkroom::kThreads,
                   static_cast<const S*>(in.data()), static_cast<S*>(out.data()), rows, inner);
  write(argv[7], out);
  std::printf("%s blocks=%lld\n", plan.vectorized ? "vec" : "scalar",
              static_cast<long long>(plan.blocks));
}

template <class S>
void add_layer_norm(char** argv, const std::string& dtype) {
  const int64_t size = sizeof(S);
  const int64_t rows = std::stoll(argv[3]), width = std::stoll(argv[4]);
  const float eps = std::stof(argv[5]);
  const auto plan = darkroom::plan_add_layer_norm(rows, width, size, true);
  const size_t bytes = static_cast<size_t>(rows * width * size);
  Buffer a = read(argv[6], bytes), b = read(argv[7], bytes);
  Buffer weight = read(argv[8], width * size), bias = read(argv[9], width * size);
  Buffer sum = zeros(bytes), normed = zeros(bytes);
  const std::string name =
      "darkroom_add_layer_norm_" + dtype + (plan.vectorized ? "_vec" : "_scalar");
  emulated::launch(kernel<AddLayerNorm<S>>(name), plan.blocks, 1, darkroom::kThreads,
                   static_cast<const S*>(a.data()), static_cast<const S*>(b.data()),
                   static_cast<const S*>(weight.data()), static_cast<const S*>(bias.data()),
                   static_cast<S*>(sum.data()), static_cast<S*>(normed.data()), rows,
                   static_cast<int>(width), eps);
  write(argv[10], sum);
  write(argv[11], normed);
  std::printf("%s blocks=%lld\n", plan.vectorized ? "vec" : "scalar",
              static_cast<long long>(plan.blocks));
}

template <class S>
void run(char** argv, const std::string& op, const std::string& dtype) {
  if (op == "add_layer_norm") {
    add_layer_norm<S>(argv, dtype);
  } else if (op == "geglu") {
    geglu<S>(argv, dtype);
  } else {
    group_norm<S>(argv, dtype, op == "group_norm_nhwc");
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string op = argc > 2 ? argv[1] : "";
    const bool norm = op == "group_norm" || op == "group_norm_nhwc";
    if (!((norm && argc == 15) || (op == "geglu" && argc == 8) ||
          (op == "add_layer_norm" && argc == 12))) {
      std::fprintf(stderr, "usage: see the top of run_kernels.cpp\n");
      return 2;
    }
    const std::string dtype = argv[2];
    if (dtype == "f32") {
      run<float>(argv, op, dtype);
    } else if (dtype == "f16" || dtype == "bf16") {
      run<bits16>(argv, op, dtype);
    } else {
      throw std::runtime_error("dtype " + dtype + ": expected f32, f16 or bf16");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "run_kernels: %s\n", e.what());
    return 1;
  }
}
