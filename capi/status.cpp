// Status strings, last-error access, versions: the part of the C API every other part relies on.
#include <cstring>

#include "src/common/error.hpp"
#include "moekit/status.h"

extern "C" {

MOEKIT_API const char* moekit_status_string(moekit_status_t status) {
  switch (status) {
    case MOEKIT_STATUS_SUCCESS: return "success";
    case MOEKIT_STATUS_INVALID_ARGUMENT: return "invalid argument";
    case MOEKIT_STATUS_UNSUPPORTED: return "unsupported configuration";
    case MOEKIT_STATUS_WORKSPACE_TOO_SMALL: return "workspace too small";
    case MOEKIT_STATUS_MISALIGNED: return "misaligned pointer";
    case MOEKIT_STATUS_CUDA_ERROR: return "CUDA error";
    case MOEKIT_STATUS_CUBLAS_ERROR: return "cuBLAS error";
    case MOEKIT_STATUS_NCCL_ERROR: return "NCCL error";
    case MOEKIT_STATUS_NOT_AVAILABLE: return "not available in this build or on this device";
    case MOEKIT_STATUS_OUT_OF_MEMORY: return "host out of memory";
    case MOEKIT_STATUS_INTERNAL_ERROR: return "internal error";
  }
  return "unknown moekit status";
}

MOEKIT_API const char* moekit_get_last_error(void) { return moekit::last_error(); }

MOEKIT_API size_t moekit_copy_last_error(char* buffer, size_t buffer_size) {
  const char* message = moekit::last_error();
  const size_t length = std::strlen(message);
  if (buffer != nullptr && buffer_size > 0) {
    const size_t n = length < buffer_size - 1 ? length : buffer_size - 1;
    std::memcpy(buffer, message, n);
    buffer[n] = '\0';
  }
  return length;
}

MOEKIT_API void moekit_clear_last_error(void) { moekit::clear_last_error(); }

MOEKIT_API int32_t moekit_get_version(void) { return MOEKIT_VERSION; }

MOEKIT_API size_t moekit_dtype_size(moekit_dtype_t dtype) {
  switch (dtype) {
    case MOEKIT_DTYPE_F32: return 4;
    case MOEKIT_DTYPE_F16: return 2;
    case MOEKIT_DTYPE_BF16: return 2;
  }
  return 0;
}

}  // extern "C"
