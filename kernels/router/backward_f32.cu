// Router backward kernels for one element type (float); split per dtype to keep each compile small.
#include "kernels/router/backward.cuh"

namespace moekit::kernels::router {

cudaError_t launch_router_backward_f32(const BackwardArgs& a, cudaStream_t stream) {
  return launch_backward_dtype<float>(a, stream);
}

}  // namespace moekit::kernels::router
