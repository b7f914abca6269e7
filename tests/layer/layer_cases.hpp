// Layer configurations and random problems shared by the layer suites, the demo and the benchmark:
// the small versions of the model table (NeMo reference, section 6), each as one value that holds
// the four moekit configs, and problems whose values are exact in the storage dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "moekit/moekit.h"
#include "tests/reference/layer_ref.hpp"
#include "tests/support/numeric.hpp"

namespace moekit::test::layer {

// Every option of one layer. config() points into this object: keep it alive (and unmoved) while
// the returned struct is used.
struct LayerCase {
  std::string name;
  moekit_dtype_t dtype = MOEKIT_DTYPE_BF16;
  int hidden = 64;
  moekit_router_config_t router{};
  moekit_experts_config_t experts{};
  bool has_shared = false;
  moekit_mlp_config_t shared{};
  bool shared_gate = false;
  bool router_bias = false;
  bool expert_bias = false;
  bool shared_bias = false;
  bool router_fp32 = false;
  bool recompute = false;
  int alignment = 1;
  int capacity = 0;
  int drop_policy = MOEKIT_DROP_BY_POSITION;
  bool correction_bias = false;  // a fp32 correction bias is passed (selection only)
  double mask_fraction = 0.0;    // probability that a token is padding
  double aux_coeff = 0.0;        // aux-loss coefficient the backward gets
  double logit_scale = 1.0;      // standard deviation of the router logits
  double correction_scale = 0.3; // the correction bias is uniform in [-scale, scale]

  LayerCase() {
    moekit_router_config_init(&router, sizeof(router));
    moekit_experts_config_init(&experts, sizeof(experts));
    moekit_mlp_config_init(&shared, sizeof(shared));
  }

  int num_experts() const { return router.num_experts; }
  int top_k() const { return router.top_k; }

  moekit_layer_config_t config() const {
    moekit_layer_config_t c;
    moekit_layer_config_init(&c, sizeof(c));
    c.hidden = hidden;
    c.dtype = dtype;
    c.router = &router;
    c.experts = &experts;
    c.shared = has_shared ? &shared : nullptr;
    c.shared_gate = shared_gate;
    c.router_bias = router_bias;
    c.expert_bias = expert_bias;
    c.shared_bias = shared_bias;
    c.router_fp32 = router_fp32;
    c.alignment = alignment;
    c.capacity = capacity;
    c.drop_policy = drop_policy;
    c.recompute = recompute;
    return c;
  }

  // Keeps the experts' and the shared MLP's hidden size and dtype in step with the layer's.
  void set_hidden(int h) {
    hidden = h;
    experts.hidden = h;
    shared.hidden = h;
  }
  void set_dtype(moekit_dtype_t d) {
    dtype = d;
    experts.dtype = d;
    shared.dtype = d;
  }
  void set_experts(int e, int k) {
    router.num_experts = e;
    router.top_k = k;
    experts.num_experts = e;
  }

  std::string describe() const {
    std::string s = name + " (" + dtype_name(dtype) + ", H=" + std::to_string(hidden) + " I=" + std::to_string(experts.inter) +
                    " E=" + std::to_string(num_experts()) + " K=" + std::to_string(top_k());
    if (router.num_groups > 1)
      s += " G=" + std::to_string(router.num_groups) + "/" + std::to_string(router.num_groups_kept);
    if (has_shared) s += std::string(" shared I=") + std::to_string(shared.inter) + (shared_gate ? " gated" : "");
    if (router_fp32) s += " fp32-router";
    if (recompute) s += " recompute";
    if (alignment > 1) s += " A=" + std::to_string(alignment);
    if (capacity > 0) s += " C=" + std::to_string(capacity) + (drop_policy == MOEKIT_DROP_BY_WEIGHT ? "/weight" : "");
    if (experts.gemm_path == MOEKIT_GEMM_PATH_SM80) s += " sm80-gemm";
    if (experts.gemm_path == MOEKIT_GEMM_PATH_SM90) s += " sm90-gemm";
    return s + ")";
  }
};

inline bool gated(int activation) { return activation != MOEKIT_ACTIVATION_RELU2; }

inline bool interleaved(int activation, int layout) {
  return gated(activation) && (layout == MOEKIT_GATE_UP_INTERLEAVED ||
                               (layout == MOEKIT_GATE_UP_AUTO && activation == MOEKIT_ACTIVATION_QUICK_GEGLU));
}

// The reference's view of the same options.
inline ref::LayerSpec spec_of(const LayerCase& c) {
  ref::LayerSpec s;
  s.router = c.router;
  s.hidden = c.hidden;
  s.inter = c.experts.inter;
  s.act.kind = c.experts.activation;
  s.act.alpha = static_cast<double>(c.experts.act_alpha);  // the device sees the fp32 values
  s.act.limit = static_cast<double>(c.experts.act_limit);
  s.interleaved = interleaved(c.experts.activation, c.experts.gate_up_layout);
  s.weight_after_down = c.experts.weight_after_down != 0;
  s.expert_bias = c.expert_bias;
  s.router_bias = c.router_bias;
  s.has_shared = c.has_shared;
  if (c.has_shared) {
    s.shared_inter = c.shared.inter;
    s.shared_act.kind = c.shared.activation;
    s.shared_act.alpha = static_cast<double>(c.shared.act_alpha);
    s.shared_act.limit = static_cast<double>(c.shared.act_limit);
    s.shared_interleaved = interleaved(c.shared.activation, c.shared.gate_up_layout);
    s.shared_out_in = c.shared.weight_layout == MOEKIT_WEIGHT_OUT_IN;
    s.shared_bias = c.shared_bias;
    s.shared_gate = c.shared_gate;
  }
  s.alignment = c.alignment;
  s.capacity = c.capacity;
  s.drop_by_weight = c.drop_policy == MOEKIT_DROP_BY_WEIGHT;
  return s;
}

// The model table at test size (H = 64 unless said, I = 32 .. 128). Every option the table names
// appears in one of them; dtypes, the fp32 router, alignment, capacity, recompute and the shared
// MLP's nn.Linear layout are spread over the cases.
inline std::vector<LayerCase> model_cases() {
  std::vector<LayerCase> v;
  {  // DeepSeek-V3: sigmoid, correction bias, 8 groups keep 4 (top-2 sums), normalise, scale 2.5, shared
    LayerCase c;
    c.name = "deepseek-v3";
    c.set_experts(64, 8);
    c.router.score_func = MOEKIT_SCORE_SIGMOID;
    c.router.num_groups = 8;
    c.router.num_groups_kept = 4;
    c.router.normalize = 1;
    c.router.route_scale = 2.5f;
    c.correction_bias = true;
    c.experts.inter = 32;
    c.has_shared = true;
    c.shared.inter = 32;
    c.mask_fraction = 0.2;
    c.aux_coeff = 1e-2;
    v.push_back(c);
  }
  {  // Qwen3-MoE: softmax then top-k, normalise, aux loss; alignment 8, recompute
    LayerCase c;
    c.name = "qwen3";
    c.set_experts(32, 8);
    c.router.normalize = 1;
    c.experts.inter = 48;
    c.alignment = 8;
    c.recompute = true;
    c.mask_fraction = 0.25;
    c.aux_coeff = 1e-2;
    v.push_back(c);
  }
  {  // GPT-OSS: top-k logits then softmax, router bias, expert biases, quick_geglu interleaved
    LayerCase c;
    c.name = "gpt-oss";
    c.set_experts(16, 4);
    c.router.softmax_order = MOEKIT_TOPK_THEN_SOFTMAX;
    c.router_bias = true;
    c.expert_bias = true;
    c.experts.inter = 64;
    c.experts.activation = MOEKIT_ACTIVATION_QUICK_GEGLU;
    c.experts.act_alpha = 1.702f;
    c.experts.act_limit = 7.0f;
    c.mask_fraction = 0.1;
    c.aux_coeff = 1e-2;
    v.push_back(c);
  }
  {  // GLM-4.5: sigmoid with correction bias, weight after down, shared (nn.Linear layout), fp32 router
    LayerCase c;
    c.name = "glm-4.5";
    c.set_experts(32, 8);
    c.router.score_func = MOEKIT_SCORE_SIGMOID;
    c.router.normalize = 1;
    c.router.route_scale = 2.5f;
    c.correction_bias = true;
    c.router_fp32 = true;
    c.experts.inter = 32;
    c.experts.weight_after_down = 1;
    c.has_shared = true;
    c.shared.inter = 48;
    c.shared.weight_layout = MOEKIT_WEIGHT_OUT_IN;
    c.mask_fraction = 0.2;
    v.push_back(c);
  }
  {  // Mixtral: softmax, top-2, renormalised; fp16, a capacity (by position: by weight would make the
     // plan depend on fp32-vs-double weight ties between tokens; tests/tokens covers that policy)
    LayerCase c;
    c.name = "mixtral";
    c.set_dtype(MOEKIT_DTYPE_F16);
    c.set_experts(8, 2);
    c.router.normalize = 1;
    c.experts.inter = 128;
    c.capacity = 40;
    c.mask_fraction = 0.1;
    c.aux_coeff = 1e-2;
    v.push_back(c);
  }
  {  // Nemotron-3: sigmoid with a (forced) correction bias, relu2 routed and shared, biases; fp32
    LayerCase c;
    c.name = "nemotron";
    c.set_dtype(MOEKIT_DTYPE_F32);
    c.set_experts(32, 6);
    c.router.score_func = MOEKIT_SCORE_SIGMOID;
    c.router.normalize = 1;
    c.router.route_scale = 2.5f;
    c.correction_bias = true;
    c.experts.inter = 32;
    c.experts.activation = MOEKIT_ACTIVATION_RELU2;
    c.expert_bias = true;
    c.has_shared = true;
    c.shared.inter = 64;
    c.shared.activation = MOEKIT_ACTIVATION_RELU2;
    c.shared_bias = true;
    c.mask_fraction = 0.2;
    v.push_back(c);
  }
  {  // Qwen3-Next: softmax-first, many experts, K = 10, gated shared expert
    LayerCase c;
    c.name = "qwen3-next";
    c.set_experts(128, 10);
    c.router.normalize = 1;
    c.experts.inter = 32;
    c.has_shared = true;
    c.shared.inter = 64;
    c.shared_gate = true;
    c.mask_fraction = 0.2;
    c.aux_coeff = 1e-2;
    v.push_back(c);
  }
  for (LayerCase& c : v) {
    c.set_hidden(c.hidden);
    c.set_dtype(c.dtype);
  }
  return v;
}

inline std::vector<double> normal_vec(std::mt19937_64& rng, size_t n, double sd, moekit_dtype_t dtype) {
  std::normal_distribution<double> d(0.0, sd);
  std::vector<double> v(n);
  for (auto& x : v) x = round_to(dtype, static_cast<float>(d(rng)));
  return v;
}

// A random problem of T tokens: x ~ N(0, 1); W_r scaled so the logits have standard deviation
// logit_scale; W_gu ~ N(0, 1/H), W_down ~ N(0, 1/I) (shared alike), w_g ~ N(0, 1/H), biases
// ~ N(0, 0.1^2) (router bias N(0, 0.5^2)); correction bias uniform; padding tokens with
// probability mask_fraction (no mask at all when it is 0). Every value is exact in the dtype.
inline ref::LayerProblem make_problem(const LayerCase& c, int64_t T, std::mt19937_64& rng) {
  ref::LayerProblem p;
  p.spec = spec_of(c);
  p.num_tokens = T;
  const moekit_dtype_t d = c.dtype;
  const size_t E = c.num_experts(), H = c.hidden, I = c.experts.inter, NU = p.spec.expert_nu();
  p.x = normal_vec(rng, static_cast<size_t>(T) * H, 1.0, d);
  if (c.mask_fraction > 0) {
    std::bernoulli_distribution pad(c.mask_fraction);
    p.mask.resize(static_cast<size_t>(T));
    for (auto& m : p.mask) m = pad(rng) ? 0 : 1;
  }
  p.router_weight = normal_vec(rng, E * H, c.logit_scale / std::sqrt(double(H)), d);
  if (c.router_bias) p.router_bias = normal_vec(rng, E, 0.5, d);
  if (c.correction_bias) {
    std::uniform_real_distribution<float> u(-static_cast<float>(c.correction_scale),
                                            static_cast<float>(c.correction_scale));
    p.correction_bias.resize(E);
    for (auto& b : p.correction_bias) b = u(rng);
  }
  p.w_gate_up = normal_vec(rng, E * H * NU, 1.0 / std::sqrt(double(H)), d);
  p.w_down = normal_vec(rng, E * I * H, 1.0 / std::sqrt(double(I)), d);
  if (c.expert_bias) {
    p.b_gate_up = normal_vec(rng, E * NU, 0.1, d);
    p.b_down = normal_vec(rng, E * H, 0.1, d);
  }
  if (c.has_shared) {
    const size_t Is = c.shared.inter, NUs = p.spec.shared_nu();
    p.shared_w_gate_up = normal_vec(rng, H * NUs, 1.0 / std::sqrt(double(H)), d);
    p.shared_w_down = normal_vec(rng, Is * H, 1.0 / std::sqrt(double(Is)), d);
    if (c.shared_bias) {
      p.shared_b_gate_up = normal_vec(rng, NUs, 0.1, d);
      p.shared_b_down = normal_vec(rng, H, 0.1, d);
    }
    if (c.shared_gate) p.shared_gate_weight = normal_vec(rng, H, 1.0 / std::sqrt(double(H)), d);
  }
  return p;
}

}  // namespace moekit::test::layer
