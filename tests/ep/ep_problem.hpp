// Random EP routing problems for the CPU and GPU suites and the benchmark: per-rank token counts,
// expert ids (distinct per token, like a router's, with optional duplicates, invalid ids, masked
// tokens and tokens routed only to their own rank), fp32 weights.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "tests/reference/ep_ref.hpp"

namespace moekit::test::ep {

struct RoutingShape {
  int num_ranks = 2;
  int num_experts = 16;
  int top_k = 4;
  int num_chunks = 1;
  bool capacity_mode = false;
  int64_t capacity = 0;               // effective capacity (capacity mode)
  std::vector<int64_t> num_tokens;    // per rank
  double local_only_fraction = 0.0;   // tokens whose ids all live on their own rank
  double mask_fraction = 0.0;         // masked tokens (a mask is passed when > 0)
  double invalid_fraction = 0.0;      // ids replaced by an invalid value (-1, E, ...)
  double duplicate_fraction = 0.0;    // tokens with one id repeated
};

struct Routing {
  moekit::ref::EpProblem problem;
  std::vector<std::vector<float>> weights;  // per rank [T, K]
};

inline Routing make_routing(const RoutingShape& s, std::mt19937_64& rng) {
  Routing out;
  moekit::ref::EpProblem& p = out.problem;
  p.num_ranks = s.num_ranks;
  p.num_experts = s.num_experts;
  p.top_k = s.top_k;
  p.num_chunks = s.num_chunks;
  p.capacity_mode = s.capacity_mode;
  p.capacity = s.capacity;
  p.num_tokens = s.num_tokens;
  const int n = s.num_ranks, E = s.num_experts, K = s.top_k, per_rank = E / n;
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::uniform_real_distribution<float> uw(0.01f, 1.0f);
  p.indices.resize(n);
  p.masks.resize(n);
  out.weights.resize(n);
  std::vector<int32_t> all(E);
  std::iota(all.begin(), all.end(), 0);
  for (int r = 0; r < n; ++r) {
    const int64_t T = s.num_tokens[r];
    p.indices[r].resize(static_cast<size_t>(T * K));
    out.weights[r].resize(static_cast<size_t>(T * K));
    if (s.mask_fraction > 0) p.masks[r].resize(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> ids(static_cast<size_t>(K));
      if (u01(rng) < s.local_only_fraction && K <= per_rank) {
        std::vector<int32_t> local(static_cast<size_t>(per_rank));
        std::iota(local.begin(), local.end(), r * per_rank);
        std::shuffle(local.begin(), local.end(), rng);
        for (int k = 0; k < K; ++k) ids[k] = local[k];
      } else {
        // K distinct experts: a partial Fisher-Yates shuffle of all E.
        for (int k = 0; k < K; ++k) {
          std::uniform_int_distribution<int> pick(k, E - 1);
          std::swap(all[k], all[pick(rng)]);
          ids[k] = all[k];
        }
      }
      if (K > 1 && u01(rng) < s.duplicate_fraction) ids[K - 1] = ids[0];
      for (int k = 0; k < K; ++k) {
        if (u01(rng) < s.invalid_fraction) {
          const int32_t bad[] = {-1, E, E + 7, -1000000, INT32_MIN, INT32_MAX};
          ids[k] = bad[std::uniform_int_distribution<int>(0, 5)(rng)];
        }
        p.indices[r][t * K + k] = ids[k];
        out.weights[r][t * K + k] = uw(rng);
      }
      if (s.mask_fraction > 0) p.masks[r][t] = u01(rng) < s.mask_fraction ? 0 : 1;
    }
  }
  return out;
}

}  // namespace moekit::test::ep
