// CPU reference of the whole MoE layer (moekit/layer.h), in double, composed from the families'
// references (router_ref, tokens_ref, experts_ref; the shared MLP is the experts reference with one
// expert and p = 1) plus the dense pieces the layer adds: the router projection, the shared gate
// and the sums.
//
// Storage-dtype roundings sit where the library rounds (logits, the experts' u / h / out / du / h',
// the combine, the shared output, y, dz, dx and every parameter gradient), through caller-given
// rounding functions; pass nullptr for an unrounded reference (finite differences). Everything
// else is double.
#pragma once

#include <cstdint>
#include <vector>

#include "moekit/router.h"
#include "tests/reference/experts_ref.hpp"
#include "tests/reference/router_ref.hpp"
#include "tests/reference/tokens_ref.hpp"

namespace moekit::ref {

// The layer's options, resolved (what moekit_layer_config_t and the three family configs say).
struct LayerSpec {
  moekit_router_config_t router{};  // num_experts = E, top_k = K and every routing option
  int hidden = 0;                   // H
  int inter = 0;                    // I of the routed experts
  ActSpec act;
  bool interleaved = false;         // gate/up column layout of the routed experts (gated only)
  bool weight_after_down = false;
  bool expert_bias = false;         // b_gate_up [E, NU], b_down [E, H]
  bool router_bias = false;         // b_r [E]
  bool has_shared = false;
  int shared_inter = 0;             // I_s
  ActSpec shared_act;
  bool shared_interleaved = false;
  bool shared_out_in = false;       // shared weights in nn.Linear layout ([NU_s, H], [H, I_s])
  bool shared_bias = false;         // [NU_s], [H]
  bool shared_gate = false;         // w_g [H]
  int alignment = 1;
  int capacity = 0;
  bool drop_by_weight = false;

  int num_experts() const { return router.num_experts; }
  int top_k() const { return router.top_k; }
  int expert_nu() const { return is_gated(act.kind) ? 2 * inter : inter; }
  int shared_nu() const { return has_shared ? (is_gated(shared_act.kind) ? 2 * shared_inter : shared_inter) : 0; }
};

// One problem: every tensor as doubles (representable in the storage dtype when a test feeds the
// device the same values), in the layouts of moekit_layer_params_t.
struct LayerProblem {
  LayerSpec spec;
  int64_t num_tokens = 0;                   // T
  std::vector<double> x;                    // [T, H]
  std::vector<uint8_t> mask;                // [T], or empty for all real
  std::vector<double> router_weight;        // [E, H]
  std::vector<double> router_bias;          // [E] or empty
  std::vector<float> correction_bias;       // [E] fp32, or empty for none
  std::vector<double> w_gate_up;            // [E, H, NU]
  std::vector<double> b_gate_up;            // [E, NU] or empty
  std::vector<double> w_down;               // [E, I, H]
  std::vector<double> b_down;               // [E, H] or empty
  std::vector<double> shared_w_gate_up;     // [H, NU_s] or [NU_s, H] (shared_out_in)
  std::vector<double> shared_b_gate_up;     // [NU_s] or empty
  std::vector<double> shared_w_down;        // [I_s, H] or [H, I_s]
  std::vector<double> shared_b_down;        // [H] or empty
  std::vector<double> shared_gate_weight;   // [H] or empty
};

struct LayerRounding {
  Rounder act;     // to the activation / parameter dtype (nullptr: no rounding)
  Rounder logits;  // to the logits dtype (the dtype, or fp32 with router_fp32)
};

struct LayerForward {
  std::vector<double> logits;          // z [T, E] (rounded to the logits dtype)
  RouterForward router;                // indices, load, S, N (router_ref on the logits as floats)
  std::vector<double> weights;         // w [T, K] from the logits in double with the indices held
  TokenPlan plan;                      // with the plan of tokens_ref
  ExpertsProblem experts;              // the routed experts' problem (xp, row weights, rows = total)
  ExpertsForwardResult expert_out;     // u, h, out over the plan's rows
  std::vector<double> routed;          // combine of out [T, H], rounded
  ExpertsProblem shared;               // the shared MLP as one expert over all T tokens
  ExpertsForwardResult shared_out;     // its u, h, out (= s)
  std::vector<double> gate_logit;      // [T] x . w_g (shared gate)
  std::vector<double> y;               // [T, H]
  double aux_loss = 0.0;
};

// z = round_L(x W_r^T + b_r) alone (what the device's projection should give).
std::vector<double> layer_logits(const LayerProblem& problem, const Rounder& logits_rounding);

// The forward. logits_override: z as some device computed it ([T, E] floats), used in place of
// the reference's own projection so that a test judges everything after it on the same routing.
LayerForward layer_forward(const LayerProblem& problem, const LayerRounding& rounding,
                           const std::vector<float>* logits_override = nullptr);

struct LayerGrads {
  std::vector<double> x;                   // [T, H]
  std::vector<double> router_weight;       // [E, H]
  std::vector<double> router_bias;         // [E] (sum over tokens of dz; filled even without a bias)
  std::vector<double> w_gate_up, b_gate_up, w_down, b_down;
  std::vector<double> shared_w_gate_up, shared_b_gate_up, shared_w_down, shared_b_down;  // stored layout
  std::vector<double> shared_gate_weight;  // [H]
  // Intermediates a test may look at.
  std::vector<double> grad_weights;        // dL/dw [T, K]
  std::vector<double> grad_logits;         // dz [T, E] (rounded to the logits dtype)
};

// The backward from dy [T, H] and the aux coefficient, through the saved state of `forward`.
LayerGrads layer_backward(const LayerProblem& problem, const LayerRounding& rounding, const LayerForward& forward,
                          const std::vector<double>& grad_y, double aux_coeff);

// The scalar the backward differentiates, unrounded, with the routing of `base` held fixed (its
// indices and plan; the aux term's load and token count too):
//   J = sum_{t,h} dy_th y_th + aux_coeff * sum_i f_i S_i(z) / N',  f_i = L_i E / (K N').
// For finite-difference checks of layer_backward with a null rounding.
double layer_objective(const LayerProblem& problem, const LayerForward& base, const std::vector<double>& grad_y,
                       double aux_coeff);

// Weights w [T, K] of fixed indices from double logits (router_ref's maths, without selection).
std::vector<double> router_weights_at(const moekit_router_config_t& config, int64_t num_tokens,
                                      const std::vector<double>& logits, const std::vector<float>* bias,
                                      const std::vector<int32_t>& indices);

}  // namespace moekit::ref
