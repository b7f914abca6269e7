// Host entry points of experts_sm90_epilogue_launch.cu (sm_90a): each sm_90a epilogue kernel in
// its register-direct form (tma = false) and its shared-memory + TMA-store form (tma = true), for
// the bit-for-bit test (experts_sm90_epilogue_test.cpp) and the A/B benchmark
// (bench/experts/bench_sm90_epilogue.cpp).
#pragma once

#include <cuda_runtime.h>

#include "kernels/experts/grouped_gemm_sm90.hpp"

namespace moekit::test::sm90_epilogue {
cudaError_t launch_store(bool bf16, const kernels::experts::GroupedGemmProblem& p,
                         const kernels::experts::EpilogueParams& ep, bool tma);
cudaError_t launch_wgrad(bool bf16, const kernels::experts::GroupedGemmProblem& p,
                         const kernels::experts::EpilogueParams& ep, bool tma);
cudaError_t launch_gate_up(bool bf16, const kernels::experts::GroupedGemmProblem& p, kernels::experts::EpiKind kind,
                           const kernels::experts::EpilogueParams& ep, bool tma);
cudaError_t smem_optin(int* optin);
}  // namespace moekit::test::sm90_epilogue
