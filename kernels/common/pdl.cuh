// Programmatic dependent launch (sm_90 and later): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization is set up while the previous kernel of its
// stream still runs, and its blocks may become resident before that kernel has finished (once every
// block of it has called pdl_launch_dependents or exited). It hides the launch of a short kernel
// behind its predecessor's tail, which for the router's few-microsecond kernels is a large part of
// their time (docs/router.md, sixth measurement).
//
// The contract, for every kernel launched through launch_programmatic with programmatic = true:
// pdl_wait() before its first global memory access, read or write. griddepcontrol.wait returns once
// the predecessor grid has completed and its writes are visible, so the kernel sees the stream
// order it would have seen without the attribute (and, the predecessor having waited on its own,
// everything before it). Without the attribute, or before sm_90, both calls do nothing.
#pragma once

#include <cuda_runtime.h>

#include "kernels/common/grid.hpp"

namespace moekit::kernels {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the stream's next kernel, if launched programmatically, be scheduled now (it still waits
// for this grid to complete in its pdl_wait).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the stream's
// previous kernel when `programmatic` (the caller decides: sm_90 or later and a created stream).
template <class... Params, class... Args>
inline cudaError_t launch_programmatic(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                       cudaStream_t stream, bool programmatic, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  const cudaError_t e = launch_with_attribute(kernel, grid, block, smem, stream, programmatic ? &attribute : nullptr,
                                              static_cast<Args&&>(args)...);
  if (e != cudaSuccess) return e;
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels
