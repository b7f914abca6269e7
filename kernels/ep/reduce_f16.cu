// EP combine reduction into f16 outputs (see kernels/ep/reduce.cuh).
#include "kernels/ep/reduce.cuh"

namespace moekit::kernels::ep {

cudaError_t launch_reduce_to_f16(moekit_dtype_t in_dtype, bool vectorized, const ReduceArgs& a,
                                 int max_blocks, cudaStream_t stream) {
  return launch_reduce_to<__half>(in_dtype, vectorized, a, max_blocks, stream);
}

}  // namespace moekit::kernels::ep
