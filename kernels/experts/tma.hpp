// Tensor maps for the TMA loads of the Hopper grouped GEMM, encoded on the host for every call
// (pure host work: no allocation, no synchronisation, nothing enqueued, so it runs inside a graph
// capture; the maps travel to the kernel by value as __grid_constant__ parameters).
// cuTensorMapEncodeTiled is a driver API function: it is looked up once through the runtime's
// cudaGetDriverEntryPointByVersion, so the library does not link libcuda itself. cuda.h is
// included for its types only.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

#include "kernels/experts/grouped_gemm_sm90.hpp"

namespace moekit::kernels::experts::sm90 {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled (CUDA 12.0 ABI), or nullptr when the driver lacks it.
// Looked up once per process; later calls read an atomic.
inline EncodeTiledFn encode_tiled_fn() {
  static std::atomic<EncodeTiledFn> cached{nullptr};
  static std::atomic<bool> looked_up{false};
  if (looked_up.load(std::memory_order_acquire)) return cached.load(std::memory_order_relaxed);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult query = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                          &query);
  if (err != cudaSuccess || query != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();
    fn = nullptr;
  }
  cached.store(reinterpret_cast<EncodeTiledFn>(fn), std::memory_order_relaxed);
  looked_up.store(true, std::memory_order_release);
  return reinterpret_cast<EncodeTiledFn>(fn);
}

// Encodes `spec` over the tensor at `base` (16-bit elements of `dtype`: bf16 or f16), 128-byte
// swizzle, zero fill out of bounds. cudaErrorNotSupported when the driver has no tensor maps,
// cudaErrorInvalidValue when the spec breaks a rule of tma_spec_valid or the driver refuses it.
inline cudaError_t encode_tensor_map(CUtensorMap* map, bool bf16, const TmaSpec& spec, const void* base) {
  if (!tma_spec_valid(spec) || (reinterpret_cast<uintptr_t>(base) & 15) != 0) return cudaErrorInvalidValue;
  const EncodeTiledFn fn = encode_tiled_fn();
  if (fn == nullptr) return cudaErrorNotSupported;
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  cuuint64_t dims[5], strides[4];
  cuuint32_t box[5];
  for (int i = 0; i < 5; ++i) {
    dims[i] = spec.dims[i];
    box[i] = spec.box[i];
  }
  for (int i = 0; i < 4; ++i) strides[i] = spec.strides[i];
  const CUresult r = fn(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                        static_cast<cuuint32_t>(spec.rank), const_cast<void*>(base), dims, strides, box,
                        element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace moekit::kernels::experts::sm90
