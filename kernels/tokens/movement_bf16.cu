// Movement kernels for one element type (__nv_bfloat16); split per dtype to keep each compile small.
#include "kernels/tokens/movement.cuh"

namespace moekit::kernels::tokens {

cudaError_t launch_move_bf16(bool vectorized, const MoveArgs& a, cudaStream_t stream) {
  return launch_move_dtype<__nv_bfloat16>(vectorized, a, stream);
}

}  // namespace moekit::kernels::tokens
