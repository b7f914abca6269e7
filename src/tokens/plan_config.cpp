#include "src/tokens/plan_config.hpp"

#include <algorithm>
#include <climits>
#include <cstddef>

#include "capi/api.hpp"
#include "src/common/error.hpp"

namespace moekit::tokens {

// Sizes of the structs in 0.1, the first release: callers' structs are never smaller.
constexpr size_t kConfigSizeV0_1 = offsetof(moekit_plan_config_t, drop_policy) + sizeof(int32_t);
constexpr size_t kPlanSizeV0_1 = offsetof(moekit_token_plan_t, totals) + sizeof(int32_t*);

void set_defaults(moekit_plan_config_t* c) {
  c->struct_size = sizeof(moekit_plan_config_t);
  c->num_experts = 0;
  c->top_k = 0;
  c->local_expert_begin = 0;
  c->num_local_experts = 0;
  c->alignment = 1;
  c->capacity = 0;
  c->drop_policy = MOEKIT_DROP_BY_POSITION;
}

void set_plan_defaults(moekit_token_plan_t* p) {
  p->struct_size = sizeof(moekit_token_plan_t);
  p->expert_counts = nullptr;
  p->expert_offsets = nullptr;
  p->row_of_slot = nullptr;
  p->slot_of_row = nullptr;
  p->totals = nullptr;
}

static int32_t resolved_local(const moekit_plan_config_t& c) {
  return c.num_local_experts != 0 ? c.num_local_experts : c.num_experts - c.local_expert_begin;
}

moekit_status_t check_config(const moekit_plan_config_t& c) {
  MOEKIT_CHECK_ARG(c.num_experts >= 1, "config->num_experts = %d is less than 1", c.num_experts);
  MOEKIT_CHECK_ARG(c.top_k >= 1 && c.top_k <= MOEKIT_MAX_TOP_K,
                   "config->top_k = %d is outside [1, %d]", c.top_k, MOEKIT_MAX_TOP_K);
  MOEKIT_CHECK_ARG(c.top_k <= c.num_experts, "config->top_k = %d exceeds num_experts = %d",
                   c.top_k, c.num_experts);
  MOEKIT_CHECK_ARG(c.local_expert_begin >= 0 && c.local_expert_begin < c.num_experts,
                   "config->local_expert_begin = %d is outside [0, num_experts = %d)",
                   c.local_expert_begin, c.num_experts);
  MOEKIT_CHECK_ARG(c.num_local_experts >= 0, "config->num_local_experts = %d is negative",
                   c.num_local_experts);
  MOEKIT_CHECK_ARG(static_cast<int64_t>(c.local_expert_begin) + c.num_local_experts <= c.num_experts,
                   "config->local_expert_begin + num_local_experts = %d + %d exceeds "
                   "num_experts = %d",
                   c.local_expert_begin, c.num_local_experts, c.num_experts);
  const int32_t local = resolved_local(c);
  MOEKIT_CHECK_ARG(local <= MOEKIT_PLAN_MAX_LOCAL_EXPERTS,
                   "config->num_local_experts = %d (resolved from num_experts = %d and "
                   "local_expert_begin = %d) exceeds MOEKIT_PLAN_MAX_LOCAL_EXPERTS = %d",
                   local, c.num_experts, c.local_expert_begin, MOEKIT_PLAN_MAX_LOCAL_EXPERTS);
  MOEKIT_CHECK_ARG(c.alignment >= 1, "config->alignment = %d is less than 1", c.alignment);
  MOEKIT_CHECK_ARG(c.capacity >= 0, "config->capacity = %d is negative", c.capacity);
  MOEKIT_CHECK_ARG(c.drop_policy == MOEKIT_DROP_BY_POSITION || c.drop_policy == MOEKIT_DROP_BY_WEIGHT,
                   "config->drop_policy = %d is not a moekit_drop_policy_t", c.drop_policy);
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t read_and_check(const moekit_plan_config_t* user, moekit_plan_config_t* out) {
  MOEKIT_TRY(capi::read_config(user, "config", kConfigSizeV0_1, set_defaults, out));
  return check_config(*out);
}

moekit_status_t read_plan(const moekit_token_plan_t* user, moekit_token_plan_t* out) {
  return capi::read_config(user, "plan", kPlanSizeV0_1, set_plan_defaults, out);
}

int64_t max_rows_for(const moekit_plan_config_t& c, int64_t n) {
  const int64_t local = resolved_local(c);
  const int64_t a = c.alignment;
  const int64_t padding = std::min(local, n) * (a - 1);
  int64_t rows = n + padding;
  if (c.capacity > 0) {
    const int64_t cap = c.capacity;
    rows = std::min(rows, std::min(n, local * cap) + padding);
    rows = std::min(rows, local * ((cap + a - 1) / a * a));
  }
  return rows;
}

moekit_status_t plan_shape(const moekit_plan_config_t& c, int64_t num_tokens, PlanShape* out) {
  MOEKIT_CHECK_ARG(num_tokens >= 0, "num_tokens = %lld is negative",
                   static_cast<long long>(num_tokens));
  MOEKIT_CHECK_ARG(num_tokens <= INT32_MAX / c.top_k,
                   "num_tokens = %lld times top_k = %d exceeds INT32_MAX slots (slots and rows "
                   "are int32)",
                   static_cast<long long>(num_tokens), c.top_k);
  const int64_t n = num_tokens * c.top_k;
  const int64_t rows = max_rows_for(c, n);
  MOEKIT_CHECK_ARG(rows <= INT32_MAX,
                   "num_tokens = %lld gives a worst case of %lld rows (alignment = %d over %d "
                   "local experts), past INT32_MAX (row indices are int32)",
                   static_cast<long long>(num_tokens), static_cast<long long>(rows), c.alignment,
                   resolved_local(c));
  out->num_experts = c.num_experts;
  out->top_k = c.top_k;
  out->expert_begin = c.local_expert_begin;
  out->num_local = resolved_local(c);
  out->alignment = c.alignment;
  out->capacity = c.capacity;
  out->drop_by_weight = c.capacity > 0 && c.drop_policy == MOEKIT_DROP_BY_WEIGHT;
  out->num_tokens = num_tokens;
  out->num_slots = n;
  out->max_rows = rows;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t read_shape(const moekit_plan_config_t* user, int64_t num_tokens, PlanShape* out) {
  moekit_plan_config_t c;
  MOEKIT_TRY(read_and_check(user, &c));
  return plan_shape(c, num_tokens, out);
}

}  // namespace moekit::tokens
