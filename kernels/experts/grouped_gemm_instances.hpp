// Launchers of the grouped-GEMM kernel instances, one translation unit per dtype and direction so
// the library builds in parallel (see the .cu files beside this one). Internal to kernels/experts.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/experts/grouped_gemm.hpp"

namespace moekit::kernels::experts {

// Tensor-core kernels, T = __nv_bfloat16 or __half. Forward: kEpiGateUp, kEpiRelu2, kEpiStore with
// B in KN layout. Backward: kEpiStore and kEpiBwdAct with B in NK layout, kEpiWgrad (axis K).
template <class T>
cudaError_t launch_sm80_forward(const GroupedGemmProblem& problem, EpiKind kind, const EpilogueParams& params,
                                cudaStream_t stream);
template <class T>
cudaError_t launch_sm80_backward(const GroupedGemmProblem& problem, EpiKind kind, const EpilogueParams& params,
                                 cudaStream_t stream);
// fp32 SIMT kernels, every combination.
cudaError_t launch_simt(const GroupedGemmProblem& problem, EpiKind kind, const EpilogueParams& params,
                        cudaStream_t stream);

}  // namespace moekit::kernels::experts
