// Layer configuration as the host code sees it: the caller's extensible struct and the three family
// configs it points to, read into full-size copies, checked against each other, with every size
// the layer derives from them resolved.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moekit/layer.h"

struct moekit_ep;  // src/ep/ep_handle.hpp

namespace moekit::layer {

struct LayerConfig {
  moekit_layer_config_t layer;      // the caller's struct at full size; the three pointers cleared
  moekit_router_config_t router;    // as given (accumulate_load kept for the expert_load output)
  moekit_experts_config_t experts;
  bool has_shared = false;
  moekit_mlp_config_t shared;       // meaningful when has_shared
  moekit_plan_config_t plan;        // E, K, alignment, capacity, drop policy; the local experts
                                    // [e0, e0 + E_local) (all of them without expert parallelism)

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

  // Expert parallelism (config->expert_parallel): the handle, and what the layer derives from it.
  moekit_ep* ep = nullptr;          // NULL: every expert on this GPU
  bool ep_exact = false;            // MOEKIT_EP_MODE_EXACT (a host read per forward) vs capacity
  int32_t local_experts = 0;        // E_local = E / n (E without expert parallelism)
  int64_t ep_max_tokens = 0;        // the handle's max_tokens: the largest T a call may pass
  int64_t ep_recv_rows = 0;         // the most rows one dispatch can bring (moekit_ep_max_recv_rows)
  size_t ep_layout_bytes = 0;       // the handle's device layout
  size_t ep_host_layout_count = 0;  // int64 entries of its host layout (exact mode)
  size_t ep_workspace_bytes = 0;    // worst-case workspace of dispatch/combine and backwards
  bool ep_global_statistics = false;  // load and aux statistics summed over the EP communicator
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
