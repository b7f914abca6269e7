// Runtime dtype -> the per-dtype movement launchers (movement_<dtype>.cu).
#include "kernels/tokens/movement.cuh"

namespace moekit::kernels::tokens {

cudaError_t launch_move(moekit_dtype_t dtype, bool vectorized, const MoveArgs& a,
                        cudaStream_t stream) {
  switch (dtype) {
    case MOEKIT_DTYPE_F32: return launch_move_f32(vectorized, a, stream);
    case MOEKIT_DTYPE_F16: return launch_move_f16(vectorized, a, stream);
    case MOEKIT_DTYPE_BF16: return launch_move_bf16(vectorized, a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::kernels::tokens
