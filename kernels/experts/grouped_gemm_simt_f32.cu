// fp32 SIMT grouped GEMM instances (every epilogue and layout the experts family uses).
#include "kernels/experts/grouped_gemm_instances.hpp"
#include "kernels/experts/grouped_gemm_simt.cuh"

namespace moekit::kernels::experts {

cudaError_t launch_simt(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep, cudaStream_t stream) {
  if (p.axis == kAxisK) {
    if (kind != kEpiWgrad || p.b_nk) return cudaErrorInvalidValue;
    return simt::launch<kAxisK, false, kEpiWgrad>(p, ep, stream);
  }
  if (!p.b_nk) {
    switch (kind) {
      case kEpiGateUp: return simt::launch<kAxisM, false, kEpiGateUp>(p, ep, stream);
      case kEpiRelu2: return simt::launch<kAxisM, false, kEpiRelu2>(p, ep, stream);
      case kEpiStore: return simt::launch<kAxisM, false, kEpiStore>(p, ep, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (kind) {
    case kEpiStore: return simt::launch<kAxisM, true, kEpiStore>(p, ep, stream);
    case kEpiBwdAct: return simt::launch<kAxisM, true, kEpiBwdAct>(p, ep, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moekit::kernels::experts
