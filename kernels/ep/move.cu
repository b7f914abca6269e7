// Row and metadata movement around the NCCL transfers of EP dispatch, and the small kernels of the
// backward and of the statistics reduction.
//
// pack (dispatch, combine backward), for each token t of a chunk and each of its rows (d, s) with
// s >= 0 (route_dest / route_slot of kernels/ep/layout.cu):
//   dst(d, s) = d == me ? recv_x[s] : send_x[s]            (recv space for this rank, send space
//   dst(d, s) = x[t]   (bit for bit)                         for the others)
//   meta(d, s) = [ idx_t0 .. idx_t,K-1 | bits(w_t0) .. bits(w_t,K-1) | t ]   (2K + 1 int32 words)
// One warp per token: the row is read once (kMoveUnroll vectors in flight per lane) and written to
// every destination; metadata goes to send_meta / recv_meta at the same rows.
// mark_tails (capacity mode): rows [count, cc) of the chunk's blocks become gaps: payload +0
//   bytes (they travel with the block, so without this a receiver would get stale workspace bytes
//   and two identical runs could differ), metadata ids -1, weights +0, token -1. One warp per
//   slot of the blocks.
// unpack: recv_meta [R][2K + 1] -> recv_indices [R, K], recv_weights [R, K], recv_src_token [R],
//   recv_mask [R] (token >= 0).
// grad_weights: grad_w[t][k] = (d == me ? self_weights : peer_weights)[s][k] with (d, s) the row
//   of t at d = owner(idx_tk); 0 for an invalid id, a dropped pair or a masked token (which has
//   no destinations, so its owner is never found).
// sum_ranks: out[i] = (((0 + in[0][i]) + in[1][i]) + ...) in fp32, rank order.
// Every output element is written by one thread with a fixed sequence of operations: bitwise
// reproducible. Every row index comes from the layout, which keeps it inside its block.
#include <cstdint>

#include "kernels/ep/launch.hpp"
#include "kernels/ep/tuning.hpp"

namespace moekit::kernels::ep {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

template <class V>
__global__ void __launch_bounds__(kMoveThreads) pack_kernel(PackArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kMoveWarpsPerBlock;
  const int64_t vectors = a.row_bytes / static_cast<int64_t>(sizeof(V));
  const int K = a.top_k, M = 2 * a.top_k + 1, D = a.max_dests;
  for (int64_t t = a.token_begin + static_cast<int64_t>(blockIdx.x) * kMoveWarpsPerBlock +
                   threadIdx.x / 32;
       t < a.token_end; t += warps) {
    int d = -1, s = -1;
    if (lane < D) {
      d = a.route_dest[t * D + lane];
      s = a.route_slot[t * D + lane];
    }
    const bool live = d >= 0 && s >= 0;
    const unsigned live_mask = __ballot_sync(kFullMask, live);
    if (live_mask == 0) continue;  // warp-uniform: the token goes nowhere (masked or dropped)
    unsigned long long dst = 0;
    if (live)
      dst = reinterpret_cast<unsigned long long>(
          static_cast<char*>(d == a.rank ? a.recv_x : a.send_x) + static_cast<int64_t>(s) * a.row_bytes);
    const V* src = reinterpret_cast<const V*>(static_cast<const char*>(a.x) + t * a.row_bytes);
    // Warp-uniform loop (the shuffles below need every lane).
    for (int64_t base = 0; base < vectors; base += 32 * kMoveUnroll) {
      V buf[kMoveUnroll];
#pragma unroll
      for (int u = 0; u < kMoveUnroll; ++u) {
        const int64_t v = base + u * 32 + lane;
        if (v < vectors) buf[u] = src[v];
      }
      unsigned m = live_mask;
      while (m != 0) {
        const int j = __ffs(m) - 1;
        m &= m - 1;
        V* out = reinterpret_cast<V*>(__shfl_sync(kFullMask, dst, j));
#pragma unroll
        for (int u = 0; u < kMoveUnroll; ++u) {
          const int64_t v = base + u * 32 + lane;
          if (v < vectors) out[v] = buf[u];
        }
      }
    }
    if (a.send_meta != nullptr) {
      unsigned m = live_mask;
      while (m != 0) {
        const int j = __ffs(m) - 1;
        m &= m - 1;
        const int dj = __shfl_sync(kFullMask, d, j);
        const int sj = __shfl_sync(kFullMask, s, j);
        int32_t* meta = (dj == a.rank ? a.recv_meta : a.send_meta) + static_cast<int64_t>(sj) * M;
        for (int w = lane; w < M; w += 32) {
          int32_t value;
          if (w < K)
            value = a.indices[t * K + w];
          else if (w < 2 * K)
            value = __float_as_int(a.weights[t * K + (w - K)]);
          else
            value = static_cast<int32_t>(t);
          meta[w] = value;
        }
      }
    }
  }
}

template <class V>
__global__ void __launch_bounds__(kMoveThreads) mark_tails_kernel(TailArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t cc = a.chunk_capacity;
  const int64_t total = static_cast<int64_t>(a.num_ranks) * cc;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kMoveWarpsPerBlock;
  const int64_t vectors = a.row_bytes / static_cast<int64_t>(sizeof(V));
  const int K = a.top_k, M = 2 * a.top_k + 1, C = a.num_chunks, P = a.exchange_stride;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kMoveWarpsPerBlock + threadIdx.x / 32; i < total;
       i += warps) {
    const int d = static_cast<int>(i / cc);
    const int64_t r = i % cc;
    if (r < a.exchange[static_cast<int64_t>(d) * P + a.chunk]) continue;  // a real row (warp-uniform)
    // The slot's index in its space: the recv space for this rank's own block, else the send
    // space (blocks of the other ranks in rank order), as route_slot numbers them for pack.
    const int64_t slot = d == a.rank ? (static_cast<int64_t>(d) * C + a.chunk) * cc + r
                                     : ((static_cast<int64_t>(d < a.rank ? d : d - 1)) * C + a.chunk) * cc + r;
    V* row = reinterpret_cast<V*>(static_cast<char*>(d == a.rank ? a.recv_x : a.send_x) + slot * a.row_bytes);
    for (int64_t v = lane; v < vectors; v += 32) row[v] = V{};
    int32_t* meta = d == a.rank ? a.recv_meta : a.send_meta;
    if (meta == nullptr) continue;
    meta += slot * M;
    for (int w = lane; w < M; w += 32) meta[w] = w < K ? -1 : (w < 2 * K ? 0 : -1);
  }
}

__global__ void __launch_bounds__(kSmallThreads) unpack_kernel(UnpackArgs a) {
  const int K = a.top_k, M = 2 * a.top_k + 1;
  const int64_t total = a.rows * M;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / M;
    const int w = static_cast<int>(i % M);
    const int32_t value = a.recv_meta[i];
    if (w < K) {
      a.recv_indices[r * K + w] = value;
    } else if (w < 2 * K) {
      a.recv_weights[r * K + (w - K)] = __int_as_float(value);
    } else {
      if (a.recv_src_token != nullptr) a.recv_src_token[r] = value;
      if (a.recv_mask != nullptr) a.recv_mask[r] = value >= 0 ? 1 : 0;
    }
  }
}

__global__ void __launch_bounds__(kSmallThreads) grad_weights_kernel(GradWeightsArgs a) {
  const int K = a.top_k, D = a.max_dests;
  const int64_t total = a.num_tokens * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / K;
    const int k = static_cast<int>(i % K);
    float g = 0.0f;
    const int e = a.indices[i];
    if (e >= 0 && e < a.num_experts) {
      const int owner = e / a.experts_per_rank;
      for (int j = 0; j < D; ++j) {
        if (a.route_dest[t * D + j] != owner) continue;
        const int s = a.route_slot[t * D + j];
        if (s >= 0)
          g = (owner == a.rank ? a.self_weights : a.peer_weights)[static_cast<int64_t>(s) * K + k];
        break;
      }
    }
    a.grad_weights[i] = g;
  }
}

__global__ void __launch_bounds__(kSmallThreads) sum_ranks_kernel(const float* __restrict__ in,
                                                                  int32_t num_ranks, int32_t count,
                                                                  float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int r = 0; r < num_ranks; ++r) s += in[static_cast<int64_t>(r) * count + i];
    out[i] = s;
  }
}

// Blocks for a grid-stride loop over `count` items, capped (a grid-stride loop covers the rest).
unsigned small_grid(int64_t count) {
  const int64_t blocks = (count + kSmallThreads - 1) / kSmallThreads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

}  // namespace

// One warp per item (a token for pack, a block slot for mark_tails), at most max_blocks blocks;
// `launch(V{}, grid)` starts the kernel instance for the row vector type V of vec_bytes.
template <class Launch>
cudaError_t launch_move(int64_t items, int vec_bytes, int max_blocks, Launch&& launch) {
  if (items <= 0) return cudaSuccess;
  int64_t blocks = (items + kMoveWarpsPerBlock - 1) / kMoveWarpsPerBlock;
  if (blocks > max_blocks) blocks = max_blocks;
  const dim3 grid(static_cast<unsigned>(blocks > 0 ? blocks : 1));
  switch (vec_bytes) {
    case 16: launch(uint4{}, grid); break;
    case 8: launch(uint2{}, grid); break;
    case 4: launch(uint32_t{}, grid); break;
    case 2: launch(uint16_t{}, grid); break;
    case 1: launch(uint8_t{}, grid); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaPeekAtLastError();
}

cudaError_t launch_pack(const PackArgs& a, int vec_bytes, int max_blocks, cudaStream_t stream) {
  return launch_move(a.token_end - a.token_begin, vec_bytes, max_blocks, [&](auto v, dim3 grid) {
    pack_kernel<decltype(v)><<<grid, kMoveThreads, 0, stream>>>(a);
  });
}

cudaError_t launch_mark_tails(const TailArgs& a, int vec_bytes, int max_blocks, cudaStream_t stream) {
  return launch_move(static_cast<int64_t>(a.num_ranks) * a.chunk_capacity, vec_bytes, max_blocks,
                     [&](auto v, dim3 grid) { mark_tails_kernel<decltype(v)><<<grid, kMoveThreads, 0, stream>>>(a); });
}

cudaError_t launch_unpack(const UnpackArgs& a, cudaStream_t stream) {
  const int64_t total = a.rows * (2 * a.top_k + 1);
  if (total == 0) return cudaSuccess;
  unpack_kernel<<<small_grid(total), kSmallThreads, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

cudaError_t launch_grad_weights(const GradWeightsArgs& a, cudaStream_t stream) {
  const int64_t total = a.num_tokens * a.top_k;
  if (total == 0) return cudaSuccess;
  grad_weights_kernel<<<small_grid(total), kSmallThreads, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

cudaError_t launch_sum_ranks(const float* gathered, int32_t num_ranks, int32_t count, float* out,
                             cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  sum_ranks_kernel<<<small_grid(count), kSmallThreads, 0, stream>>>(gathered, num_ranks, count,
                                                                    out);
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels::ep
