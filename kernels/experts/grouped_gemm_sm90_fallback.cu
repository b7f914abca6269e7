// Builds whose gpu_archs lack 90 have no sm_90a kernels: the Hopper launchers report
// cudaErrorNotSupported and sm90_built() is false (the experts then return UNSUPPORTED for
// MOEKIT_GEMM_PATH_SM90 before anything is enqueued).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/experts/grouped_gemm_sm90.hpp"

namespace moekit::kernels::experts {

template <class T>
cudaError_t launch_sm90_forward(const GroupedGemmProblem&, EpiKind, const EpilogueParams&, cudaStream_t) {
  return cudaErrorNotSupported;
}
template <class T>
cudaError_t launch_sm90_backward(const GroupedGemmProblem&, EpiKind, const EpilogueParams&, cudaStream_t) {
  return cudaErrorNotSupported;
}
template cudaError_t launch_sm90_forward<__nv_bfloat16>(const GroupedGemmProblem&, EpiKind, const EpilogueParams&,
                                                        cudaStream_t);
template cudaError_t launch_sm90_forward<__half>(const GroupedGemmProblem&, EpiKind, const EpilogueParams&,
                                                 cudaStream_t);
template cudaError_t launch_sm90_backward<__nv_bfloat16>(const GroupedGemmProblem&, EpiKind, const EpilogueParams&,
                                                         cudaStream_t);
template cudaError_t launch_sm90_backward<__half>(const GroupedGemmProblem&, EpiKind, const EpilogueParams&,
                                                  cudaStream_t);
bool sm90_built() { return false; }

}  // namespace moekit::kernels::experts
