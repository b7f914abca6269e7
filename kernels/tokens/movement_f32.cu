// Movement kernels for one element type (float); split per dtype to keep each compile small.
#include "kernels/tokens/movement.cuh"

namespace moekit::kernels::tokens {

cudaError_t launch_move_f32(bool vectorized, const MoveArgs& a, cudaStream_t stream) {
  return launch_move_dtype<float>(vectorized, a, stream);
}

}  // namespace moekit::kernels::tokens
