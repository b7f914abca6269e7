#include "src/common/error.hpp"

#include <cstdarg>
#include <cstdio>
#include <string>

namespace moekit {
namespace {

// One message per thread (NCCL's single process-global buffer lets threads read each other's).
thread_local std::string t_last_error;
thread_local const char* t_current_api = nullptr;

}  // namespace

moekit_status_t fail(moekit_status_t status, const char* format, ...) {
  char text[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(text, sizeof(text), format, args);
  va_end(args);
  try {
    t_last_error = t_current_api ? std::string(t_current_api) + ": " + text : std::string(text);
  } catch (...) {
    // Out of memory while reporting: keep the status, lose the message.
  }
  return status;
}

moekit_status_t fail_cuda(cudaError_t error, const char* what) {
  // Clear the sticky-free error so the next CUDA call does not see it again.
  (void)cudaGetLastError();
  return fail(MOEKIT_STATUS_CUDA_ERROR, "%s: CUDA error %s (%s)", what, cudaGetErrorName(error),
              cudaGetErrorString(error));
}

void clear_last_error() { t_last_error.clear(); }

const char* last_error() { return t_last_error.c_str(); }

const char* current_api() { return t_current_api; }

ApiScope::ApiScope(const char* api_name) : previous_(t_current_api) {
  if (previous_ == nullptr) {
    t_current_api = api_name;
    clear_last_error();
  }
}

ApiScope::~ApiScope() { t_current_api = previous_; }

}  // namespace moekit
