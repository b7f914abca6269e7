// Bodies of launch_sm80_forward / launch_sm80_backward, included by the per-dtype .cu files.
#pragma once

#include "kernels/experts/grouped_gemm_instances.hpp"
#include "kernels/experts/grouped_gemm_sm80.cuh"

namespace moekit::kernels::experts {

template <class T>
cudaError_t launch_sm80_forward(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep,
                                cudaStream_t stream) {
  if (p.axis != kAxisM || p.b_nk) return cudaErrorInvalidValue;
  switch (kind) {
    case kEpiGateUp: return sm80::launch<T, kAxisM, false, kEpiGateUp>(p, ep, stream);
    case kEpiRelu2: return sm80::launch<T, kAxisM, false, kEpiRelu2>(p, ep, stream);
    case kEpiStore: return sm80::launch<T, kAxisM, false, kEpiStore>(p, ep, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <class T>
cudaError_t launch_sm80_backward(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep,
                                 cudaStream_t stream) {
  if (p.axis == kAxisK) {
    if (kind != kEpiWgrad || p.b_nk) return cudaErrorInvalidValue;
    return sm80::launch<T, kAxisK, false, kEpiWgrad>(p, ep, stream);
  }
  if (!p.b_nk) return cudaErrorInvalidValue;
  switch (kind) {
    case kEpiStore: return sm80::launch<T, kAxisM, true, kEpiStore>(p, ep, stream);
    case kEpiBwdAct: return sm80::launch<T, kAxisM, true, kEpiBwdAct>(p, ep, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moekit::kernels::experts
