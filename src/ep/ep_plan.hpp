// The host side of an EP layout, with no NCCL and no CUDA in it (the CPU tests compile this file
// directly): the carving of the device layout buffer and of the workspace, the host layout array
// that exact mode fills from the one host read, and the per-chunk list of NCCL transfers that both
// ends of every pair derive from their own layouts. If the two ends ever disagreed on a size, the
// NCCL group would hang: tests/ep/test_ep_cpu.cpp checks, for simulated ranks, that what rank a
// sends to rank b in every chunk is exactly what b expects from a.
//
// Row spaces. "Send rows" index this rank's send buffer (rows it sends to other ranks, grouped by
// destination, then chunk, then token); "recv rows" index the received rows (grouped by source,
// then chunk, then token). The rows a token keeps on its own rank live only in the recv space.
//   exact:    send rows of destination d != me start at sum_{d' < d, d' != me} S_d'; inside, chunk c
//             starts after the rows of chunks < c. Recv rows of source s start at sum_{s' < s} R_s'.
//   capacity: block (d, c) of the send space starts at (b(d) C + c) cc with b(d) = d - (d > me),
//             block (s, c) of the recv space at (s C + c) cc; every block is cc rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "src/ep/ep_config.hpp"

namespace moekit::ep {

// Tokens per layout tile (one thread per token in the layout kernels).
constexpr int kLayoutTileTokens = 256;

// Tiles per chunk for T tokens.
inline int64_t tiles_per_chunk(int64_t num_tokens, int32_t num_chunks) {
  return (chunk_tokens(num_tokens, num_chunks) + kLayoutTileTokens - 1) / kLayoutTileTokens;
}

// ---- the device layout buffer -----------------------------------------------------------------
// Entries of LayoutPieces::totals.
constexpr int kTotalSendRows = 0;  // rows in the send space (remote destinations)
constexpr int kTotalRecvRows = 1;  // rows in the recv space
constexpr int kTotalDropped = 2;   // (token, destination) pairs over the capacity
constexpr int kNumTotals = 4;

// int32 per peer in the count exchange: MOEKIT_EP_MAX_CHUNKS counts (the first C used) and the
// configuration signature last. Fixed, so that ranks created with different num_chunks still
// exchange the same number of bytes and detect the mismatch instead of hanging.
constexpr int32_t kExchangeStride = MOEKIT_EP_MAX_CHUNKS + 1;

struct LayoutPieces {
  int32_t* tile_counts;  // [C][J_max][n]: per-tile counts, then their exclusive prefix per chunk
  int32_t* exchange;     // [2][n][kExchangeStride]: send side then recv side; per peer C counts
                         // and the configuration signature (exact mode exchanges the send side)
  int32_t* starts;       // [2][n][C]: first send row of (d, c), then first recv row of (s, c)
  int32_t* totals;       // [kNumTotals]
  int32_t* route_dest;   // [T_max][D]: destinations of each token, ascending, -1 padded
  int32_t* route_slot;   // [T_max][D]: its row there (send space, or recv space for this rank),
                         // -1 when dropped or padded
};

template <class Carver>
LayoutPieces carve_layout(Carver& ws, const Dims& d) {
  const int64_t n = d.num_ranks, C = d.num_chunks;
  LayoutPieces p{};
  p.tile_counts = ws.template take<int32_t>(
      static_cast<size_t>(C * tiles_per_chunk(d.max_tokens, d.num_chunks) * n), "tile_counts");
  p.exchange = ws.template take<int32_t>(static_cast<size_t>(2 * n * kExchangeStride), "exchange");
  p.starts = ws.template take<int32_t>(static_cast<size_t>(2 * n * C), "starts");
  p.totals = ws.template take<int32_t>(kNumTotals, "totals");
  p.route_dest = ws.template take<int32_t>(static_cast<size_t>(d.max_tokens * d.max_dests),
                                           "route_dest");
  p.route_slot = ws.template take<int32_t>(static_cast<size_t>(d.max_tokens * d.max_dests),
                                           "route_slot");
  return p;
}

size_t layout_bytes(const Dims& d);

// ---- the host layout (exact mode) ---------------------------------------------------------------
// int64 array: a header, then send counts [n][C] and recv counts [n][C] of one layout.
constexpr int64_t kHostLayoutMagic = 0x6d6f656b69744550LL;  // "moekitEP"
enum HostLayoutField : int {
  kHlMagic = 0,
  kHlSignature = 1,
  kHlRank = 2,
  kHlNumTokens = 3,
  kHlSendRows = 4,  // rows of the send space
  kHlRecvRows = 5,  // rows of the recv space
  kHlNumRanks = 6,
  kHlNumChunks = 7,
  kHlHeader = 8,
};

size_t host_layout_count(const Dims& d);

// Fills a host layout from the exchanged counts (send[d][c], recv[s][c], stride kExchangeStride
// as in LayoutPieces::exchange) of a rank with T tokens.
void fill_host_layout(const Dims& d, int32_t signature, int32_t rank, int64_t num_tokens,
                      const int32_t* exchange_send, const int32_t* exchange_recv,
                      int64_t* host_layout);

// Checks that host_layout was filled by a layout of this configuration and rank (and, when
// num_tokens >= 0, for that T); reports with the parameter name "host_layout".
moekit_status_t check_host_layout(const Dims& d, int32_t signature, int32_t rank,
                                  int64_t num_tokens, const int64_t* host_layout);

inline int64_t hl_send_count(const Dims& d, const int64_t* hl, int32_t dest, int32_t chunk) {
  return hl[kHlHeader + static_cast<int64_t>(dest) * d.num_chunks + chunk];
}
inline int64_t hl_recv_count(const Dims& d, const int64_t* hl, int32_t src, int32_t chunk) {
  return hl[kHlHeader + static_cast<int64_t>(d.num_ranks) * d.num_chunks +
            static_cast<int64_t>(src) * d.num_chunks + chunk];
}

// ---- row spaces and transfers -------------------------------------------------------------------
struct RowSpaces {
  int64_t send_rows;  // S
  int64_t recv_rows;  // R
};

// The rows of a layout (host_layout != nullptr, exact mode) or the configuration's worst case.
RowSpaces row_spaces(const Dims& d, const int64_t* host_layout);

// One peer's part of one chunk, in the dispatch direction: this rank sends send_count rows from
// send row send_row to `peer` and receives recv_count rows from it into recv row recv_row.
// The combine direction swaps the roles (sends recv rows back, receives into send rows).
struct Transfer {
  int32_t peer;
  int64_t send_row;
  int64_t send_count;
  int64_t recv_row;
  int64_t recv_count;
};

// Calls f(const Transfer&) -> moekit_status_t for the transfers of chunk `chunk` with every other
// rank, in ascending peer order, and stops at the first failure. Pairs with nothing to move either
// way are left out (both ends leave out the same pairs). No allocation: the NCCL calls run inside.
template <class F>
moekit_status_t for_each_transfer(const Dims& d, int32_t rank, const int64_t* host_layout,
                                  int32_t chunk, F&& f) {
  const int32_t n = d.num_ranks, C = d.num_chunks;
  if (d.capacity_mode) {
    const int64_t cc = d.chunk_capacity;
    if (cc == 0) return MOEKIT_STATUS_SUCCESS;
    for (int32_t p = 0; p < n; ++p) {
      if (p == rank) continue;
      const int64_t block = p < rank ? p : p - 1;
      Transfer t{};
      t.peer = p;
      t.send_row = (block * C + chunk) * cc;
      t.send_count = cc;
      t.recv_row = (static_cast<int64_t>(p) * C + chunk) * cc;
      t.recv_count = cc;
      const moekit_status_t s = f(t);
      if (s != MOEKIT_STATUS_SUCCESS) return s;
    }
    return MOEKIT_STATUS_SUCCESS;
  }
  // Exact: prefix sums over the host counts, the same formulas the device used for the rows.
  int64_t send_base = 0, recv_base = 0;
  for (int32_t p = 0; p < n; ++p) {
    int64_t send_total = 0, recv_total = 0, send_before = 0, recv_before = 0;
    for (int32_t c = 0; c < C; ++c) {
      const int64_t s = hl_send_count(d, host_layout, p, c);
      const int64_t r = hl_recv_count(d, host_layout, p, c);
      if (c < chunk) {
        send_before += s;
        recv_before += r;
      }
      send_total += s;
      recv_total += r;
    }
    if (p != rank) {
      Transfer t{};
      t.peer = p;
      t.send_row = send_base + send_before;
      t.send_count = hl_send_count(d, host_layout, p, chunk);
      t.recv_row = recv_base + recv_before;
      t.recv_count = hl_recv_count(d, host_layout, p, chunk);
      if (t.send_count > 0 || t.recv_count > 0) {
        const moekit_status_t s = f(t);
        if (s != MOEKIT_STATUS_SUCCESS) return s;
      }
      send_base += send_total;
    }
    recv_base += recv_total;
  }
  return MOEKIT_STATUS_SUCCESS;
}

// The same list, collected (for tests and tools).
std::vector<Transfer> chunk_transfers(const Dims& d, int32_t rank, const int64_t* host_layout,
                                      int32_t chunk);

// ---- the NCCL script of a call ------------------------------------------------------------------
// Every collective of this family is a fixed sequence of NCCL groups (ncclGroupStart, sends and
// receives, ncclGroupEnd) on the caller's stream. NCCL pairs the k-th send from a to b with the
// k-th receive at b from a; a send or receive without its partner, or with another byte count,
// waits forever. So the sequence a rank issues may depend only on what every rank agrees on: the
// configuration, the host layouts (the count exchange gives a's send counts to b as b's receive
// counts) and the call's payloads, never on whether a pointer is NULL on this rank (a rank with
// T = 0 passes NULL where its peers pass arrays: deriving "metadata moves" from indices != NULL
// was the hang of the first multi-GPU test case). src/ep/ep_ops.cpp issues exactly the operations
// listed here, and tests/ep checks, for simulated ranks, that both ends of every pair agree.

enum class Call : int32_t { kLayout, kDispatch, kCombine, kDispatchBackward, kCombineBackward };
const char* call_name(Call call);

// What moves beside the rows of a call.
struct Payloads {
  bool meta;     // dispatch: K ids, K weights and the token index (2K + 1 int32 per row)
  bool weights;  // dispatch backward: the weight gradients (K fp32 per row)
};
// Dispatch always moves metadata (whatever this rank's pointers). Dispatch backward moves weight
// gradients when the caller gives grad_weights or grad_recv_weights: the API requires every rank to
// ask for them or none, and a rank whose row counts make both arrays empty has no transfers at all,
// so its choice cannot change what its peers see. The other calls move rows only.
Payloads call_payloads(Call call, bool grad_weights_given, bool grad_recv_weights_given);

enum class Payload : int32_t { kCounts, kRows, kMeta, kWeights };

// One ncclSend / ncclRecv (ncclUint8, `bytes` bytes) of a group.
struct P2pOp {
  bool send;
  int32_t peer;
  Payload payload;
  bool recv_space;    // rows of the recv space, else of the send space (unused for kCounts)
  int64_t first_row;  // first row in that space (kCounts: the peer's block of the exchange)
  int64_t rows;
  int64_t bytes;      // rows * payload_row_bytes
};

// Groups of a call: C for dispatch, combine and the backwards; an exact-mode layout has one (the
// count exchange), a capacity-mode layout none.
int32_t call_groups(const Dims& d, Call call);
// Bytes per row of a payload in a call (kCounts: one block of kExchangeStride int32).
int64_t payload_row_bytes(const Dims& d, Call call, Payload payload);

// Calls f(const P2pOp&) -> moekit_status_t for every operation of group `group` of `call`, in the
// order they are issued, and stops at the first failure. No allocation: the NCCL calls run inside.
//   layout (exact):             to every rank, itself included: send counts, receive counts.
//   dispatch, combine backward: per transfer (ascending peer): send rows [, send metadata] of the
//                               send space, then receive rows [, metadata] into the recv space.
//   combine, dispatch backward: per transfer: send rows [, weight gradients] of the recv space
//                               back, then receive rows [, weight gradients] into the send space.
template <class F>
moekit_status_t for_each_op(const Dims& d, int32_t rank, const int64_t* host_layout, Call call,
                            int32_t group, Payloads payloads, F&& f) {
  if (call == Call::kLayout) {
    if (d.capacity_mode) return MOEKIT_STATUS_SUCCESS;
    const int64_t bytes = payload_row_bytes(d, call, Payload::kCounts);
    for (int32_t peer = 0; peer < d.num_ranks; ++peer) {
      for (const bool send : {true, false}) {
        const moekit_status_t s = f(P2pOp{send, peer, Payload::kCounts, false, peer, 1, bytes});
        if (s != MOEKIT_STATUS_SUCCESS) return s;
      }
    }
    return MOEKIT_STATUS_SUCCESS;
  }
  const bool forward = call == Call::kDispatch || call == Call::kCombineBackward;
  const Payload extra = forward ? Payload::kMeta : Payload::kWeights;
  const bool with_extra = forward ? payloads.meta : payloads.weights;
  const int64_t row_bytes = payload_row_bytes(d, call, Payload::kRows);
  const int64_t extra_bytes = payload_row_bytes(d, call, extra);
  return for_each_transfer(d, rank, host_layout, group, [&](const Transfer& t) {
    // Forward: the send space goes out, the recv space comes in; reverse: the other way round.
    const int64_t out_row = forward ? t.send_row : t.recv_row;
    const int64_t out_count = forward ? t.send_count : t.recv_count;
    const int64_t in_row = forward ? t.recv_row : t.send_row;
    const int64_t in_count = forward ? t.recv_count : t.send_count;
    const bool out_recv_space = !forward;
    if (out_count > 0) {
      moekit_status_t s = f(P2pOp{true, t.peer, Payload::kRows, out_recv_space, out_row,
                                  out_count, out_count * row_bytes});
      if (s == MOEKIT_STATUS_SUCCESS && with_extra)
        s = f(P2pOp{true, t.peer, extra, out_recv_space, out_row, out_count,
                    out_count * extra_bytes});
      if (s != MOEKIT_STATUS_SUCCESS) return s;
    }
    if (in_count > 0) {
      moekit_status_t s = f(P2pOp{false, t.peer, Payload::kRows, !out_recv_space, in_row,
                                  in_count, in_count * row_bytes});
      if (s == MOEKIT_STATUS_SUCCESS && with_extra)
        s = f(P2pOp{false, t.peer, extra, !out_recv_space, in_row, in_count,
                    in_count * extra_bytes});
      if (s != MOEKIT_STATUS_SUCCESS) return s;
    }
    return MOEKIT_STATUS_SUCCESS;
  });
}

// Every group of a call, collected (for tests and tools).
std::vector<std::vector<P2pOp>> call_script(const Dims& d, int32_t rank,
                                            const int64_t* host_layout, Call call,
                                            Payloads payloads);

// ---- workspace ----------------------------------------------------------------------------------
struct DispatchWorkspace {
  uint8_t* send_x;     // [S][row_bytes] (also the combine-backward send buffer)
  int32_t* send_meta;  // [S][M]
  int32_t* recv_meta;  // [R][M]
};
struct CombineWorkspace {
  uint8_t* peer_rows;    // [S][max(row_bytes, combine_row_bytes)]: partials / gradients coming back
  float* peer_weights;   // [S][K]: weight gradients coming back (dispatch backward)
};

template <class Carver>
DispatchWorkspace carve_dispatch_workspace(Carver& ws, const Dims& d, const RowSpaces& r) {
  DispatchWorkspace w{};
  w.send_x = ws.template take<uint8_t>(static_cast<size_t>(r.send_rows * d.row_bytes), "send_x");
  w.send_meta = ws.template take<int32_t>(static_cast<size_t>(r.send_rows * d.meta_words),
                                          "send_meta");
  w.recv_meta = ws.template take<int32_t>(static_cast<size_t>(r.recv_rows * d.meta_words),
                                          "recv_meta");
  return w;
}

template <class Carver>
CombineWorkspace carve_combine_workspace(Carver& ws, const Dims& d, const RowSpaces& r) {
  const int64_t row = d.row_bytes > d.combine_row_bytes ? d.row_bytes : d.combine_row_bytes;
  CombineWorkspace w{};
  w.peer_rows = ws.template take<uint8_t>(static_cast<size_t>(r.send_rows * row), "peer_rows");
  w.peer_weights = ws.template take<float>(static_cast<size_t>(r.send_rows * d.top_k),
                                           "peer_weights");
  return w;
}

// One workspace serves every op: the larger of the two carvings.
size_t workspace_bytes(const Dims& d, const RowSpaces& r);

}  // namespace moekit::ep
