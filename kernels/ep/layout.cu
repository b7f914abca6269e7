// The EP layout: where every token of this rank goes, and at which row.
//
// Maths. With E_r = E / n experts per rank, the destinations of token t are
//   dest(t) = sorted { floor(idx_tk / E_r) : 0 <= idx_tk < E }      (empty for a masked token).
// Tokens are split into C chunks of L = ceil(T / C) tokens. For destination d and chunk c, the
// tokens of the chunk that go to d, in ascending token order, get positions 0, 1, 2, ...; the
// count of (d, c) is the number of such tokens. The row of t at d is
//   start(d, c) + pos                         (pos < cc in capacity mode, else dropped: -1)
// with start(d, c) from the exact prefix sums or the fixed capacity blocks (src/ep/ep_plan.hpp),
// in the recv space when d is this rank and in the send space otherwise.
//
// Shapes. indices [T, K] int32, token_mask [T] uint8; tile_counts [C][J][n], exchange
// [2][n][P] with P = MOEKIT_EP_MAX_CHUNKS + 1 (C counts, then the configuration signature at
// P - 1; the send side is written here, the recv side by NCCL in exact mode), starts [2][n][C], totals [4], route_dest / route_slot [T][D]
// (destinations ascending, then -1 padding).
//
// Kernels (one thread per token, tiles of 256 tokens that never straddle a chunk):
//  1. layout_count_kernel: each warp walks the union of its lanes' destinations in ascending
//     order (warp min-reduce, ballot); the ballot's popcount is the warp's count for d. Per-tile
//     counts go to tile_counts.
//  2. layout_scan_kernel: one block per (d, c) turns the chunk's tile counts into exclusive
//     prefixes (block scans in tile order) and writes the count of (d, c) to the exchange.
//  3. layout_offsets_kernel: one block; the starts of every block in both row spaces (block scans
//     over ranks in rank order), the totals and the dropped count.
//  4. layout_assign_kernel: recomputes the warp counts, then a token's position at d is
//        (tile prefix) + (counts of earlier warps of the tile) + popc(ballot below the lane).
// All of it is exact integer bookkeeping in a fixed order (no atomics): the layout is a function
// of the indices, bitwise. Every row written is inside its block: positions count the chunk's
// tokens, and capacity blocks drop positions >= cc.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>

#include "kernels/ep/launch.hpp"
#include "kernels/ep/tuning.hpp"

namespace moekit::kernels::ep {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
// Items per thread of the offsets kernel: kLayoutThreads * 4 = 1024 = MOEKIT_EP_MAX_RANKS ranks.
constexpr int kOffsetItems = 4;

// The smallest destination rank > prev among token t's valid ids, or INT_MAX.
__device__ __forceinline__ int next_dest(const LayoutArgs& a, int64_t t, int prev) {
  const int32_t* row = a.indices + t * a.top_k;
  int best = INT_MAX;
  for (int k = 0; k < a.top_k; ++k) {
    const int e = row[k];
    if (e >= 0 && e < a.num_experts) {
      const int d = e / a.experts_per_rank;
      if (d > prev && d < best) best = d;
    }
  }
  return best;
}

__device__ __forceinline__ int64_t chunk_end(const LayoutArgs& a, int c) {
  const int64_t end = (static_cast<int64_t>(c) + 1) * a.chunk_tokens;
  return end < a.num_tokens ? end : a.num_tokens;
}

// This thread's token and whether it is real (inside its chunk and not masked).
__device__ __forceinline__ int64_t tile_token(const LayoutArgs& a) {
  return static_cast<int64_t>(blockIdx.y) * a.chunk_tokens +
         static_cast<int64_t>(blockIdx.x) * kLayoutThreads + threadIdx.x;
}

__device__ __forceinline__ bool is_real(const LayoutArgs& a, int64_t t) {
  return t < chunk_end(a, blockIdx.y) && (a.token_mask == nullptr || a.token_mask[t] != 0);
}

// warp_count[w][d] = tokens of warp w of this tile that go to d (smem zeroed by the caller).
// Every lane of the warp takes part (the loop is warp-uniform).
__device__ void count_warp(const LayoutArgs& a, int64_t t, bool real, int* warp_count) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int cur = real ? next_dest(a, t, -1) : INT_MAX;
  while (true) {
    const int d = __reduce_min_sync(kFullMask, cur);
    if (d == INT_MAX) break;
    const unsigned peers = __ballot_sync(kFullMask, cur == d);
    if (lane == 0) warp_count[warp * a.num_ranks + d] = __popc(peers);
    if (cur == d) cur = next_dest(a, t, d);
  }
}

__device__ void zero_shared(int* p, int count) {
  for (int i = threadIdx.x; i < count; i += kLayoutThreads) p[i] = 0;
}

__global__ void __launch_bounds__(kLayoutThreads) layout_count_kernel(LayoutArgs a) {
  extern __shared__ int warp_count[];  // [kLayoutWarps][n]
  const int n = a.num_ranks;
  zero_shared(warp_count, kLayoutWarps * n);
  __syncthreads();
  const int64_t t = tile_token(a);
  count_warp(a, t, is_real(a, t), warp_count);
  __syncthreads();
  int32_t* out =
      a.tile_counts + (static_cast<int64_t>(blockIdx.y) * a.tiles_per_chunk + blockIdx.x) * n;
  for (int d = threadIdx.x; d < n; d += kLayoutThreads) {
    int sum = 0;
    for (int w = 0; w < kLayoutWarps; ++w) sum += warp_count[w * n + d];
    out[d] = sum;
  }
}

// Block (d, c): exclusive prefix of the chunk's tile counts for d, in tile order; the total is
// the count of (d, c).
__global__ void __launch_bounds__(kLayoutThreads) layout_scan_kernel(LayoutArgs a) {
  using Scan = cub::BlockScan<int, kLayoutThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int d = blockIdx.x, c = blockIdx.y, n = a.num_ranks, tiles = a.tiles_per_chunk;
  int running = 0;
  for (int base = 0; base < tiles; base += kLayoutThreads) {
    const int j = base + static_cast<int>(threadIdx.x);
    int32_t* p = a.tile_counts + (static_cast<int64_t>(c) * tiles + j) * n + d;
    const int value = j < tiles ? *p : 0;
    int before = 0, aggregate = 0;
    Scan(temp).ExclusiveSum(value, before, aggregate);
    if (j < tiles) *p = running + before;
    running += aggregate;
    __syncthreads();  // temp is reused by the next round
  }
  if (threadIdx.x == 0) {
    const int64_t stride = a.exchange_stride;
    a.exchange[d * stride + c] = running;
    if (c == 0) {
      // The unused count slots are zeroed, so the exchanged block is fully defined.
      for (int u = a.num_chunks; u < a.exchange_stride - 1; ++u) a.exchange[d * stride + u] = 0;
      a.exchange[d * stride + a.exchange_stride - 1] = a.signature;
    }
  }
}

__global__ void __launch_bounds__(kLayoutThreads) layout_offsets_kernel(LayoutArgs a) {
  using Scan = cub::BlockScan<int, kLayoutThreads>;
  using Reduce = cub::BlockReduce<int, kLayoutThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } temp;
  const int n = a.num_ranks, C = a.num_chunks, P = a.exchange_stride, me = a.rank;
  const int32_t* send = a.exchange;
  const int32_t* recv = a.exchange + static_cast<int64_t>(n) * P;
  int32_t* send_starts = a.starts;
  int32_t* recv_starts = a.starts + static_cast<int64_t>(n) * C;

  if (a.capacity_mode) {
    const int cc = a.chunk_capacity;
    int dropped = 0;
    for (int d = threadIdx.x; d < n; d += kLayoutThreads) {
      const int block = d < me ? d : d - 1;
      for (int c = 0; c < C; ++c) {
        send_starts[d * C + c] = d == me ? 0 : (block * C + c) * cc;
        recv_starts[d * C + c] = (d * C + c) * cc;
        const int count = send[d * P + c];
        if (count > cc) dropped += count - cc;
      }
    }
    const int total_dropped = Reduce(temp.reduce).Sum(dropped);
    if (threadIdx.x == 0) {
      a.totals[0] = (n - 1) * C * cc;
      a.totals[1] = n * C * cc;
      a.totals[2] = total_dropped;
      a.totals[3] = 0;
    }
    return;
  }

  // Exact: blocked arrangement, thread i holds ranks 4i .. 4i + 3, scanned in rank order.
  int send_total[kOffsetItems], recv_total[kOffsetItems];
  for (int i = 0; i < kOffsetItems; ++i) {
    const int d = static_cast<int>(threadIdx.x) * kOffsetItems + i;
    send_total[i] = 0;
    recv_total[i] = 0;
    if (d < n) {
      for (int c = 0; c < C; ++c) {
        if (d != me) send_total[i] += send[d * P + c];
        recv_total[i] += recv[d * P + c];
      }
    }
  }
  int send_base[kOffsetItems], recv_base[kOffsetItems];
  int send_rows = 0, recv_rows = 0;
  Scan(temp.scan).ExclusiveSum(send_total, send_base, send_rows);
  __syncthreads();
  Scan(temp.scan).ExclusiveSum(recv_total, recv_base, recv_rows);
  for (int i = 0; i < kOffsetItems; ++i) {
    const int d = static_cast<int>(threadIdx.x) * kOffsetItems + i;
    if (d >= n) break;
    int s = send_base[i], r = recv_base[i];
    for (int c = 0; c < C; ++c) {
      send_starts[d * C + c] = d == me ? 0 : s;
      if (d != me) s += send[d * P + c];
      recv_starts[d * C + c] = r;
      r += recv[d * P + c];
    }
  }
  if (threadIdx.x == 0) {
    a.totals[0] = send_rows;
    a.totals[1] = recv_rows;
    a.totals[2] = 0;
    a.totals[3] = 0;
  }
}

__global__ void __launch_bounds__(kLayoutThreads) layout_assign_kernel(LayoutArgs a) {
  extern __shared__ int warp_count[];  // [kLayoutWarps][n]
  const int n = a.num_ranks, C = a.num_chunks, D = a.max_dests, c = blockIdx.y;
  zero_shared(warp_count, kLayoutWarps * n);
  __syncthreads();
  const int64_t t = tile_token(a);
  const bool inside = t < chunk_end(a, c);
  const bool real = is_real(a, t);
  count_warp(a, t, real, warp_count);
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int32_t* tile_prefix =
      a.tile_counts + (static_cast<int64_t>(c) * a.tiles_per_chunk + blockIdx.x) * n;
  const int32_t* send_starts = a.starts;
  const int32_t* recv_starts = a.starts + static_cast<int64_t>(n) * C;
  const int cap = a.capacity_mode ? a.chunk_capacity : INT_MAX;
  int j = 0;
  int cur = real ? next_dest(a, t, -1) : INT_MAX;
  while (true) {
    const int d = __reduce_min_sync(kFullMask, cur);
    if (d == INT_MAX) break;
    const unsigned peers = __ballot_sync(kFullMask, cur == d);
    if (cur == d) {
      int pos = tile_prefix[d];
      for (int w = 0; w < warp; ++w) pos += warp_count[w * n + d];
      pos += __popc(peers & lanes_below);
      int slot = -1;
      if (pos < cap) slot = (d == a.rank ? recv_starts[d * C + c] : send_starts[d * C + c]) + pos;
      a.route_dest[t * D + j] = d;
      a.route_slot[t * D + j] = slot;
      ++j;
      cur = next_dest(a, t, d);
    }
  }
  if (inside) {
    for (; j < D; ++j) {
      a.route_dest[t * D + j] = -1;
      a.route_slot[t * D + j] = -1;
    }
  }
}

size_t warp_count_bytes(int num_ranks) {
  return static_cast<size_t>(kLayoutWarps) * num_ranks * sizeof(int);
}

}  // namespace

cudaError_t launch_layout_count(const LayoutArgs& a, cudaStream_t stream) {
  if (a.num_tokens > 0 && a.tiles_per_chunk > 0) {
    layout_count_kernel<<<dim3(a.tiles_per_chunk, a.num_chunks), kLayoutThreads,
                          warp_count_bytes(a.num_ranks), stream>>>(a);
    const cudaError_t e = cudaPeekAtLastError();
    if (e != cudaSuccess) return e;
  }
  layout_scan_kernel<<<dim3(a.num_ranks, a.num_chunks), kLayoutThreads, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

cudaError_t launch_layout_offsets(const LayoutArgs& a, cudaStream_t stream) {
  layout_offsets_kernel<<<1, kLayoutThreads, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

cudaError_t launch_layout_assign(const LayoutArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.tiles_per_chunk == 0) return cudaSuccess;
  layout_assign_kernel<<<dim3(a.tiles_per_chunk, a.num_chunks), kLayoutThreads,
                         warp_count_bytes(a.num_ranks), stream>>>(a);
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels::ep
