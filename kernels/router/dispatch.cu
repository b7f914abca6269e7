// Runtime dtype -> the per-dtype router launchers (forward_<dtype>.cu, backward_<dtype>.cu).
#include "kernels/router/launch.hpp"

namespace moekit::kernels::router {

cudaError_t launch_router_forward_f32(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks);
cudaError_t launch_router_forward_f16(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks);
cudaError_t launch_router_forward_bf16(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks);
cudaError_t launch_router_backward_f32(const BackwardArgs& a, cudaStream_t stream);
cudaError_t launch_router_backward_f16(const BackwardArgs& a, cudaStream_t stream);
cudaError_t launch_router_backward_bf16(const BackwardArgs& a, cudaStream_t stream);

cudaError_t launch_router_forward(moekit_dtype_t dtype, const ForwardArgs& a, cudaStream_t stream,
                                  int32_t* blocks) {
  switch (dtype) {
    case MOEKIT_DTYPE_F32: return launch_router_forward_f32(a, stream, blocks);
    case MOEKIT_DTYPE_F16: return launch_router_forward_f16(a, stream, blocks);
    case MOEKIT_DTYPE_BF16: return launch_router_forward_bf16(a, stream, blocks);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_router_backward(moekit_dtype_t dtype, const BackwardArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case MOEKIT_DTYPE_F32: return launch_router_backward_f32(a, stream);
    case MOEKIT_DTYPE_F16: return launch_router_backward_f16(a, stream);
    case MOEKIT_DTYPE_BF16: return launch_router_backward_bf16(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::kernels::router
