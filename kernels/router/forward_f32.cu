// Router forward kernels for one element type (float); split per dtype to keep each compile small.
#include "kernels/router/forward.cuh"

namespace moekit::kernels::router {

cudaError_t launch_router_forward_f32(const ForwardArgs& a, cudaStream_t stream) {
  return launch_forward_dtype<float>(a, stream);
}

}  // namespace moekit::kernels::router
