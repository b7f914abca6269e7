// Tensor-core grouped GEMM instances: forward, __nv_bfloat16.
#include "kernels/experts/grouped_gemm_sm80_impl.cuh"

namespace moekit::kernels::experts {
template cudaError_t launch_sm80_forward<__nv_bfloat16>(const GroupedGemmProblem&, EpiKind, const EpilogueParams&,
                                             cudaStream_t);
}  // namespace moekit::kernels::experts
