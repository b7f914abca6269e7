// The routing plan: a stable counting sort of the (token, choice) slots by local expert.
//
// Maths. Slot s = t K + k is routed to local expert e = indices[s] - e0 when its token is real
// (token_mask[t] != 0 or no mask) and indices[s] is in [e0, e0 + E_local); an id outside [0, E)
// in a real token is invalid (no row, counted). With n_e routed slots, kept_e = min(n_e, C) (C = inf
// when dropless), size_e = roundup(kept_e, A), offset_e = sum_{e' < e} size_e'. The routed slots
// of expert e, in ascending slot order, have ranks 0 .. n_e - 1; the slot of rank p gets row
// offset_e + p when kept (p < C under drop-by-position), drop-by-weight keeps the C largest
// weights and numbers the kept ones in slot order.
//
// Shapes. indices [T, K] int32, weights [T, K] fp32 (drop by weight), token_mask [T] uint8;
// outputs expert_counts [E_local], expert_offsets [E_local + 1], row_of_slot [T K],
// slot_of_row [max_rows] (entries >= total untouched), totals [3] (rows, dropped, invalid).
// Workspace: table [blocks, E_local + 1] int32 (used as uint16 entries when a block owns at most
// 65535 slots) and, for drop by weight, raw_counts and list_offsets [E_local], list_slots /
// list_keys [N].
//
// Phases 1 and 2 run in one plain launch when the grid is one block (plan_single_block_kernel:
// count, __syncthreads, scatter; N <= kPlanTileSlots, T = 0 included), else either in one
// cooperative launch (plan_fused_kernel: count, grid barrier, scatter; the default wherever the
// grid is sure to be resident) or as two kernels
// (plan_count_kernel, plan_scatter_kernel: the kernel boundary is the barrier); phase 3 is a
// kernel of its own. So the common case is 1 launch (2 with drop by weight), or 2 (3) on the
// two-kernel path. The index arithmetic is in plan_steps.hpp (labels, slot of a lane, ballot
// match, placement), which the CPU suite replays in this file's order:
//  1. count (count_block): block b counts its contiguous slot range per label into table[b][*]
//     (E_local + 1 bins, the last one invalid ids) with shared-memory integer atomics (a count
//     does not depend on their order). With few experts a warp first matches the labels of each
//     32-slot step (one ballot per label bit) and the lowest lane of each group adds its size.
//  2. scatter (scatter_block): every block reads the whole table (through L2), so it knows n_e
//     (column sums), the offsets (a block scan over experts) and its own start inside each expert
//     (the column prefix over lower blocks), without another barrier. Block 0 writes the counts,
//     offsets and totals; padding rows are marked -1, one warp per expert. Then the block walks
//     its range in tiles of kPlanTileSlots (1024) slots; each warp owns kPlanWarpSlots (128)
//     consecutive slots of the tile in kPlanItersPerWarp (4) steps of 32. A slot's rank inside
//     its expert is
//        (start of this block) + (earlier tiles) + (earlier warps of the tile, an inclusive scan
//        over the warps' counts) + (earlier steps of the warp, a per-warp shared counter) +
//        popc(lanes below with the same label),
//     all exact integer bookkeeping in a fixed order: stable and deterministic by construction.
//  3. plan_select_kernel (drop by weight, one block per expert over capacity): radix-selects the
//     C-th largest weight key among the expert's slots (listed in slot order by phase 2), keeps
//     the keys above it plus the first (in slot order) of the keys equal to it, and numbers the
//     kept slots in slot order with block scans.
//
// Latency is what the plan costs (its data are a few hundred KiB), so every global load is issued
// in batches before its first use: the first tile's labels before the table, the table in
// predicated batches of kPlanTableBatch (a loop that adds each load before issuing the next pays
// one L2 round trip per table row), the next tile's labels before the current tile's writes.
// Every index written is in range: ids are checked against [0, E) before use, rows are below
// total <= max_rows by construction.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cooperative_groups.h>

#include <climits>

#include "kernels/common/grid.hpp"
#include "kernels/tokens/launch.hpp"
#include "kernels/tokens/plan_launch.hpp"
#include "kernels/tokens/plan_steps.hpp"
#include "kernels/tokens/tuning.hpp"

namespace moekit::kernels::tokens {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kSteps = kPlanItersPerWarp;

// label[i] = label of this lane's slot in step i of the tile starting at `tile` (label_none past
// `end`). The loads of all steps are issued before any is used.
__device__ __forceinline__ void load_labels(const PlanArgs& a, int64_t tile, int64_t end, int warp,
                                            int lane, int (&label)[kSteps]) {
#pragma unroll
  for (int it = 0; it < kSteps; ++it) {
    const int64_t s = plan_slot(tile, warp, it, lane);
    label[it] = s < end ? slot_label(a, s) : label_none(a.num_local);
  }
}

// peers[i] = the lanes whose step-i label equals ours: one ballot per label bit (fold_vote), the
// steps interleaved so that their ballots are independent. All 32 lanes take part.
__device__ __forceinline__ void match_labels(const int (&label)[kSteps], unsigned (&peers)[kSteps],
                                             int bits) {
#pragma unroll
  for (int it = 0; it < kSteps; ++it) peers[it] = kFullMask;
  for (int bit = 0; bit < bits; ++bit) {
#pragma unroll
    for (int it = 0; it < kSteps; ++it)
      peers[it] = fold_vote(peers[it], __ballot_sync(kFullMask, (label[it] >> bit) & 1), label[it], bit);
  }
}

// Entry: the table's element type, uint16_t when plan_table_is_narrow (plan_steps.hpp), else int.
// A table entry. Read through L2 (ld.global.cg): in the fused kernel other blocks wrote it in
// this launch, before the grid barrier, and L1 is not coherent with their stores.
template <class Entry>
__device__ __forceinline__ int table_at(const PlanArgs& a, int64_t i) {
  return static_cast<int>(__ldcg(reinterpret_cast<const Entry*>(a.table) + i));
}

// ---- 1. counts per block ----------------------------------------------------------------------
// Block b counts its slot range into its row of the table. s_hist: [E_local + 1] ints of dynamic
// shared memory, the last bin counts invalid ids.
__device__ __forceinline__ void count_block(const PlanArgs& a, int* s_hist) {
  const int EL = a.num_local;
  const int bins = EL + 1;
  for (int i = threadIdx.x; i < bins; i += kPlanThreads) s_hist[i] = 0;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bits = label_bits(EL);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * a.slots_per_block;
  const int64_t end = min(static_cast<int64_t>(a.num_slots), begin + a.slots_per_block);
  // Few labels: many lanes of a step share one, so the lowest lane of each group adds the
  // group's size (one ballot per bit); many labels: lanes rarely collide, one atomic each.
  const bool aggregate = count_aggregates(EL);
  int label[kSteps];
  load_labels(a, begin, end, warp, lane, label);  // every label_none when the range is empty
  __syncthreads();
  for (int64_t tile = begin; tile < end; tile += kPlanTileSlots) {
    unsigned peers[kSteps];
    if (aggregate) {
      match_labels(label, peers, bits);
    } else {
#pragma unroll
      for (int it = 0; it < kSteps; ++it) peers[it] = 1u << lane;
    }
    int cur[kSteps];
#pragma unroll
    for (int it = 0; it < kSteps; ++it) cur[it] = label[it];
    // The next tile's loads go out before this tile's atomics.
    if (tile + kPlanTileSlots < end) load_labels(a, tile + kPlanTileSlots, end, warp, lane, label);
#pragma unroll
    for (int it = 0; it < kSteps; ++it)
      if (cur[it] <= EL && lane == __ffs(peers[it]) - 1) atomicAdd(&s_hist[cur[it]], __popc(peers[it]));
  }
  __syncthreads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * bins;
  if (plan_table_is_narrow(a.slots_per_block)) {
    uint16_t* out = reinterpret_cast<uint16_t*>(a.table) + row;
    for (int i = threadIdx.x; i < bins; i += kPlanThreads) out[i] = static_cast<uint16_t>(s_hist[i]);
  } else {
    int* out = a.table + row;
    for (int i = threadIdx.x; i < bins; i += kPlanThreads) out[i] = s_hist[i];
  }
}

__global__ void __launch_bounds__(kPlanThreads) plan_count_kernel(PlanArgs a) {
  extern __shared__ int s_hist[];
  count_block(a, s_hist);
}

// ---- 2. offsets and stable ranks --------------------------------------------------------------
// Dynamic shared memory of plan_scatter_kernel for E_local experts.
__host__ __device__ constexpr int wcnt_stride(int num_local) { return (num_local + 1) & ~1; }
__host__ __device__ constexpr size_t scatter_smem_bytes(int num_local) {
  return sizeof(int) * (4 * static_cast<size_t>(num_local) + 1) +
         sizeof(uint16_t) * kPlanWarps * static_cast<size_t>(wcnt_stride(num_local));
}
// The fused kernel's: the count's histogram [E_local + 1] and the scatter's arrays share it.
__host__ __device__ constexpr size_t fused_smem_bytes(int num_local) {
  const size_t count = sizeof(int) * (static_cast<size_t>(num_local) + 1);
  const size_t scatter = scatter_smem_bytes(num_local);
  return count > scatter ? count : scatter;
}

// E_local >= kPlanThreads: thread t owns the columns t, t + kPlanThreads, ... of the local
// experts; it loads RP rows of kPlanTableBatch / RP columns per batch (all issued, then used)
// and writes s_n[e] (sum over all blocks) and s_run[e] (sum over blocks below b).
template <int RP, class Entry>
__device__ __forceinline__ void sum_owned_columns(const PlanArgs& a, int b, int B, int* s_n, int* s_run) {
  constexpr int CP = kPlanTableBatch / RP;
  const int EL = a.num_local;
  const int64_t bins = EL + 1;
  for (int c0 = threadIdx.x; c0 < EL; c0 += CP * kPlanThreads) {
    int tot[CP], pre[CP];
#pragma unroll
    for (int c = 0; c < CP; ++c) tot[c] = pre[c] = 0;
    for (int r0 = 0; r0 < B; r0 += RP) {
      int v[CP][RP];
#pragma unroll
      for (int c = 0; c < CP; ++c)
#pragma unroll
        for (int j = 0; j < RP; ++j) {
          const int e = c0 + c * kPlanThreads, r = r0 + j;
          v[c][j] = e < EL && r < B ? table_at<Entry>(a, r * bins + e) : 0;
        }
#pragma unroll
      for (int c = 0; c < CP; ++c)
#pragma unroll
        for (int j = 0; j < RP; ++j) {
          tot[c] += v[c][j];
          pre[c] += r0 + j < b ? v[c][j] : 0;
        }
    }
#pragma unroll
    for (int c = 0; c < CP; ++c) {
      const int e = c0 + c * kPlanThreads;
      if (e < EL) {
        s_n[e] = tot[c];
        s_run[e] = pre[c];
      }
    }
  }
}

// The column sums of the table for scatter_block: s_n[e] = n_e over all blocks, s_run[e] = the
// sum over the blocks below b. s_part: [2][kPlanThreads] shared scratch.
template <class Entry>
__device__ __forceinline__ void sum_table(const PlanArgs& a, int b, int B, int* s_n, int* s_run,
                                          int (*s_part)[kPlanThreads]) {
  const int EL = a.num_local;
  const int64_t bins = EL + 1;
  const int tid = threadIdx.x;
  if (EL >= kPlanThreads) {
    const int rows = table_rows_per_batch(B);
    if (rows == kPlanTableBatch / 4)
      sum_owned_columns<kPlanTableBatch / 4, Entry>(a, b, B, s_n, s_run);
    else if (rows == kPlanTableBatch / 2)
      sum_owned_columns<kPlanTableBatch / 2, Entry>(a, b, B, s_n, s_run);
    else
      sum_owned_columns<kPlanTableBatch, Entry>(a, b, B, s_n, s_run);
  } else {
    // Fewer experts than threads: `parts` threads share each column, part p loading the rows
    // p, p + parts, ... in predicated batches.
    const int parts = column_parts(EL, B);
    const int e = tid % EL, p = tid / EL;
    int pre = 0, tot = 0;
    if (p < parts) {
      for (int r0 = p; r0 < B; r0 += parts * kPlanTableBatch) {
        int v[kPlanTableBatch];
#pragma unroll
        for (int j = 0; j < kPlanTableBatch; ++j) {
          const int r = r0 + j * parts;
          v[j] = r < B ? table_at<Entry>(a, r * bins + e) : 0;
        }
#pragma unroll
        for (int j = 0; j < kPlanTableBatch; ++j) {
          tot += v[j];
          pre += r0 + j * parts < b ? v[j] : 0;
        }
      }
    }
    s_part[0][tid] = pre;
    s_part[1][tid] = tot;
    __syncthreads();
    if (tid < EL) {
      int pre_sum = 0, tot_sum = 0;
      for (int q = 0; q < parts; ++q) {
        pre_sum += s_part[0][q * EL + tid];
        tot_sum += s_part[1][q * EL + tid];
      }
      s_run[tid] = pre_sum;
      s_n[tid] = tot_sum;
    }
  }
}

// s_dyn: scatter_smem_bytes(E_local) of dynamic shared memory.
__device__ __forceinline__ void scatter_block(const PlanArgs& a, int* s_dyn) {
  using BlockScan = cub::BlockScan<int, kPlanThreads>;
  using BlockReduce = cub::BlockReduce<int, kPlanThreads>;
  __shared__ typename BlockScan::TempStorage s_scan;
  __shared__ typename BlockReduce::TempStorage s_reduce;
  __shared__ int s_part[2][kPlanThreads];

  const int EL = a.num_local;
  const int stride = wcnt_stride(EL);
  int* s_n = s_dyn;              // [EL] n_e, routed slots of expert e (all blocks)
  int* s_off = s_n + EL;         // [EL + 1] offset_e
  int* s_run = s_off + EL + 1;   // [EL] rank of this block's next slot of expert e
  int* s_list = s_run + EL;      // [EL] list start of expert e (drop by weight)
  // [kPlanWarps][stride]: per-warp counts of the current tile, then their inclusive scan over warps
  uint16_t* s_wcnt = reinterpret_cast<uint16_t*>(s_list + EL);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int b = blockIdx.x;
  const int B = gridDim.x;
  const int64_t bins = EL + 1;
  const int cap = capacity_or_max(a);
  const int bits = label_bits(EL);
  const int64_t begin = static_cast<int64_t>(b) * a.slots_per_block;
  const int64_t end = min(static_cast<int64_t>(a.num_slots), begin + a.slots_per_block);

  // Loads first: this block's first tile of labels, then (block 0) the invalid-id column; the
  // table columns follow, so the three latencies overlap.
  int label[kSteps];
  load_labels(a, begin, end, warp, lane, label);
  int my_invalid = 0;
  if (b == 0) {
    const bool narrow = plan_table_is_narrow(a.slots_per_block);
    for (int bb = tid; bb < B; bb += kPlanThreads)
      my_invalid += narrow ? table_at<uint16_t>(a, bb * bins + EL) : table_at<int>(a, bb * bins + EL);
  }

  for (int i = tid; i < kPlanWarps * stride; i += kPlanThreads) s_wcnt[i] = 0;

  // Column sums of the table: n_e over all blocks, and the prefix over blocks below b.
  if (plan_table_is_narrow(a.slots_per_block))
    sum_table<uint16_t>(a, b, B, s_n, s_run, s_part);
  else
    sum_table<int>(a, b, B, s_n, s_run, s_part);
  __syncthreads();

  // Offsets: each thread owns a contiguous run of experts; one block scan over the runs.
  const int per_thread = (EL + kPlanThreads - 1) / kPlanThreads;
  const int e_begin = min(EL, tid * per_thread);
  const int e_end = min(EL, e_begin + per_thread);
  int my_size = 0, my_list = 0, my_dropped = 0;
  for (int e = e_begin; e < e_end; ++e) {
    const int n = s_n[e];
    const int kept = min(n, cap);
    my_size += padded_size(kept, a.alignment);
    my_dropped += n - kept;
    if (listed(a, n, cap)) my_list += n;
  }
  int size_prefix = 0, total_rows = 0;
  BlockScan(s_scan).ExclusiveSum(my_size, size_prefix, total_rows);
  __syncthreads();
  int list_prefix = 0;
  if (a.drop_by_weight != 0) {
    BlockScan(s_scan).ExclusiveSum(my_list, list_prefix);
    __syncthreads();
  }
  for (int e = e_begin; e < e_end; ++e) {
    const int n = s_n[e];
    s_off[e] = size_prefix;
    size_prefix += padded_size(min(n, cap), a.alignment);
    s_list[e] = list_prefix;
    if (listed(a, n, cap)) list_prefix += n;
  }
  if (tid == 0) s_off[EL] = total_rows;

  if (b == 0) {
    const int dropped = BlockReduce(s_reduce).Sum(my_dropped);
    __syncthreads();
    const int invalid = BlockReduce(s_reduce).Sum(my_invalid);
    if (tid == 0) {
      a.totals[0] = total_rows;
      a.totals[1] = dropped;
      a.totals[2] = invalid;
    }
  }
  __syncthreads();

  if (b == 0) {
    for (int e = tid; e < EL; e += kPlanThreads) {
      a.expert_counts[e] = min(s_n[e], cap);
      a.expert_offsets[e] = s_off[e];
      if (a.drop_by_weight != 0) {
        a.raw_counts[e] = s_n[e];
        a.list_offsets[e] = s_list[e];
      }
    }
    if (tid == 0) a.expert_offsets[EL] = s_off[EL];
  }

  // Padding rows of the experts this block looks after: one warp per expert, lanes on
  // consecutive rows.
  for (int e = b + warp * B; e < EL; e += B * kPlanWarps) {
    const int pad_begin = s_off[e] + min(s_n[e], cap);
    const int pad_end = s_off[e + 1];
    for (int r = pad_begin + lane; r < pad_end; r += 32) a.slot_of_row[r] = kNoRow;
  }

  // Stable ranks, tile by tile.
  const unsigned below = (1u << lane) - 1u;
  uint16_t* my_wcnt = s_wcnt + warp * stride;
  for (int64_t tile = begin; tile < end; tile += kPlanTileSlots) {
    unsigned peers[kSteps];
    match_labels(label, peers, bits);
    // Rank inside the warp: the label's count in earlier steps (the warp's shared counter,
    // advanced by the lowest lane of each group) plus the group's lanes below this one.
    int wrank[kSteps];
#pragma unroll
    for (int it = 0; it < kSteps; ++it) {
      const int l = label[it];
      const bool routed = l < EL;
      const int before = routed ? static_cast<int>(my_wcnt[l]) : 0;
      __syncwarp();
      if (routed && lane == __ffs(peers[it]) - 1)
        my_wcnt[l] = static_cast<uint16_t>(before + __popc(peers[it]));
      __syncwarp();
      wrank[it] = before + __popc(peers[it] & below);
    }
    // The next tile's loads go out before this tile's scan and writes.
    int next[kSteps];
    load_labels(a, tile + kPlanTileSlots, end, warp, lane, next);
    __syncthreads();
    // Inclusive prefix over the warps of the tile, per expert: s_wcnt[w][e] = count of e in
    // warps 0 .. w; the last warp's entry is the tile's count.
    for (int e = tid; e < EL; e += kPlanThreads) {
      int run = 0;
#pragma unroll
      for (int w = 0; w < kPlanWarps; ++w) {
        run += s_wcnt[w * stride + e];
        s_wcnt[w * stride + e] = static_cast<uint16_t>(run);
      }
    }
    __syncthreads();
    // Positions and writes. List entries (drop by weight) get their keys after the loop, so that
    // the weight loads of all steps are in flight together.
    int list_entry[kSteps];
#pragma unroll
    for (int it = 0; it < kSteps; ++it) {
      const int64_t s = plan_slot(tile, warp, it, lane);
      const int l = label[it];
      list_entry[it] = -1;
      if (l < EL) {
        const int earlier_warps = warp > 0 ? static_cast<int>(s_wcnt[(warp - 1) * stride + l]) : 0;
        const int pos = s_run[l] + earlier_warps + wrank[it];
        const Placement pl = place_slot(a, pos, s_n[l], cap, s_off[l], s_list[l]);
        if (pl.kind == Place::kRow) {
          a.row_of_slot[s] = pl.index;
          a.slot_of_row[pl.index] = static_cast<int>(s);
        } else if (pl.kind == Place::kDropped) {
          a.row_of_slot[s] = kNoRow;
        } else {
          a.list_slots[pl.index] = static_cast<int>(s);
          list_entry[it] = pl.index;
        }
      } else if (s < end) {
        a.row_of_slot[s] = kNoRow;
      }
    }
    if (a.drop_by_weight != 0) {
      float w[kSteps];
#pragma unroll
      for (int it = 0; it < kSteps; ++it)
        w[it] = list_entry[it] >= 0 ? a.weights[plan_slot(tile, warp, it, lane)] : 0.0f;
#pragma unroll
      for (int it = 0; it < kSteps; ++it)
        if (list_entry[it] >= 0) a.list_keys[list_entry[it]] = weight_key(w[it]);
    }
    __syncthreads();
    // Advance past the tile and clear the warps' counters.
    for (int e = tid; e < EL; e += kPlanThreads) {
      s_run[e] += s_wcnt[(kPlanWarps - 1) * stride + e];
#pragma unroll
      for (int w = 0; w < kPlanWarps; ++w) s_wcnt[w * stride + e] = 0;
    }
    __syncthreads();
#pragma unroll
    for (int it = 0; it < kSteps; ++it) label[it] = next[it];
  }
}

__global__ void __launch_bounds__(kPlanThreads) plan_scatter_kernel(PlanArgs a) {
  extern __shared__ int s_dyn[];
  scatter_block(a, s_dyn);
}

// ---- 1 + 2 in one launch ----------------------------------------------------------------------
// The count and the scatter of a block, separated by a grid barrier instead of a kernel boundary:
// launched cooperatively (every block resident at once), so the barrier cannot deadlock. The
// shared memory of the count is dead once the block has written its table row (before the
// barrier), so both phases use the same dynamic shared memory.
__global__ void __launch_bounds__(kPlanThreads) plan_fused_kernel(PlanArgs a) {
  extern __shared__ int s_dyn[];
  count_block(a, s_dyn);
  // Makes every block's table row visible to every block (the barrier fences device-wide).
  cooperative_groups::this_grid().sync();
  scatter_block(a, s_dyn);
}

// ---- 1 + 2 in one block -----------------------------------------------------------------------
// The grid of plan_grid is one block exactly when N <= kPlanTileSlots (T = 0 included): then the
// block's own barrier is the grid barrier, and the kernel is launched like any other (a
// cooperative launch costs the host more than a plain one, and the grid barrier's atomic and
// polling round trips are gone). __syncthreads() orders the table row's stores before the
// scatter's loads of it (block-wide visibility of global memory; ld.global.cg is only a cache
// hint) and the count's last reads of the shared histogram before the scatter reuses that memory.
// Same code, same bits as the two other paths.
__global__ void __launch_bounds__(kPlanThreads) plan_single_block_kernel(PlanArgs a) {
  extern __shared__ int s_dyn[];
  count_block(a, s_dyn);
  __syncthreads();
  scatter_block(a, s_dyn);
}

// ---- 3. capacity by weight --------------------------------------------------------------------
__global__ void __launch_bounds__(kSelectThreads) plan_select_kernel(PlanArgs a) {
  using BlockScan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename BlockScan::TempStorage s_scan;
  __shared__ unsigned s_bins[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;

  const int e = blockIdx.x;
  const int n = a.raw_counts[e];
  const int cap = a.capacity;
  if (n <= cap) return;  // all kept: rows written by the scatter kernel
  const int tid = threadIdx.x;
  const uint32_t* keys = a.list_keys + a.list_offsets[e];
  const int* slots = a.list_slots + a.list_offsets[e];
  const int offset = a.expert_offsets[e];

  // Radix select, 8 bits at a time from the top: after the 4 passes `prefix` is the key of the
  // cap-th largest element and `remaining` how many elements equal to it are kept.
  uint32_t prefix = 0;
  int remaining = cap;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    const uint32_t high = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
    for (int i = tid; i < 256; i += kSelectThreads) s_bins[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kSelectThreads) {
      const uint32_t k = keys[i];
      if ((k & high) == prefix) atomicAdd(&s_bins[(k >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins 255 - 8l down to 248 - 8l; lanes in descending key order.
      int c[8];
      int sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = static_cast<int>(s_bins[255 - 8 * tid - j]);
        sum += c[j];
      }
      int inclusive = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(kFullMask, inclusive, o);
        if (tid >= o) inclusive += v;
      }
      const unsigned hit = __ballot_sync(kFullMask, inclusive >= remaining);
      if (tid == __ffs(hit) - 1) {
        int before = inclusive - sum;
        for (int j = 0; j < 8; ++j) {
          if (before + c[j] >= remaining) {
            s_prefix = prefix | (static_cast<uint32_t>(255 - 8 * tid - j) << shift);
            s_remaining = remaining - before;
            break;
          }
          before += c[j];
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
  }

  // Keep key > threshold, and the first `remaining` keys equal to it in slot order; number the
  // kept slots in slot order.
  const uint32_t threshold = prefix;
  int ties_seen = 0, kept_seen = 0;
  for (int chunk = 0; chunk < n; chunk += kSelectThreads) {
    const int i = chunk + tid;
    const bool valid = i < n;
    const uint32_t k = valid ? keys[i] : 0u;
    const int tie = valid && k == threshold ? 1 : 0;
    int tie_rank = 0, ties = 0;
    BlockScan(s_scan).ExclusiveSum(tie, tie_rank, ties);
    __syncthreads();
    const int keep = valid && (k > threshold || (tie && ties_seen + tie_rank < remaining)) ? 1 : 0;
    int keep_rank = 0, kept = 0;
    BlockScan(s_scan).ExclusiveSum(keep, keep_rank, kept);
    __syncthreads();
    if (valid) {
      const int slot = slots[i];
      if (keep) {
        const int row = offset + kept_seen + keep_rank;
        a.row_of_slot[slot] = row;
        a.slot_of_row[row] = slot;
      } else {
        a.row_of_slot[slot] = kNoRow;
      }
    }
    ties_seen += ties;
    kept_seen += kept;
  }
}

cudaError_t launch_select(const PlanArgs& a, cudaStream_t stream) {
  if (a.drop_by_weight == 0 || a.capacity <= 0 || a.num_slots <= 0) return cudaSuccess;
  plan_select_kernel<<<a.num_local, kSelectThreads, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

cudaError_t launch_split(const PlanArgs& a, cudaStream_t stream) {
  const size_t count_smem = sizeof(int) * (static_cast<size_t>(a.num_local) + 1);
  plan_count_kernel<<<a.num_blocks, kPlanThreads, count_smem, stream>>>(a);
  cudaError_t error = cudaPeekAtLastError();
  if (error != cudaSuccess) return error;
  const size_t scatter_smem = scatter_smem_bytes(a.num_local);
  error = ensure_dynamic_smem(plan_scatter_kernel, scatter_smem);
  if (error != cudaSuccess) return error;
  plan_scatter_kernel<<<a.num_blocks, kPlanThreads, scatter_smem, stream>>>(a);
  error = cudaPeekAtLastError();
  if (error != cudaSuccess) return error;
  return launch_select(a, stream);
}

// Whether the fused kernel's grid is certain to be resident at once on the current device: at
// most one block per SM (a plan block always fits on an SM by itself: 256 threads, at most 255
// registers each, shared memory within the opt-in limit) on a device with cooperative launch.
// Device attributes from kernels/common/grid.hpp's per-device cache (no API call once read; a
// device that cannot be asked takes the two-kernel path).
bool fused_fits(const PlanArgs& a) {
  const int device = current_device();
  return device_cooperative_launch(device) && a.num_blocks <= device_sm_count(device);
}

cudaError_t launch_fused(const PlanArgs& a, cudaStream_t stream) {
  const size_t smem = fused_smem_bytes(a.num_local);
  cudaError_t error = ensure_dynamic_smem(plan_fused_kernel, smem);
  if (error != cudaSuccess) return error;
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  error = launch_with_attribute(plan_fused_kernel, dim3(static_cast<unsigned>(a.num_blocks)), dim3(kPlanThreads), smem,
                                stream, &cooperative, a);
  if (error != cudaSuccess) return error;
  return launch_select(a, stream);
}

cudaError_t launch_single_block(const PlanArgs& a, cudaStream_t stream) {
  const size_t smem = fused_smem_bytes(a.num_local);
  cudaError_t error = ensure_dynamic_smem(plan_single_block_kernel, smem);
  if (error != cudaSuccess) return error;
  plan_single_block_kernel<<<1, kPlanThreads, smem, stream>>>(a);
  error = cudaPeekAtLastError();
  if (error != cudaSuccess) return error;
  return launch_select(a, stream);
}

}  // namespace

cudaError_t launch_plan_kernels(const PlanArgs& a, PlanKernels which, cudaStream_t stream) {
  if (which == PlanKernels::kSplit) return launch_split(a, stream);
  if (which == PlanKernels::kAuto) {
    // One block (N <= kPlanTileSlots, T = 0 included): a plain launch, no grid barrier, no device
    // query. kFused still forces the cooperative kernel there (the GPU suite compares the paths).
    if (a.num_blocks == 1) return launch_single_block(a, stream);
    if (!fused_fits(a)) return launch_split(a, stream);
    // A device that runs fewer blocks at once than it has SMs (an MPS client limited to part of
    // the GPU) refuses the cooperative launch before enqueuing anything: take the two kernels.
    const cudaError_t fused = launch_fused(a, stream);
    if (fused != cudaErrorCooperativeLaunchTooLarge) return fused;
    (void)cudaGetLastError();  // not sticky: clear it
    return launch_split(a, stream);
  }
  return launch_fused(a, stream);
}

cudaError_t launch_plan(const PlanArgs& a, cudaStream_t stream) {
  return launch_plan_kernels(a, PlanKernels::kAuto, stream);
}

}  // namespace moekit::kernels::tokens
