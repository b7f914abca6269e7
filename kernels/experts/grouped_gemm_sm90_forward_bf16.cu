// Hopper (sm_90a) grouped GEMM instances: forward, __nv_bfloat16.
#include "kernels/experts/grouped_gemm_sm90_impl.cuh"

namespace moekit::kernels::experts {
template cudaError_t launch_sm90_forward<__nv_bfloat16>(const GroupedGemmProblem&, EpiKind, const EpilogueParams&,
                                             cudaStream_t);

// The sm_90a objects are in this build.
bool sm90_built() { return true; }
}  // namespace moekit::kernels::experts
