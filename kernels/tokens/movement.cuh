// Token <-> row movement over a plan: permute, combine, and their backwards.
//
// Maths (r = row_of_slot[t K + k], only slots with a row, k ascending):
//   permute            xp[r] = x[t]                      row_weights[r] = w[t K + k]
//   combine            y[t] = sum_k w_tk yp[r]            (w = 1 without weights)
//   permute backward   dx[t] = sum_k dxp[r]               dw[t K + k] = d_row_weights[r]
//   combine backward   dyp[r] = w_tk dy[t]                dw[t K + k] = <dy[t], yp[r]>
// Sums accumulate in fp32 with fmaf in ascending k and are rounded once to the element type; dot
// products accumulate per thread over its elements in a fixed order, then over the group with a
// fixed xor-butterfly and a fixed sum over warps. Padding rows (permute, combine backward) are
// written as zeros; rows >= total are never touched; slots without a row give dw = 0.
//
// Shapes: token-side tensors [T, H] with a row stride (elements), row-side tensors [max_rows, H]
// contiguous, weights [T, K] fp32, row_weights [max_rows] fp32.
//
// Work split: a group of G threads (32..256, a power of two, so its first 32 lanes are one warp)
// owns one token and walks its row in steps of G x kMoveUnroll accesses; an access is 16 bytes on
// the vector path (V = 16 / sizeof(T) elements) or one element on the scalar path. The token is
// read once and its K rows are written (scatter: permute, combine backward), or its K rows are
// read once and the token is written (gather: combine, permute backward): every byte moves once.
// Blocks [0, pad_blocks) zero the padding rows, pad_split blocks per expert, each a contiguous
// slice of the expert's padding (padding blocks come first so that they start early).
// Deterministic: every output element is written by exactly one thread with a fixed sequence of
// operations; no atomics. Rows read from the plan are used only when in [0, max_rows).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstring>

#include "kernels/common/dtype.cuh"
#include "kernels/tokens/launch.hpp"
#include "kernels/tokens/tuning.hpp"
#include "moekit/tokens.h"

namespace moekit::kernels::tokens {

// Storage bits of an element type, so that vectors are plain integer/float arrays.
template <class T>
struct Elem;
template <>
struct Elem<float> {
  using Bits = float;
  static __device__ __forceinline__ float load(Bits b) { return b; }
  static __device__ __forceinline__ Bits store(float f) { return f; }
};
template <>
struct Elem<__half> {
  using Bits = unsigned short;
  static __device__ __forceinline__ float load(Bits b) { return to_float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits store(float f) {
    return __half_as_ushort(from_float<__half>(f));
  }
};
template <>
struct Elem<__nv_bfloat16> {
  using Bits = unsigned short;
  // bf16 -> fp32 is exact: the bits go to the top half.
  static __device__ __forceinline__ float load(Bits b) {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  }
  static __device__ __forceinline__ Bits store(float f) {
    return __bfloat16_as_ushort(from_float<__nv_bfloat16>(f));
  }
};

// V elements moved as one access (16 bytes on the vector path).
template <class Bits, int V>
struct __align__(sizeof(Bits) * V) Pack {
  Bits e[V];
};

constexpr int kMaxGroups = kMoveThreads / 32;

// A store of the row side of the scatters (xp, dyp and their padding rows). With STREAM it is
// st.global.cs: the rows are written once and read by a later kernel, so L2 may evict them first
// instead of holding them against the lines of the rest of the stream.
template <bool STREAM, class Vec>
__device__ __forceinline__ void store_row(Vec* p, const Vec& v) {
  if constexpr (STREAM && sizeof(Vec) == 16) {
    int4 bits;
    memcpy(&bits, &v, sizeof(bits));
    __stcs(reinterpret_cast<int4*>(p), bits);
  } else if constexpr (STREAM && sizeof(Vec) == 4) {
    unsigned bits;
    memcpy(&bits, &v, sizeof(bits));
    __stcs(reinterpret_cast<unsigned*>(p), bits);
  } else if constexpr (STREAM && sizeof(Vec) == 2) {
    unsigned short bits;
    memcpy(&bits, &v, sizeof(bits));
    __stcs(reinterpret_cast<unsigned short*>(p), bits);
  } else {
    *p = v;
  }
}

template <class T, int V, MoveOp OP, bool STREAM>
__device__ __forceinline__ void zero_padding(const MoveArgs& a, int pad_block, int pad_split) {
  using Bits = typename Elem<T>::Bits;
  using Vec = Pack<Bits, V>;
  const int64_t nvec = a.hidden / V;
  const int e = pad_block / pad_split;
  const int part = pad_block - e * pad_split;
  // In int64 and clamped to [0, max_rows): a corrupt plan cannot make this write out of bounds.
  const int64_t lo = max(int64_t{0}, static_cast<int64_t>(a.expert_offsets[e]) + max(0, a.expert_counts[e]));
  const int64_t hi = min(static_cast<int64_t>(a.expert_offsets[e + 1]), static_cast<int64_t>(a.max_rows));
  if (lo >= hi) return;
  const int64_t count = static_cast<int64_t>(hi - lo) * nvec;
  const int64_t slice = (count + pad_split - 1) / pad_split;
  const int64_t first = static_cast<int64_t>(part) * slice;
  const int64_t last = min(count, first + slice);
  Vec* base = reinterpret_cast<Vec*>(static_cast<Bits*>(a.rows_out) + lo * a.hidden);
  Vec zero;
#pragma unroll
  for (int i = 0; i < V; ++i) zero.e[i] = Elem<T>::store(0.0f);
  for (int64_t i = first + threadIdx.x; i < last; i += kMoveThreads) store_row<STREAM>(base + i, zero);
  if constexpr (OP == MoveOp::kPermute) {
    if (part == 0 && a.row_weights != nullptr)
      for (int64_t r = lo + threadIdx.x; r < hi; r += kMoveThreads) a.row_weights[r] = 0.0f;
  }
}

// buf[u] = row[v0 + u G] for the accesses inside the row.
template <int U, class Vec, class Bits>
__device__ __forceinline__ void load_row(Vec (&buf)[U], const Bits* row, int64_t v0, int G, int64_t nvec) {
  const Vec* src = reinterpret_cast<const Vec*>(row);
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (v0 + u * G < nvec) buf[u] = src[v0 + u * G];
}

// acc += w * buf, elementwise in fp32 (fmaf).
template <class T, int U, int V, class Vec>
__device__ __forceinline__ void accumulate(float (&acc)[U][V], const Vec (&buf)[U], float w, int64_t v0,
                                           int G, int64_t nvec) {
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (v0 + u * G < nvec)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[u][i] = fmaf(w, Elem<T>::load(buf[u].e[i]), acc[u][i]);
}

// SCATTER_U: accesses per thread and pass of permute; STREAM: store_row's streaming stores for
// the scatters. Both come from tuning.hpp; other values exist for the tuning benchmark.
template <class T, int V, MoveOp OP, int SCATTER_U = kMoveScatterUnroll, bool STREAM = kMoveStreamingStores>
__global__ void __launch_bounds__(kMoveThreads, kMoveMinBlocks)
    move_kernel(MoveArgs a, int group_size, int pad_blocks, int pad_split) {
  using Bits = typename Elem<T>::Bits;
  using Vec = Pack<Bits, V>;
  constexpr int U = OP == MoveOp::kPermute ? SCATTER_U : kMoveGatherUnroll;

  if (static_cast<int>(blockIdx.x) < pad_blocks) {
    if constexpr (OP == MoveOp::kPermute || OP == MoveOp::kCombineBackward)
      zero_padding<T, V, OP, STREAM>(a, blockIdx.x, pad_split);
    return;
  }

  __shared__ int s_row[kMaxGroups][MOEKIT_MAX_TOP_K];
  __shared__ float s_w[kMaxGroups][MOEKIT_MAX_TOP_K];
  __shared__ int s_k[kMaxGroups][MOEKIT_MAX_TOP_K];
  __shared__ int s_count[kMaxGroups];

  const int G = group_size;
  const int g = threadIdx.x / G;
  const int lane = threadIdx.x - g * G;
  const int64_t t = static_cast<int64_t>(blockIdx.x - pad_blocks) * (kMoveThreads / G) + g;
  const bool active = t < a.num_tokens;
  const int K = a.top_k;
  const int64_t H = a.hidden;
  const int64_t nvec = H / V;

  // The group's first warp reads the token's K rows and compacts the present ones in k order.
  if (lane < 32) {
    int row = -1;
    if (active && lane < K) {
      const int r = a.row_of_slot[t * K + lane];
      if (r >= 0 && r < a.max_rows) row = r;
    }
    const unsigned present = __ballot_sync(0xffffffffu, row >= 0);
    if (row >= 0) {
      const int pos = __popc(present & ((1u << lane) - 1u));
      s_row[g][pos] = row;
      s_k[g][pos] = lane;
      float w = 1.0f;
      if constexpr (OP == MoveOp::kCombine || OP == MoveOp::kCombineBackward)
        if (a.weights != nullptr) w = a.weights[t * K + lane];
      s_w[g][pos] = w;
    }
    if (lane == 0) s_count[g] = __popc(present);
    if (active && lane < K) {
      if constexpr (OP == MoveOp::kPermute) {
        if (a.row_weights != nullptr && row >= 0) a.row_weights[row] = a.weights[t * K + lane];
      }
      if constexpr (OP == MoveOp::kPermuteBackward) {
        if (a.grad_weights != nullptr)
          a.grad_weights[t * K + lane] = row >= 0 ? a.grad_row_weights[row] : 0.0f;
      }
      if constexpr (OP == MoveOp::kCombineBackward) {
        if (a.grad_weights != nullptr && row < 0) a.grad_weights[t * K + lane] = 0.0f;
      }
    }
  }
  __syncthreads();
  const int n = s_count[g];

  if constexpr (OP == MoveOp::kPermute) {
    // With U = kMoveAccessesPerThread one pass holds the thread's whole share of the token (the
    // group size gives each thread at most that many accesses up to 2048 accesses a row): all its
    // loads are in flight at once, then the rows are written one after the other, each warp's
    // consecutive stores filling one row's contiguous span.
    // Offsets inside a pass are 32-bit (u G < left <= INT_MAX); a row starts at Vec r * nvec
    // (H = nvec V exactly on both paths).
    if (active && n > 0) {
      const Vec* src = reinterpret_cast<const Vec*>(static_cast<const Bits*>(a.token_in) + t * a.token_in_stride);
      Vec* rows = static_cast<Vec*>(a.rows_out);
      for (int64_t v0 = lane; v0 < nvec; v0 += static_cast<int64_t>(G) * U) {
        const int left = static_cast<int>(min(nvec - v0, static_cast<int64_t>(INT_MAX)));
        const Vec* s0 = src + v0;
        Vec buf[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (u * G < left) buf[u] = s0[u * G];
#pragma unroll 1
        for (int j = 0; j < n; ++j) {
          Vec* d0 = rows + static_cast<int64_t>(s_row[g][j]) * nvec + v0;
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (u * G < left) store_row<STREAM>(d0 + u * G, buf[u]);
        }
      }
    }
  } else if constexpr (OP == MoveOp::kCombine || OP == MoveOp::kPermuteBackward) {
    // Gather: the loads of row j + 1 are issued before row j is accumulated, so 2 x U accesses
    // per thread are in flight with only U x V fp32 accumulators.
    if (active) {
      Vec* dst = reinterpret_cast<Vec*>(static_cast<Bits*>(a.token_out) + t * a.token_out_stride);
      const Bits* rows = static_cast<const Bits*>(a.rows_in);
      for (int64_t v0 = lane; v0 < nvec; v0 += static_cast<int64_t>(G) * U) {
        float acc[U][V];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int i = 0; i < V; ++i) acc[u][i] = 0.0f;
        // Two buffers in turn: row j + 1 loads while row j accumulates (k order is kept).
        Vec even[U], odd[U];
        if (n > 0) load_row<U>(even, rows + static_cast<int64_t>(s_row[g][0]) * H, v0, G, nvec);
        for (int j = 0; j < n; j += 2) {
          if (j + 1 < n) load_row<U>(odd, rows + static_cast<int64_t>(s_row[g][j + 1]) * H, v0, G, nvec);
          accumulate<T, U, V>(acc, even, s_w[g][j], v0, G, nvec);
          if (j + 2 < n) load_row<U>(even, rows + static_cast<int64_t>(s_row[g][j + 2]) * H, v0, G, nvec);
          if (j + 1 < n) accumulate<T, U, V>(acc, odd, s_w[g][j + 1], v0, G, nvec);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (v0 + u * G < nvec) {
            Vec out;
#pragma unroll
            for (int i = 0; i < V; ++i) out.e[i] = Elem<T>::store(acc[u][i]);
            dst[v0 + u * G] = out;
          }
        }
      }
    }
  } else {  // kCombineBackward
    extern __shared__ float s_partial[];  // [K][kMoveThreads] when grad_weights is wanted
    const bool want_dw = a.grad_weights != nullptr;
    if (want_dw)
      for (int j = 0; j < n; ++j) s_partial[j * kMoveThreads + threadIdx.x] = 0.0f;
    if (active && n > 0) {
      const Vec* dy = reinterpret_cast<const Vec*>(static_cast<const Bits*>(a.token_in) + t * a.token_in_stride);
      for (int64_t v0 = lane; v0 < nvec; v0 += static_cast<int64_t>(G) * U) {
        Vec d[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (v0 + u * G < nvec) d[u] = dy[v0 + u * G];
        for (int j = 0; j < n; ++j) {
          const int64_t row_elem = static_cast<int64_t>(s_row[g][j]) * H;
          if (a.rows_out != nullptr) {
            const float w = s_w[g][j];
            Vec* dst = reinterpret_cast<Vec*>(static_cast<Bits*>(a.rows_out) + row_elem);
#pragma unroll
            for (int u = 0; u < U; ++u) {
              if (v0 + u * G < nvec) {
                Vec out;
#pragma unroll
                for (int i = 0; i < V; ++i) out.e[i] = Elem<T>::store(w * Elem<T>::load(d[u].e[i]));
                store_row<STREAM>(dst + v0 + u * G, out);
              }
            }
          }
          if (want_dw) {
            const Vec* src = reinterpret_cast<const Vec*>(static_cast<const Bits*>(a.rows_in) + row_elem);
            Vec y[U];
#pragma unroll
            for (int u = 0; u < U; ++u)
              if (v0 + u * G < nvec) y[u] = src[v0 + u * G];
            float dot = 0.0f;
#pragma unroll
            for (int u = 0; u < U; ++u)
              if (v0 + u * G < nvec)
#pragma unroll
                for (int i = 0; i < V; ++i)
                  dot = fmaf(Elem<T>::load(d[u].e[i]), Elem<T>::load(y[u].e[i]), dot);
            s_partial[j * kMoveThreads + threadIdx.x] += dot;
          }
        }
      }
    }
    if (want_dw) {
      __shared__ float s_warp_sum[MOEKIT_MAX_TOP_K][kMaxGroups];
      const int warp = threadIdx.x / 32;
      for (int j = 0; j < n; ++j) {  // n is the same for every lane of a warp (one group)
        float v = s_partial[j * kMoveThreads + threadIdx.x];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if ((threadIdx.x & 31) == 0) s_warp_sum[j][warp] = v;
      }
      __syncthreads();
      if (active && lane < n) {
        const int first_warp = g * (G / 32);
        float sum = 0.0f;
        for (int w = 0; w < G / 32; ++w) sum += s_warp_sum[lane][first_warp + w];
        a.grad_weights[t * K + s_k[g][lane]] = sum;
      }
    }
  }
}

// The group size for a row of nvec accesses: the smallest power of two in [32, 256] that gives
// each thread at most kMoveAccessesPerThread accesses.
inline int move_group_size(int64_t nvec) {
  const int64_t per_group = (nvec + kMoveAccessesPerThread - 1) / kMoveAccessesPerThread;
  int g = 32;
  while (g < per_group && g < kMoveThreads) g *= 2;
  return g;
}

template <class T, int V, MoveOp OP, int SCATTER_U = kMoveScatterUnroll, bool STREAM = kMoveStreamingStores>
cudaError_t launch_move_op(const MoveArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  const int64_t nvec = a.hidden / V;
  const int group = move_group_size(nvec);
  const int64_t tokens_per_block = kMoveThreads / group;
  const int64_t token_blocks = (a.num_tokens + tokens_per_block - 1) / tokens_per_block;
  int pad_blocks = 0, pad_split = 1;
  if ((OP == MoveOp::kPermute || OP == MoveOp::kCombineBackward) && a.rows_out != nullptr &&
      a.alignment > 1) {
    const int64_t pad_bytes = static_cast<int64_t>(a.alignment - 1) * a.hidden * sizeof(T);
    int64_t split = (pad_bytes + kMovePadBytesPerBlock - 1) / kMovePadBytesPerBlock;
    if (split < 1) split = 1;
    if (split > kMovePadMaxSplit) split = kMovePadMaxSplit;
    pad_split = static_cast<int>(split);
    pad_blocks = a.num_local * pad_split;
  }
  const int64_t blocks = token_blocks + pad_blocks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  size_t smem = 0;
  if (OP == MoveOp::kCombineBackward && a.grad_weights != nullptr)
    smem = sizeof(float) * static_cast<size_t>(a.top_k) * kMoveThreads;
  move_kernel<T, V, OP, SCATTER_U, STREAM>
      <<<static_cast<unsigned>(blocks), kMoveThreads, smem, stream>>>(a, group, pad_blocks, pad_split);
  return cudaPeekAtLastError();
}

template <class T, int V>
cudaError_t launch_move_typed(const MoveArgs& a, cudaStream_t stream) {
  switch (a.op) {
    case MoveOp::kPermute: return launch_move_op<T, V, MoveOp::kPermute>(a, stream);
    case MoveOp::kCombine: return launch_move_op<T, V, MoveOp::kCombine>(a, stream);
    case MoveOp::kPermuteBackward: return launch_move_op<T, V, MoveOp::kPermuteBackward>(a, stream);
    case MoveOp::kCombineBackward: return launch_move_op<T, V, MoveOp::kCombineBackward>(a, stream);
  }
  return cudaErrorInvalidValue;
}

// Both access widths of one element type (instantiated in movement_<dtype>.cu).
template <class T>
cudaError_t launch_move_dtype(bool vectorized, const MoveArgs& a, cudaStream_t stream) {
  return vectorized ? launch_move_typed<T, 16 / static_cast<int>(sizeof(T))>(a, stream)
                    : launch_move_typed<T, 1>(a, stream);
}

cudaError_t launch_move_f32(bool vectorized, const MoveArgs& a, cudaStream_t stream);
cudaError_t launch_move_f16(bool vectorized, const MoveArgs& a, cudaStream_t stream);
cudaError_t launch_move_bf16(bool vectorized, const MoveArgs& a, cudaStream_t stream);

}  // namespace moekit::kernels::tokens
