// Bodies of launch_sm90_forward / launch_sm90_backward, included by the per-dtype sm_90a .cu files.
#pragma once

#include <cstdlib>
#include <cstring>

#include "kernels/experts/grouped_gemm_sm90.cuh"
#include "kernels/experts/grouped_gemm_sm90.hpp"

namespace moekit::kernels::experts {

namespace sm90 {
// The current device's opt-in shared memory per block, from grid.hpp's per-device cache (every
// TMA-store and staged launch picks its ring depth from it: no API call once read).
inline cudaError_t smem_optin(int* optin) {
  const int device = current_device();
  *optin = cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device, -1);
  return *optin < 0 ? cudaErrorInvalidDevice : cudaSuccess;
}

// Ring depth of a TMA-store kernel of configuration Cfg for E groups on the current device
// (tma_store_stages: Cfg's deepest ring, one less, or 0 where neither fits).
template <class Cfg = TileConfig>
inline cudaError_t tma_store_ring(int num_groups, int* stages) {
  int optin = 0;
  if (const cudaError_t err = smem_optin(&optin)) return err;
  *stages = tma_store_stages<Cfg>(num_groups, static_cast<size_t>(optin));
  return cudaSuccess;
}

// The TMA-store (kStagedEpi = false) or staged act-backward (true) instance of configuration Cfg
// whose ring is `stages` deep: Cfg's deepest or one less, the two depths instantiated
// (tma_store_stages, bwd_act_staged_stages); cudaErrorInvalidValue for any other depth.
template <class T, bool kBNK, int kKind, bool kStagedEpi, class Cfg>
cudaError_t launch_ring(int stages, const GroupedGemmProblem& p, const EpilogueParams& ep, cudaStream_t stream) {
  constexpr int kDeep = Cfg::kStages, kShallow = Cfg::kStages - 1;
  if (stages == kDeep)
    return launch<T, kBNK, kKind, kStagedEpi ? kDeep : 0, kStagedEpi ? 0 : kDeep, Cfg>(p, ep, stream);
  if (stages == kShallow)
    return launch<T, kBNK, kKind, kStagedEpi ? kShallow : 0, kStagedEpi ? 0 : kShallow, Cfg>(p, ep, stream);
  return cudaErrorInvalidValue;
}

// An axis-M GEMM with a store epilogue: kEpiStore (B KN or NK), kEpiGateUp / kEpiRelu2 (B KN), with
// the TMA-store epilogue where `tma` asks for it, the problem takes it (tma_store_takes;
// tma_store_gate_up_takes for the gate-up kinds) and a ring fits (4 stages, else 3), else the
// register-direct one. The library's launchers instantiate the TMA-store kernels only where
// kTmaStore / kTmaStoreGateUp / kTmaStoreRelu2 ask for them (kWithTma); the epilogue tests and
// bench instantiate both and pick at run time.
// Cfg: the tile configuration (choose_tile); where its TMA-store ring does not fit, or the
// problem does not take the TMA-store epilogue, the register-direct kernel of TileConfig runs
// (the other configurations have no register-direct instance: every problem their measured
// classes hold takes the TMA store).
template <class T, bool kBNK, int kKind, bool kWithTma, class Cfg = TileConfig>
cudaError_t launch_axis_m(const GroupedGemmProblem& p, const EpilogueParams& ep, cudaStream_t stream, bool tma) {
  static_assert(kKind == kEpiStore || (!kBNK && (kKind == kEpiGateUp || kKind == kEpiRelu2)),
                "axis-M store kinds: kEpiStore, or kEpiGateUp / kEpiRelu2 with B KN");
  static_assert(kWithTma || std::is_same<Cfg, TileConfig>::value, "other tiles run the TMA-store epilogue only");
  if constexpr (kWithTma) {
    const bool takes = kKind == kEpiStore ? tma_store_takes(p, kEpiStore, ep)
                                          : tma_store_gate_up_takes(p, static_cast<EpiKind>(kKind), ep);
    if (tma && takes) {
      int stages = 0;
      if (const cudaError_t err = tma_store_ring<Cfg>(p.num_groups, &stages)) return err;
      if (stages != 0) return launch_ring<T, kBNK, kKind, false, Cfg>(stages, p, ep, stream);
    }
  }
  return launch<T, kBNK, kKind>(p, ep, stream);
}

// The activation-backward dgrad (kEpiBwdAct, B NK): the staged epilogue of configuration Cfg where
// it takes the problem and a ring fits, else the register-direct kernel of TileConfig.
template <class T, class Cfg = TileConfig>
cudaError_t launch_bwd_act(const GroupedGemmProblem& p, const EpilogueParams& ep, cudaStream_t stream) {
  if constexpr (kBwdActStaged) {
    if (bwd_act_staged_takes(p, ep)) {
      int optin = 0;
      if (const cudaError_t err = smem_optin(&optin)) return err;
      const int stages = bwd_act_staged_stages<Cfg>(p.num_groups, static_cast<size_t>(optin));
      if (stages != 0) return launch_ring<T, true, kEpiBwdAct, true, Cfg>(stages, p, ep, stream);
    }
  }
  return launch<T, true, kEpiBwdAct, 0>(p, ep, stream);
}

// The tile a problem runs on: choose_tile, unless MOEKIT_SM90_TILE=128 or 64 forces one (the
// benchmarks' A/B of whole calls; read once per process; 64 only where its tile count fits).
inline Tile tile_for(const GroupedGemmProblem& p, EpiKind kind) {
  static const int forced = [] {
    const char* e = std::getenv("MOEKIT_SM90_TILE");
    if (e == nullptr) return -1;
    if (std::strcmp(e, "128") == 0) return 128;
    if (std::strcmp(e, "64") == 0) return 64;
    return -1;
  }();
  if (forced == 128) return Tile::k128;
  if (forced == 64) return tile_count_fits(p, TileConfig64::kBM) ? Tile::k64 : Tile::k128;
  return choose_tile(p, kind);
}

// The weight gradients, as launch_axis_m (wgrad has no prefix: the 4-stage ring always fits 227 KB).
template <class T, bool kWithTma>
cudaError_t launch_wgrad_store(const GroupedGemmProblem& p, const EpilogueParams& ep, cudaStream_t stream, bool tma) {
  if constexpr (kWithTma) {
    if (tma && tma_store_takes(p, kEpiWgrad, ep)) {
      int stages = 0;
      if (const cudaError_t err = tma_store_ring<TileConfig>(0, &stages)) return err;
      if (stages == 4) return launch_wgrad<T, 4>(p, ep, stream);
      if (stages == 3) return launch_wgrad<T, 3>(p, ep, stream);
    }
  }
  return launch_wgrad<T>(p, ep, stream);
}
}  // namespace sm90

template <class T>
cudaError_t launch_sm90_forward(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep,
                                cudaStream_t stream) {
  if (p.axis != kAxisM || p.b_nk || !sm90::takes(p, kind)) return cudaErrorInvalidValue;
  if (sm90::tile_for(p, kind) == sm90::Tile::k64) {  // TMA-store epilogues only (h and u alike)
    using C64 = sm90::TileConfig64;
    switch (kind) {
      case kEpiGateUp: return sm90::launch_axis_m<T, false, kEpiGateUp, true, C64>(p, ep, stream, true);
      case kEpiRelu2: return sm90::launch_axis_m<T, false, kEpiRelu2, true, C64>(p, ep, stream, true);
      case kEpiStore: return sm90::launch_axis_m<T, false, kEpiStore, true, C64>(p, ep, stream, true);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (kind) {
    case kEpiGateUp:
      return sm90::launch_axis_m<T, false, kEpiGateUp, sm90::kTmaStoreGateUp != 0>(p, ep, stream,
                                                                                   sm90::tma_store_gated(ep));
    case kEpiRelu2: return sm90::launch_axis_m<T, false, kEpiRelu2, sm90::kTmaStoreRelu2>(p, ep, stream, true);
    case kEpiStore: return sm90::launch_axis_m<T, false, kEpiStore, sm90::kTmaStore>(p, ep, stream, true);
    default: return cudaErrorInvalidValue;
  }
}

template <class T>
cudaError_t launch_sm90_backward(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep,
                                 cudaStream_t stream) {
  if (!sm90::takes(p, kind)) return cudaErrorInvalidValue;
  if (p.axis == kAxisK) return sm90::launch_wgrad_store<T, sm90::kTmaStore>(p, ep, stream, true);
  if (!p.b_nk) return cudaErrorInvalidValue;
  if (sm90::tile_for(p, kind) == sm90::Tile::k64) {
    using C64 = sm90::TileConfig64;
    switch (kind) {
      case kEpiStore: return sm90::launch_axis_m<T, true, kEpiStore, true, C64>(p, ep, stream, true);
      case kEpiBwdAct: return sm90::launch_bwd_act<T, C64>(p, ep, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (kind) {
    case kEpiStore: return sm90::launch_axis_m<T, true, kEpiStore, sm90::kTmaStore>(p, ep, stream, true);
    case kEpiBwdAct: return sm90::launch_bwd_act<T>(p, ep, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moekit::kernels::experts
