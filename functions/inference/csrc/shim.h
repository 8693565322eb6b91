// What the shim's C++ files share: errors reported to Rust as a malloc'ed message in `*error`
// (freed with darkroom_free_error); a null `*error` means success.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>

namespace darkroom {

inline void set_error(char** error, const char* message) {
  if (error != nullptr) {
    *error = strdup(message);
  }
}

// Runs `f`, turning any C++ exception into `*error`; returns whether `f` succeeded.
template <typename F>
bool guarded(char** error, F&& f) {
  if (error != nullptr) {
    *error = nullptr;
  }
  try {
    f();
    return true;
  } catch (const std::exception& e) {
    set_error(error, e.what());
  } catch (...) {
    set_error(error, "unknown C++ exception");
  }
  return false;
}

}  // namespace darkroom
