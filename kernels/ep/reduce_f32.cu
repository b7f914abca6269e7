// EP combine reduction into fp32 outputs (see kernels/ep/reduce.cuh), and the dtype dispatch.
#include "kernels/ep/reduce.cuh"

namespace moekit::kernels::ep {

cudaError_t launch_reduce_to_f32(moekit_dtype_t in_dtype, bool vectorized, const ReduceArgs& a,
                                 int max_blocks, cudaStream_t stream) {
  return launch_reduce_to<float>(in_dtype, vectorized, a, max_blocks, stream);
}

cudaError_t launch_reduce(moekit_dtype_t in_dtype, moekit_dtype_t out_dtype, bool vectorized,
                          const ReduceArgs& a, int max_blocks, cudaStream_t stream) {
  switch (out_dtype) {
    case MOEKIT_DTYPE_F32: return launch_reduce_to_f32(in_dtype, vectorized, a, max_blocks, stream);
    case MOEKIT_DTYPE_F16: return launch_reduce_to_f16(in_dtype, vectorized, a, max_blocks, stream);
    case MOEKIT_DTYPE_BF16:
      return launch_reduce_to_bf16(in_dtype, vectorized, a, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::kernels::ep
