// The sm_90a kernels of every tile configuration (sm90::Tile) for the axis-M kinds that take one,
// bf16, instantiated here whatever sm90::choose_tile picks, so one binary runs them all: the
// tile test compares them bit for bit, the tile benchmark times them against each other. Built with
// the sm_90a target only (tests/experts/meson.build).
#include <cuda_bf16.h>

#include "kernels/experts/grouped_gemm_sm90_impl.cuh"
#include "tests/experts/experts_sm90_tiles_launch.hpp"

namespace moekit::test::sm90_tiles {

namespace kx = moekit::kernels::experts;
namespace k90 = moekit::kernels::experts::sm90;
using T = __nv_bfloat16;

namespace {

// The TMA-store (or, for kEpiBwdAct, staged) kernel of configuration Cfg at the ring depth the
// library would pick (its launch_ring), or cudaErrorInvalidValue where the problem does not take
// that epilogue or no ring fits: never the library's fallback to TileConfig's register-direct one.
template <bool kBNK, int kKind, class Cfg>
cudaError_t launch_as(const kx::GroupedGemmProblem& p, const kx::EpilogueParams& ep, cudaStream_t stream) {
  if (!k90::tile_count_fits(p, Cfg::kBM)) return cudaErrorInvalidValue;
  int optin = 0;
  if (const cudaError_t err = k90::smem_optin(&optin)) return err;
  const size_t limit = static_cast<size_t>(optin);
  if constexpr (kKind == kx::kEpiBwdAct) {
    if (!k90::bwd_act_staged_takes(p, ep)) return cudaErrorInvalidValue;
    return k90::launch_ring<T, true, kx::kEpiBwdAct, true, Cfg>(k90::bwd_act_staged_stages<Cfg>(p.num_groups, limit),
                                                                 p, ep, stream);
  } else {
    const bool takes = kKind == kx::kEpiStore ? k90::tma_store_takes(p, kx::kEpiStore, ep)
                                              : k90::tma_store_gate_up_takes(p, static_cast<kx::EpiKind>(kKind), ep);
    if (!takes) return cudaErrorInvalidValue;
    return k90::launch_ring<T, kBNK, kKind, false, Cfg>(k90::tma_store_stages<Cfg>(p.num_groups, limit), p, ep,
                                                        stream);
  }
}

template <class Cfg>
cudaError_t launch_cfg(const kx::GroupedGemmProblem& p, kx::EpiKind kind, const kx::EpilogueParams& ep,
                       cudaStream_t stream) {
  if (!k90::takes(p, kind)) return cudaErrorInvalidValue;
  if constexpr (Cfg::kClusterM > 1) {  // B multicast: the forward kinds (B KN) only (sm90::tile_takes)
    if (p.b_nk) return cudaErrorInvalidValue;
    switch (kind) {
      case kx::kEpiGateUp: return launch_as<false, kx::kEpiGateUp, Cfg>(p, ep, stream);
      case kx::kEpiRelu2: return launch_as<false, kx::kEpiRelu2, Cfg>(p, ep, stream);
      case kx::kEpiStore: return launch_as<false, kx::kEpiStore, Cfg>(p, ep, stream);
      default: return cudaErrorInvalidValue;
    }
  } else {
    switch (kind) {
      case kx::kEpiGateUp:
        return p.b_nk ? cudaErrorInvalidValue : launch_as<false, kx::kEpiGateUp, Cfg>(p, ep, stream);
      case kx::kEpiRelu2:
        return p.b_nk ? cudaErrorInvalidValue : launch_as<false, kx::kEpiRelu2, Cfg>(p, ep, stream);
      case kx::kEpiStore:
        return p.b_nk ? launch_as<true, kx::kEpiStore, Cfg>(p, ep, stream)
                      : launch_as<false, kx::kEpiStore, Cfg>(p, ep, stream);
      case kx::kEpiBwdAct:
        return p.b_nk ? launch_as<true, kx::kEpiBwdAct, Cfg>(p, ep, stream) : cudaErrorInvalidValue;
      default: return cudaErrorInvalidValue;
    }
  }
}

}  // namespace

cudaError_t launch(k90::Tile tile, const kx::GroupedGemmProblem& p, kx::EpiKind kind, const kx::EpilogueParams& ep,
                   cudaStream_t stream) {
  switch (tile) {
    case k90::Tile::k128: return launch_cfg<k90::TileConfig>(p, kind, ep, stream);
    case k90::Tile::k64: return launch_cfg<k90::TileConfig64>(p, kind, ep, stream);
    case k90::Tile::k128x2: return launch_cfg<k90::TileConfig128x2>(p, kind, ep, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::test::sm90_tiles
