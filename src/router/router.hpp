// Router host side: launch shapes, workspace layout and the enqueue of every router call. The
// callers (capi/router) have validated every argument; these functions only decide and launch.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/router/launch.hpp"
#include "moekit/router.h"

namespace moekit::router {

// True when the register fast path runs this configuration (E <= 512 and, with groups, groups
// made of whole lanes, a power of two of them, with a max / top-2 group score; AUTO is one of the
// two whether or not a bias is given, so the choice never depends on the bias).
bool fast_path(const moekit_router_config_t& config);

// Grid and block of the forward / backward for T tokens; depends only on the config, T and (the
// generic forward's shared memory) the logits' element size and whether aux statistics are asked
// for. The forward workspace is sized for 4-byte elements with statistics, the most blocks of any
// call.
kernels::router::RouterShape forward_shape(const moekit_router_config_t& config, int64_t num_tokens,
                                           int elem_bytes, bool stats);
kernels::router::RouterShape backward_shape(const moekit_router_config_t& config, int64_t num_tokens,
                                            int elem_bytes);

// Workspace bytes of the forward / backward (the same carving as the run).
size_t forward_workspace_bytes(const moekit_router_config_t& config, int64_t num_tokens);
size_t backward_workspace_bytes(const moekit_router_config_t& config, int64_t num_tokens);

// Widest access (16, 8, 4 or 2 bytes, at least the element size) that a pointer and a row stride
// of `element_bytes` elements allow.
int32_t vector_bytes(const void* ptr, int64_t stride_elements, size_t element_bytes);

struct ForwardCall {
  moekit_router_config_t config;
  int64_t num_tokens;
  moekit_dtype_t dtype;
  const void* logits;
  int64_t logits_row_stride;
  const float* bias;
  const uint8_t* token_mask;
  float* weights;
  int32_t* indices;
  int32_t* expert_load;
  float* aux_score_sum;
  int32_t* aux_token_count;
  void* workspace;
  void* stream;
};
moekit_status_t run_forward(const ForwardCall& call);

struct BackwardCall {
  moekit_router_config_t config;
  int64_t num_tokens;
  moekit_dtype_t dtype;
  const void* logits;
  int64_t logits_row_stride;
  const float* bias;
  const uint8_t* token_mask;
  const int32_t* indices;
  const float* grad_weights;
  float aux_loss_coeff;
  const int32_t* expert_load;
  const int32_t* aux_token_count;
  void* grad_logits;
  int64_t grad_logits_row_stride;
  void* stream;
};
moekit_status_t run_backward(const BackwardCall& call);

moekit_status_t run_aux_loss(int32_t num_experts, int32_t top_k, const int32_t* expert_load,
                             const float* aux_score_sum, const int32_t* aux_token_count,
                             float* aux_loss, void* stream);

moekit_status_t run_bias_update(int32_t num_experts, float update_rate, int32_t recenter,
                                float* correction_bias, int32_t* expert_load, int32_t reset_load,
                                void* stream);

struct FakeGateCall {
  int64_t num_tokens;
  int32_t num_experts;
  int32_t top_k;
  int32_t skip_experts;
  float noise;
  uint64_t seed;
  uint64_t offset;
  const uint8_t* token_mask;
  float* weights;
  int32_t* indices;
  int32_t* expert_load;
  int32_t accumulate_load;
  void* stream;
};
moekit_status_t run_fake_gate(const FakeGateCall& call);

}  // namespace moekit::router
