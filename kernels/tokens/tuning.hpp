// Tuning numbers of the tokens family, in one place. Plain C++ (no device code): the host side
// (src/tokens) sizes workspaces and grids from them, the kernels (kernels/tokens) are built with
// them. Chosen by reasoning about the H100/H200 memory system; the benchmark that checks them is
// bench/tokens/moekit-bench-tokens (--preset=all), whose plan/permute/combine rows are the ones to
// watch when changing a number here.
#pragma once

#include <cstdint>

namespace moekit::kernels::tokens {

// ---- plan ----------------------------------------------------------------------------------
// Threads of the counting and scatter kernels (8 warps).
constexpr int kPlanThreads = 256;
constexpr int kPlanWarps = kPlanThreads / 32;
// Slots each warp ranks per tile, in 32-slot steps: a tile is kPlanThreads * 4 = 1024 slots.
// A block's work on a tile is a serial chain (label ballots, the warp's rank chain of one shared
// load and store per step, the scattered slot_of_row stores) run by only 8 warps, so the plan's
// T-dependent time is that of one block's tiles, whatever the number of blocks: measured on the
// H200, 17-18 us with 4096-slot tiles and 7-9 us with 2048-slot tiles (4 to 64 blocks), so it
// scales with the slots of a block. 1024-slot tiles spread it over twice the SMs again
// (T=16384 K=8: 128 blocks of one tile). 4 keeps 4 independent index loads in flight per lane.
// -DMOEKIT_PLAN_ITERS_PER_WARP=8 in both cpp_args and cuda_args builds the 2048-slot tiles of
// commit 22425fd (the bar's shape then runs on 64 blocks) for an A/B measurement. Host and device
// must agree for the workspace size, but the plan is correct either way: the host's grid gives
// each block a contiguous slot range, which the kernels walk in their own tile size.
#ifndef MOEKIT_PLAN_ITERS_PER_WARP
#define MOEKIT_PLAN_ITERS_PER_WARP 4
#endif
constexpr int kPlanItersPerWarp = MOEKIT_PLAN_ITERS_PER_WARP;
static_assert(kPlanItersPerWarp >= 1 && kPlanItersPerWarp <= 16, "8 to 512 slots a warp per tile");
constexpr int kPlanWarpSlots = kPlanItersPerWarp * 32;
constexpr int kPlanTileSlots = kPlanThreads * kPlanItersPerWarp;
// Every scatter block reads the whole [blocks, E_local + 1] count table once (that is how it
// finds its offsets without a third launch): the table is kept under this many entries, i.e.
// at most 144 loads per thread. T=16384, K=8, E=256 runs on 128 blocks of one tile each
// (128 x 257 entries: two batches of 64 rows per thread).
// kPlanMaxBlocks is at most the SM count of the H100 and H200 (132), so that the plan's grid is
// resident at once there and the one-launch (cooperative) path runs (kernels/tokens/plan_launch.hpp);
// a grid wider than the SM count (an A100 with 108 SMs and more than 108 tiles) takes the
// two-launch path, which needs no residency.
constexpr int kPlanMaxTableEntries = 36864;
constexpr int kPlanMaxBlocks = 128;
// Table loads a scatter thread issues before it uses any (predicated, so a short column costs
// one round trip, never one per row: a loop that adds each load before issuing the next pays a
// full L2 latency per table row). 64 covers the 64 rows of the bar's shape (T=16384 K=8 E=256)
// in one round trip (batches of 32 would take two); it costs 64 registers in that phase, where
// one block per SM leaves plenty.
constexpr int kPlanTableBatch = 64;
// The counting kernel matches equal labels of a 32-slot step (one ballot per label bit) and adds
// each group once when labels have at most this many bits (E_local <= 62), where lanes collide
// often (E = 8: ~4 lanes per address); with more experts one atomic per slot is cheaper than the
// ballots (E = 256: 9 ballots per step against rare collisions).
constexpr int kPlanCountAggregateBits = 6;
// Threads of the per-expert selection kernel (capacity with drop by weight).
constexpr int kSelectThreads = 256;

// How the slots are split over plan blocks: block b owns slots
// [b * slots_per_block, min(N, (b + 1) * slots_per_block)), a whole number of tiles.
struct PlanGrid {
  int blocks;
  int64_t slots_per_block;
};

inline PlanGrid plan_grid(int64_t num_slots, int32_t num_local_experts) {
  const int64_t tiles = num_slots > 0 ? (num_slots + kPlanTileSlots - 1) / kPlanTileSlots : 1;
  int64_t max_blocks = kPlanMaxTableEntries / (static_cast<int64_t>(num_local_experts) + 1);
  if (max_blocks < 1) max_blocks = 1;
  if (max_blocks > kPlanMaxBlocks) max_blocks = kPlanMaxBlocks;
  const int64_t blocks = tiles < max_blocks ? tiles : max_blocks;
  const int64_t tiles_per_block = (tiles + blocks - 1) / blocks;
  PlanGrid g;
  g.slots_per_block = tiles_per_block * kPlanTileSlots;
  g.blocks = num_slots > 0
                 ? static_cast<int>((num_slots + g.slots_per_block - 1) / g.slots_per_block)
                 : 1;
  return g;
}

// ---- movement (permute, combine, backwards) ------------------------------------------------
constexpr int kMoveThreads = 256;
// Each token is handled by a group of G threads (32 .. 256, a power of two): the smallest G that
// gives each thread at most this many 16-byte accesses per row.
constexpr int kMoveAccessesPerThread = 8;
// Accesses each thread issues before it uses them. Permute loads its whole share of the token
// (up to 8 x 16 B, 32 registers) and then writes the rows one after the other, so that a warp's
// consecutive stores fill one row's contiguous span instead of visiting all K rows per 4 x 16 B
// (the 4 of 0.1, measured at 83 % of the copy bandwidth on the shapes). The gathers
// (combine, permute backward) hold 2 x 16 B per row in fp32 accumulators (16 registers for bf16)
// and load the next row while summing the current one, so 4 x 16 B are in flight per thread;
// combine backward keeps 2 x 16 B of dy plus 2 x 16 B of yp. With 4 resident blocks of 256
// threads that is 64 KiB in flight per SM, about twice what Little's law asks for at 4.8 TB/s
// and ~1 us loaded latency over 132 SMs (the gathers reach 94-98 %).
constexpr int kMoveScatterUnroll = kMoveAccessesPerThread;
constexpr int kMoveGatherUnroll = 2;
// Streaming (evict-first, st.global.cs) stores for the rows the scatters write (permute's xp,
// combine backward's dyp, padding): 8/9 of permute's traffic is these writes, each line written
// once and not read again by the same kernel.
constexpr bool kMoveStreamingStores = true;
// Resident blocks per SM the movement kernels are compiled for (at most 64 registers).
constexpr int kMoveMinBlocks = 4;
// Padding rows (alignment > 1) are zeroed by extra blocks, one per expert, split further so that
// no block zeroes more than about this many bytes (at most kMovePadMaxSplit blocks per expert).
constexpr int64_t kMovePadBytesPerBlock = 64 * 1024;
constexpr int kMovePadMaxSplit = 16;

}  // namespace moekit::kernels::tokens
