// Layer configuration as the host code sees it: the caller's extensible struct and the three family
// configs it points to, read into full-size copies, checked against each other, with every size
// the layer derives from them resolved.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moekit/layer.h"

namespace moekit::layer {

struct LayerConfig {
  moekit_layer_config_t layer;      // the caller's struct at full size; the three pointers cleared
  moekit_router_config_t router;    // as given (accumulate_load kept for the expert_load output)
  moekit_experts_config_t experts;
  bool has_shared = false;
  moekit_mlp_config_t shared;       // meaningful when has_shared
  moekit_plan_config_t plan;        // E, K, alignment, capacity, drop policy; all experts local

  // Resolved sizes and types.
  moekit_dtype_t dtype;             // of x, y, parameters and gradients
  moekit_dtype_t logits_dtype;      // dtype, or F32 with router_fp32
  bool mixed_router;                // router_fp32 with a 16-bit dtype: fp32 projection backward
  bool gated_shared;                // shared_gate
  int32_t num_experts;              // E
  int32_t top_k;                    // K
  int32_t hidden;                   // H
  int32_t expert_nu;                // NU of the routed experts
  int32_t shared_inter;             // I_s (0 without shared MLP)
  int32_t shared_nu;                // NU_s (0 without shared MLP)
  int64_t logits_stride;            // E rounded up to a multiple of 8
};

// Defaults of every field (what moekit_layer_config_init writes).
void set_defaults(moekit_layer_config_t* config);

// Size of the 0.1 struct (the smallest struct_size accepted).
size_t config_min_size();
size_t params_min_size();
size_t grads_min_size();
size_t saved_view_min_size();

// Reads the caller's struct (any released size) and the configs it points to, validates each and
// their agreement, and resolves the sizes. Messages name the field through the path the caller
// wrote, e.g. "config->router->top_k = 40 exceeds num_experts = 32".
moekit_status_t read_and_check(const moekit_layer_config_t* user, LayerConfig* out);

}  // namespace moekit::layer
