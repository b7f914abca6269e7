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
// Workspace: table [blocks, E_local + 1] int32 and, for drop by weight, raw_counts and
// list_offsets [E_local], list_slots / list_keys [N].
//
// Kernels (2 launches, 3 with drop by weight):
//  1. plan_count_kernel: block b counts its contiguous slot range per local expert (shared-memory
//     integer atomics: a count does not depend on their order) into table[b][*].
//  2. plan_scatter_kernel: every block reads the whole table, so it knows n_e (column sums), the
//     offsets (a block scan over experts) and its own start inside each expert (the column prefix
//     over lower blocks), without a third launch or a global barrier. Block 0 writes the counts,
//     offsets and totals; padding rows are marked -1, experts spread over the blocks. Then the
//     block walks its range in tiles of 4096 slots; each warp owns 512 consecutive slots of the
//     tile. A slot's rank inside its expert is
//        (start of this block) + (earlier tiles) + (earlier warps of the tile) + (earlier lanes of
//        earlier steps of the warp) + popc(match_any peers below the lane),
//     all exact integer bookkeeping in a fixed order: stable and deterministic by construction.
//  3. plan_select_kernel (drop by weight, one block per expert over capacity): radix-selects the
//     C-th largest weight key among the expert's slots (listed in slot order by kernel 2), keeps
//     the keys above it plus the first (in slot order) of the keys equal to it, and numbers the
//     kept slots in slot order with block scans.
// Every index written is in range: ids are checked against [0, E) before use, rows are below
// total <= max_rows by construction.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>

#include "kernels/tokens/launch.hpp"
#include "kernels/tokens/tuning.hpp"

namespace moekit::kernels::tokens {
namespace {

constexpr int kNoRow = -1;
constexpr int kInvalidId = -2;
constexpr unsigned kFullMask = 0xffffffffu;

// Local expert of slot s, kNoRow or kInvalidId. The id of a masked token is not read.
__device__ __forceinline__ int classify(const PlanArgs& a, int64_t slot) {
  if (a.token_mask != nullptr) {
    const unsigned t = static_cast<unsigned>(slot) / static_cast<unsigned>(a.top_k);
    if (a.token_mask[t] == 0) return kNoRow;
  }
  const int id = a.indices[slot];
  if (id < 0 || id >= a.num_experts) return kInvalidId;
  const unsigned rel = static_cast<unsigned>(id - a.expert_begin);
  return rel < static_cast<unsigned>(a.num_local) ? static_cast<int>(rel) : kNoRow;
}

// Order-preserving key of a routing weight: a larger weight gives a larger key; -0 and +0 are
// equal; every NaN maps to 0, below -inf.
__device__ __forceinline__ uint32_t weight_key(float w) {
  uint32_t u = __float_as_uint(w);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ int capacity_or_max(const PlanArgs& a) {
  return a.capacity > 0 ? a.capacity : INT_MAX;
}

// roundup(kept, A) without int32 overflow in the intermediate (the result fits: it is bounded by
// max_rows, checked on the host).
__device__ __forceinline__ int padded_size(int kept, int alignment) {
  return static_cast<int>((static_cast<int64_t>(kept) + alignment - 1) / alignment * alignment);
}

__device__ __forceinline__ bool listed(const PlanArgs& a, int n, int cap) {
  return a.drop_by_weight != 0 && n > cap;
}

// ---- 1. counts per block ----------------------------------------------------------------------
__global__ void __launch_bounds__(kPlanThreads) plan_count_kernel(PlanArgs a) {
  extern __shared__ int s_hist[];  // [E_local + 1], the last bin counts invalid ids
  const int bins = a.num_local + 1;
  for (int i = threadIdx.x; i < bins; i += kPlanThreads) s_hist[i] = 0;
  __syncthreads();

  const int64_t begin = static_cast<int64_t>(blockIdx.x) * a.slots_per_block;
  const int64_t end = min(static_cast<int64_t>(a.num_slots), begin + a.slots_per_block);
  for (int64_t base = begin + threadIdx.x; base < end;
       base += static_cast<int64_t>(kPlanThreads) * kCountUnroll) {
    int cls[kCountUnroll];
#pragma unroll
    for (int u = 0; u < kCountUnroll; ++u) {
      const int64_t s = base + static_cast<int64_t>(u) * kPlanThreads;
      cls[u] = s < end ? classify(a, s) : kNoRow;
    }
#pragma unroll
    for (int u = 0; u < kCountUnroll; ++u) {
      if (cls[u] >= 0)
        atomicAdd(&s_hist[cls[u]], 1);
      else if (cls[u] == kInvalidId)
        atomicAdd(&s_hist[a.num_local], 1);
    }
  }
  __syncthreads();
  int* out = a.table + static_cast<int64_t>(blockIdx.x) * bins;
  for (int i = threadIdx.x; i < bins; i += kPlanThreads) out[i] = s_hist[i];
}

// ---- 2. offsets and stable ranks --------------------------------------------------------------
// Dynamic shared memory of plan_scatter_kernel for E_local experts.
__host__ __device__ constexpr int woff_stride(int num_local) { return (num_local + 1) & ~1; }
__host__ __device__ constexpr size_t scatter_smem_bytes(int num_local) {
  return sizeof(int) * (4 * static_cast<size_t>(num_local) + 1) +
         sizeof(uint16_t) * kPlanWarps * static_cast<size_t>(woff_stride(num_local));
}

__global__ void __launch_bounds__(kPlanThreads) plan_scatter_kernel(PlanArgs a) {
  using BlockScan = cub::BlockScan<int, kPlanThreads>;
  using BlockReduce = cub::BlockReduce<int, kPlanThreads>;
  __shared__ typename BlockScan::TempStorage s_scan;
  __shared__ typename BlockReduce::TempStorage s_reduce;
  __shared__ int s_part[2][kPlanThreads];

  const int EL = a.num_local;
  const int stride = woff_stride(EL);
  extern __shared__ int s_dyn[];
  int* s_n = s_dyn;              // [EL] n_e, routed slots of expert e (all blocks)
  int* s_off = s_n + EL;         // [EL + 1] offset_e
  int* s_run = s_off + EL + 1;   // [EL] rank of this block's next slot of expert e
  int* s_list = s_run + EL;      // [EL] list start of expert e (drop by weight)
  uint16_t* s_woff = reinterpret_cast<uint16_t*>(s_list + EL);  // [kPlanWarps][stride]

  const int tid = threadIdx.x;
  const int b = blockIdx.x;
  const int B = gridDim.x;
  const int bins = EL + 1;
  const int cap = capacity_or_max(a);

  for (int i = tid; i < kPlanWarps * stride; i += kPlanThreads) s_woff[i] = 0;

  // Column sums of the table: n_e over all blocks, and the prefix over blocks below b.
  if (EL >= kPlanThreads) {
    for (int e = tid; e < EL; e += kPlanThreads) {
      int pre = 0, tot = 0;
      // Independent loads: unrolled so that 16 are in flight per thread.
#pragma unroll 16
      for (int bb = 0; bb < B; ++bb) {
        const int v = a.table[static_cast<int64_t>(bb) * bins + e];
        tot += v;
        pre += bb < b ? v : 0;
      }
      s_run[e] = pre;
      s_n[e] = tot;
    }
  } else {
    // Fewer experts than threads: `parts` threads share each column.
    const int parts = kPlanThreads / EL;
    const int e = tid % EL, p = tid / EL;
    int pre = 0, tot = 0;
    if (p < parts) {
#pragma unroll 16
      for (int bb = p; bb < B; bb += parts) {
        const int v = a.table[static_cast<int64_t>(bb) * bins + e];
        tot += v;
        pre += bb < b ? v : 0;
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
    int my_invalid = 0;
    for (int bb = tid; bb < B; bb += kPlanThreads)
      my_invalid += a.table[static_cast<int64_t>(bb) * bins + EL];
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

  // Padding rows of the experts this block looks after.
  for (int e = b; e < EL; e += B) {
    const int pad_begin = s_off[e] + min(s_n[e], cap);
    const int pad_end = s_off[e + 1];
    for (int r = pad_begin + tid; r < pad_end; r += kPlanThreads) a.slot_of_row[r] = kNoRow;
  }

  // Stable ranks, tile by tile.
  const int warp = tid / 32, lane = tid % 32;
  const unsigned below = (1u << lane) - 1u;
  uint16_t* my_woff = s_woff + warp * stride;
  const int64_t begin = static_cast<int64_t>(b) * a.slots_per_block;
  const int64_t end = min(static_cast<int64_t>(a.num_slots), begin + a.slots_per_block);
  for (int64_t tile = begin; tile < end; tile += kPlanTileSlots) {
    const int64_t warp_base = tile + static_cast<int64_t>(warp) * (kPlanItersPerWarp * 32);
    int le[kPlanItersPerWarp];
    unsigned peers[kPlanItersPerWarp];
#pragma unroll
    for (int it = 0; it < kPlanItersPerWarp; ++it) {
      const int64_t s = warp_base + it * 32 + lane;
      const int c = s < end ? classify(a, s) : kNoRow;
      le[it] = c >= 0 ? c : kNoRow;
    }
    // Counts of each warp's 512 slots per expert (one writer per expert and step: the lowest
    // lane of the peers).
#pragma unroll
    for (int it = 0; it < kPlanItersPerWarp; ++it) {
      peers[it] = __match_any_sync(kFullMask, le[it]);
      if (le[it] >= 0 && lane == __ffs(peers[it]) - 1)
        my_woff[le[it]] = static_cast<uint16_t>(my_woff[le[it]] + __popc(peers[it]));
      __syncwarp();
    }
    __syncthreads();
    // Exclusive prefix over the warps of the tile, per expert.
    for (int e = tid; e < EL; e += kPlanThreads) {
      int run = 0;
#pragma unroll
      for (int w = 0; w < kPlanWarps; ++w) {
        const int v = s_woff[w * stride + e];
        s_woff[w * stride + e] = static_cast<uint16_t>(run);
        run += v;
      }
    }
    __syncthreads();
    // Ranks and writes, in step order; each step advances the warp's counters.
#pragma unroll
    for (int it = 0; it < kPlanItersPerWarp; ++it) {
      const int64_t s = warp_base + it * 32 + lane;
      const int l = le[it];
      const unsigned p = peers[it];
      if (l >= 0) {
        const int pos = s_run[l] + static_cast<int>(my_woff[l]) + __popc(p & below);
        const int n = s_n[l];
        if (listed(a, n, cap)) {
          const int idx = s_list[l] + pos;
          a.list_slots[idx] = static_cast<int>(s);
          a.list_keys[idx] = weight_key(a.weights[s]);
        } else if (pos < min(n, cap)) {
          const int row = s_off[l] + pos;
          a.row_of_slot[s] = row;
          a.slot_of_row[row] = static_cast<int>(s);
        } else {
          a.row_of_slot[s] = kNoRow;  // dropped by position
        }
      } else if (s < end) {
        a.row_of_slot[s] = kNoRow;
      }
      __syncwarp();
      if (l >= 0 && lane == __ffs(p) - 1)
        my_woff[l] = static_cast<uint16_t>(my_woff[l] + __popc(p));
      __syncwarp();
    }
    __syncthreads();
    // The last warp's counters now hold the tile's totals: advance and clear.
    for (int e = tid; e < EL; e += kPlanThreads) {
      s_run[e] += s_woff[(kPlanWarps - 1) * stride + e];
#pragma unroll
      for (int w = 0; w < kPlanWarps; ++w) s_woff[w * stride + e] = 0;
    }
    __syncthreads();
  }
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

}  // namespace

cudaError_t launch_plan(const PlanArgs& a, cudaStream_t stream) {
  const size_t count_smem = sizeof(int) * (static_cast<size_t>(a.num_local) + 1);
  plan_count_kernel<<<a.num_blocks, kPlanThreads, count_smem, stream>>>(a);
  cudaError_t error = cudaPeekAtLastError();
  if (error != cudaSuccess) return error;

  const size_t scatter_smem = scatter_smem_bytes(a.num_local);
  if (scatter_smem > 48 * 1024) {
    error = cudaFuncSetAttribute(plan_scatter_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(scatter_smem));
    if (error != cudaSuccess) return error;
  }
  plan_scatter_kernel<<<a.num_blocks, kPlanThreads, scatter_smem, stream>>>(a);
  error = cudaPeekAtLastError();
  if (error != cudaSuccess) return error;

  if (a.drop_by_weight != 0 && a.capacity > 0 && a.num_slots > 0) {
    plan_select_kernel<<<a.num_local, kSelectThreads, 0, stream>>>(a);
    error = cudaPeekAtLastError();
  }
  return error;
}

}  // namespace moekit::kernels::tokens
