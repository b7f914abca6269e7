// Router forward kernels for one element type (__half); split per dtype to keep each compile small.
#include "kernels/router/forward.cuh"

namespace moekit::kernels::router {

cudaError_t launch_router_forward_f16(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  return launch_forward_dtype<__half>(a, stream, blocks);
}

}  // namespace moekit::kernels::router
