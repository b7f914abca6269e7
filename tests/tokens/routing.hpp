// Routing inputs for the tokens tests: configs and index/weight/mask generators that produce the
// awkward cases (empty experts, one hot expert, duplicates inside a token, invalid ids, ties and
// NaN weights), shared by the CPU and GPU suites.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "moekit/tokens.h"

namespace moekit::test {

inline moekit_plan_config_t plan_config(int experts, int top_k, int alignment = 1, int capacity = 0,
                                        int drop_policy = MOEKIT_DROP_BY_POSITION,
                                        int local_begin = 0, int num_local = 0) {
  moekit_plan_config_t c;
  moekit_plan_config_init(&c, sizeof(c));
  c.num_experts = experts;
  c.top_k = top_k;
  c.alignment = alignment;
  c.capacity = capacity;
  c.drop_policy = drop_policy;
  c.local_expert_begin = local_begin;
  c.num_local_experts = num_local;
  return c;
}

inline std::string describe(const moekit_plan_config_t& c, int64_t tokens) {
  std::ostringstream s;
  s << "T=" << tokens << " E=" << c.num_experts << " K=" << c.top_k << " e0=" << c.local_expert_begin
    << " E_local=" << c.num_local_experts << " A=" << c.alignment << " C=" << c.capacity
    << " policy=" << c.drop_policy;
  return s.str();
}

enum class Routing {
  kDistinct,  // K distinct experts per token, uniform (what a router produces)
  kSkewed,    // distinct per token, drawn from a few hot experts: most experts stay empty
  kAny,       // independent draws: the same expert may repeat inside a token
  kOneHot,    // every slot to expert `hot`
};

// indices [T, K] in [0, E) for the given pattern; `invalid_fraction` of them are then replaced by
// ids outside [0, E) (negative, E, INT_MIN, INT_MAX).
inline std::vector<int32_t> make_indices(std::mt19937_64& rng, int64_t tokens, int top_k,
                                         int experts, Routing routing,
                                         double invalid_fraction = 0.0, int hot = 0) {
  std::vector<int32_t> idx(static_cast<size_t>(tokens) * top_k);
  std::uniform_int_distribution<int> any(0, experts - 1);
  const int hot_count = std::max(top_k, std::min(experts, 3 + experts / 16));
  std::vector<int> perm(experts);
  std::iota(perm.begin(), perm.end(), 0);
  // A random order first: the skewed pool (the first hot_count entries) is a random subset.
  std::shuffle(perm.begin(), perm.end(), rng);
  for (int64_t t = 0; t < tokens; ++t) {
    switch (routing) {
      case Routing::kDistinct:
      case Routing::kSkewed: {
        const int pool = routing == Routing::kDistinct ? experts : hot_count;
        // Partial Fisher-Yates over the pool (the skewed pool is a fixed random subset).
        for (int k = 0; k < top_k; ++k) {
          std::uniform_int_distribution<int> pick(k, pool - 1);
          std::swap(perm[k], perm[pick(rng)]);
          idx[t * top_k + k] = perm[k];
        }
        break;
      }
      case Routing::kAny:
        for (int k = 0; k < top_k; ++k) idx[t * top_k + k] = any(rng);
        break;
      case Routing::kOneHot:
        for (int k = 0; k < top_k; ++k) idx[t * top_k + k] = hot;
        break;
    }
  }
  if (invalid_fraction > 0) {
    std::bernoulli_distribution bad(invalid_fraction);
    const int32_t bad_ids[] = {-1, experts, INT_MIN, INT_MAX, -experts, experts + 7};
    std::uniform_int_distribution<int> which(0, 5);
    for (auto& v : idx)
      if (bad(rng)) v = bad_ids[which(rng)];
  }
  return idx;
}

// Weights in (0, 1], quantised to 1/16 so that ties are common; with `specials`, some are NaN,
// -0, +0, -inf or +inf (drop-by-weight must rank them by the documented rule).
inline std::vector<float> make_weights(std::mt19937_64& rng, size_t n, bool specials = false) {
  std::uniform_int_distribution<int> q(1, 16);
  std::vector<float> w(n);
  for (auto& v : w) v = static_cast<float>(q(rng)) / 16.0f;
  if (specials) {
    std::bernoulli_distribution special(0.1);
    const float values[] = {std::numeric_limits<float>::quiet_NaN(), -0.0f, 0.0f,
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::infinity(), -0.5f};
    std::uniform_int_distribution<int> which(0, 5);
    for (auto& v : w)
      if (special(rng)) v = values[which(rng)];
  }
  return w;
}

// A token mask with about `real_fraction` real tokens (1 = real).
inline std::vector<uint8_t> make_mask(std::mt19937_64& rng, int64_t tokens, double real_fraction) {
  std::bernoulli_distribution real(real_fraction);
  std::vector<uint8_t> m(tokens);
  std::uniform_int_distribution<int> nonzero(1, 255);
  for (auto& v : m) v = real(rng) ? static_cast<uint8_t>(nonzero(rng)) : 0;  // any nonzero is real
  return m;
}

// One plan case of the test grids.
struct PlanCase {
  int64_t tokens;
  moekit_plan_config_t config;
  Routing routing;
  double invalid_fraction;
  double real_fraction;  // 1 = no mask
};

// The awkward shapes of the issue: 257 experts, T < E, experts with no tokens, all tokens masked,
// K = 1 and 32, A in {1, 8, 16, 128}, capacities that drop by position and by weight, local
// expert ranges, out-of-range ids, T = 0 and 1.
inline std::vector<PlanCase> plan_case_grid() {
  using R = Routing;
  const int pos = MOEKIT_DROP_BY_POSITION, wt = MOEKIT_DROP_BY_WEIGHT;
  std::vector<PlanCase> cases = {
      {0, plan_config(8, 2), R::kDistinct, 0, 1},
      {1, plan_config(8, 2), R::kDistinct, 0, 1},
      {1, plan_config(4, 4, 8), R::kDistinct, 0, 1},
      {5, plan_config(257, 8), R::kDistinct, 0, 1},            // T < E: most experts empty
      {300, plan_config(257, 8, 16), R::kDistinct, 0, 1},
      {1000, plan_config(257, 1), R::kSkewed, 0, 1},
      {777, plan_config(64, 32), R::kDistinct, 0, 1},           // K = 32
      {333, plan_config(32, 32, 8), R::kDistinct, 0, 1},        // K = E
      {500, plan_config(128, 8, 128), R::kSkewed, 0, 1},        // A = 128, empty experts
      {640, plan_config(16, 4, 8), R::kAny, 0, 0.6},            // duplicates + mask
      {256, plan_config(8, 2, 16), R::kDistinct, 0, 0},         // every token masked
      {999, plan_config(256, 8, 1, 0, pos, 64, 64), R::kDistinct, 0, 1},   // EP rank 1 of 4
      {999, plan_config(256, 8, 8, 0, pos, 192, 0), R::kDistinct, 0, 0.8}, // last rank, E_local = 0
      {700, plan_config(100, 6, 1), R::kAny, 0.05, 1},          // invalid ids
      {700, plan_config(100, 6, 8, 0, pos, 10, 30), R::kAny, 0.1, 0.7},
      {1200, plan_config(64, 8, 1, 40, pos), R::kSkewed, 0, 1},           // drops by position
      {1200, plan_config(64, 8, 16, 40, wt), R::kSkewed, 0, 1},           // drops by weight
      {2000, plan_config(257, 4, 8, 3, wt), R::kAny, 0.02, 0.9},
      {3000, plan_config(16, 2, 1, 1, wt), R::kDistinct, 0, 1},           // capacity 1
      {4096, plan_config(8, 8, 1, 2000, wt), R::kDistinct, 0, 1},         // K = E, 2000 of 4096
      {5000, plan_config(2048, 16, 1), R::kDistinct, 0, 1},                // large E
      {1500, plan_config(4096, 32, 4), R::kDistinct, 0, 1},                // E_local = 4096
      {9000, plan_config(3100, 8, 1, 0, pos, 1000, 2048), R::kSkewed, 0, 1},
      {6000, plan_config(12, 3, 1), R::kOneHot, 0, 1},                     // one expert has all
      {6000, plan_config(12, 3, 1, 4100, wt), R::kOneHot, 0, 1},
  };
  return cases;
}

}  // namespace moekit::test
