// Element types on the device: conversions to and from the fp32 every kernel accumulates in, and
// the runtime-dtype -> compile-time-type dispatch used by every launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moekit/status.h"

namespace moekit::kernels {

template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Round-to-nearest-even, as PyTorch's casts do.
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(T{}) with T the element type of `dtype`. Every launcher dispatches through this; an
// unknown dtype is an explicit error, never a silent no-op.
template <class F>
cudaError_t dispatch_dtype(moekit_dtype_t dtype, F&& f) {
  switch (dtype) {
    case MOEKIT_DTYPE_F32: return f(float{});
    case MOEKIT_DTYPE_F16: return f(__half{});
    case MOEKIT_DTYPE_BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::kernels
