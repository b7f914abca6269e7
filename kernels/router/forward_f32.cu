// Router forward kernels for one element type (float); split per dtype to keep each compile small.
#include "kernels/router/forward.cuh"

namespace moekit::kernels::router {

cudaError_t launch_router_forward_f32(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  return launch_forward_dtype<float>(a, stream, blocks);
}

}  // namespace moekit::kernels::router
