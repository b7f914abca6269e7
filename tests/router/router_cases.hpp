// Shared by the router test suites: configurations of the model table, input generators that keep
// the selection away from near-ties (so the fp32 device and the double reference must agree on
// every index), and small helpers.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "moekit/router.h"
#include "tests/reference/router_ref.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

namespace moekit::test {

inline moekit_router_config_t router_config(int32_t experts, int32_t top_k) {
  moekit_router_config_t c;
  moekit_router_config_init(&c, sizeof(c));
  c.num_experts = experts;
  c.top_k = top_k;
  return c;
}

// A named configuration plus what its model passes to the router.
struct RouterCase {
  std::string name;
  moekit_router_config_t config;
  bool bias = false;  // a correction bias is given
};

// The model table of the NeMo reference (section 6) and the extra shapes the issue asks for.
inline std::vector<RouterCase> model_cases() {
  std::vector<RouterCase> v;
  {
    RouterCase r{"deepseek-v3", router_config(256, 8), true};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.num_groups = 8;
    r.config.num_groups_kept = 4;
    r.config.normalize = 1;
    r.config.route_scale = 2.5f;
    v.push_back(r);
  }
  {
    RouterCase r{"moonlight", router_config(64, 6), false};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.normalize = 1;
    r.config.route_scale = 2.446f;
    v.push_back(r);
  }
  {
    RouterCase r{"qwen3", router_config(128, 8), false};
    r.config.normalize = 1;
    v.push_back(r);
  }
  {
    RouterCase r{"gpt-oss", router_config(128, 4), false};
    r.config.softmax_order = MOEKIT_TOPK_THEN_SOFTMAX;
    v.push_back(r);
  }
  {
    RouterCase r{"glm-4.5", router_config(160, 8), true};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.normalize = 1;
    r.config.route_scale = 2.5f;
    v.push_back(r);
  }
  {
    RouterCase r{"mixtral", router_config(8, 2), false};
    r.config.normalize = 1;
    v.push_back(r);
  }
  {
    RouterCase r{"nemotron", router_config(128, 6), true};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.normalize = 1;
    r.config.route_scale = 2.5f;
    v.push_back(r);
  }
  {
    RouterCase r{"qwen3-next", router_config(512, 10), false};
    r.config.normalize = 1;
    v.push_back(r);
  }
  {
    RouterCase r{"e2048-k32", router_config(2048, 32), false};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.normalize = 1;
    v.push_back(r);
  }
  {
    RouterCase r{"deepseek-v4-sqrtsoftplus", router_config(256, 8), true};
    r.config.score_func = MOEKIT_SCORE_SQRT_SOFTPLUS;
    r.config.normalize = 1;
    r.config.route_scale = 1.5f;
    v.push_back(r);
  }
  {
    RouterCase r{"sigmoid-bias-neginf-groups", router_config(256, 8), true};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.num_groups = 8;
    r.config.num_groups_kept = 4;
    r.config.group_mask = MOEKIT_GROUP_MASK_NEG_INF;
    r.config.normalize = 1;
    v.push_back(r);
  }
  {
    RouterCase r{"softmax-bias-topn-groups", router_config(128, 8), true};
    r.config.num_groups = 8;
    r.config.num_groups_kept = 3;
    r.config.group_score = MOEKIT_GROUP_SCORE_TOPN_SUM;
    r.config.group_score_topn = 4;  // n > 2: the generic path
    v.push_back(r);
  }
  {
    RouterCase r{"kimi-weights-use-bias", router_config(256, 8), true};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.weights_use_bias = 1;
    r.config.normalize = 1;
    r.config.route_scale = 2.5f;
    v.push_back(r);
  }
  {
    RouterCase r{"max-groups-no-bias", router_config(64, 4), false};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.num_groups = 8;
    r.config.num_groups_kept = 2;
    v.push_back(r);
  }
  {
    RouterCase r{"e257-no-groups", router_config(257, 7), true};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.normalize = 1;
    v.push_back(r);
  }
  {
    RouterCase r{"groups-of-3-generic", router_config(96, 6), true};  // groups narrower than a lane
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.num_groups = 32;
    r.config.num_groups_kept = 10;
    v.push_back(r);
  }
  {
    RouterCase r{"e384-groups-of-3-lanes", router_config(384, 8), true};  // 3 lanes a group: generic
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.num_groups = 8;
    r.config.num_groups_kept = 3;
    r.config.normalize = 1;
    v.push_back(r);
  }
  {
    RouterCase r{"e160-groups5-padded-lanes", router_config(160, 8), true};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.num_groups = 5;
    r.config.num_groups_kept = 2;
    r.config.normalize = 1;
    v.push_back(r);
  }
  {
    RouterCase r{"e4096-groups64", router_config(4096, 16), true};
    r.config.score_func = MOEKIT_SCORE_SIGMOID;
    r.config.num_groups = 64;
    r.config.num_groups_kept = 40;
    r.config.normalize = 1;
    v.push_back(r);
  }
  return v;
}

// Logits for T tokens, rounded to `dtype`, with every row's selection margin (ref::selection_margin)
// at least `min_margin`: rows are redrawn until they are (the fp32 device then cannot reorder a
// near-tie relative to the double reference).
inline std::vector<float> separated_logits(const moekit_router_config_t& c, int64_t T, moekit_dtype_t dtype,
                                           const std::vector<float>* bias, std::mt19937_64& rng,
                                           double min_margin = 1e-5, float spread = 1.5f) {
  const int E = c.num_experts;
  std::vector<float> logits(static_cast<size_t>(T) * E);
  std::normal_distribution<float> normal(0.0f, spread);
  for (int64_t t = 0; t < T; ++t) {
    float* row = logits.data() + t * E;
    for (int attempt = 0;; ++attempt) {
      for (int e = 0; e < E; ++e) row[e] = round_to(dtype, normal(rng));
      if (ref::selection_margin(c, row, bias ? bias->data() : nullptr) >= min_margin) break;
      if (attempt > 200) throw std::runtime_error("could not draw a well-separated row");
    }
  }
  return logits;
}

// A correction bias on a coarse grid (multiples of 1/64 in [-0.5, 0.5]): exact in fp32.
inline std::vector<float> coarse_bias(int E, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> d(-32, 32);
  std::vector<float> b(E);
  for (auto& x : b) x = static_cast<float>(d(rng)) / 64.0f;
  return b;
}

// A token mask keeping about 80% of the tokens.
inline std::vector<uint8_t> random_mask(std::mt19937_64& rng, int64_t T) {
  std::bernoulli_distribution keep(0.8);
  std::vector<uint8_t> m(static_cast<size_t>(T));
  for (auto& v : m) v = keep(rng) ? 1 : 0;
  return m;
}

}  // namespace moekit::test
