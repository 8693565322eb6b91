// What every part of the shim shares at link time: freeing the error messages of shim.h.
// Built by build.rs on every build (the profiler needs it; the CUDA parts with the `cuda` feature).

#include "shim.h"

extern "C" {

void darkroom_free_error(char* error) { free(error); }

}  // extern "C"
