// CPU reference of the tokens family (semantics section 4) in double precision: the routing plan,
// permute, combine and both backwards, plus an invariant checker that judges any plan (the
// device's or the reference's) from its definition alone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moekit/tokens.h"

namespace moekit::ref {

// A plan configuration with the defaults resolved.
struct TokenPlanConfig {
  int num_experts = 0;   // E
  int top_k = 0;         // K
  int expert_begin = 0;  // e0
  int num_local = 0;     // E_local
  int alignment = 1;     // A
  int capacity = 0;      // C, 0 = dropless
  bool drop_by_weight = false;
};

TokenPlanConfig resolve(const moekit_plan_config_t& config);

struct TokenPlan {
  std::vector<int32_t> expert_counts;   // [E_local]
  std::vector<int32_t> expert_offsets;  // [E_local + 1]
  std::vector<int32_t> row_of_slot;     // [T K]
  std::vector<int32_t> slot_of_row;     // [total]
  int32_t total = 0;
  int32_t dropped = 0;
  int32_t invalid = 0;
};

// Built the plainest way: per expert, a list of its routed slots in slot order; capacity by
// position keeps the first C, by weight the C best by (weight desc, NaN last, slot asc) put back
// in slot order. `weights` may be empty unless drop_by_weight; `mask` empty = all real.
TokenPlan build_plan(const TokenPlanConfig& c, int64_t num_tokens,
                     const std::vector<int32_t>& indices, const std::vector<float>& weights,
                     const std::vector<uint8_t>& mask);

// True when weight a (slot sa) is kept before weight b (slot sb) under drop-by-weight.
bool weight_ranks_before(float a, int64_t sa, float b, int64_t sb);

// Checks a plan against its definition (not against build_plan): counts, aligned offsets,
// totals, every routed slot exactly once or dropped, stable slot order inside each expert,
// padding sentinels, the capacity policy. Returns "" or a description of the first violation.
std::string check_plan(const TokenPlanConfig& c, int64_t num_tokens,
                       const std::vector<int32_t>& indices, const std::vector<float>& weights,
                       const std::vector<uint8_t>& mask, const TokenPlan& plan);

// Movement in double. Token-side tensors [T, H] contiguous; row-side [total, H].
// xp[r] = x[t(r)], 0 for padding; row_weights[r] = w[slot(r)] (0 for padding) when w is given.
void permute(const TokenPlan& plan, int top_k, int64_t num_tokens, int64_t hidden,
             const std::vector<double>& x, const std::vector<double>& weights,
             std::vector<double>* xp, std::vector<double>* row_weights);

// y[t] = sum_k w_tk yp[row(t, k)] (w = 1 when weights is empty).
std::vector<double> combine(const TokenPlan& plan, int top_k, int64_t num_tokens, int64_t hidden,
                            const std::vector<double>& yp, const std::vector<double>& weights);

// dx[t] = sum_k dxp[row(t, k)]; dw[t K + k] = d_row_weights[row(t, k)] (0 without a row) when
// d_row_weights is given.
void permute_backward(const TokenPlan& plan, int top_k, int64_t num_tokens, int64_t hidden,
                      const std::vector<double>& dxp, const std::vector<double>& d_row_weights,
                      std::vector<double>* dx, std::vector<double>* dw);

// dyp[row(t, k)] = w_tk dy[t] (0 for padding); dw[t K + k] = <dy[t], yp[row(t, k)]> (0 without a
// row); also returns, per slot, sum over H of |dy yp| (the scale of dw's rounding error).
void combine_backward(const TokenPlan& plan, int top_k, int64_t num_tokens, int64_t hidden,
                      const std::vector<double>& dy, const std::vector<double>& weights,
                      const std::vector<double>& yp, std::vector<double>* dyp,
                      std::vector<double>* dw, std::vector<double>* dw_scale);

}  // namespace moekit::ref
