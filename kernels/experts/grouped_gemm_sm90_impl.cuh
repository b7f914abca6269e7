// Bodies of launch_sm90_forward / launch_sm90_backward, included by the per-dtype sm_90a .cu files.
#pragma once

#include "kernels/experts/grouped_gemm_sm90.cuh"
#include "kernels/experts/grouped_gemm_sm90.hpp"

namespace moekit::kernels::experts {

template <class T>
cudaError_t launch_sm90_forward(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep,
                                cudaStream_t stream) {
  if (p.axis != kAxisM || p.b_nk || !sm90::takes(p, kind)) return cudaErrorInvalidValue;
  switch (kind) {
    case kEpiGateUp: return sm90::launch<T, false, kEpiGateUp>(p, ep, stream);
    case kEpiRelu2: return sm90::launch<T, false, kEpiRelu2>(p, ep, stream);
    case kEpiStore: return sm90::launch<T, false, kEpiStore>(p, ep, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <class T>
cudaError_t launch_sm90_backward(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep,
                                 cudaStream_t stream) {
  if (!sm90::takes(p, kind)) return cudaErrorInvalidValue;
  if (p.axis == kAxisK) return sm90::launch_wgrad<T>(p, ep, stream);
  if (!p.b_nk) return cudaErrorInvalidValue;
  switch (kind) {
    case kEpiStore: return sm90::launch<T, true, kEpiStore>(p, ep, stream);
    case kEpiBwdAct:
      if constexpr (sm90::kBwdActStaged) {
        if (sm90::bwd_act_staged_takes(p, ep)) {
          int device = 0, optin = 0;
          cudaError_t err = cudaGetDevice(&device);
          if (err == cudaSuccess)
            err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
          if (err != cudaSuccess) return err;
          const int stages = sm90::bwd_act_staged_stages(p.num_groups, static_cast<size_t>(optin));
          if (stages == 4) return sm90::launch<T, true, kEpiBwdAct, 4>(p, ep, stream);
          if (stages == 3) return sm90::launch<T, true, kEpiBwdAct, 3>(p, ep, stream);
        }
      }
      return sm90::launch<T, true, kEpiBwdAct, 0>(p, ep, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moekit::kernels::experts
