// Host entry point of experts_sm90_tiles_launch.cu (sm_90a): one axis-M GEMM of the Hopper path on
// a chosen tile configuration (sm90::Tile), bf16, for the bit-for-bit tile test
// (experts_sm90_tiles_test.cpp) and the tile benchmark that chose
// sm90::choose_tile (bench/experts/bench_sm90_tiles.cpp).
#pragma once

#include <cuda_runtime.h>

#include "kernels/experts/grouped_gemm_sm90.hpp"

namespace moekit::test::sm90_tiles {
// kind kEpiGateUp / kEpiRelu2 (B KN; the gate-up TMA-store epilogue), kEpiStore (B KN or NK; the
// TMA-store epilogue), kEpiBwdAct (B NK; the staged epilogue). cudaErrorInvalidValue where the
// problem does not take that epilogue (sm90::takes and tma_store_*_takes / bwd_act_staged_takes)
// or its ring does not fit, and for the cluster tile with B NK (sm90::tile_takes): every launch here
// runs the configuration asked for, or nothing.
// The problem's stream-K fields (sk_*) are honoured as by the library: with slots, the whole-tile
// launch and the tail launch (a programmatic dependent of it on a created `stream`).
cudaError_t launch(kernels::experts::sm90::Tile tile, const kernels::experts::GroupedGemmProblem& p,
                   kernels::experts::EpiKind kind, const kernels::experts::EpilogueParams& ep,
                   cudaStream_t stream = nullptr);
}  // namespace moekit::test::sm90_tiles
