// CPU reference of expert parallelism (semantics section 7): who sends what to whom, the order in
// which every rank receives its rows, capacity drops, and the rank-ordered combine sums. Built
// from the definitions in moekit/ep.h the plainest way (lists per destination), independent of
// the device algorithm. The sums are specified bitwise (fp32, ascending rank, from +0), so the
// reference reproduces exactly that fp32 loop instead of a double sum.
#pragma once

#include <cstdint>
#include <vector>

namespace moekit::ref {

struct EpProblem {
  int num_ranks = 0;       // n
  int num_experts = 0;     // E (a multiple of n)
  int top_k = 0;           // K
  int num_chunks = 1;      // C
  bool capacity_mode = false;
  int64_t capacity = 0;    // effective capacity (capacity mode): rows per (source, destination)
  // Per rank: T, indices [T, K], token mask [T] (empty = all real).
  std::vector<int64_t> num_tokens;
  std::vector<std::vector<int32_t>> indices;
  std::vector<std::vector<uint8_t>> masks;
};

struct EpRecvRow {
  int src = -1;       // source rank, -1 for a gap
  int64_t token = -1; // token at the source, -1 for a gap
};

struct EpExchange {
  int64_t chunk_capacity = 0;  // cc (capacity mode)
  // dests[r][t]: the ascending destination ranks of token t of rank r.
  std::vector<std::vector<std::vector<int>>> dests;
  // row_at[r][t][j]: the row of token t of rank r at dests[r][t][j], -1 when dropped.
  std::vector<std::vector<std::vector<int64_t>>> row_at;
  // rows[d]: what rank d receives, in order (gaps in capacity mode).
  std::vector<std::vector<EpRecvRow>> rows;
  // sent[r][d]: (token, destination) pairs of rank r for d that were kept (d == r included).
  std::vector<std::vector<int64_t>> sent;
  // dropped[r]: pairs of rank r over the capacity.
  std::vector<int64_t> dropped;
};

EpExchange ep_exchange(const EpProblem& p);

// The owner rank of expert e (-1 for an id outside [0, E)).
int ep_owner(const EpProblem& p, int32_t e);

// Combine of one rank r in fp32: y[t][h] = (((0 + P_d0[row]) + P_d1[row]) + ...) over the kept
// destinations of t in ascending order, with partials[d] the [rows(d), H] values at rank d (as
// floats, already exact in their storage dtype). Returns [T_r, H] fp32 (not yet rounded).
std::vector<float> ep_combine(const EpProblem& p, const EpExchange& x, int rank, int64_t hidden,
                              const std::vector<std::vector<float>>& partials);

// Dispatch-backward weight gradients of rank r: gw[t][k] = grad_recv_weights[o][row of t at o][k]
// with o the owner of idx_tk; 0 for an invalid id, a masked token or a dropped pair.
std::vector<float> ep_grad_weights(const EpProblem& p, const EpExchange& x, int rank,
                                   const std::vector<std::vector<float>>& grad_recv_weights);

}  // namespace moekit::ref
