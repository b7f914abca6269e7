// Error state behind the C API: the thread-local last-error message and the name of the entry
// point currently running on this thread, so that code below the C API can report failures
// ("moekit_router_forward: launching router_topk: too many resources requested") without
// threading the function name through every call.
#pragma once

#include <cuda_runtime_api.h>

#include "moekit/status.h"

namespace moekit {

// Sets the last-error message to "<current api>: <formatted text>" and returns `status`.
// printf-style; never throws.
moekit_status_t fail(moekit_status_t status, const char* format, ...)
    __attribute__((format(printf, 2, 3)));

// Translates a CUDA error into CUDA_ERROR with its name and text; `what` says what was being done.
moekit_status_t fail_cuda(cudaError_t error, const char* what);

void clear_last_error();
const char* last_error();

// RAII: names the C entry point running on this thread (used as the message prefix) and clears
// the last error. Entry points nest (the layer calls the router), so the outermost name wins.
class ApiScope {
 public:
  explicit ApiScope(const char* api_name);
  ~ApiScope();
  ApiScope(const ApiScope&) = delete;
  ApiScope& operator=(const ApiScope&) = delete;

 private:
  const char* previous_;
};

const char* current_api();

}  // namespace moekit

// Early-return helpers for host code returning moekit_status_t.
#define MOEKIT_TRY(expr)                                         \
  do {                                                           \
    const moekit_status_t moekit_try_status_ = (expr);           \
    if (moekit_try_status_ != MOEKIT_STATUS_SUCCESS) return moekit_try_status_; \
  } while (0)

#define MOEKIT_CUDA_TRY(expr, what)                              \
  do {                                                           \
    const cudaError_t moekit_cuda_error_ = (expr);               \
    if (moekit_cuda_error_ != cudaSuccess) return ::moekit::fail_cuda(moekit_cuda_error_, what); \
  } while (0)
