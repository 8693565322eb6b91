// Runs one fused kernel of kernels.cu on the CPU (cuda_on_cpu.h) with the launch geometry the
// CUDA host code uses (launch.h), on raw tensors in files: how tests/kernels.rs checks the
// kernels against libtorch on machines without a GPU.
//
//   run_kernels group_norm DTYPE SAMPLES CHANNELS GROUPS SPATIAL EPS SILU MULTIPROCESSORS
//       X SHIFT|- WEIGHT BIAS OUT
//   run_kernels geglu DTYPE ROWS INNER MULTIPROCESSORS IN OUT
//
// DTYPE is f32, f16 or bf16; files hold the elements in native byte order. Prints the plan it
// launched, e.g. `vec parts=4 apply_parts=2`.

#include "cuda_on_cpu.h"

#include "../kernels.cu"
#include "../launch.h"

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

namespace {

// A file's bytes in 16-byte-aligned storage (the vector kernels' requirement).
struct Buffer {
  std::vector<uint4> words;
  size_t bytes = 0;
  void* data() { return words.data(); }
};

Buffer read(const std::string& path, size_t expected) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  if (bytes.size() != expected) {
    throw std::runtime_error(path + ": " + std::to_string(bytes.size()) + " bytes, expected " +
                             std::to_string(expected));
  }
  Buffer buffer;
  buffer.words.resize((bytes.size() + 15) / 16);
  buffer.bytes = bytes.size();
  std::memcpy(buffer.data(), bytes.data(), bytes.size());
  return buffer;
}

Buffer zeros(size_t bytes) {
  Buffer buffer;
  buffer.words.resize((bytes + 15) / 16);
  buffer.bytes = bytes;
  return buffer;
}

void write(const std::string& path, Buffer& buffer) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(buffer.data()), static_cast<std::streamsize>(buffer.bytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

int64_t element_size(const std::string& dtype) {
  if (dtype == "f32") return 4;
  if (dtype == "f16" || dtype == "bf16") return 2;
  throw std::runtime_error("dtype " + dtype + ": expected f32, f16 or bf16");
}

// The kernels of one dtype and width, by name as the host code asks for them.
template <class S>
struct GroupNormKernels {
  void (*moments)(const S*, const S*, float*, i64, int, int);
  void (*apply)(const S*, const S*, const S*, const S*, const float*, S*, i64, int, int, int,
                float, int);
};

template <class S>
struct GegluKernel {
  void (*geglu)(const S*, S*, i64, i64);
};

#define DARKROOM_PICK(NAME, WIDTH)                                                   \
  std::make_pair(GroupNormKernels<decltype(pick_storage_##NAME)>{                    \
                     darkroom_group_norm_moments_##NAME##_##WIDTH,                   \
                     darkroom_group_norm_apply_##NAME##_##WIDTH},                    \
                 GegluKernel<decltype(pick_storage_##NAME)>{darkroom_geglu_##NAME##_##WIDTH})

float pick_storage_f32;
bits16 pick_storage_f16;
bits16 pick_storage_bf16;

template <class S>
int run(const std::pair<GroupNormKernels<S>, GegluKernel<S>>& kernels, char** argv,
        const std::string& op, int64_t size, const std::string& plan_name) {
  using darkroom::kThreads;
  if (op == "group_norm") {
    const int64_t samples = std::stoll(argv[3]), channels = std::stoll(argv[4]);
    const int64_t groups = std::stoll(argv[5]), spatial = std::stoll(argv[6]);
    const float eps = std::stof(argv[7]);
    const int silu = std::stoi(argv[8]);
    const auto plan = darkroom::plan_group_norm(samples, channels, groups, spatial, size, true,
                                                std::stoll(argv[9]));
    const size_t bytes = static_cast<size_t>(samples * channels * spatial * size);
    Buffer x = read(argv[10], bytes);
    const bool shifted = std::string(argv[11]) != "-";
    Buffer shift = shifted ? read(argv[11], samples * channels * size) : zeros(0);
    Buffer weight = read(argv[12], channels * size);
    Buffer bias = read(argv[13], channels * size);
    Buffer y = zeros(bytes);
    std::vector<float> partial(plan.slabs * plan.parts * 3);
    const S* shift_ptr = shifted ? static_cast<const S*>(shift.data()) : nullptr;
    emulated::launch(kernels.first.moments, plan.parts, plan.slabs, kThreads,
                     static_cast<const S*>(x.data()), shift_ptr, partial.data(), spatial,
                     static_cast<int>(channels), static_cast<int>(groups));
    emulated::launch(kernels.first.apply, plan.apply_parts, plan.slabs, kThreads,
                     static_cast<const S*>(x.data()), shift_ptr,
                     static_cast<const S*>(weight.data()), static_cast<const S*>(bias.data()),
                     static_cast<const float*>(partial.data()), static_cast<S*>(y.data()),
                     spatial, static_cast<int>(channels), static_cast<int>(groups),
                     static_cast<int>(plan.parts), eps, silu);
    write(argv[14], y);
    std::printf("%s parts=%lld apply_parts=%lld\n", plan_name.c_str(),
                static_cast<long long>(plan.parts), static_cast<long long>(plan.apply_parts));
    return 0;
  }
  const int64_t rows = std::stoll(argv[3]), inner = std::stoll(argv[4]);
  const auto plan = darkroom::plan_geglu(rows, inner, size, true, std::stoll(argv[5]));
  Buffer in = read(argv[6], rows * 2 * inner * size);
  Buffer out = zeros(rows * inner * size);
  emulated::launch(kernels.second.geglu, plan.blocks, 1, kThreads,
                   static_cast<const S*>(in.data()), static_cast<S*>(out.data()), rows, inner);
  write(argv[7], out);
  std::printf("%s blocks=%lld\n", plan_name.c_str(), static_cast<long long>(plan.blocks));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string op = argc > 2 ? argv[1] : "";
    if (!((op == "group_norm" && argc == 15) || (op == "geglu" && argc == 8))) {
      std::fprintf(stderr, "usage: see the top of run_kernels.cpp\n");
      return 2;
    }
    const std::string dtype = argv[2];
    const int64_t size = element_size(dtype);
    // The vector kernels when the plan says so, exactly as the host code chooses.
    bool vectorized;
    if (op == "group_norm") {
      vectorized = darkroom::plan_group_norm(std::stoll(argv[3]), std::stoll(argv[4]),
                                             std::stoll(argv[5]), std::stoll(argv[6]), size,
                                             true, std::stoll(argv[9]))
                       .vectorized;
    } else {
      vectorized = darkroom::plan_geglu(std::stoll(argv[3]), std::stoll(argv[4]), size, true,
                                        std::stoll(argv[5]))
                       .vectorized;
    }
    const std::string plan_name = vectorized ? "vec" : "scalar";
    if (dtype == "f32") {
      return vectorized ? run(DARKROOM_PICK(f32, vec), argv, op, size, plan_name)
                        : run(DARKROOM_PICK(f32, scalar), argv, op, size, plan_name);
    }
    if (dtype == "f16") {
      return vectorized ? run(DARKROOM_PICK(f16, vec), argv, op, size, plan_name)
                        : run(DARKROOM_PICK(f16, scalar), argv, op, size, plan_name);
    }
    return vectorized ? run(DARKROOM_PICK(bf16, vec), argv, op, size, plan_name)
                      : run(DARKROOM_PICK(bf16, scalar), argv, op, size, plan_name);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "run_kernels: %s\n", e.what());
    return 1;
  }
}
