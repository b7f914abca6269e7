// Experts and MLP configurations as the host code sees them: the caller's extensible structs read
// into full-size copies, validated, with AUTO resolved.
#pragma once

#include "kernels/experts/activation.cuh"
#include "moekit/experts.h"

namespace moekit::experts {

// Largest H or I accepted (keeps every column index and 2I inside int32 comfortably).
constexpr int32_t kMaxDim = 1 << 24;

void set_defaults(moekit_experts_config_t* config);
void set_defaults(moekit_mlp_config_t* config);

moekit_status_t check_config(const moekit_experts_config_t& config);
moekit_status_t check_config(const moekit_mlp_config_t& config);

// Reads the caller's struct (any released size) into `out` and validates it.
moekit_status_t read_and_check(const moekit_experts_config_t* user, moekit_experts_config_t* out);
moekit_status_t read_and_check(const moekit_mlp_config_t* user, moekit_mlp_config_t* out);

// The activation settings every kernel takes, and the resolved layout.
struct ActivationSpec {
  kernels::experts::ActParams act;
  bool gated;
  bool interleaved;  // gated and interleaved
  int nu(int inter) const { return gated ? 2 * inter : inter; }
};
ActivationSpec activation_spec(int32_t activation, int32_t gate_up_layout, float alpha, float limit);

// Size of a released struct version (the smallest struct_size accepted).
size_t experts_config_min_size();
size_t mlp_config_min_size();

}  // namespace moekit::experts
