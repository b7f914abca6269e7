// Token-movement configuration as the host code sees it: the caller's extensible structs (plan
// config and plan arrays) read into full-size copies and validated, and the sizes every call
// derives from the config and the token count.
#pragma once

#include <cstdint>

#include "moekit/tokens.h"

namespace moekit::tokens {

// Defaults of every field (what moekit_plan_config_init writes).
void set_defaults(moekit_plan_config_t* config);
// A plan with every pointer NULL (what moekit_token_plan_init writes).
void set_plan_defaults(moekit_token_plan_t* plan);

// Validates a full-size config; reports the first bad field with its value.
moekit_status_t check_config(const moekit_plan_config_t& config);

// Reads the caller's struct (any released size) into `out` and validates it.
moekit_status_t read_and_check(const moekit_plan_config_t* user, moekit_plan_config_t* out);

// Reads the caller's plan struct (any released size) into `out` (pointers are not checked here).
moekit_status_t read_plan(const moekit_token_plan_t* user, moekit_token_plan_t* out);

// The sizes of one plan: the config with defaults resolved, and what T makes of it.
struct PlanShape {
  int32_t num_experts;   // E
  int32_t top_k;         // K
  int32_t expert_begin;  // e0
  int32_t num_local;     // E_local (resolved: 0 -> E - e0)
  int32_t alignment;     // A
  int32_t capacity;      // C, 0 = dropless
  bool drop_by_weight;   // capacity > 0 and MOEKIT_DROP_BY_WEIGHT
  int64_t num_tokens;    // T
  int64_t num_slots;     // N = T K
  int64_t max_rows;      // moekit_plan_max_rows
};

// Worst-case rows (see moekit_plan_max_rows), in int64 (no overflow for any int32 config and
// int32-sized N).
int64_t max_rows_for(const moekit_plan_config_t& config, int64_t num_slots);

// Validates num_tokens against a checked config (T >= 0, N and max_rows within int32) and fills
// `out`. Messages name num_tokens.
moekit_status_t plan_shape(const moekit_plan_config_t& config, int64_t num_tokens, PlanShape* out);

// read_and_check + plan_shape.
moekit_status_t read_shape(const moekit_plan_config_t* user, int64_t num_tokens, PlanShape* out);

}  // namespace moekit::tokens
