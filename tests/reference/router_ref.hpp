// CPU reference of the router family (include/moekit/router.h), in double precision: forward
// (scores, groups, selection, weights, load, aux statistics), aux loss, backward (the analytic
// gradient and the objective it differentiates, for finite differences), bias update and the
// fake gate. The fake gate's random numbers are the device's bit for bit (same Philox stream and
// the same rounded fp32 operations); everything else is computed from the same fp32 inputs in
// double, so device results are compared with a tolerance (integers exactly when the inputs keep
// the selection away from near-ties; see selection_margin).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "moekit/router.h"

namespace moekit::ref {

// One token's routing, with the intermediate values tests look at.
struct RouterRow {
  std::vector<double> scores;          // s [E]
  std::vector<double> selection;       // c after sanitising (NaN -> -inf) and group masking [E]
  std::vector<double> group_scores;    // [G] (empty without groups)
  std::vector<int32_t> kept_groups;    // the G' groups kept, in selection order
  std::vector<int32_t> indices;        // [K] in selection order
  std::vector<double> weights;         // [K] final weights
  std::vector<double> aux_scores;      // p [E] (normalised when normalize and K > 1)
};

// Routes one token. z: [E] logits (already exact in their storage dtype); bias: [E] or nullptr.
RouterRow router_row(const moekit_router_config_t& config, const float* z, const float* bias);

struct RouterForward {
  std::vector<double> weights;   // [T, K]
  std::vector<int32_t> indices;  // [T, K]
  std::vector<int64_t> load;     // [E]
  std::vector<double> score_sum; // [E]
  int64_t token_count = 0;
};

// logits: [T, E] row-major; bias: [E] or nullptr; mask: [T] or nullptr.
RouterForward router_forward(const moekit_router_config_t& config, int64_t num_tokens,
                             const std::vector<float>& logits, const std::vector<float>* bias,
                             const std::vector<uint8_t>* mask);

// The smallest relative gap |a - b| / (max(|a|, |b|) + 1e-3) in one token between values whose
// order decides the output: consecutive selection values among the K picked and the first one
// left out, and the group scores around the G'-th group (exact ties of selection values, which the
// device reproduces from equal inputs, and infinities do not count; equal group scores do). A device computing in fp32 (relative
// error ~1e-6) reproduces the indices exactly when this is well above that: tests ask for 1e-5.
double selection_margin(const moekit_router_config_t& config, const float* z, const float* bias);

// aux = sum_i (L_i E / (K N')) (S_i / N'), N' = max(N, 1).
double aux_loss(int32_t num_experts, int32_t top_k, const std::vector<int64_t>& load,
                const std::vector<double>& score_sum, int64_t token_count);

// The objective the backward differentiates, with the routing (indices) and the aux-loss load L
// and count N held fixed: J(z) = sum_{t,k} gw_tk w_tk(z) + coeff * sum_i f_i S_i(z) / N',
// f_i = L_i E / (K N'). logits in double so that finite differences can perturb them.
double router_objective(const moekit_router_config_t& config, int64_t num_tokens,
                        const std::vector<double>& logits, const std::vector<float>* bias,
                        const std::vector<uint8_t>* mask, const std::vector<int32_t>& indices,
                        const std::vector<float>* grad_weights, double aux_coeff,
                        const std::vector<int64_t>& load, int64_t token_count);

// dJ/dz [T, E] by the chain rule (independent of router_objective's code path). Indices outside
// [0, E) contribute nothing; repeated indices add up.
std::vector<double> router_backward(const moekit_router_config_t& config, int64_t num_tokens,
                                    const std::vector<double>& logits, const std::vector<float>* bias,
                                    const std::vector<uint8_t>* mask,
                                    const std::vector<int32_t>& indices,
                                    const std::vector<float>* grad_weights, double aux_coeff,
                                    const std::vector<int64_t>& load, int64_t token_count);

// The backward as the kernels evaluate it (kernels/router/backward.cuh, "Evaluation order"), for
// the same arguments as router_backward:
//   value: that order in double -- the same maths as router_backward (tests check the two agree);
//   fp32:  that order in fp32 with IEEE exp / division in place of the MUFU approximations (what
//          the device computes up to those approximations; tests check it stays within bound);
//   bound: a bound on |device fp32 result - exact value| per element, by running error analysis
//          of that order: every fp32 operation rounds with relative error u = 2^-24 (plus the
//          flush of results below 2^-126), __expf(x) is within (2 + 1.173 |x|) ulp (CUDA's
//          documented bound), rcp.approx and log1pf within 1 ulp; a sum over n terms by any of the
//          kernels' trees is within gamma_d sum |term|, d = min(n - 1, ceil(n / 32) + 37) (the
//          deepest per-lane chain of the fast and the generic path plus the butterfly).
//   textbook_fp32: router_backward's textbook order in fp32 (the kernels' order before the first
//          GPU run): tests show it leaves the bound where the rows cancel;
//   reference_bound: the same analysis of router_backward's own double evaluation (textbook
//          order, sequential sums, u = 2^-53): values that are analytically ~1e-20 (the 1e-20 of
//          the normalisation) come out of O(1) terms there, so the reference is not exact either.
// Neither includes the rounding of the result to the gradient's dtype (docs/router.md, "Backward
// precision" tells how the GPU suite combines them).
struct BackwardEvaluation {
  std::vector<double> value;            // [T, E]
  std::vector<float> fp32;              // [T, E]
  std::vector<float> textbook_fp32;     // [T, E]
  std::vector<double> bound;            // [T, E]
  std::vector<double> reference_bound;  // [T, E]
};
BackwardEvaluation router_backward_device_order(const moekit_router_config_t& config, int64_t num_tokens,
                                                const std::vector<double>& logits,
                                                const std::vector<float>* bias,
                                                const std::vector<uint8_t>* mask,
                                                const std::vector<int32_t>& indices,
                                                const std::vector<float>* grad_weights, double aux_coeff,
                                                const std::vector<int64_t>& load, int64_t token_count,
                                                bool emulations = true);  // false: bounds only

// b_i += rate sign(mean(L) - L_i) (fp32 additions, as on the device), then optionally
// b -= mean(b) (in double), then optionally L = 0.
void bias_update(int32_t num_experts, float rate, bool recenter, std::vector<float>& bias,
                 std::vector<int32_t>& load, bool reset_load);

// ---- fake gate ---------------------------------------------------------------------------------
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// The device's stream (kernels/router/philox.cuh): purpose 0 weights, 1 bias, 2 uniforms.
std::array<uint32_t, 4> fake_gate_random(uint64_t seed, uint64_t offset, uint32_t purpose,
                                         uint64_t token, uint32_t block);
float rand_uniform24(uint32_t x);
void rand_normal2(uint32_t a, uint32_t b, float* n0, float* n1);

struct FakeGate {
  std::vector<float> weights;    // [T, K], bit-exact with the device
  std::vector<int32_t> indices;  // [T, K]
  std::vector<int64_t> load;     // [E] (masked tokens do not count)
};
FakeGate fake_gate(int64_t num_tokens, int32_t num_experts, int32_t top_k, int32_t skip_experts,
                   float noise, uint64_t seed, uint64_t offset, const std::vector<uint8_t>* mask);

}  // namespace moekit::ref
