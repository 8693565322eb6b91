// libtorch's profiler (Kineto) for Darkroom, which tch does not bind: what operations a stretch
// of code dispatched on the CPU and, with CUDA, which kernels ran on the GPU and for how long.
// Built by build.rs on every build; see src/profile.rs for the Rust side.
//
// darkroom_profiler_stop hands the events back as text, one per line:
//   kind \t thread \t start_ns \t duration_ns \t name
// kind: op (an ATen operation on the CPU), kernel, memcpy or memset (on the GPU). Other Kineto
// activities (CUDA runtime calls, annotations) are left out. Names are last: kernel names are
// C++ signatures with spaces and commas; newlines and tabs in them become spaces.

#include "shim.h"

#include <kineto/ActivityType.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdint>
#include <set>
#include <sstream>
#include <string>

namespace {

using darkroom::guarded;
namespace profiler = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

const char* kind_of(const profiler::KinetoEvent& event) {
  switch (static_cast<libkineto::ActivityType>(event.activityType())) {
    case libkineto::ActivityType::CPU_OP:
      return "op";
    case libkineto::ActivityType::CONCURRENT_KERNEL:
      return "kernel";
    case libkineto::ActivityType::GPU_MEMCPY:
      return "memcpy";
    case libkineto::ActivityType::GPU_MEMSET:
      return "memset";
    default:
      return nullptr;
  }
}

std::string one_line(std::string name) {
  for (char& c : name) {
    if (c == '\n' || c == '\r' || c == '\t') {
      c = ' ';
    }
  }
  return name;
}

}  // namespace

extern "C" {

// Starts profiling this process: CPU operations, and GPU activity when `cuda` is set.
void darkroom_profiler_start(bool cuda, char** error) {
  guarded(error, [&] {
    impl::ProfilerConfig config(impl::ProfilerState::KINETO);
    std::set<impl::ActivityType> activities{impl::ActivityType::CPU};
    if (cuda) {
      activities.insert(impl::ActivityType::CUDA);
    }
    profiler::prepareProfiler(config, activities);
    profiler::enableProfiler(config, activities);
  });
}

// Stops profiling; returns the events (see above), malloc'ed, freed with darkroom_free_error.
char* darkroom_profiler_stop(char** error) {
  char* text = nullptr;
  guarded(error, [&] {
    auto result = profiler::disableProfiler();
    std::ostringstream out;
    for (const auto& event : result->events()) {
      const char* kind = kind_of(event);
      if (kind == nullptr) {
        continue;
      }
      out << kind << '\t' << event.startThreadId() << '\t' << event.startNs() << '\t'
          << event.durationNs() << '\t' << one_line(event.name()) << '\n';
    }
    text = strdup(out.str().c_str());
  });
  return text;
}

}  // extern "C"
