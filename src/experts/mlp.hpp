// The dense MLP (shared experts) on the host side: the caller-owned cuBLASLt state behind
// moekit_mlp_handle_t (src/common/lt_gemm.hpp) and the forward/backward sequences (cuBLASLt GEMMs
// around the elementwise activation kernels of kernels/experts).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/experts.h"
#include "src/common/lt_gemm.hpp"

// The opaque handle of moekit/experts.h: cuBLASLt state and its plan cache, on one device.
struct moekit_mlp_handle {
  moekit::LtGemm gemm;
  int device = 0;
};

namespace moekit::experts {

moekit_status_t mlp_handle_create(moekit_mlp_handle_t* handle);
moekit_status_t mlp_handle_destroy(moekit_mlp_handle_t handle);

struct MlpForwardArgs {
  int64_t num_tokens;
  const void* x;
  const void* w_gate_up;
  const void* b_gate_up;
  const void* w_down;
  const void* b_down;
  void* u_out;
  void* out;
};

struct MlpBackwardArgs {
  int64_t num_tokens;
  const void* x;
  const void* w_gate_up;
  const void* b_gate_up;
  const void* w_down;
  const void* b_down;
  const void* u;
  const void* grad_out;
  void* grad_x;
  void* grad_w_gate_up;
  void* grad_b_gate_up;
  void* grad_w_down;
  void* grad_b_down;
};

size_t mlp_forward_workspace_bytes(const moekit_mlp_config_t& config, int64_t num_tokens);
size_t mlp_backward_workspace_bytes(const moekit_mlp_config_t& config, int64_t num_tokens, bool has_saved_u);

moekit_status_t mlp_forward(moekit_mlp_handle_t handle, const moekit_mlp_config_t& config,
                            const MlpForwardArgs& args, void* workspace, cudaStream_t stream);
moekit_status_t mlp_backward(moekit_mlp_handle_t handle, const moekit_mlp_config_t& config,
                             const MlpBackwardArgs& args, void* workspace, cudaStream_t stream);

}  // namespace moekit::experts
