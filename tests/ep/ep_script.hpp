// The NCCL groups a sequence of EP calls issues on every rank, simulated on the host from the
// library's own script (moekit::ep::for_each_op in src/ep/ep_plan.hpp, which src/ep/ep_ops.cpp
// follows op for op), and the check that would have caught every hang so far: every rank issues
// the same number of groups for the same calls, and in each group what rank a sends to rank b is,
// operation by operation and byte for byte, what b receives from a. NCCL pairs sends and receives
// in order per peer; a partner missing or of another size waits forever.
//
// Used by the CPU suite (random problems, the GPU suite's cases, and a deliberately broken rule to
// show that the check fails) and by the GPU suite before it starts its rank threads (a mismatch
// fails the case with a description instead of hanging the machine). Needs src/ep/ep_plan.cpp and
// src/ep/ep_config.cpp compiled into the test (libmoekit.so hides them).
#pragma once

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "src/ep/ep_config.hpp"
#include "src/ep/ep_plan.hpp"
#include "tests/reference/ep_ref.hpp"

namespace moekit::test::ep {

using moekit::ep::Call;
using moekit::ep::P2pOp;
using moekit::ep::Payloads;

// One call as a rank makes it: which call and what it moves (call_payloads of the pointers that
// rank passes).
struct ScriptedCall {
  Call call;
  Payloads payloads;
};

struct ScriptGroup {
  size_t call_index;  // position of the call in the sequence
  Call call;
  int32_t group;      // group (chunk) inside the call
  std::vector<P2pOp> ops;
};

// Every group `rank` issues for `calls`, in order. host_layout: this rank's (exact mode), or NULL.
inline std::vector<ScriptGroup> rank_script(const moekit::ep::Dims& d, int32_t rank,
                                            const int64_t* host_layout,
                                            const std::vector<ScriptedCall>& calls) {
  std::vector<ScriptGroup> out;
  for (size_t i = 0; i < calls.size(); ++i) {
    const auto groups =
        moekit::ep::call_script(d, rank, host_layout, calls[i].call, calls[i].payloads);
    for (size_t g = 0; g < groups.size(); ++g)
      out.push_back({i, calls[i].call, static_cast<int32_t>(g), groups[g]});
  }
  return out;
}

inline const char* payload_name(moekit::ep::Payload p) {
  switch (p) {
    case moekit::ep::Payload::kCounts: return "counts";
    case moekit::ep::Payload::kRows: return "rows";
    case moekit::ep::Payload::kMeta: return "ids+weights";
    case moekit::ep::Payload::kWeights: return "weight grads";
  }
  return "?";
}

// "[rows 2368 B, ids+weights 612 B]": the operations of one direction of a pair.
inline std::string describe_ops(const std::vector<P2pOp>& ops) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < ops.size(); ++i)
    s << (i ? ", " : "") << payload_name(ops[i].payload) << " " << ops[i].bytes << " B";
  s << "]";
  return s.str();
}

// Empty when every pair agrees; else the first disagreement, in words.
inline std::string check_scripts(const std::vector<std::vector<ScriptGroup>>& scripts) {
  const int n = static_cast<int>(scripts.size());
  std::ostringstream why;
  size_t groups = scripts.empty() ? 0 : scripts[0].size();
  for (const auto& script : scripts) groups = std::min(groups, script.size());
  // The groups every rank issues first; then whether some rank issues more.
  for (size_t g = 0; g < groups; ++g) {
    const ScriptGroup& g0 = scripts[0][g];
    for (int r = 1; r < n; ++r) {
      const ScriptGroup& gr = scripts[r][g];
      if (gr.call != g0.call || gr.group != g0.group || gr.call_index != g0.call_index) {
        why << "NCCL group " << g << ": rank 0 is in call " << g0.call_index << " ("
            << moekit::ep::call_name(g0.call) << ", group " << g0.group << "), rank " << r
            << " in call " << gr.call_index << " (" << moekit::ep::call_name(gr.call)
            << ", group " << gr.group << ")";
        return why.str();
      }
    }
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b) {
        std::vector<P2pOp> sent, received;
        for (const P2pOp& op : scripts[a][g].ops)
          if (op.send && op.peer == b) sent.push_back(op);
        for (const P2pOp& op : scripts[b][g].ops)
          if (!op.send && op.peer == a) received.push_back(op);
        bool same = sent.size() == received.size();
        for (size_t i = 0; same && i < sent.size(); ++i)
          same = sent[i].bytes == received[i].bytes && sent[i].payload == received[i].payload;
        if (!same) {
          why << "NCCL group " << g << " (call " << g0.call_index << ", "
              << moekit::ep::call_name(g0.call) << ", group " << g0.group << "): rank " << a
              << " sends rank " << b << " " << describe_ops(sent) << ", rank " << b
              << " receives from rank " << a << " " << describe_ops(received);
          return why.str();
        }
      }
  }
  for (int r = 1; r < n; ++r)
    if (scripts[r].size() != scripts[0].size()) {
      why << "rank 0 issues " << scripts[0].size() << " NCCL groups, rank " << r << " "
          << scripts[r].size();
      return why.str();
    }
  return "";
}

// The host layout every rank holds after the count exchange (exact mode), from the reference's
// routing: what moekit_ep_layout fills when the device counts are right.
inline std::vector<std::vector<int64_t>> reference_host_layouts(const moekit::ep::Dims& d,
                                                                int32_t signature,
                                                                const moekit::ref::EpProblem& p,
                                                                const moekit::ref::EpExchange& x) {
  const int n = p.num_ranks, C = p.num_chunks, P = moekit::ep::kExchangeStride;
  std::vector<std::vector<int64_t>> out;
  if (p.capacity_mode) return out;
  // counts[s][dst][c]: tokens of chunk c of rank s that go to dst.
  std::vector<std::vector<std::vector<int32_t>>> counts(
      n, std::vector<std::vector<int32_t>>(n, std::vector<int32_t>(C, 0)));
  for (int s = 0; s < n; ++s) {
    const int64_t T = p.num_tokens[s], L = (T + C - 1) / C;
    for (int64_t t = 0; t < T; ++t)
      for (int dst : x.dests[s][t]) ++counts[s][dst][t / L];
  }
  for (int r = 0; r < n; ++r) {
    std::vector<int32_t> send(static_cast<size_t>(n) * P), recv(static_cast<size_t>(n) * P);
    for (int peer = 0; peer < n; ++peer) {
      for (int c = 0; c < C; ++c) {
        send[peer * P + c] = counts[r][peer][c];
        recv[peer * P + c] = counts[peer][r][c];
      }
      send[peer * P + P - 1] = signature;
      recv[peer * P + P - 1] = signature;
    }
    std::vector<int64_t> hl(moekit::ep::host_layout_count(d), -7);
    moekit::ep::fill_host_layout(d, signature, r, p.num_tokens[r], send.data(), recv.data(),
                                 hl.data());
    out.push_back(hl);
  }
  return out;
}

// The calls one rank of the GPU suite's exchange check (check_rank in test_ep_gpu.cpp) makes, in
// order, with the pointers it passes: a rank with T = 0 passes NULL x, ids, weights, y, grad_x and
// grad_weights; a rank with no received rows NULL receive arrays. `duality`: the extra combine of
// the dispatch-backward rows (when combine_dtype == dtype). Keep in step with check_rank.
inline std::vector<ScriptedCall> check_rank_calls(int64_t num_tokens, int64_t recv_rows,
                                                  bool duality) {
  using moekit::ep::call_payloads;
  std::vector<ScriptedCall> calls{{Call::kLayout, call_payloads(Call::kLayout, false, false)}};
  for (int run = 0; run < 2; ++run) {
    calls.push_back({Call::kDispatch, call_payloads(Call::kDispatch, false, false)});
    calls.push_back({Call::kCombine, call_payloads(Call::kCombine, false, false)});
    calls.push_back({Call::kDispatchBackward,
                     call_payloads(Call::kDispatchBackward, num_tokens > 0, recv_rows > 0)});
    calls.push_back({Call::kCombineBackward, call_payloads(Call::kCombineBackward, false, false)});
    if (duality) calls.push_back({Call::kCombine, call_payloads(Call::kCombine, false, false)});
  }
  return calls;
}

// Every rank's script for per-rank call lists, from the reference's host layouts.
inline std::vector<std::vector<ScriptGroup>> all_scripts(
    const moekit::ep::Dims& d, const std::vector<std::vector<int64_t>>& host_layouts,
    const std::vector<std::vector<ScriptedCall>>& calls) {
  std::vector<std::vector<ScriptGroup>> out;
  for (int r = 0; r < d.num_ranks; ++r)
    out.push_back(rank_script(d, r, host_layouts.empty() ? nullptr : host_layouts[r].data(),
                              calls[r]));
  return out;
}

}  // namespace moekit::test::ep
