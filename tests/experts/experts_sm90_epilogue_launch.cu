// The sm_90a kernels of the TMA-store epilogue tests (experts_sm90_epilogue_test.cpp), instantiated
// here with both epilogues whatever MOEKIT_SM90_TMA_STORE / MOEKIT_SM90_TMA_STORE_GATE_UP say (the
// launchers' kWithTma = true),
// so one binary compares them. Built with the sm_90a target only (tests/experts/meson.build).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/experts/grouped_gemm_sm90_impl.cuh"
#include "tests/experts/experts_sm90_epilogue_launch.hpp"

namespace moekit::test::sm90_epilogue {

namespace kx = moekit::kernels::experts;

// axis M kEpiStore (B NK when p.b_nk), register-direct (tma = false) or TMA-store (tma = true,
// where tma_store_takes the problem).
cudaError_t launch_store(bool bf16, const kx::GroupedGemmProblem& p, const kx::EpilogueParams& ep, bool tma) {
  if (!kx::sm90::takes(p, kx::kEpiStore)) return cudaErrorInvalidValue;
  if (bf16)
    return p.b_nk ? kx::sm90::launch_axis_m<__nv_bfloat16, true, kx::kEpiStore, true>(p, ep, nullptr, tma)
                  : kx::sm90::launch_axis_m<__nv_bfloat16, false, kx::kEpiStore, true>(p, ep, nullptr, tma);
  return p.b_nk ? kx::sm90::launch_axis_m<__half, true, kx::kEpiStore, true>(p, ep, nullptr, tma)
                : kx::sm90::launch_axis_m<__half, false, kx::kEpiStore, true>(p, ep, nullptr, tma);
}

// kEpiWgrad, as launch_store.
cudaError_t launch_wgrad(bool bf16, const kx::GroupedGemmProblem& p, const kx::EpilogueParams& ep, bool tma) {
  if (!kx::sm90::takes(p, kx::kEpiWgrad)) return cudaErrorInvalidValue;
  return bf16 ? kx::sm90::launch_wgrad_store<__nv_bfloat16, true>(p, ep, nullptr, tma)
              : kx::sm90::launch_wgrad_store<__half, true>(p, ep, nullptr, tma);
}

// Forward gate-up kinds (kEpiGateUp, kEpiRelu2; B KN), register-direct (tma = false) or the
// TMA-store gate-up epilogue (tma = true, where tma_store_gate_up_takes the problem).
cudaError_t launch_gate_up(bool bf16, const kx::GroupedGemmProblem& p, kx::EpiKind kind, const kx::EpilogueParams& ep,
                           bool tma) {
  if (p.b_nk || (kind != kx::kEpiGateUp && kind != kx::kEpiRelu2) || !kx::sm90::takes(p, kind))
    return cudaErrorInvalidValue;
  if (kind == kx::kEpiGateUp)
    return bf16 ? kx::sm90::launch_axis_m<__nv_bfloat16, false, kx::kEpiGateUp, true>(p, ep, nullptr, tma)
                : kx::sm90::launch_axis_m<__half, false, kx::kEpiGateUp, true>(p, ep, nullptr, tma);
  return bf16 ? kx::sm90::launch_axis_m<__nv_bfloat16, false, kx::kEpiRelu2, true>(p, ep, nullptr, tma)
              : kx::sm90::launch_axis_m<__half, false, kx::kEpiRelu2, true>(p, ep, nullptr, tma);
}

// The device's opt-in shared memory per block.
cudaError_t smem_optin(int* optin) { return kx::sm90::smem_optin(optin); }

}  // namespace moekit::test::sm90_epilogue
