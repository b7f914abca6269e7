#include "src/router/router_config.hpp"

#include <cmath>
#include <cstddef>

#include "capi/api.hpp"
#include "src/common/error.hpp"

namespace moekit::router {

// Size of moekit_router_config_t in 0.1, the first release: callers' structs are never smaller.
constexpr size_t kConfigSizeV0_1 = offsetof(moekit_router_config_t, route_scale) + sizeof(float);

void set_defaults(moekit_router_config_t* c) {
  c->struct_size = sizeof(moekit_router_config_t);
  c->num_experts = 0;
  c->top_k = 0;
  c->score_func = MOEKIT_SCORE_SOFTMAX;
  c->softmax_order = MOEKIT_SOFTMAX_THEN_TOPK;
  c->num_groups = 1;
  c->num_groups_kept = 1;
  c->group_score = MOEKIT_GROUP_SCORE_AUTO;
  c->group_score_topn = 2;
  c->group_mask = MOEKIT_GROUP_MASK_ZERO;
  c->normalize = 0;
  c->weights_use_bias = 0;
  c->accumulate_load = 0;
  c->route_scale = 1.0f;
}

moekit_status_t check_config(const moekit_router_config_t& c) {
  MOEKIT_CHECK_ARG(c.num_experts >= 1 && c.num_experts <= MOEKIT_ROUTER_MAX_EXPERTS,
                   "config->num_experts = %d is outside [1, %d]", c.num_experts,
                   MOEKIT_ROUTER_MAX_EXPERTS);
  MOEKIT_CHECK_ARG(c.top_k >= 1 && c.top_k <= MOEKIT_MAX_TOP_K,
                   "config->top_k = %d is outside [1, %d]", c.top_k, MOEKIT_MAX_TOP_K);
  MOEKIT_CHECK_ARG(c.top_k <= c.num_experts, "config->top_k = %d exceeds num_experts = %d",
                   c.top_k, c.num_experts);
  MOEKIT_CHECK_ARG(c.score_func == MOEKIT_SCORE_SOFTMAX || c.score_func == MOEKIT_SCORE_SIGMOID ||
                       c.score_func == MOEKIT_SCORE_SQRT_SOFTPLUS,
                   "config->score_func = %d is not a moekit_score_func_t", c.score_func);
  MOEKIT_CHECK_ARG(c.softmax_order == MOEKIT_SOFTMAX_THEN_TOPK ||
                       c.softmax_order == MOEKIT_TOPK_THEN_SOFTMAX,
                   "config->softmax_order = %d is not a moekit_softmax_order_t", c.softmax_order);
  MOEKIT_CHECK_ARG(c.num_groups >= 1, "config->num_groups = %d is less than 1", c.num_groups);
  MOEKIT_CHECK_ARG(c.num_experts % c.num_groups == 0,
                   "config->num_groups = %d does not divide num_experts = %d", c.num_groups,
                   c.num_experts);
  MOEKIT_CHECK_ARG(c.num_groups_kept >= 1 && c.num_groups_kept <= c.num_groups,
                   "config->num_groups_kept = %d is outside [1, num_groups = %d]",
                   c.num_groups_kept, c.num_groups);
  const int32_t experts_per_group = c.num_experts / c.num_groups;
  MOEKIT_CHECK_ARG(static_cast<int64_t>(c.num_groups_kept) * experts_per_group >= c.top_k,
                   "config->num_groups_kept = %d groups of %d experts hold fewer than top_k = %d",
                   c.num_groups_kept, experts_per_group, c.top_k);
  MOEKIT_CHECK_ARG(c.group_score >= MOEKIT_GROUP_SCORE_AUTO &&
                       c.group_score <= MOEKIT_GROUP_SCORE_TOPN_SUM,
                   "config->group_score = %d is not a moekit_group_score_t", c.group_score);
  MOEKIT_CHECK_ARG(c.group_score != MOEKIT_GROUP_SCORE_TOPN_SUM ||
                       (c.group_score_topn >= 1 && c.group_score_topn <= experts_per_group),
                   "config->group_score_topn = %d is outside [1, experts per group = %d]",
                   c.group_score_topn, experts_per_group);
  MOEKIT_CHECK_ARG(c.group_mask == MOEKIT_GROUP_MASK_ZERO || c.group_mask == MOEKIT_GROUP_MASK_NEG_INF,
                   "config->group_mask = %d is not a moekit_group_mask_t", c.group_mask);
  MOEKIT_CHECK_ARG(std::isfinite(c.route_scale), "config->route_scale = %g is not finite",
                   static_cast<double>(c.route_scale));
  MOEKIT_CHECK_SUPPORTED(!(c.weights_use_bias && c.score_func == MOEKIT_SCORE_SOFTMAX &&
                           c.softmax_order == MOEKIT_TOPK_THEN_SOFTMAX),
                         "config->weights_use_bias = %d cannot be combined with "
                         "MOEKIT_TOPK_THEN_SOFTMAX (weights are a softmax of the picked logits)",
                         c.weights_use_bias);
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t read_and_check(const moekit_router_config_t* user, moekit_router_config_t* out) {
  MOEKIT_TRY(capi::read_config(user, "config", kConfigSizeV0_1, set_defaults, out));
  return check_config(*out);
}

moekit_group_score_t effective_group_score(const moekit_router_config_t& c, bool has_bias) {
  if (c.group_score != MOEKIT_GROUP_SCORE_AUTO) return static_cast<moekit_group_score_t>(c.group_score);
  return has_bias ? MOEKIT_GROUP_SCORE_TOP2_SUM : MOEKIT_GROUP_SCORE_MAX;
}

kernels::router::RouterOptions resolve_options(const moekit_router_config_t& c, bool has_bias) {
  kernels::router::RouterOptions o{};
  o.num_experts = c.num_experts;
  o.top_k = c.top_k;
  o.score_func = c.score_func;
  o.topk_then_softmax =
      c.score_func == MOEKIT_SCORE_SOFTMAX && c.softmax_order == MOEKIT_TOPK_THEN_SOFTMAX ? 1 : 0;
  o.normalize = c.normalize != 0 && c.top_k > 1 ? 1 : 0;
  o.weights_use_bias = c.weights_use_bias != 0 ? 1 : 0;
  o.route_scale = c.route_scale;
  o.num_groups = c.num_groups;
  o.groups_kept = c.num_groups_kept;
  o.group_score = effective_group_score(c, has_bias);
  o.group_topn = c.group_score_topn;
  o.group_mask_value = c.group_mask == MOEKIT_GROUP_MASK_NEG_INF ? -INFINITY : 0.0f;
  return o;
}

}  // namespace moekit::router
