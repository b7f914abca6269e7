// Router forward for one element type: the fast path for the shapes of fast_shape(), the generic
// path otherwise (the choice is made on the host: RouterShape::fast).
#pragma once

#include "kernels/router/forward_fast.cuh"
#include "kernels/router/forward_generic.cuh"

namespace moekit::kernels::router {

template <class T>
cudaError_t launch_forward_dtype(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  *blocks = 0;
  if (a.num_tokens == 0) return cudaSuccess;
  return a.shape.fast ? launch_forward_fast_dtype<T>(a, stream, blocks)
                      : launch_forward_generic<T>(a, stream, blocks);
}

cudaError_t launch_router_forward_f32(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks);
cudaError_t launch_router_forward_f16(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks);
cudaError_t launch_router_forward_bf16(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks);

}  // namespace moekit::kernels::router
