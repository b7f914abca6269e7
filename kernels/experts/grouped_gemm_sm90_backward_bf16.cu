// Hopper (sm_90a) grouped GEMM instances: backward, __nv_bfloat16.
#include "kernels/experts/grouped_gemm_sm90_impl.cuh"

namespace moekit::kernels::experts {
template cudaError_t launch_sm90_backward<__nv_bfloat16>(const GroupedGemmProblem&, EpiKind, const EpilogueParams&,
                                             cudaStream_t);
}  // namespace moekit::kernels::experts
