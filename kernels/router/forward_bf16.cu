// Router forward kernels for one element type (__nv_bfloat16); split per dtype to keep each compile small.
#include "kernels/router/forward.cuh"

namespace moekit::kernels::router {

cudaError_t launch_router_forward_bf16(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  return launch_forward_dtype<__nv_bfloat16>(a, stream, blocks);
}

}  // namespace moekit::kernels::router
