// Launchers of the ep family's kernels: plain C++ declarations (no device code) so that the host
// tier (src/ep) can include them. Each returns the first CUDA error of its launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/status.h"

namespace moekit::kernels::ep {

// The layout of one rank's tokens (kernels/ep/layout.cu). Sizes were validated by the caller.
struct LayoutArgs {
  const int32_t* indices;     // [T, K]
  const uint8_t* token_mask;  // [T] or nullptr
  int64_t num_tokens;         // T
  int32_t top_k;              // K
  int32_t num_experts;        // E
  int32_t experts_per_rank;   // E / n
  int32_t num_ranks;          // n
  int32_t rank;               // me
  int32_t num_chunks;         // C
  int64_t chunk_tokens;       // L = ceil(T / C)
  int32_t tiles_per_chunk;    // J = ceil(L / 256) for this T
  int32_t max_dests;          // D = min(K, n)
  int32_t capacity_mode;      // nonzero: fixed blocks of chunk_capacity rows
  int32_t chunk_capacity;     // cc (capacity mode)
  int32_t signature;          // configuration signature written into the exchange
  int32_t exchange_stride;    // P = MOEKIT_EP_MAX_CHUNKS + 1 int32 per peer, whatever C is
  // the layout buffer (src/ep/ep_plan.hpp LayoutPieces)
  int32_t* tile_counts;       // [C][J][n]
  int32_t* exchange;          // [2][n][P]: C counts per peer, the signature at P - 1
  int32_t* starts;            // [2][n][C]
  int32_t* totals;            // [4]
  int32_t* route_dest;        // [T][D]
  int32_t* route_slot;        // [T][D]
};

// Counts every tile's tokens per destination and scans them per chunk: exchange send side
// (counts and signature) and tile_counts (exclusive prefix per chunk) are written.
cudaError_t launch_layout_count(const LayoutArgs& args, cudaStream_t stream);
// From the exchange (recv side filled by NCCL in exact mode): starts and totals.
cudaError_t launch_layout_offsets(const LayoutArgs& args, cudaStream_t stream);
// Every token's destinations and rows: route_dest and route_slot.
cudaError_t launch_layout_assign(const LayoutArgs& args, cudaStream_t stream);

// Copies each token of [token_begin, token_end) to its rows: remote rows in the send space
// (send_x, send_meta), this rank's row in the recv space (recv_x, recv_meta). Metadata (when
// send_meta != nullptr): K ids, K weights (bits), the token index.
struct PackArgs {
  int64_t token_begin;
  int64_t token_end;
  int32_t max_dests;
  int32_t rank;
  const int32_t* route_dest;
  const int32_t* route_slot;
  const void* x;          // [T][row_bytes]
  int64_t row_bytes;
  void* send_x;           // [S][row_bytes]
  void* recv_x;           // [R][row_bytes]
  int32_t top_k;
  const int32_t* indices; // [T, K] (metadata)
  const float* weights;   // [T, K] (metadata)
  int32_t* send_meta;     // [S][2K + 1] or nullptr (no metadata)
  int32_t* recv_meta;     // [R][2K + 1]
};
// vec_bytes: 16, 8, 4, 2 or 1, dividing row_bytes and every base address (chosen by the caller).
cudaError_t launch_pack(const PackArgs& args, int vec_bytes, int max_blocks, cudaStream_t stream);

// Capacity mode: marks the rows of chunk `chunk`'s blocks past their count as gaps (payload +0
// bytes; metadata ids -1, weights 0, token -1), in the send space for remote destinations and in
// the recv space for this rank.
struct TailArgs {
  int32_t num_ranks;
  int32_t rank;
  int32_t num_chunks;
  int32_t chunk;
  int32_t chunk_capacity;
  int32_t top_k;
  const int32_t* exchange;  // send side: counts [n][P]
  int32_t exchange_stride;  // P
  int64_t row_bytes;
  void* send_x;             // send space rows: gap payload becomes +0 bytes
  void* recv_x;             // recv space rows (this rank's own block)
  int32_t* send_meta;       // or nullptr (rows only: combine backward)
  int32_t* recv_meta;       // or nullptr
};
// vec_bytes and max_blocks as for launch_pack (the same pointers and row size).
cudaError_t launch_mark_tails(const TailArgs& args, int vec_bytes, int max_blocks, cudaStream_t stream);

// Splits the received metadata [R][2K + 1] into the caller's arrays.
struct UnpackArgs {
  const int32_t* recv_meta;
  int64_t rows;
  int32_t top_k;
  int32_t* recv_indices;    // [R, K]
  float* recv_weights;      // [R, K]
  int32_t* recv_src_token;  // [R] or nullptr
  uint8_t* recv_mask;       // [R] or nullptr
};
cudaError_t launch_unpack(const UnpackArgs& args, cudaStream_t stream);

// out[t] = sum over the token's rows, in route order (ascending rank), in fp32 from +0, rounded
// once: rows on this rank come from self_rows (recv space), the others from peer_rows (send
// space); a slot of -1 contributes nothing.
struct ReduceArgs {
  int64_t token_begin;
  int64_t token_end;
  int32_t max_dests;
  int32_t rank;
  int64_t hidden;
  const int32_t* route_dest;
  const int32_t* route_slot;
  const void* self_rows;  // [R][H] of in_dtype
  const void* peer_rows;  // [S][H] of in_dtype
  void* out;              // [T][H] of out_dtype
};
// vectorized: H % 8 == 0 and every base address 16-byte aligned (chosen by the caller).
cudaError_t launch_reduce(moekit_dtype_t in_dtype, moekit_dtype_t out_dtype, bool vectorized,
                          const ReduceArgs& args, int max_blocks, cudaStream_t stream);

// grad_weights[t][k] = gradient of the owner rank of indices[t][k] (see moekit_ep_dispatch_backward).
struct GradWeightsArgs {
  int64_t num_tokens;
  int32_t top_k;
  int32_t num_experts;
  int32_t experts_per_rank;
  int32_t max_dests;
  int32_t rank;
  const int32_t* indices;
  const int32_t* route_dest;  // a masked token has no destination, so it finds no owner
  const int32_t* route_slot;
  const float* self_weights;  // [R][K]
  const float* peer_weights;  // [S][K]
  float* grad_weights;        // [T][K]
};
cudaError_t launch_grad_weights(const GradWeightsArgs& args, cudaStream_t stream);

// out[i] = (((0 + in[0][i]) + in[1][i]) + ... + in[n-1][i]) in fp32.
cudaError_t launch_sum_ranks(const float* gathered, int32_t num_ranks, int32_t count, float* out,
                             cudaStream_t stream);

}  // namespace moekit::kernels::ep
