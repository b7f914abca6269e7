// Tuning numbers and launch shapes of the router family, in one place. Plain C++ (no device
// code): the host side (src/router) sizes workspaces and grids from them and the kernels
// (kernels/router) are built with them. Chosen by counting instructions and bytes per token for
// the model table (docs/router.md, "Performance"); the benchmark that checks them is
// bench/router/moekit-bench-router --preset=all, whose forward/backward "x floor" columns are
// the ones to watch when changing a number here.
//
// Every shape below depends only on the configuration and T (never on the device), so the
// workspace size query and the run always agree.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moekit::kernels::router {

// ---- fast path (E <= kFastMaxExperts) --------------------------------------------------------
// A team of lanes_per_token (TPT, a power of two <= 32) lanes owns one token; lane l of the team
// holds experts [l V, l V + V) of the row in registers (V = values_per_lane, a multiple of 8 so a
// lane's logits are whole 16-byte vectors). Small TPT puts several tokens in a warp, which
// spreads the per-token selection work (one warp reduction per pick) over more tokens; V <= 16
// keeps a lane's values within the register cap of fast_min_blocks() below.
constexpr int kFastMaxExperts = 512;

struct FastShape {
  int values_per_lane;  // V
  int lanes_per_token;  // TPT
};

// Forward: E <= 8: one thread per token (Mixtral). Up to 64: V = 8 and the smallest team that
// covers E. 65..128: V = 16, 8 lanes (four Qwen3 / GPT-OSS tokens per warp: a pick's reductions
// and ballots serve four tokens, at the price of more refills, ~2.3 per warp-step for Qwen3
// against ~0.3 with 16 lanes; docs/router.md). 129..256: V = 16, 16 lanes (two DeepSeek-V3 tokens
// per warp). 257..512: V = 16, a warp.
inline constexpr FastShape fast_shape(int num_experts) {
  return num_experts <= 8     ? FastShape{8, 1}
         : num_experts <= 16  ? FastShape{8, 2}
         : num_experts <= 32  ? FastShape{8, 4}
         : num_experts <= 64  ? FastShape{8, 8}
         : num_experts <= 128 ? FastShape{16, 8}
         : num_experts <= 256 ? FastShape{16, 16}
                              : FastShape{16, 32};
}

// Backward: the forward's shapes, except E = 65..128 (Qwen3, GPT-OSS): V = 8 with 16 lanes. V = 16
// with 8 lanes (four tokens per warp, one butterfly level fewer per team reduction) was predicted
// to halve the resident rounds at T = 32768 and measured ~15 % slower instead (H200, 9e09811:
// Qwen3 27.4 us against 22.8-24.0 with 16 lanes; GPT-OSS 24.7 against 22.2-23.4): the kernel is
// issue-bound, not bound by its rounds (docs/router.md, third measurement).
inline constexpr FastShape fast_backward_shape(int num_experts) {
  return num_experts > 64 && num_experts <= 128 ? FastShape{8, 16} : fast_shape(num_experts);
}

// Threads per block of the fast forward and backward kernels (8 warps), compiled for at least
// fast_min_blocks(V, element bytes) resident blocks per SM: 4 (at most 64 registers, 32 warps per
// SM) for V = 8, and for V = 16 with 16-bit logits; 3 (at most 80 registers, 24 warps per SM) for
// V = 16 with fp32 logits (the selection values and aux sums live in shared memory, not
// registers). The measurements read as a forward bound mostly by the latency of its per-warp
// chains (scores, top-2, picks, weights), not by DRAM (docs/router.md, "Performance"): a fourth
// block is 33% more tokens in flight per SM, which at T = 32768 cuts the resident rounds of
// DeepSeek-V3 from 6 to 4, of Qwen3 / GPT-OSS from 3 to 2 and of E = 512 from 11 to 8. ptxas 13.0
// then spills a few words in the 16-bit V = 16 instances (at most 78 bytes stored, mostly
// loop-carried scalars, each an L1 access per token step); fp32 rows hold twice the prefetch
// registers and would spill ~100 bytes, so they keep 3 blocks. (On sm_80, 164 KB of shared memory
// per SM, the 42 KB blocks of E = 65..128 fit 3: the occupancy query sizes the grid.)
constexpr int kFastThreads = 256;
// The switch for the fourth block of the 16-bit V = 16 kernels, forward and backward. Off (3
// blocks at 80 registers, as at commit 8b21dc0: fewer spills, 25% fewer tokens in flight): the
// same-session A/B at 9e09811 (H200, T = 32768) measured 3 blocks faster on 9 of 10 preset rows,
// e.g. DeepSeek-V3 forward 31.7 against 32.9 us and backward 32.2 against 36.8 (Qwen3-Next
// backward 78.8 against 74.1 the exception); bench/results/diagnostics/bench-router-3blocks-h200.json.
// -DMOEKIT_ROUTER_FOUR_BLOCKS=1 in cuda_args and cpp_args (the host sizes grids from it too)
// builds the 4-block variant for an A/B measurement.
#ifndef MOEKIT_ROUTER_FOUR_BLOCKS
#define MOEKIT_ROUTER_FOUR_BLOCKS 0
#endif
constexpr bool kFastFourBlocksV16 = MOEKIT_ROUTER_FOUR_BLOCKS != 0;
inline constexpr int fast_min_blocks(int values_per_lane, int elem_bytes = 2) {
  return values_per_lane <= 8 || (kFastFourBlocksV16 && elem_bytes <= 2) ? 4 : 3;
}
// The backward also holds a token's K ranks per lane (K / TPT of them): with V = 8, 64 registers
// (4 blocks) only fit when a team has at least 8 lanes; otherwise 80 (3 blocks). With V = 16 and
// 16-bit logits it takes 4 blocks like the forward (tokens in flight +33%: at T = 32768 DeepSeek-V3
// 6 -> 4 resident rounds, Qwen3 / GPT-OSS 3 -> 2, E = 512 11 -> 8); ptxas 13.0 spills up to ~90
// bytes there (none for E = 257..512 softmax); fp32 rows keep 3.
inline constexpr int fast_backward_min_blocks(int values_per_lane, int lanes_per_token, int elem_bytes = 4) {
  return (values_per_lane <= 8 && lanes_per_token >= 8) ||
                 (kFastFourBlocksV16 && values_per_lane == 16 && elem_bytes <= 2)
             ? 4
             : 3;
}

// ---- generic path (everything else: E up to 4096, any groups) ---------------------------------
// One warp per token; the selection keys of the row live in shared memory (padded so that lane-
// strided and group-strided scans are conflict-free) and the logits are re-read through L1.
// Warps per block: as many as fit kGenericSmemBudget (at most kGenericMaxWarps); the budget stays
// under the 99 KiB every sm_80+ part allows per block.
constexpr int kGenericMaxWarps = 8;
constexpr size_t kGenericSmemBudget = 96 * 1024;
// Depth of each lane's sorted candidate cache in the warp top-k (refilled by a rescan of the
// lane's items when it runs dry): 4 makes refills rare for K = 32 over E = 2048.
constexpr int kGenericCacheDepth = 4;

// ---- grids ------------------------------------------------------------------------------------
// Forward and backward run one wave of resident blocks that stride over the tokens: the grid is
// min(blocks the tokens need, blocks resident on this device, kMax...Blocks). The forward writes
// one row of partial expert statistics per block (S in fp32, loads in int32, the token count)
// that the finalize kernel sums in block order; the workspace holds kMaxForwardBlocks rows at most
// (device-independent size; 1024 covers 148 SMs x 3 blocks with room to spare).
constexpr int kMaxForwardBlocks = 1024;
constexpr int kMaxBackwardBlocks = 4096;

// ---- finalize, aux loss, bias update, fake gate -----------------------------------------------
// Finalize: a block owns kFinalizeExperts experts and sums their partial rows in kFinalizeChunks
// fixed chunks of blocks, then the chunks in order (short dependent load chains, fixed order).
constexpr int kFinalizeExperts = 32;
constexpr int kFinalizeChunks = 32;
constexpr int kSmallReduceThreads = 256;  // aux loss and bias update: one block
constexpr int kFakeGateWarps = 8;         // fake gate: one warp per token

// Shared memory of the generic forward, carved in the same order on the host (size) and in the
// kernel. Per warp: the selection keys of its token (E padded by one word per 32), the group keys
// and kept-group bits (G > 1), the picked experts, and two staging buffers for logits rows (the
// current token's and the next one's, elem_bytes each); per block: the aux statistics
// accumulator, the load histogram and one aux flag per warp. The keys are kept only where they
// are read again (groups, or the aux scores written over them for the block sum); otherwise a
// refill recomputes a key from the staged row (the same instructions, the same bits). The
// workspace size query knows neither the dtype nor which statistics a call asks for: it sizes
// for 4-byte rows and kept keys (the most shared memory per warp, so the fewest warps per block
// and the most blocks); a launch with less per warp has more warps per block, fewer blocks, so
// fewer partial rows than the workspace holds.
struct GenericLayout {
  size_t key_words;    // per warp (0: keys not kept)
  size_t gkey_words;   // per warp
  size_t gbit_words;   // per warp
  size_t row_words;    // per warp, each of the two staging buffers (multiple of 4 words)
  size_t warp_words;   // per warp, total (multiple of 4 words)
  size_t block_words;  // per block: acc [E] + hist [E] + flags [kGenericMaxWarps] + count
  int warps;
  size_t bytes;
};

inline constexpr size_t padded_words(size_t n) { return n + n / 32 + 1; }
inline constexpr size_t round4(size_t n) { return (n + 3) / 4 * 4; }

inline constexpr GenericLayout generic_layout(int num_experts, int num_groups, int elem_bytes = 4,
                                              bool keys = true) {
  GenericLayout l{};
  const size_t E = static_cast<size_t>(num_experts);
  l.key_words = keys ? round4(padded_words(E)) : 0;
  l.gkey_words = num_groups > 1 ? round4(padded_words(static_cast<size_t>(num_groups))) : 0;
  l.gbit_words = num_groups > 1 ? round4((static_cast<size_t>(num_groups) + 31) / 32) : 0;
  l.row_words = round4((E * static_cast<size_t>(elem_bytes) + 3) / 4);
  l.warp_words = l.key_words + l.gkey_words + l.gbit_words + 32 + 2 * l.row_words;
  l.block_words = round4(2 * E + kGenericMaxWarps + 1);
  size_t warps = 1;
  while (warps < static_cast<size_t>(kGenericMaxWarps) &&
         4 * ((warps + 1) * l.warp_words + l.block_words) <= kGenericSmemBudget)
    ++warps;
  l.warps = static_cast<int>(warps);
  l.bytes = 4 * (warps * l.warp_words + l.block_words);
  return l;
}

// Shared memory of the generic backward, per warp: one fp32 row [E] of scattered gradient and two
// staging buffers for logits rows (elem_bytes each; kernels/router/backward.cuh). Warps per block:
// as many as fit kGenericSmemBudget (at most kGenericMaxWarps).
struct GenericBackwardLayout {
  size_t grad_words;  // per warp (multiple of 4 words)
  size_t row_words;   // per warp, each of the two staging buffers (multiple of 4 words)
  size_t warp_words;  // per warp, total
  int warps;
  size_t bytes;
};

inline constexpr GenericBackwardLayout generic_backward_layout(int num_experts, int elem_bytes) {
  GenericBackwardLayout l{};
  const size_t E = static_cast<size_t>(num_experts);
  l.grad_words = round4(E);
  l.row_words = round4((E * static_cast<size_t>(elem_bytes) + 3) / 4);
  l.warp_words = l.grad_words + 2 * l.row_words;
  size_t w = kGenericSmemBudget / (4 * l.warp_words);
  if (w < 1) w = 1;
  if (w > static_cast<size_t>(kGenericMaxWarps)) w = kGenericMaxWarps;
  l.warps = static_cast<int>(w);
  l.bytes = 4 * w * l.warp_words;
  return l;
}

}  // namespace moekit::kernels::router
