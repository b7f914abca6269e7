// Router backward kernels for one element type (__nv_bfloat16); split per dtype to keep each compile small.
#include "kernels/router/backward.cuh"

namespace moekit::kernels::router {

cudaError_t launch_router_backward_bf16(const BackwardArgs& a, cudaStream_t stream) {
  return launch_backward_dtype<__nv_bfloat16>(a, stream);
}

}  // namespace moekit::kernels::router
