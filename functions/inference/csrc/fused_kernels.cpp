// The fused kernels of csrc/kernels.cu: compiled by NVRTC for the device's architecture on first
// use, loaded with the CUDA runtime's library API, and launched on libtorch's current stream, so
// CUDA graphs record them like libtorch's own kernels. Tensors come from Rust as tch's handles
// (`at::Tensor*`); results go back as new heap tensors that tch takes ownership of.
// See src/kernels.rs for the Rust side and the conditions under which these are used.

#include "launch.h"
#include "shim.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nvrtc.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

using darkroom::guarded;
using darkroom::kThreads;

void check_cuda(cudaError_t rc, const char* what) {
  TORCH_CHECK(rc == cudaSuccess, what, ": ", cudaGetErrorString(rc));
}

void check_nvrtc(nvrtcResult rc, const char* what) {
  TORCH_CHECK(rc == NVRTC_SUCCESS, what, ": ", nvrtcGetErrorString(rc));
}

int attribute(cudaDeviceAttr which, int device) {
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, which, device), "cudaDeviceGetAttribute");
  return value;
}

// The kernels compiled for one compute capability, and what launches need of each device.
struct Library {
  cudaLibrary_t library = nullptr;
  std::map<std::string, cudaKernel_t> kernels;
};

std::mutex mutex;
std::map<int, Library> libraries;        // by compute capability (major × 10 + minor)
std::map<int, int> capability_of;       // device → compute capability
std::map<int, int> multiprocessors_of;  // device → streaming multiprocessors

// The options scripts/compile_kernels.py checks the source with (keep in step).
std::vector<char> compile(const char* source, int capability) {
  nvrtcProgram program;
  check_nvrtc(nvrtcCreateProgram(&program, source, "kernels.cu", 0, nullptr, nullptr),
              "nvrtcCreateProgram");
  const std::string arch = "--gpu-architecture=sm_" + std::to_string(capability);
  const char* options[] = {"--std=c++17", arch.c_str()};
  const nvrtcResult compiled = nvrtcCompileProgram(program, 2, options);
  size_t size = 0;
  std::string log;
  if (nvrtcGetProgramLogSize(program, &size) == NVRTC_SUCCESS && size > 1) {
    log.resize(size);
    nvrtcGetProgramLog(program, log.data());
  }
  std::vector<char> cubin;
  if (compiled == NVRTC_SUCCESS && nvrtcGetCUBINSize(program, &size) == NVRTC_SUCCESS) {
    cubin.resize(size);
    if (nvrtcGetCUBIN(program, cubin.data()) != NVRTC_SUCCESS) cubin.clear();
  }
  nvrtcDestroyProgram(&program);
  TORCH_CHECK(compiled == NVRTC_SUCCESS, "NVRTC cannot compile the fused kernels for sm_",
              capability, " (", nvrtcGetErrorString(compiled), "):\n", log);
  TORCH_CHECK(!cubin.empty(), "NVRTC gave no binary for sm_", capability);
  return cubin;
}

// Compiles and loads the kernels for `device`'s architecture unless already loaded.
void load(int device, const char* source) {
  std::lock_guard<std::mutex> lock(mutex);
  if (capability_of.count(device) == 0) {
    capability_of[device] = attribute(cudaDevAttrComputeCapabilityMajor, device) * 10 +
                            attribute(cudaDevAttrComputeCapabilityMinor, device);
    multiprocessors_of[device] = attribute(cudaDevAttrMultiProcessorCount, device);
  }
  const int capability = capability_of[device];
  if (libraries.count(capability) != 0) return;
  const std::vector<char> cubin = compile(source, capability);
  Library library;
  check_cuda(cudaLibraryLoadData(&library.library, cubin.data(), nullptr, nullptr, 0, nullptr,
                                 nullptr, 0),
             "cudaLibraryLoadData");
  libraries.emplace(capability, std::move(library));
}

// `device`'s compute capability; fails unless the kernels were loaded for it. Under `mutex`.
int loaded_capability(int device) {
  const auto capability = capability_of.find(device);
  TORCH_CHECK(capability != capability_of.end(),
              "the fused kernels are not loaded for cuda:", device);
  return capability->second;
}

int64_t multiprocessors(int device) {
  std::lock_guard<std::mutex> lock(mutex);
  loaded_capability(device);
  return multiprocessors_of.at(device);
}

// The kernel `name` for `device`.
cudaKernel_t kernel(int device, const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex);
  Library& library = libraries.at(loaded_capability(device));
  auto found = library.kernels.find(name);
  if (found == library.kernels.end()) {
    cudaKernel_t handle = nullptr;
    check_cuda(cudaLibraryGetKernel(&handle, library.library, name.c_str()),
               "cudaLibraryGetKernel");
    found = library.kernels.emplace(name, handle).first;
  }
  return found->second;
}

const char* type_suffix(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return "f32";
    case at::kHalf:
      return "f16";
    case at::kBFloat16:
      return "bf16";
    default:
      TORCH_CHECK(false, "fused kernels take f32, f16 or bf16 tensors, not ", t.scalar_type());
  }
}

bool aligned(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(), name,
              " must be on the input's device with its dtype");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void launch(cudaKernel_t kernel, dim3 grid, void** args, int64_t threads) {
  check_cuda(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid,
                              dim3(static_cast<unsigned>(threads)),
                              args, 0, c10::cuda::getCurrentCUDAStream().stream()),
             "cudaLaunchKernel");
}

// The grids and kernels of one GroupNorm: the statistics pass, then the normalising pass.
struct GroupNormLaunch {
  cudaKernel_t moments, apply;
  int64_t parts, apply_parts, grid_y, threads;
};

// Launches `plan`'s two kernels (the contiguous and channels-last ones take the same arguments).
void launch_group_norm(const GroupNormLaunch& plan, const at::Tensor& x, const at::Tensor* shift,
                       const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                       double eps, bool silu, at::Tensor& y) {
  const int64_t samples = x.size(0);
  at::Tensor partial =
      at::empty({samples * groups * plan.parts * 3}, x.options().dtype(at::kFloat));
  const void* x_ptr = x.data_ptr();
  const void* shift_ptr = shift != nullptr ? shift->data_ptr() : nullptr;
  const void* weight_ptr = weight.data_ptr();
  const void* bias_ptr = bias.data_ptr();
  void* partial_ptr = partial.data_ptr();
  void* y_ptr = y.data_ptr();
  int64_t spatial_arg = x.numel() / (samples * x.size(1));
  int channels_arg = static_cast<int>(x.size(1));
  int groups_arg = static_cast<int>(groups);
  int parts_arg = static_cast<int>(plan.parts);
  float eps_arg = static_cast<float>(eps);
  int silu_arg = silu ? 1 : 0;
  void* moments_args[] = {&x_ptr, &shift_ptr, &partial_ptr, &spatial_arg, &channels_arg,
                          &groups_arg};
  const auto grid_y = static_cast<unsigned>(plan.grid_y);
  launch(plan.moments, dim3(static_cast<unsigned>(plan.parts), grid_y), moments_args,
         plan.threads);
  void* apply_args[] = {&x_ptr,       &shift_ptr, &weight_ptr,  &bias_ptr,
                        &partial_ptr, &y_ptr,     &spatial_arg, &channels_arg,
                        &groups_arg,  &parts_arg, &eps_arg,     &silu_arg};
  launch(plan.apply, dim3(static_cast<unsigned>(plan.apply_parts), grid_y), apply_args,
         plan.threads);
}

// The channels-last kernels for a channels-last `x`, or nothing when its rows are too wide.
bool group_norm_nhwc(const at::Tensor& x, const at::Tensor* shift, const at::Tensor& weight,
                     const at::Tensor& bias, int64_t groups, double eps, bool silu,
                     at::Tensor& y) {
  const int64_t samples = x.size(0);
  const int device = x.get_device();
  const darkroom::GroupNormNhwcPlan plan = darkroom::plan_group_norm_nhwc(
      samples, x.size(1), groups, x.size(2) * x.size(3), x.element_size(),
      aligned(x) && aligned(y), multiprocessors(device));
  if (!plan.supported) return false;
  const std::string suffix = std::string(type_suffix(x)) + "_v" + std::to_string(plan.width);
  const GroupNormLaunch launch_plan = {
      kernel(device, "darkroom_group_norm_moments_nhwc_" + suffix),
      kernel(device, "darkroom_group_norm_apply_nhwc_" + suffix),
      plan.parts, plan.apply_parts, samples, plan.threads};
  launch_group_norm(launch_plan, x, shift, weight, bias, groups, eps, silu, y);
  return true;
}

at::Tensor group_norm(const at::Tensor& x, const at::Tensor* shift, const at::Tensor& weight,
                      const at::Tensor& bias, int64_t groups, double eps, bool silu) {
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() &&
                             x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_cuda() && (x.is_contiguous() || channels_last) && x.dim() >= 2,
              "group norm: the input must be a contiguous or channels-last CUDA tensor "
              "[n, c, ...]");
  const int64_t samples = x.size(0);
  const int64_t channels = x.size(1);
  TORCH_CHECK(groups > 0 && channels % groups == 0, "group norm: ", channels,
              " channels do not split into ", groups, " groups");
  check_like(weight, x, "group norm weight");
  check_like(bias, x, "group norm bias");
  TORCH_CHECK(weight.numel() == channels && bias.numel() == channels,
              "group norm: weight and bias must have one value per channel");
  if (shift != nullptr) {
    check_like(*shift, x, "group norm shift");
    TORCH_CHECK(shift->dim() == 2 && shift->size(0) == samples && shift->size(1) == channels,
                "group norm: the shift must be [n, c]");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  if (channels_last) {
    at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (x.numel() == 0 || group_norm_nhwc(x, shift, weight, bias, groups, eps, silu, y)) {
      return y;
    }
    return group_norm(x.contiguous(), shift, weight, bias, groups, eps, silu);
  }
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const int64_t spatial = x.numel() / (samples * channels);
  TORCH_CHECK(samples * groups <= 65535, "group norm: at most 65535 (sample, group) pairs");
  const bool all_aligned = aligned(x) && aligned(y) && (shift == nullptr || aligned(*shift));
  const std::string dtype = type_suffix(x);
  const int device = x.get_device();
  const darkroom::GroupNormPlan plan = darkroom::plan_group_norm(
      samples, channels, groups, spatial, x.element_size(), all_aligned, multiprocessors(device));
  const std::string suffix = dtype + (plan.vectorized ? "_vec" : "_scalar");
  const GroupNormLaunch launch_plan = {kernel(device, "darkroom_group_norm_moments_" + suffix),
                                       kernel(device, "darkroom_group_norm_apply_" + suffix),
                                       plan.parts, plan.apply_parts, plan.slabs, kThreads};
  launch_group_norm(launch_plan, x, shift, weight, bias, groups, eps, silu, y);
  return y;
}

at::Tensor geglu(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda() && input.is_contiguous() && input.dim() >= 1 &&
                  input.size(-1) % 2 == 0,
              "geglu: the input must be a contiguous CUDA tensor [..., 2 × inner]");
  const c10::cuda::CUDAGuard guard(input.device());
  std::vector<int64_t> sizes = input.sizes().vec();
  const int64_t inner = sizes.back() / 2;
  sizes.back() = inner;
  at::Tensor out = at::empty(sizes, input.options());
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / inner;
  const std::string dtype = type_suffix(input);
  const int device = input.get_device();
  const darkroom::GegluPlan plan = darkroom::plan_geglu(
      rows, inner, input.element_size(), aligned(input) && aligned(out), multiprocessors(device));
  const auto geglu =
      kernel(device, "darkroom_geglu_" + dtype + (plan.vectorized ? "_vec" : "_scalar"));
  const int64_t blocks = plan.blocks;
  const void* in_ptr = input.data_ptr();
  void* out_ptr = out.data_ptr();
  int64_t rows_arg = rows;
  int64_t inner_arg = inner;
  void* args[] = {&in_ptr, &out_ptr, &rows_arg, &inner_arg};
  launch(geglu, dim3(static_cast<unsigned>(blocks)), args, kThreads);
  return out;
}

// `(a + b, layer_norm(a + b))` over the last dimension of two like tensors.
std::pair<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& a, const at::Tensor& b,
                                                 const at::Tensor& weight, const at::Tensor& bias,
                                                 double eps) {
  TORCH_CHECK(a.is_cuda() && a.is_contiguous() && a.dim() >= 1,
              "add layer norm: the inputs must be contiguous CUDA tensors");
  check_like(b, a, "add layer norm: the second input");
  TORCH_CHECK(b.sizes() == a.sizes(), "add layer norm: the inputs' shapes differ");
  check_like(weight, a, "layer norm weight");
  check_like(bias, a, "layer norm bias");
  const int64_t width = a.size(-1);
  TORCH_CHECK(weight.numel() == width && bias.numel() == width,
              "add layer norm: weight and bias must have one value per column");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor sum = at::empty(a.sizes(), a.options());
  at::Tensor normed = at::empty(a.sizes(), a.options());
  if (a.numel() == 0) return {sum, normed};
  const int64_t rows = a.numel() / width;
  const bool all_aligned = aligned(a) && aligned(b) && aligned(weight) && aligned(bias) &&
                           aligned(sum) && aligned(normed);
  const darkroom::AddLayerNormPlan plan =
      darkroom::plan_add_layer_norm(rows, width, a.element_size(), all_aligned);
  const cudaKernel_t add_norm =
      kernel(a.get_device(), std::string("darkroom_add_layer_norm_") + type_suffix(a) +
                                 (plan.vectorized ? "_vec" : "_scalar"));
  const void* a_ptr = a.data_ptr();
  const void* b_ptr = b.data_ptr();
  const void* weight_ptr = weight.data_ptr();
  const void* bias_ptr = bias.data_ptr();
  void* sum_ptr = sum.data_ptr();
  void* normed_ptr = normed.data_ptr();
  int64_t rows_arg = rows;
  TORCH_CHECK(width <= (int64_t{1} << 30), "add layer norm: rows too wide");
  int width_arg = static_cast<int>(width);
  float eps_arg = static_cast<float>(eps);
  void* args[] = {&a_ptr,   &b_ptr,      &weight_ptr, &bias_ptr, &sum_ptr,
                  &normed_ptr, &rows_arg, &width_arg,  &eps_arg};
  launch(add_norm, dim3(static_cast<unsigned>(plan.blocks)), args, kThreads);
  return {sum, normed};
}

}  // namespace

extern "C" {

// Compiles (NVRTC) and loads the kernels of `source` for cuda:`device`'s architecture, once per
// architecture; later calls return at once.
void darkroom_kernels_load(int32_t device, const char* source, char** error) {
  guarded(error, [&] { load(device, source); });
}

// GroupNorm of `x` [n, c, ...] (plus `shift` [n, c] per channel when not null), then SiLU when
// `silu`; returns a new tensor in `x`'s layout (contiguous or channels-last), or null with
// `*error` set.
void* darkroom_group_norm(const void* x, const void* shift, const void* weight, const void* bias,
                          int64_t groups, double eps, bool silu, char** error) {
  at::Tensor* result = nullptr;
  guarded(error, [&] {
    result = new at::Tensor(group_norm(
        *static_cast<const at::Tensor*>(x), static_cast<const at::Tensor*>(shift),
        *static_cast<const at::Tensor*>(weight), *static_cast<const at::Tensor*>(bias), groups,
        eps, silu));
  });
  return result;
}

// GEGLU of `input` [..., 2 × inner] → [..., inner]; a new tensor, or null with `*error` set.
void* darkroom_geglu(const void* input, char** error) {
  at::Tensor* result = nullptr;
  guarded(error, [&] { result = new at::Tensor(geglu(*static_cast<const at::Tensor*>(input))); });
  return result;
}

// `a + b` into `*sum` and LayerNorm of it (last dimension) into `*normed`, both new tensors;
// false with `*error` set on failure.
bool darkroom_add_layer_norm(const void* a, const void* b, const void* weight, const void* bias,
                             double eps, void** sum, void** normed, char** error) {
  return guarded(error, [&] {
    auto [s, n] = add_layer_norm(
        *static_cast<const at::Tensor*>(a), *static_cast<const at::Tensor*>(b),
        *static_cast<const at::Tensor*>(weight), *static_cast<const at::Tensor*>(bias), eps);
    *sum = new at::Tensor(std::move(s));
    *normed = new at::Tensor(std::move(n));
  });
}

}  // extern "C"
