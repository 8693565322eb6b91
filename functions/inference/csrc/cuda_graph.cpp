// CUDA graphs and caching-allocator statistics for Darkroom, over libtorch's C++ API (tch binds
// neither). Built by build.rs with the `cuda` feature only; see src/cuda.rs for the Rust side.
//
// Every function catches C++ exceptions and reports them through `*error` (shim.h).

#include "shim.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

namespace {

using darkroom::guarded;

// A graph with the side stream it is captured on (capture cannot run on the default stream).
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream stream;
  c10::cuda::CUDAStream caller;
  std::optional<c10::cuda::CUDAStreamGuard> guard;

  explicit Graph(c10::DeviceIndex device)
      : graph(),
        stream(c10::cuda::getStreamFromPool(false, device)),
        caller(c10::cuda::getCurrentCUDAStream(device)) {}
};

// `a` waits for the work queued on `b` so far.
void wait_for(const c10::cuda::CUDAStream& a, const c10::cuda::CUDAStream& b) {
  cudaEvent_t event;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, b.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(a.stream(), event, 0));
  C10_CUDA_CHECK(cudaEventDestroy(event));
}

}  // namespace

extern "C" {

void* darkroom_graph_new(int32_t device, char** error) {
  Graph* graph = nullptr;
  guarded(error, [&] { graph = new Graph(static_cast<c10::DeviceIndex>(device)); });
  return graph;
}

void darkroom_graph_free(void* graph) { delete static_cast<Graph*>(graph); }

// Makes the graph's side stream current on this thread, after the work queued so far.
void darkroom_graph_enter_stream(void* raw, char** error) {
  guarded(error, [&] {
    auto* graph = static_cast<Graph*>(raw);
    graph->caller = c10::cuda::getCurrentCUDAStream(graph->stream.device_index());
    wait_for(graph->stream, graph->caller);
    graph->guard.emplace(graph->stream);
  });
}

// Restores the caller's stream, which then waits for the side stream's work.
void darkroom_graph_exit_stream(void* raw, char** error) {
  guarded(error, [&] {
    auto* graph = static_cast<Graph*>(raw);
    graph->guard.reset();
    wait_for(graph->caller, graph->stream);
  });
}

// Starts capturing this thread's work on the side stream (thread-local capture mode, so other
// threads may keep using CUDA). `pool_*` = 0, 0: a new private memory pool; else another graph's.
void darkroom_graph_capture_begin(void* raw, uint64_t pool_a, uint64_t pool_b, char** error) {
  guarded(error, [&] {
    auto* graph = static_cast<Graph*>(raw);
    graph->graph.capture_begin({pool_a, pool_b}, cudaStreamCaptureModeThreadLocal);
  });
}

void darkroom_graph_capture_end(void* raw, char** error) {
  guarded(error, [&] { static_cast<Graph*>(raw)->graph.capture_end(); });
}

void darkroom_graph_pool(void* raw, uint64_t* pool_a, uint64_t* pool_b, char** error) {
  guarded(error, [&] {
    auto pool = static_cast<Graph*>(raw)->graph.pool();
    *pool_a = pool.first;
    *pool_b = pool.second;
  });
}

// Launches the captured work on the current stream.
void darkroom_graph_replay(void* raw, char** error) {
  guarded(error, [&] { static_cast<Graph*>(raw)->graph.replay(); });
}

// The caching allocator's byte counts for `device`: in use now and at peak, reserved now and at
// peak (what nvidia-smi sees, less the CUDA context).
void darkroom_cuda_memory(int32_t device, uint64_t* out, char** error) {
  guarded(error, [&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
  });
}

void darkroom_cuda_reset_peak_memory(int32_t device, char** error) {
  guarded(error, [&] {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

// Returns the allocator's unused cached blocks to the driver.
void darkroom_cuda_empty_cache(char** error) {
  guarded(error, [&] { c10::cuda::CUDACachingAllocator::emptyCache(); });
}

// cuDNN autotuning: each convolution shape benchmarks the available algorithms once and keeps
// the fastest (libtorch's default is a heuristic pick).
void darkroom_cuda_set_cudnn_benchmark(bool enabled, char** error) {
  guarded(error, [&] { at::globalContext().setBenchmarkCuDNN(enabled); });
}

// Scaled-dot-product attention backends: `fa3` enables FlashAttention 3 (Hopper) where the
// build has it; `cudnn_first` tries cuDNN's fused attention before the flash kernels.
void darkroom_cuda_set_attention(bool fa3, bool cudnn_first, char** error) {
  guarded(error, [&] {
    auto& context = at::globalContext();
    context.setSDPUseFA3(fa3);
    if (cudnn_first) {
      context.setSDPUseCuDNN(true);
      context.setSDPPriorityOrder({static_cast<int64_t>(at::SDPBackend::cudnn_attention),
                                   static_cast<int64_t>(at::SDPBackend::flash_attention),
                                   static_cast<int64_t>(at::SDPBackend::efficient_attention),
                                   static_cast<int64_t>(at::SDPBackend::math)});
    }
  });
}

}  // extern "C"
