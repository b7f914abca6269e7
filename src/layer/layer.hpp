// The MoE layer on the host side: the handle behind moekit_layer_t, the layouts of the saved buffer
// and of the two workspaces (one carve function each, shared by the size queries and the runs), and
// the sequences of family calls and glue kernels of the forward and the backward. The callers
// (capi/layer) have validated every argument; these functions decide and enqueue.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <vector>

#include "moekit/layer.h"
#include "src/layer/layer_config.hpp"
#include "src/common/lt_gemm.hpp"
#include "src/tokens/plan_config.hpp"

// The opaque handle of moekit/layer.h.
struct moekit_layer {
  moekit::layer::LayerConfig config;
  int device = 0;
  moekit::LtGemm projection;      // cuBLASLt for z = x W_r^T and its backward
  moekit_mlp_handle_t shared = nullptr;  // the shared MLP's cuBLASLt state (with a shared MLP)
  std::atomic<void* const*> stage_events{nullptr};
  // Expert parallelism in exact mode: the host layout (exchanged counts) of the last forward into
  // each saved buffer, which its backward needs to size the NCCL transfers. Keyed by the saved
  // buffer's address, so forwards of several micro-batches can precede their backwards. The
  // kMaxHostLayouts most recent saved buffers are kept (oldest dropped first), so a caller whose
  // saved buffers move around does not grow this without bound.
  static constexpr size_t kMaxHostLayouts = 256;
  std::map<const void*, std::vector<int64_t>> host_layouts;
  std::deque<const void*> host_layout_order;  // keys of host_layouts, oldest first
};

namespace moekit::layer {

// The sizes of a call with T tokens. Without expert parallelism the plan is over the T tokens;
// with it, over the rows a dispatch brings to this rank, at most recv_rows (the buffers are sized
// for that worst case; exact mode runs the plan over the rows that came).
struct CallShape {
  int64_t num_tokens = 0;  // T
  tokens::PlanShape plan;  // the (worst-case) plan; plan.max_rows is R
  int64_t recv_rows = 0;   // expert parallelism: the most rows a dispatch brings here; else 0
};
// Validates T (messages name num_tokens).
moekit_status_t shape_for(const LayerConfig& config, int64_t num_tokens, CallShape* shape);

size_t saved_bytes(const LayerConfig& config, const CallShape& shape);
size_t forward_workspace_bytes(const LayerConfig& config, const CallShape& shape);
size_t backward_workspace_bytes(const LayerConfig& config, const CallShape& shape);

// The pieces of a saved buffer (host arithmetic). view->struct_size is kept.
void saved_view(const LayerConfig& config, const CallShape& shape, void* saved, moekit_layer_saved_view_t* view);

// Bytes of each parameter (0 for one the config does not have), in the order of
// moekit_layer_params_t / moekit_layer_grads_t after struct_size.
struct ParamSizes {
  uint64_t router_weight, router_bias, correction_bias, w_gate_up, b_gate_up, w_down, b_down, shared_w_gate_up,
      shared_b_gate_up, shared_w_down, shared_b_down, shared_gate_weight;
};
ParamSizes param_sizes(const LayerConfig& config);

moekit_status_t create(const LayerConfig& config, moekit_layer_t* layer);
moekit_status_t destroy(moekit_layer_t layer);

struct ForwardCall {
  int64_t num_tokens;
  const void* x;
  const uint8_t* token_mask;
  moekit_layer_params_t params;  // full size
  void* y;
  int32_t* expert_load;
  float* aux_loss;
  void* saved;
  void* workspace;
  cudaStream_t stream;
};
moekit_status_t forward(moekit_layer& layer, const CallShape& shape, const ForwardCall& call);

struct BackwardCall {
  int64_t num_tokens;
  const void* x;
  const uint8_t* token_mask;
  moekit_layer_params_t params;  // full size
  const void* saved;
  const void* grad_y;
  float aux_loss_coeff;
  void* grad_x;
  moekit_layer_grads_t grads;    // full size; all NULL when the caller gave none
  void* workspace;
  cudaStream_t stream;
};
moekit_status_t backward(moekit_layer& layer, const CallShape& shape, const BackwardCall& call);

}  // namespace moekit::layer
