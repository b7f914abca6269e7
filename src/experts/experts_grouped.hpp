// The grouped expert FFN on the host side: workspace layouts (one carve function per direction,
// shared by the size query and the run) and the sequence of kernels of the forward and backward.
// Arguments arrive validated by capi/experts.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/experts.h"

namespace moekit::experts {

struct ForwardArgs {
  int64_t max_rows;
  const int32_t* expert_offsets;
  const void* xp;
  const float* row_weights;
  const void* w_gate_up;
  const void* b_gate_up;
  const void* w_down;
  const void* b_down;
  void* u_out;
  void* out;
};

struct BackwardArgs {
  int64_t max_rows;
  const int32_t* expert_offsets;
  const void* xp;
  const float* row_weights;
  const void* w_gate_up;
  const void* b_gate_up;
  const void* w_down;
  const void* b_down;
  const void* u;
  const void* grad_out;
  void* grad_xp;
  void* grad_w_gate_up;
  void* grad_b_gate_up;
  void* grad_w_down;
  void* grad_b_down;
  float* grad_row_weights;
};

size_t forward_workspace_bytes(const moekit_experts_config_t& config, int64_t max_rows);
size_t backward_workspace_bytes(const moekit_experts_config_t& config, int64_t max_rows, bool has_saved_u);

// Fails with NOT_AVAILABLE when the current device cannot hold the kernels' shared memory, and
// with UNSUPPORTED when config->gemm_path = SM90 and the device is not compute capability 9.0 or
// the build lacks the sm_90a kernels. Device attributes are read once per device.
moekit_status_t check_device(const moekit_experts_config_t& config);

moekit_status_t forward(const moekit_experts_config_t& config, const ForwardArgs& args, void* workspace,
                        cudaStream_t stream);
moekit_status_t backward(const moekit_experts_config_t& config, const BackwardArgs& args, void* workspace,
                         cudaStream_t stream);

}  // namespace moekit::experts
