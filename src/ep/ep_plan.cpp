#include "src/ep/ep_plan.hpp"

#include "src/common/error.hpp"
#include "src/common/workspace.hpp"

namespace moekit::ep {

size_t layout_bytes(const Dims& d) {
  WorkspaceCarver c(nullptr);
  carve_layout(c, d);
  return c.bytes();
}

size_t host_layout_count(const Dims& d) {
  if (d.capacity_mode) return 0;
  return static_cast<size_t>(kHlHeader + 2 * static_cast<int64_t>(d.num_ranks) * d.num_chunks);
}

void fill_host_layout(const Dims& d, int32_t signature, int32_t rank, int64_t num_tokens,
                      const int32_t* exchange_send, const int32_t* exchange_recv,
                      int64_t* hl) {
  const int32_t n = d.num_ranks, C = d.num_chunks, P = kExchangeStride;
  hl[kHlMagic] = kHostLayoutMagic;
  hl[kHlSignature] = signature;
  hl[kHlRank] = rank;
  hl[kHlNumTokens] = num_tokens;
  hl[kHlNumRanks] = n;
  hl[kHlNumChunks] = C;
  int64_t send_rows = 0, recv_rows = 0;
  for (int32_t p = 0; p < n; ++p) {
    for (int32_t c = 0; c < C; ++c) {
      const int64_t s = exchange_send[static_cast<int64_t>(p) * P + c];
      const int64_t r = exchange_recv[static_cast<int64_t>(p) * P + c];
      hl[kHlHeader + static_cast<int64_t>(p) * C + c] = s;
      hl[kHlHeader + static_cast<int64_t>(n) * C + static_cast<int64_t>(p) * C + c] = r;
      if (p != rank) send_rows += s;
      recv_rows += r;
    }
  }
  hl[kHlSendRows] = send_rows;
  hl[kHlRecvRows] = recv_rows;
}

moekit_status_t check_host_layout(const Dims& d, int32_t signature, int32_t rank,
                                  int64_t num_tokens, const int64_t* hl) {
  if (hl == nullptr) return fail(MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout is NULL");
  if (hl[kHlMagic] != kHostLayoutMagic || hl[kHlSignature] != signature ||
      hl[kHlNumRanks] != d.num_ranks || hl[kHlNumChunks] != d.num_chunks)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                "host_layout = %p was not filled by moekit_ep_layout for this configuration",
                static_cast<const void*>(hl));
  if (hl[kHlRank] != rank)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                "host_layout belongs to rank %lld, but this handle is rank %d",
                static_cast<long long>(hl[kHlRank]), rank);
  if (num_tokens >= 0 && hl[kHlNumTokens] != num_tokens)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                "num_tokens = %lld differs from the %lld tokens of host_layout's layout",
                static_cast<long long>(num_tokens), static_cast<long long>(hl[kHlNumTokens]));
  if (hl[kHlNumTokens] < 0 || hl[kHlNumTokens] > d.max_tokens || hl[kHlSendRows] < 0 ||
      hl[kHlRecvRows] < 0 ||
      hl[kHlRecvRows] > static_cast<int64_t>(d.num_ranks) * d.max_tokens)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout = %p holds inconsistent sizes",
                static_cast<const void*>(hl));
  return MOEKIT_STATUS_SUCCESS;
}

RowSpaces row_spaces(const Dims& d, const int64_t* hl) {
  RowSpaces r{};
  const int64_t n = d.num_ranks;
  if (d.capacity_mode) {
    r.send_rows = (n - 1) * d.num_chunks * d.chunk_capacity;
    r.recv_rows = n * d.num_chunks * d.chunk_capacity;
  } else if (hl != nullptr) {
    r.send_rows = hl[kHlSendRows];
    r.recv_rows = hl[kHlRecvRows];
  } else {
    // Each token goes at most once to each rank: at most min(K, n - 1) remote rows per token and
    // at most max_tokens rows from each source.
    const int64_t remote = d.top_k < n - 1 ? d.top_k : n - 1;
    r.send_rows = d.max_tokens * remote;
    r.recv_rows = n * d.max_tokens;
  }
  return r;
}

std::vector<Transfer> chunk_transfers(const Dims& d, int32_t rank, const int64_t* hl,
                                      int32_t chunk) {
  std::vector<Transfer> out;
  for_each_transfer(d, rank, hl, chunk, [&](const Transfer& t) {
    out.push_back(t);
    return MOEKIT_STATUS_SUCCESS;
  });
  return out;
}

const char* call_name(Call call) {
  switch (call) {
    case Call::kLayout: return "moekit_ep_layout";
    case Call::kDispatch: return "moekit_ep_dispatch";
    case Call::kCombine: return "moekit_ep_combine";
    case Call::kDispatchBackward: return "moekit_ep_dispatch_backward";
    case Call::kCombineBackward: return "moekit_ep_combine_backward";
  }
  return "?";
}

Payloads call_payloads(Call call, bool grad_weights_given, bool grad_recv_weights_given) {
  Payloads p{};
  p.meta = call == Call::kDispatch;
  p.weights = call == Call::kDispatchBackward && (grad_weights_given || grad_recv_weights_given);
  return p;
}

int32_t call_groups(const Dims& d, Call call) {
  if (call == Call::kLayout) return d.capacity_mode ? 0 : 1;
  return d.num_chunks;
}

int64_t payload_row_bytes(const Dims& d, Call call, Payload payload) {
  switch (payload) {
    case Payload::kCounts: return static_cast<int64_t>(kExchangeStride) * 4;
    case Payload::kMeta: return static_cast<int64_t>(d.meta_words) * 4;
    case Payload::kWeights: return static_cast<int64_t>(d.top_k) * 4;
    case Payload::kRows: return call == Call::kCombine ? d.combine_row_bytes : d.row_bytes;
  }
  return 0;
}

std::vector<std::vector<P2pOp>> call_script(const Dims& d, int32_t rank, const int64_t* hl,
                                            Call call, Payloads payloads) {
  std::vector<std::vector<P2pOp>> groups(static_cast<size_t>(call_groups(d, call)));
  for (int32_t g = 0; g < static_cast<int32_t>(groups.size()); ++g)
    for_each_op(d, rank, hl, call, g, payloads, [&](const P2pOp& op) {
      groups[static_cast<size_t>(g)].push_back(op);
      return MOEKIT_STATUS_SUCCESS;
    });
  return groups;
}

size_t workspace_bytes(const Dims& d, const RowSpaces& r) {
  WorkspaceCarver a(nullptr);
  carve_dispatch_workspace(a, d, r);
  WorkspaceCarver b(nullptr);
  carve_combine_workspace(b, d, r);
  return a.bytes() > b.bytes() ? a.bytes() : b.bytes();
}

}  // namespace moekit::ep
