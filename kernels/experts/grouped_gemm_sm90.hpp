// Host-visible facts of the Hopper (sm_90a) grouped GEMM: tile shape, shared-memory layout, the
// tensor maps its TMA loads read through, and which problems it takes. Plain C++ (no CUDA device
// code, no driver types), so the CPU tests check every number here; grouped_gemm_sm90.cuh holds
// the kernel and tma.hpp turns a TmaSpec into a CUtensorMap.
//
// Tile: 128 x 256 x 64 per CTA (BM x BN x BK), 3 warpgroups of 128 threads:
//   warpgroup 0       producer: one thread issues every TMA load (the other 127 threads leave
//                     after giving up their registers: setmaxnreg.dec to kProducerRegs);
//   warpgroups 1, 2   consumers: rows [64 (w - 1), 64 w) of the tile, all 256 columns, one
//                     wgmma.m64n256k16 per k16 step (128 fp32 accumulators per thread), then the
//                     fused epilogue straight from the registers (setmaxnreg.inc to kConsumerRegs).
// Shared memory: kStages stages of { A [128 rows][64 k] (16 KB), B (32 KB) }, each stage operand
// 1024-byte aligned and 128-byte swizzled (what TMA's SWIZZLE_128B writes and wgmma's 128B swizzle
// mode reads), then (staged activation-backward kernels only) the epilogue staging regions, then
// 2 kStages mbarriers (full, empty), then the row-tile prefix of the schedule.
//   B, KN layout (x @ W, N contiguous in memory; wgmma's "N-major", imm-trans-b = 1): four TMA
//     boxes of [64 k][64 n] (8 KB each) side by side: box j holds logical columns [64 j, 64 j + 64)
//     of the tile.
//   B, NK layout (x @ W^T, K contiguous; wgmma's K-major): one TMA box of [256 n][64 k].
// Gate/up pairing (concatenated gate | up columns, kEpiGateUp): the tile's virtual columns
// [n0, n0 + 256) are gate columns [n0 / 2, n0 / 2 + 128) and the same up columns (b_column in
// grouped_problem.cuh). Boxes 0, 1 load those gate columns and boxes 2, 3 the up columns, so
// logical tile column c < 128 is gate column n0 / 2 + c and column 128 + c its up column: in the
// wgmma accumulator layout (per 8-column chunk j the mma.sync m16n8 C layout) a thread owns gate
// chunk j and up chunk j + 16, i.e. every gate column together with its up column. The tensor map
// of B is then 4-D, {I, 2, K, G}: the "half" coordinate picks gate or up, and a box past I (the
// last tile when I is not a multiple of 128) is zero-filled instead of reading the up half.
#pragma once

#include <cuda_runtime_api.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "kernels/experts/grouped_gemm.hpp"

namespace moekit::kernels::experts::sm90 {

// The deepest shared-memory ring any sm_90a kernel uses (a -D in cuda_args, 3 or 4). 4 by
// measurement: docs/experts.md "Ring depth" (an A/B of two builds, this one set to 3 in the other,
// per shape class). The CPU suite's layout checks assume 4.
#ifndef MOEKIT_SM90_MAX_STAGES
#define MOEKIT_SM90_MAX_STAGES 4
#endif
static_assert(MOEKIT_SM90_MAX_STAGES == 3 || MOEKIT_SM90_MAX_STAGES == 4, "MOEKIT_SM90_MAX_STAGES: 3 or 4");

// One tile configuration of the axis-M kernels: kBM_ rows (64 per consumer warpgroup: 128 = two
// consumers, 64 = one) x 256 columns x 64 k, one CTA per SM. The 64-row tiles halve the rows a
// group's last tile computes past its end, at twice the B traffic from L2 per row and one
// warpgroup's epilogue per 64 rows. (Two 64-row CTAs per SM, so that one's epilogue overlaps the
// other's k loop, cannot be built: ptxas compiles the whole kernel under the launch bound's 128
// registers a thread, and the m64n256 accumulators alone take 128.) Which one a problem gets:
// sm90::choose_tile (measured, docs/experts.md "Tile per shape class"). The weight gradients run
// TileConfig (128 x 256) only.
// kClusterM_ = 2: two CTAs of a cluster take the two 128-row halves of a 256-row tile of one group
// and column tile, and each loads half of the weights' (B's) boxes for both (TMA multicast): B
// crosses L2 once per 256 rows instead of once per 128 (CUTLASS's 2 x 1 cluster). Forward kinds
// (B KN) only; the schedule's row tiles are 256 rows, so a group with an odd number of 128-row tiles
// has the second CTA compute rows it never stores. Measured at parity with TileConfig on the large
// balanced shapes and slower elsewhere (this kernel is not short of L2 bandwidth): choose_tile
// never picks it; the tile test and benchmark keep it measured.
template <int kBM_, int kClusterM_ = 1>
struct TileConfigT {
  static_assert(kBM_ == 64 || kBM_ == 128, "tile rows: 64 or 128 (64 per consumer warpgroup)");
  static_assert(kClusterM_ == 1 || (kClusterM_ == 2 && kBM_ == 128), "clusters of two 128-row CTAs only");
  static constexpr int kBM = kBM_;
  static constexpr int kClusterM = kClusterM_;
  static constexpr int kSchedBM = kBM_ * kClusterM_;  // rows of the schedule's row tiles
  static constexpr int kBN = 256;
  static constexpr int kBK = 64;
  static constexpr int kConsumers = kBM_ / 64;  // consumer warpgroups, 64 rows each
  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kThreads = kWarpgroupThreads * (kConsumers + 1);
  // The deepest ring; the TMA-store and staged instances take it or one stage less
  // (tma_store_stages).
  static constexpr int kStages = MOEKIT_SM90_MAX_STAGES;
  static constexpr int kGroupM = 8;      // panel height of the tile swizzle (as sm_80)
  static constexpr int kBoxCols = 64;    // 64 16-bit elements = the 128-byte swizzle span
  // Register split by setmaxnreg: the entry allocation of __launch_bounds__(384, 1) (168, for
  // either configuration: the 64-row one, 256 threads, is compiled under the same bound so that
  // ptxas allocates its consumer under the same 232-register cap; left at 255 it spilled the
  // staged act-backward kernel) is moved from the producer warpgroup to the consumers.
  static constexpr int kMaxThreads = 384;
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
  static constexpr int kElemBytes = 2;   // bf16 / f16
};
using TileConfig = TileConfigT<128>;
using TileConfig64 = TileConfigT<64>;        // the configurations sm90::choose_tile picks from
using TileConfig128x2 = TileConfigT<128, 2>;

// Byte offsets inside the dynamic shared memory, after its base is rounded up to 1024 bytes:
// kStages_ ring stages, then kStagingBytes_ of epilogue staging (0 for every kernel but the
// staged activation-backward dgrad), then the barriers and the prefix.
template <int kStages_, uint32_t kStagingBytes_, class Cfg_ = TileConfig>
struct SmemLayoutT {
  using C = Cfg_;
  static constexpr int kStages = kStages_;
  static constexpr uint32_t kAlign = 1024;  // 128B-swizzle atoms: 8 rows of 128 bytes
  static constexpr uint32_t kABytes = C::kBM * C::kBK * C::kElemBytes;          // 16384 (128 rows)
  static constexpr uint32_t kBBoxBytes = C::kBK * C::kBoxCols * C::kElemBytes;  // 8192 (KN box)
  static constexpr uint32_t kBBytes = C::kBN * C::kBK * C::kElemBytes;          // 32768
  static constexpr uint32_t kStageBytes = kABytes + kBBytes;                    // 49152 (128 rows)
  static constexpr uint32_t kPipelineBytes = kStages * kStageBytes;
  static constexpr uint32_t kStaging = kPipelineBytes;                          // kStagingBytes_
  static constexpr uint32_t kStagingBytes = kStagingBytes_;
  static constexpr uint32_t kFullBarrier = kStaging + kStagingBytes;            // kStages x 8
  static constexpr uint32_t kEmptyBarrier = kFullBarrier + 8 * kStages;         // kStages x 8
  static constexpr uint32_t kPrefix = kEmptyBarrier + 8 * kStages;
  static constexpr uint32_t a_offset(int stage) { return stage * kStageBytes; }
  static constexpr uint32_t b_offset(int stage) { return stage * kStageBytes + kABytes; }
  // Prefix [G + 1] plus the block scan's scratch (one int32 per warp).
  static size_t bytes(int num_groups) {
    return kAlign + kPrefix + (static_cast<size_t>(num_groups) + 1 + C::kThreads / 32) * 4;
  }
};
template <class Cfg = TileConfig>
using SmemLayoutOf = SmemLayoutT<Cfg::kStages, 0, Cfg>;
using SmemLayout = SmemLayoutOf<TileConfig>;

// The activation-backward dgrad's staged epilogue (kEpiBwdAct, grouped_gemm_sm90.cuh
// epilogue_bwd_act_staged): each consumer warpgroup stages its accumulators (fp32) through its own
// region, one pass of 32 rows x 64 columns at a time (rows padded to kBwdStageStride floats so the
// fragment stores of a half-warp hit 32 distinct banks), then walks them row-major with 16-byte
// loads of u and 16-byte stores of du and h'. The two regions (18 KB) fit next to the 4-stage
// ring while the prefix does (E <= 4067); above that the kernel runs a 3-stage ring
// (bwd_act_staged_stages). MOEKIT_SM90_BWD_ACT_STAGED=0 (a -D in cuda_args) restores the
// register-direct epilogue for every dgrad.
#ifndef MOEKIT_SM90_BWD_ACT_STAGED
#define MOEKIT_SM90_BWD_ACT_STAGED 1
#endif
constexpr bool kBwdActStaged = MOEKIT_SM90_BWD_ACT_STAGED != 0;
constexpr int kBwdStageRows = 64;                       // one consumer warpgroup's rows
constexpr int kBwdStagePassRows = 32;                   // rows staged at a time
constexpr int kBwdStageCols = 64;                       // accumulator columns per sub-tile
constexpr int kBwdStageStride = kBwdStageCols + 8;      // floats per staged row
constexpr uint32_t kBwdStageRegionBytes = kBwdStagePassRows * kBwdStageStride * 4;  // 9216
template <class Cfg = TileConfig>
constexpr uint32_t bwd_staging_bytes() { return Cfg::kConsumers * kBwdStageRegionBytes; }
constexpr uint32_t kBwdStagingBytes = bwd_staging_bytes<TileConfig>();  // 18432
template <int kStages, class Cfg = TileConfig>
using SmemLayoutBwdAct = SmemLayoutT<kStages, bwd_staging_bytes<Cfg>(), Cfg>;

// The ring depth of a staged or TMA-store instance of configuration Cfg whose layout L<stages>
// needs L<stages>::bytes(E) for E groups, under the device's opt-in shared memory per block:
// Cfg's deepest ring where it fits, else one stage less, else 0. The launchers instantiate
// exactly these two depths.
template <class Cfg, template <int, class> class L>
inline int ring_stages(int num_groups, size_t smem_optin) {
  if (L<Cfg::kStages, Cfg>::bytes(num_groups) <= smem_optin) return Cfg::kStages;
  if (L<Cfg::kStages - 1, Cfg>::bytes(num_groups) <= smem_optin) return Cfg::kStages - 1;
  return 0;
}

// Ring depth of the staged kernel for E groups: 4 (as every other kernel) where that layout fits
// the device's opt-in shared memory per block, else 3 (0: neither fits).
template <class Cfg = TileConfig>
inline int bwd_act_staged_stages(int num_groups, size_t smem_optin) {
  return ring_stages<Cfg, SmemLayoutBwdAct>(num_groups, smem_optin);
}

// ---- The TMA-store epilogue (MOEKIT_SM90_TMA_STORE; kEpiStore of axis M, kEpiWgrad) ----
// Instead of storing its accumulators straight from registers (4-byte pairs, both consumer
// warpgroups held until the last store issues), each consumer warpgroup converts them to T into
// its own shared-memory region of [64 rows][128 columns] (two [64][64] boxes, 128-byte rows,
// 128B-swizzled as TMA's SWIZZLE_128B reads them), and one elected thread writes each box with a
// TMA bulk tensor store (cp.async.bulk.tensor ... .global.shared::cta, one bulk group per box).
// A tile's 256 columns go out as four boxes through the two box buffers; before a box overwrites
// its buffer the elected thread waits until every bulk group but the newest has been read
// (cp.async.bulk.wait_group.read 1), so a box is converted while the previous one is read out, and
// the last box of tile i drains while tile i + 1's k loop runs. Row tails: a box of a group's
// tile must not write rows past the group's end (the next expert's rows of the same output), so a
// warpgroup whose 64 rows are not all inside its group stores that tile with the register-direct
// epilogue (see docs/experts.md); column tails are clipped by the tensor map's bounds (N). Weight
// gradients have the group as the third tensor-map dimension, so their m and n tails clip too.
// MOEKIT_SM90_TMA_STORE=0 (a -D in cuda_args) keeps the register-direct stores everywhere.
#ifndef MOEKIT_SM90_TMA_STORE
#define MOEKIT_SM90_TMA_STORE 1
#endif
constexpr bool kTmaStore = MOEKIT_SM90_TMA_STORE != 0;
constexpr int kTmaStoreRows = 64;                                               // one warpgroup's rows
constexpr int kTmaStoreCols = 128;                                              // columns per region
constexpr uint32_t kTmaStoreBoxBytes = kTmaStoreRows * TileConfig::kBoxCols * TileConfig::kElemBytes;  // 8192
constexpr uint32_t kTmaStoreRegionBytes = kTmaStoreRows * kTmaStoreCols * TileConfig::kElemBytes;     // 16384
template <class Cfg = TileConfig>
constexpr uint32_t tma_store_staging_bytes() { return Cfg::kConsumers * kTmaStoreRegionBytes; }
constexpr uint32_t kTmaStoreStagingBytes = tma_store_staging_bytes<TileConfig>();  // 32768
template <int kStages, class Cfg = TileConfig>
using SmemLayoutTmaStore = SmemLayoutT<kStages, tma_store_staging_bytes<Cfg>(), Cfg>;
static_assert(SmemLayoutTmaStore<4>::kStaging % SmemLayoutTmaStore<4>::kAlign == 0 &&
                  SmemLayoutTmaStore<3>::kStaging % SmemLayoutTmaStore<3>::kAlign == 0 &&
                  kTmaStoreRegionBytes % 1024 == 0 && kTmaStoreBoxBytes % 1024 == 0,
              "TMA-store boxes start on 128B-swizzle atoms");

// Ring depth of a TMA-store kernel for E groups (wgrad: E = 0, no prefix): 4 where that layout
// fits the device's opt-in shared memory per block (E <= 483 on 227 KB), else 3 (0: neither).
template <class Cfg = TileConfig>
inline int tma_store_stages(int num_groups, size_t smem_optin) {
  return ring_stages<Cfg, SmemLayoutTmaStore>(num_groups, smem_optin);
}

// Geometry of the staged epilogue (one consumer warpgroup; float indices into its region).
// Fragment stores: the wgmma accumulator pair d[4 j + 2 h], d[4 j + 2 h + 1] of thread
// (warp, lane) is warpgroup row 16 warp + lane / 4 + 8 h, tile columns 8 j + 2 (lane % 4), + 1;
// sub-tile s holds chunks j = 8 s + jj (jj < 8); pass P of a sub-tile holds warpgroup rows
// [32 P, 32 P + 32), written by warps 2 P and 2 P + 1. Items: consumer thread ctid's item k
// (0 .. 15) is sub-tile k / 4, pass (k / 2) % 2, warpgroup row 16 (k % 4) + ctid / 8, tile columns
// 64 (k / 4) + 8 (ctid % 8) .. + 7. The CPU tests check that the items read back exactly what the
// fragments stored and cover every element of the warpgroup's 64 x 256 tile once.
__host__ __device__ constexpr int bwd_stage_writer_pass(int warp) { return warp >> 1; }
__host__ __device__ constexpr int bwd_stage_store_index(int warp, int lane, int h, int jj) {
  return (16 * (warp & 1) + (lane >> 2) + 8 * h) * kBwdStageStride + 8 * jj + 2 * (lane & 3);
}
__host__ __device__ constexpr int bwd_stage_item_pass(int k) { return (k >> 1) & 1; }
__host__ __device__ constexpr int bwd_stage_item_row(int ctid, int k) { return 16 * (k & 3) + (ctid >> 3); }
__host__ __device__ constexpr int bwd_stage_item_column(int ctid, int k) {
  return kBwdStageCols * (k >> 2) + 8 * (ctid & 7);
}
__host__ __device__ constexpr int bwd_stage_load_index(int ctid, int k) {
  return (bwd_stage_item_row(ctid, k) - kBwdStagePassRows * bwd_stage_item_pass(k)) * kBwdStageStride +
         8 * (ctid & 7);
}

// Whether the staged epilogue takes this kEpiBwdAct GEMM: its 16-byte accesses of u, du and h'
// need 16-byte-aligned bases and row strides, I (the up half's offset) and N multiples of 8
// elements. The public API guarantees all of it (MOEKIT_STATUS_MISALIGNED, H and I multiples of
// 8); anything else runs the register-direct epilogue's kernel.
inline bool bwd_act_staged_takes(const GroupedGemmProblem& p, const EpilogueParams& ep) {
  if (!kBwdActStaged || ep.u == nullptr || ep.c == nullptr || ep.h == nullptr) return false;
  const uintptr_t ptrs = reinterpret_cast<uintptr_t>(ep.u) | reinterpret_cast<uintptr_t>(ep.c) |
                         reinterpret_cast<uintptr_t>(ep.h);
  const int64_t lds = ep.ldu | ep.ldc | ep.ldh;
  return (ptrs & 15u) == 0 && (lds & 7) == 0 && (p.n & 7) == 0 && (ep.inter & 7) == 0 && ep.ldu > 0 &&
         ep.ldc > 0 && ep.ldh > 0;
}

static_assert(SmemLayout::kABytes % SmemLayout::kAlign == 0 && SmemLayout::kBBytes % SmemLayout::kAlign == 0,
              "every operand tile starts on a swizzle atom");

// A tensor map as cuTensorMapEncodeTiled takes it (dims innermost first, in elements; strides of
// dims 1 .. rank - 1 in bytes; box in elements), 16-bit elements, SWIZZLE_128B, zero fill.
struct TmaSpec {
  int rank = 0;
  uint64_t dims[5] = {0, 0, 0, 0, 0};
  uint64_t strides[4] = {0, 0, 0, 0};
  uint32_t box[5] = {1, 1, 1, 1, 1};
};

// A [R, K] with row stride lda: box [bm rows][64 k] (the tile's rows). Rows past R and k past K
// read as zeros.
inline TmaSpec tma_spec_a(int64_t rows, int k, int64_t lda, int bm = TileConfig::kBM) {
  TmaSpec s;
  s.rank = 2;
  s.dims[0] = static_cast<uint64_t>(k);
  s.dims[1] = static_cast<uint64_t>(rows);
  s.strides[0] = static_cast<uint64_t>(lda) * TileConfig::kElemBytes;
  s.box[0] = TileConfig::kBK;
  s.box[1] = static_cast<uint32_t>(bm);
  return s;
}

// B_g, KN ([K, N] row-major per group, ldb, group stride in elements), as {cols, halves, K, G}:
// with gate/up pairing (gate_up_half = I > 0) cols = I and halves = 2 (the up half starts I
// columns on); otherwise cols = N and halves = 1. Box [1 group][64 k][1 half][64 cols].
inline TmaSpec tma_spec_b_kn(int num_groups, int k, int n, int64_t ldb, int64_t group_stride, int gate_up_half) {
  TmaSpec s;
  const uint64_t eb = TileConfig::kElemBytes;
  s.rank = 4;
  const bool paired = gate_up_half > 0;
  s.dims[0] = static_cast<uint64_t>(paired ? gate_up_half : n);
  s.dims[1] = paired ? 2 : 1;
  s.dims[2] = static_cast<uint64_t>(k);
  s.dims[3] = static_cast<uint64_t>(num_groups);
  s.strides[0] = (paired ? static_cast<uint64_t>(gate_up_half) : static_cast<uint64_t>(ldb)) * eb;
  s.strides[1] = static_cast<uint64_t>(ldb) * eb;
  s.strides[2] = static_cast<uint64_t>(group_stride) * eb;
  s.box[0] = TileConfig::kBoxCols;
  s.box[1] = 1;
  s.box[2] = TileConfig::kBK;
  s.box[3] = 1;
  return s;
}

// B_g, NK ([N, K] row-major per group) as {K, N, G}: box [1 group][256 n][64 k].
inline TmaSpec tma_spec_b_nk(int num_groups, int k, int n, int64_t ldb, int64_t group_stride) {
  TmaSpec s;
  const uint64_t eb = TileConfig::kElemBytes;
  s.rank = 3;
  s.dims[0] = static_cast<uint64_t>(k);
  s.dims[1] = static_cast<uint64_t>(n);
  s.dims[2] = static_cast<uint64_t>(num_groups);
  s.strides[0] = static_cast<uint64_t>(ldb) * eb;
  s.strides[1] = static_cast<uint64_t>(group_stride) * eb;
  s.box[0] = TileConfig::kBK;
  s.box[1] = TileConfig::kBN;
  s.box[2] = 1;
  return s;
}

// Weight gradients (axis K): X [R, M] and Y [R, N] row-major, both read k-major by rows: box
// [64 rows][64 columns] ({cols, R}); the tile's A is two X boxes (m0, m0 + 64: one per consumer
// warpgroup), its B four Y boxes (n0 + 64 j), as for B KN.
inline TmaSpec tma_spec_rows(int64_t rows, int cols, int64_t ld) {
  TmaSpec s;
  s.rank = 2;
  s.dims[0] = static_cast<uint64_t>(cols);
  s.dims[1] = static_cast<uint64_t>(rows);
  s.strides[0] = static_cast<uint64_t>(ld) * TileConfig::kElemBytes;
  s.box[0] = TileConfig::kBoxCols;
  s.box[1] = TileConfig::kBK;
  return s;
}

// Output of a TMA-store epilogue, axis M: C [R, N] with row stride ldc, box [64 rows][64 cols].
inline TmaSpec tma_spec_store_rows(int64_t rows, int n, int64_t ldc) {
  TmaSpec s;
  s.rank = 2;
  s.dims[0] = static_cast<uint64_t>(n);
  s.dims[1] = static_cast<uint64_t>(rows);
  s.strides[0] = static_cast<uint64_t>(ldc) * TileConfig::kElemBytes;
  s.box[0] = TileConfig::kBoxCols;
  s.box[1] = kTmaStoreRows;
  return s;
}

// Output of the TMA-store weight gradient: C [G][M][N] contiguous, as {N, M, G}; box
// [1 group][64 m][64 n] (m and n tails clip at the group's own bounds).
inline TmaSpec tma_spec_store_wgrad(int num_groups, int m, int n) {
  TmaSpec s;
  s.rank = 3;
  s.dims[0] = static_cast<uint64_t>(n);
  s.dims[1] = static_cast<uint64_t>(m);
  s.dims[2] = static_cast<uint64_t>(num_groups);
  s.strides[0] = static_cast<uint64_t>(n) * TileConfig::kElemBytes;
  s.strides[1] = static_cast<uint64_t>(m) * static_cast<uint64_t>(n) * TileConfig::kElemBytes;
  s.box[0] = TileConfig::kBoxCols;
  s.box[1] = kTmaStoreRows;
  s.box[2] = 1;
  return s;
}

// What cuTensorMapEncodeTiled demands of a spec (so a launch never gets as far as a driver
// error): rank 1..5, every dim in [1, 2^32], strides multiples of 16 below 2^40, boxes in
// [1, 256] (a box may be larger than its dim: the excess is zero-filled) with the inner box a
// 16-byte multiple within the 128-byte swizzle span, and each stride at least the extent of the
// dimensions below it (no overlapping rows).
inline bool tma_spec_valid(const TmaSpec& s) {
  if (s.rank < 1 || s.rank > 5) return false;
  for (int i = 0; i < s.rank; ++i) {
    if (s.dims[i] < 1 || s.dims[i] > (uint64_t(1) << 32)) return false;
    if (s.box[i] < 1 || s.box[i] > 256) return false;
  }
  if ((s.box[0] * TileConfig::kElemBytes) % 16 != 0 || s.box[0] * TileConfig::kElemBytes > 128) return false;
  uint64_t extent = s.dims[0] * TileConfig::kElemBytes;
  for (int i = 0; i + 1 < s.rank; ++i) {
    if (s.strides[i] % 16 != 0 || s.strides[i] >= (uint64_t(1) << 40)) return false;
    if (s.strides[i] < extent) return false;
    extent = s.strides[i] * s.dims[i + 1];
  }
  return true;
}

// KN boxes of a tile whose first virtual column is n0 (box j fills logical tile columns
// [64 j, 64 j + 64)): the column coordinate in B's tensor map and its "half" coordinate. Paired:
// boxes 0, 1 gate columns n0 / 2 + {0, 64}, boxes 2, 3 the same up columns; otherwise n0 + 64 j.
// A box whose column is at or past the map's columns (I paired, N otherwise) is not issued.
__host__ __device__ inline int kn_box_column(int n0, int j, bool paired) {
  return paired ? n0 / 2 + TileConfig::kBoxCols * (j & 1) : n0 + TileConfig::kBoxCols * j;
}
__host__ __device__ inline int kn_box_half(int j, bool paired) { return paired ? (j >> 1) : 0; }

// Epilogue columns of accumulator chunk j (columns 8 j .. 8 j + 7 of the tile) for the lane with
// q = lane % 4: its first column (q owns that and the next). Paired: for j < 16 the gate (= h)
// column i, whose up column sits in chunk j + 16; otherwise the stored output column.
__host__ __device__ inline int paired_h_column(int n0, int j, int q) { return n0 / 2 + 8 * j + 2 * q; }
__host__ __device__ inline int plain_column(int n0, int j, int q) { return n0 + 8 * j + 2 * q; }

// Bytes one stage's TMA loads deliver (the full boxes, zero-filled parts included): what the
// producer announces with mbarrier.arrive.expect_tx.
constexpr uint32_t stage_tx_bytes() { return SmemLayout::kStageBytes; }

// wgmma shared-memory matrix descriptor (PTX ISA "matrix descriptor"): start address >> 4 in bits
// 0-13, leading-dimension byte offset >> 4 in 16-29, stride-dimension byte offset >> 4 in 32-45,
// base offset 0 (every tile starts on a 1024-byte atom), swizzle mode in 62-63 (1 = 128B).
//   A (K-major, 128B swizzle): rows of 128 bytes, 8-row atoms 1024 bytes apart: SBO = 1024; LBO
//     is unused for swizzled K-major layouts (a k16 step stays inside one 128-byte row) and set
//     to 1 (16 bytes); a k16 step adds 32 bytes to the start address.
//   B KN (N-major, 128B swizzle): each 64-column box is 64 k-rows of 128 bytes; LBO = distance
//     between 64-column boxes (8192), SBO = distance between 8-k-row atoms (1024); a k16 step
//     adds 16 rows = 2048 bytes.
//   B NK (K-major, 128B swizzle): as A (256 rows).
//   A of a weight gradient (X^T, M-major, imm-trans-a = 1): one [64 k][64 m] box per consumer
//     warpgroup, read like B KN (LBO would step to the next 64 m; one m64 wgmma needs none), a
//     k16 step adds 2048 bytes.
constexpr uint64_t kDescSwizzle128 = uint64_t(1) << 62;
constexpr uint64_t wgmma_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return (static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4)) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) | kDescSwizzle128;
}
constexpr uint32_t kDescALbo = 16, kDescASbo = 1024;
constexpr uint32_t kDescBKnLbo = SmemLayout::kBBoxBytes, kDescBKnSbo = 1024;
constexpr uint32_t kDescBNkLbo = 16, kDescBNkSbo = 1024;
constexpr uint32_t kDescAMnLbo = SmemLayout::kBBoxBytes, kDescAMnSbo = 1024;
constexpr uint32_t kAMnStepBytes = 16 * TileConfig::kBoxCols * TileConfig::kElemBytes;  // 2048
constexpr uint32_t kAStepBytes = 16 * TileConfig::kElemBytes;                        // 32
constexpr uint32_t kBKnStepBytes = 16 * TileConfig::kBoxCols * TileConfig::kElemBytes;  // 2048
constexpr uint32_t kBNkStepBytes = 16 * TileConfig::kElemBytes;                      // 32

// Byte offset, inside a 128B-swizzled tile of 128-byte rows, of the 16-bit element (row, col)
// (col < 64): TMA's SWIZZLE_128B places 16-byte chunk c of row r at chunk c ^ (r % 8).
constexpr uint32_t swizzled_offset(uint32_t row, uint32_t col) {
  return row * 128 + ((((col * 2) >> 4) ^ (row & 7)) << 4) + ((col * 2) & 15);
}

// Byte offset of element (warpgroup row r < 64, column col < 128 of the half) in a TMA-store
// region: box col / 64, inside it swizzled_offset(r, col % 64) (the CPU tests check both).
__host__ __device__ constexpr uint32_t tma_store_offset(uint32_t r, uint32_t col) {
  return (col >> 6) * kTmaStoreBoxBytes + r * 128 + (((((col & 63) * 2) >> 4) ^ (r & 7)) << 4) + (((col & 63) * 2) & 15);
}

// The same offsets as the gate-up TMA-store epilogue computes them (the CPU tests check both
// against tma_store_offset). Fragment stores: rows r and r + 8 share r % 8, so from a row base
// with r % 8 in bits 4-6 (tma_store_row_base) every column's swizzled 16-byte chunk is one XOR
// with a constant, (col % 64) / 8, plus the box and the byte inside the chunk
// (tma_store_col_offset). Tail copies: 16-byte chunk ch (0 .. 15) of row r
// (tma_store_chunk_offset), 1024 bytes apart for rows 8 apart.
__host__ __device__ constexpr uint32_t tma_store_row_base(uint32_t r) { return 128 * r + 16 * (r & 7); }
__host__ __device__ constexpr uint32_t tma_store_col_offset(uint32_t row_base, uint32_t col) {
  return (row_base ^ (((col & 63) >> 3) << 4)) + (col >> 6) * kTmaStoreBoxBytes + (col & 7) * 2;
}
__host__ __device__ constexpr uint32_t tma_store_chunk_offset(uint32_t r, uint32_t ch) {
  return (ch >> 3) * kTmaStoreBoxBytes + r * 128 + (((ch & 7) ^ (r & 7)) << 4);
}

// Whether the TMA-store epilogue can write this problem's output (sm90::takes holds): kEpiStore
// of axis M (forward down projection, dgrad of the down projection) with a 16-byte-aligned C and
// ldc a multiple of 8 elements, or kEpiWgrad without row splits (the fp32 split partials keep
// the register-direct stores) with a 16-byte-aligned C and N a multiple of 8. The public API
// guarantees the alignment (MOEKIT_STATUS_MISALIGNED, H and I multiples of 8). Independent of
// kTmaStore (the tests run both epilogues in one binary); the launchers check the switch.
inline bool tma_store_takes(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep) {
  if (ep.c == nullptr || (reinterpret_cast<uintptr_t>(ep.c) & 15) != 0) return false;
  if (p.axis == kAxisK)
    return kind == kEpiWgrad && p.splits == 1 && p.m >= 1 && p.n >= 1 && p.num_groups >= 1 &&
           tma_spec_valid(tma_spec_store_wgrad(p.num_groups, p.m, p.n));
  return p.axis == kAxisM && kind == kEpiStore && p.max_rows >= 1 && p.n >= 1 && ep.ldc > 0 && (ep.ldc & 7) == 0 &&
         tma_spec_valid(tma_spec_store_rows(p.max_rows, p.n, ep.ldc));
}

// ---- The gate-up forward epilogue through TMA stores (MOEKIT_SM90_TMA_STORE_GATE_UP) ----
// kEpiGateUp / kEpiRelu2 of axis M: h (ep.c) and, when asked, u (ep.u) staged per consumer
// warpgroup through the same [64][128] regions as the kEpiStore TMA-store epilogue, 128 columns
// (one region, two boxes) per phase: concatenated u gate, u up, h (h columns n0 / 2 + [0, 128));
// interleaved u 0..127, u 128..255, h (one h element per accumulator pair); relu2 u 0..127,
// u 128..255, h 0..127, h 128..255 (u phases only with ep.u; h last, so the accumulators die in
// the last phase). A warpgroup whose 64 rows all lie inside the tile's group stores each phase
// with TMA (boxes clip at the output's columns); a group's tail warpgroup copies its valid rows
// out of the staged region by thread (16-byte shared loads and global stores) instead, so the
// kernel holds no second (register-direct) copy of the epilogue. Per kind, by measurement
// (bench/results/diagnostics/sm90-epilogue-gateup-h200.json, one binary, alternating order): on
// for relu2 (MOEKIT_SM90_TMA_STORE_GATE_UP_RELU2, default 1: h 1.03-1.08x, h and u 1.07-1.17x
// faster than the register-direct stores); for the gated kinds (MOEKIT_SM90_TMA_STORE_GATE_UP:
// 0 never, 1 always, 2 = default: when the forward writes h alone) only without u (SwiGLU h
// 1.00-1.02x, h and u 0.99-1.04x at aa123c1). Either is a -D in cuda_args;
// tests/experts/test_experts_sm90_epilogue compares both epilogues bit for bit whatever they say.
#ifndef MOEKIT_SM90_TMA_STORE_GATE_UP
#define MOEKIT_SM90_TMA_STORE_GATE_UP 2
#endif
#ifndef MOEKIT_SM90_TMA_STORE_GATE_UP_RELU2
#define MOEKIT_SM90_TMA_STORE_GATE_UP_RELU2 1
#endif
constexpr int kTmaStoreGateUp = MOEKIT_SM90_TMA_STORE_GATE_UP;
constexpr bool kTmaStoreRelu2 = MOEKIT_SM90_TMA_STORE_GATE_UP_RELU2 != 0;
// Whether a gated gate-up forward with these parameters takes the TMA-store epilogue.
inline bool tma_store_gated(const EpilogueParams& ep) {
  return kTmaStoreGateUp == 1 || (kTmaStoreGateUp == 2 && ep.u == nullptr);
}

// Columns of h of a gate-up forward problem: I (concatenated), N / 2 (interleaved), N (relu2).
inline int gate_up_h_cols(const GroupedGemmProblem& p, EpiKind kind) {
  if (kind == kEpiRelu2) return p.n;
  return p.gate_up_half > 0 ? p.gate_up_half : p.n / 2;
}

// The u output of the TMA-store gate-up epilogue: concatenated u [R][2 I] as {I, 2, R} (gate half
// 0, up half 1: a box clips at its own half's end, never writing into the other half), box
// [64 rows][1][64 cols]; otherwise u [R][N] as tma_spec_store_rows.
inline TmaSpec tma_spec_store_u(const GroupedGemmProblem& p, int64_t ldu) {
  if (p.gate_up_half <= 0) return tma_spec_store_rows(p.max_rows, p.n, ldu);
  TmaSpec s;
  s.rank = 3;
  s.dims[0] = static_cast<uint64_t>(p.gate_up_half);
  s.dims[1] = 2;
  s.dims[2] = static_cast<uint64_t>(p.max_rows);
  s.strides[0] = static_cast<uint64_t>(p.gate_up_half) * TileConfig::kElemBytes;
  s.strides[1] = static_cast<uint64_t>(ldu) * TileConfig::kElemBytes;
  s.box[0] = TileConfig::kBoxCols;
  s.box[1] = 1;
  s.box[2] = kTmaStoreRows;
  return s;
}

// Whether the TMA-store gate-up epilogue can write this problem's outputs (sm90::takes holds):
// kEpiGateUp / kEpiRelu2 of axis M with h (ep.c) present, h and u 16-byte aligned with row
// strides multiples of 8 elements, and every output's column count (h: gate_up_h_cols, u: N, or
// I per half) a multiple of 8, so the tail warpgroups' 16-byte copies never straddle the end of a
// row's columns. Independent of kTmaStoreGateUp (the tests run both epilogues in one binary).
inline bool tma_store_gate_up_takes(const GroupedGemmProblem& p, EpiKind kind, const EpilogueParams& ep) {
  if (kind != kEpiGateUp && kind != kEpiRelu2) return false;
  if (p.axis != kAxisM || p.b_nk || p.max_rows < 1 || p.n < 1) return false;
  if (kind == kEpiRelu2 && p.gate_up_half > 0) return false;
  if (p.gate_up_half > 0 && p.n != 2 * p.gate_up_half) return false;
  if (ep.c == nullptr || (reinterpret_cast<uintptr_t>(ep.c) & 15) != 0 || ep.ldc <= 0 || (ep.ldc & 7) != 0)
    return false;
  const int hc = gate_up_h_cols(p, kind);
  if (hc < 8 || (hc & 7) != 0 || (p.n & 7) != 0 || ep.ldc < hc) return false;
  if (!tma_spec_valid(tma_spec_store_rows(p.max_rows, hc, ep.ldc))) return false;
  if (ep.u != nullptr) {
    if ((reinterpret_cast<uintptr_t>(ep.u) & 15) != 0 || ep.ldu < p.n || (ep.ldu & 7) != 0) return false;
    if (!tma_spec_valid(tma_spec_store_u(p, ep.ldu))) return false;
  }
  return true;
}

// ---- Tile per shape class ----
// The axis-M configurations (TileConfigT): 128 x 256, 64 x 256, and 128 x 256 in clusters of two
// with B multicast (forward kinds). choose_tile picks one from what the host knows of a problem: its
// kind, N, K and rows per group on average (max_rows / num_groups; the distribution is on the
// device), by the measurement in docs/experts.md "Tile per shape class"
// (bench/experts/bench_sm90_tiles.cpp). Every configuration computes each output element with the
// same wgmma instructions over k in the same order: the tile changes no bit of any result.
enum class Tile : int { k128 = 0, k64 = 1, k128x2 = 2 };
constexpr int kTileCount = 3;
inline const char* tile_name(Tile t) {
  switch (t) {
    case Tile::k64: return "64x256";
    case Tile::k128x2: return "128x256x2";
    default: return "128x256";
  }
}

// Whether tile `t` can run this axis-M problem: the clusters with B multicast take B KN (the
// forward kinds) only.
inline bool tile_takes(Tile t, const GroupedGemmProblem& p) { return t != Tile::k128x2 || !p.b_nk; }

// Whether configuration `bm` rows tiles this problem within the kernel's 32-bit tile decode.
inline bool tile_count_fits(const GroupedGemmProblem& p, int bm) {
  return max_row_tiles(p.max_rows, p.num_groups, bm) * ((p.n + TileConfig::kBN - 1) / TileConfig::kBN) <= INT32_MAX;
}

// Average rows per group at or below which the axis-M GEMMs run the 64-row tile (measured,
// docs/experts.md "Tile per shape class"). Small groups are bound by reading each group's weights
// once per row tile: where a group fits one 64-row tile both tiles read them once and the 64-row
// one computes and stores fewer padding rows (1-10 % faster at 16 and 32 rows per expert,
// balanced and random routing); a group of 65-128 rows takes two 64-row tiles, reading its
// weights twice (at 64 rows per expert on average, random routing puts half the groups there:
// 10-25 % slower). At 32 the cubic skew's few large groups already cost the 64-row tile 1-22 %
// on DeepSeek-V3 and Qwen3.
constexpr int64_t kSmallGroupRows = 32;

// The tile of an axis-M problem of a kind that has both (the forward gate-up kinds, kEpiStore and
// kEpiBwdAct; the weight gradients have one): 64 x 256 where groups average at most
// kSmallGroupRows rows and its tile count fits the 32-bit decode, else 128 x 256.
inline Tile choose_tile(const GroupedGemmProblem& p, EpiKind kind) {
  if (p.axis != kAxisM || kind == kEpiWgrad || p.num_groups < 1) return Tile::k128;
  if (p.max_rows > kSmallGroupRows * static_cast<int64_t>(p.num_groups)) return Tile::k128;
  return tile_count_fits(p, TileConfigT<64>::kBM) ? Tile::k64 : Tile::k128;
}

// Whether the sm_90a kernels take this problem with this epilogue: axis M with B KN and the
// forward epilogues or B NK with kEpiStore / kEpiBwdAct, and axis K with kEpiWgrad while kWgrad
// is on (one switch, so a GPU failure of that kernel alone can send the weight gradients back to
// the sm_80 kernels without touching the rest); tensor maps that cuTensorMapEncodeTiled accepts
// (16-byte-aligned bases, row and group strides multiples of 16 bytes: H and I multiples of 8);
// the gate/up pairing only as N = 2 I; max_rows >= 1 (at 0 the sm_80 kernels write the zero
// weight gradients). Everything else runs on the sm_80 kernels.
constexpr bool kWgrad = true;
inline bool takes(const GroupedGemmProblem& p, EpiKind kind) {
  if (p.axis == kAxisK) {
    if (!kWgrad || kind != kEpiWgrad || p.b_nk || p.num_groups < 1 || p.max_rows < 1 || p.max_rows > INT32_MAX ||
        p.m < 1 || p.n < 1 || p.splits < 1)
      return false;
    if ((reinterpret_cast<uintptr_t>(p.a) & 15) != 0 || (reinterpret_cast<uintptr_t>(p.b) & 15) != 0) return false;
    return tma_spec_valid(tma_spec_rows(p.max_rows, p.m, p.lda)) &&
           tma_spec_valid(tma_spec_rows(p.max_rows, p.n, p.ldb));
  }
  if (p.axis != kAxisM || p.num_groups < 1 || p.max_rows < 1 || p.max_rows > INT32_MAX || p.k < 1 || p.n < 1)
    return false;
  // The kernel decodes tiles in 32 bits (RowTileSchedule::decode32): the worst-case tile count
  // must fit.
  if (max_row_tiles(p.max_rows, p.num_groups, TileConfig::kBM) * ((p.n + TileConfig::kBN - 1) / TileConfig::kBN) >
      INT32_MAX)
    return false;
  if (p.b_nk ? !(kind == kEpiStore || kind == kEpiBwdAct)
             : !(kind == kEpiGateUp || kind == kEpiRelu2 || kind == kEpiStore))
    return false;
  if (p.gate_up_half > 0 && (p.b_nk || kind != kEpiGateUp || p.n != 2 * p.gate_up_half)) return false;
  if ((reinterpret_cast<uintptr_t>(p.a) & 15) != 0 || (reinterpret_cast<uintptr_t>(p.b) & 15) != 0) return false;
  const TmaSpec b = p.b_nk ? tma_spec_b_nk(p.num_groups, p.k, p.n, p.ldb, p.b_group_stride)
                           : tma_spec_b_kn(p.num_groups, p.k, p.n, p.ldb, p.b_group_stride, p.gate_up_half);
  return tma_spec_valid(tma_spec_a(p.max_rows, p.k, p.lda)) && tma_spec_valid(b);
}

}  // namespace moekit::kernels::experts::sm90

namespace moekit::kernels::experts {

// Launchers of the sm_90a kernels (grouped_gemm_sm90_*.cu; T = __nv_bfloat16 or __half), for
// problems sm90::takes accepts. In a build without sm_90a objects (gpu_archs without 90) they
// return cudaErrorNotSupported and sm90_built() is false.
template <class T>
cudaError_t launch_sm90_forward(const GroupedGemmProblem& problem, EpiKind kind, const EpilogueParams& params,
                                cudaStream_t stream);
template <class T>
cudaError_t launch_sm90_backward(const GroupedGemmProblem& problem, EpiKind kind, const EpilogueParams& params,
                                 cudaStream_t stream);
bool sm90_built();

}  // namespace moekit::kernels::experts
