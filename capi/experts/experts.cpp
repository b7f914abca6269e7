// C entry points of the grouped experts and the dense MLP: every argument is validated here,
// before anything is enqueued, so a rejected call writes nothing.
#include <cstdint>
#include <cstring>

#include "capi/api.hpp"
#include "moekit/experts.h"
#include "src/common/error.hpp"
#include "src/common/workspace.hpp"
#include "src/experts/experts_config.hpp"
#include "src/experts/experts_grouped.hpp"
#include "src/experts/mlp.hpp"

using moekit::capi::guarded;

namespace {

constexpr int64_t kMaxRows = INT32_MAX;  // row indices and offsets are int32

#define MOEKIT_CHECK_TENSOR(p) \
  MOEKIT_TRY(moekit::capi::check_aligned((p), MOEKIT_EXPERTS_TENSOR_ALIGNMENT, #p))
#define MOEKIT_CHECK_ALIGN4(p) MOEKIT_TRY(moekit::capi::check_aligned((p), 4, #p))

template <class Config>
moekit_status_t init_config(Config* config, size_t struct_size, size_t min_size) {
  MOEKIT_CHECK_NOT_NULL(config);
  MOEKIT_CHECK_ARG(struct_size >= min_size, "struct_size = %zu is smaller than any released config (%zu bytes)",
                   struct_size, min_size);
  Config defaults;
  moekit::experts::set_defaults(&defaults);
  const size_t n = struct_size < sizeof(defaults) ? struct_size : sizeof(defaults);
  std::memcpy(static_cast<void*>(config), &defaults, n);
  config->struct_size = struct_size;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t check_rows(int64_t rows, const char* name) {
  MOEKIT_CHECK_ARG(rows >= 0 && rows <= kMaxRows, "%s = %lld is outside [0, %lld]", name,
                   static_cast<long long>(rows), static_cast<long long>(kMaxRows));
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

MOEKIT_API moekit_status_t moekit_experts_config_init(moekit_experts_config_t* config, size_t struct_size) {
  return guarded(__func__, [&] { return init_config(config, struct_size, moekit::experts::experts_config_min_size()); });
}

MOEKIT_API moekit_status_t moekit_experts_config_check(const moekit_experts_config_t* config) {
  return guarded(__func__, [&] {
    moekit_experts_config_t c;
    return moekit::experts::read_and_check(config, &c);
  });
}

MOEKIT_API moekit_status_t moekit_experts_forward_workspace_size(const moekit_experts_config_t* config,
                                                                 int64_t max_rows, size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    moekit_experts_config_t c;
    MOEKIT_TRY(moekit::experts::read_and_check(config, &c));
    MOEKIT_TRY(check_rows(max_rows, "max_rows"));
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    *workspace_bytes = moekit::experts::forward_workspace_bytes(c, max_rows);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_experts_forward(const moekit_experts_config_t* config, int64_t max_rows,
                                                  const int32_t* expert_offsets, const void* xp,
                                                  const float* row_weights, const void* w_gate_up,
                                                  const void* b_gate_up, const void* w_down, const void* b_down,
                                                  void* u_out, void* out, void* workspace, size_t workspace_bytes,
                                                  void* stream) {
  return guarded(__func__, [&] {
    moekit_experts_config_t c;
    MOEKIT_TRY(moekit::experts::read_and_check(config, &c));
    MOEKIT_TRY(check_rows(max_rows, "max_rows"));
    MOEKIT_CHECK_NOT_NULL(expert_offsets);
    MOEKIT_CHECK_NOT_NULL(w_gate_up);
    MOEKIT_CHECK_NOT_NULL(w_down);
    if (max_rows > 0) {
      MOEKIT_CHECK_NOT_NULL(xp);
      MOEKIT_CHECK_NOT_NULL(out);
    }
    MOEKIT_CHECK_ALIGN4(expert_offsets);
    MOEKIT_CHECK_TENSOR(xp);
    MOEKIT_CHECK_ALIGN4(row_weights);
    MOEKIT_CHECK_TENSOR(w_gate_up);
    MOEKIT_CHECK_TENSOR(b_gate_up);
    MOEKIT_CHECK_TENSOR(w_down);
    MOEKIT_CHECK_TENSOR(b_down);
    MOEKIT_CHECK_TENSOR(u_out);
    MOEKIT_CHECK_TENSOR(out);
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes,
                                       moekit::experts::forward_workspace_bytes(c, max_rows)));
    const moekit::experts::ForwardArgs args{max_rows, expert_offsets, xp,     row_weights, w_gate_up,
                                            b_gate_up, w_down,        b_down, u_out,       out};
    return moekit::experts::forward(c, args, workspace, static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_experts_backward_workspace_size(const moekit_experts_config_t* config,
                                                                  int64_t max_rows, int32_t has_saved_u,
                                                                  size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    moekit_experts_config_t c;
    MOEKIT_TRY(moekit::experts::read_and_check(config, &c));
    MOEKIT_TRY(check_rows(max_rows, "max_rows"));
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    *workspace_bytes = moekit::experts::backward_workspace_bytes(c, max_rows, has_saved_u != 0);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_experts_backward(
    const moekit_experts_config_t* config, int64_t max_rows, const int32_t* expert_offsets, const void* xp,
    const float* row_weights, const void* w_gate_up, const void* b_gate_up, const void* w_down, const void* b_down,
    const void* u, const void* grad_out, void* grad_xp, void* grad_w_gate_up, void* grad_b_gate_up,
    void* grad_w_down, void* grad_b_down, float* grad_row_weights, void* workspace, size_t workspace_bytes,
    void* stream) {
  return guarded(__func__, [&] {
    moekit_experts_config_t c;
    MOEKIT_TRY(moekit::experts::read_and_check(config, &c));
    MOEKIT_TRY(check_rows(max_rows, "max_rows"));
    MOEKIT_CHECK_NOT_NULL(expert_offsets);
    MOEKIT_CHECK_NOT_NULL(w_gate_up);
    MOEKIT_CHECK_NOT_NULL(w_down);
    if (max_rows > 0) {
      MOEKIT_CHECK_NOT_NULL(xp);
      MOEKIT_CHECK_NOT_NULL(grad_out);
    }
    MOEKIT_CHECK_ARG(grad_b_gate_up == nullptr || b_gate_up != nullptr,
                     "grad_b_gate_up is given but b_gate_up is NULL (the layer has no gate-up bias)");
    MOEKIT_CHECK_ARG(grad_b_down == nullptr || b_down != nullptr,
                     "grad_b_down is given but b_down is NULL (the layer has no down bias)");
    MOEKIT_CHECK_ARG(grad_row_weights == nullptr || row_weights != nullptr,
                     "grad_row_weights is given but row_weights is NULL (no routing weight to differentiate)");
    MOEKIT_CHECK_ALIGN4(expert_offsets);
    MOEKIT_CHECK_TENSOR(xp);
    MOEKIT_CHECK_ALIGN4(row_weights);
    MOEKIT_CHECK_TENSOR(w_gate_up);
    MOEKIT_CHECK_TENSOR(b_gate_up);
    MOEKIT_CHECK_TENSOR(w_down);
    MOEKIT_CHECK_TENSOR(b_down);
    MOEKIT_CHECK_TENSOR(u);
    MOEKIT_CHECK_TENSOR(grad_out);
    MOEKIT_CHECK_TENSOR(grad_xp);
    MOEKIT_CHECK_TENSOR(grad_w_gate_up);
    MOEKIT_CHECK_TENSOR(grad_b_gate_up);
    MOEKIT_CHECK_TENSOR(grad_w_down);
    MOEKIT_CHECK_TENSOR(grad_b_down);
    MOEKIT_CHECK_ALIGN4(grad_row_weights);
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes,
                                       moekit::experts::backward_workspace_bytes(c, max_rows, u != nullptr)));
    const moekit::experts::BackwardArgs args{max_rows,    expert_offsets, xp,          row_weights,    w_gate_up,
                                             b_gate_up,   w_down,         b_down,      u,              grad_out,
                                             grad_xp,     grad_w_gate_up, grad_b_gate_up, grad_w_down, grad_b_down,
                                             grad_row_weights};
    return moekit::experts::backward(c, args, workspace, static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_mlp_handle_create(moekit_mlp_handle_t* handle) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(handle);
    *handle = nullptr;
    return moekit::experts::mlp_handle_create(handle);
  });
}

MOEKIT_API moekit_status_t moekit_mlp_handle_destroy(moekit_mlp_handle_t handle) {
  return guarded(__func__, [&] { return moekit::experts::mlp_handle_destroy(handle); });
}

MOEKIT_API moekit_status_t moekit_mlp_config_init(moekit_mlp_config_t* config, size_t struct_size) {
  return guarded(__func__, [&] { return init_config(config, struct_size, moekit::experts::mlp_config_min_size()); });
}

MOEKIT_API moekit_status_t moekit_mlp_config_check(const moekit_mlp_config_t* config) {
  return guarded(__func__, [&] {
    moekit_mlp_config_t c;
    return moekit::experts::read_and_check(config, &c);
  });
}

MOEKIT_API moekit_status_t moekit_mlp_forward_workspace_size(const moekit_mlp_config_t* config, int64_t num_tokens,
                                                             size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    moekit_mlp_config_t c;
    MOEKIT_TRY(moekit::experts::read_and_check(config, &c));
    MOEKIT_TRY(check_rows(num_tokens, "num_tokens"));
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    *workspace_bytes = moekit::experts::mlp_forward_workspace_bytes(c, num_tokens);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_mlp_forward(moekit_mlp_handle_t handle, const moekit_mlp_config_t* config,
                                              int64_t num_tokens, const void* x, const void* w_gate_up,
                                              const void* b_gate_up, const void* w_down, const void* b_down,
                                              void* u_out, void* out, void* workspace, size_t workspace_bytes,
                                              void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(handle);
    moekit_mlp_config_t c;
    MOEKIT_TRY(moekit::experts::read_and_check(config, &c));
    MOEKIT_TRY(check_rows(num_tokens, "num_tokens"));
    MOEKIT_CHECK_NOT_NULL(w_gate_up);
    MOEKIT_CHECK_NOT_NULL(w_down);
    if (num_tokens > 0) {
      MOEKIT_CHECK_NOT_NULL(x);
      MOEKIT_CHECK_NOT_NULL(out);
    }
    MOEKIT_CHECK_TENSOR(x);
    MOEKIT_CHECK_TENSOR(w_gate_up);
    MOEKIT_CHECK_TENSOR(b_gate_up);
    MOEKIT_CHECK_TENSOR(w_down);
    MOEKIT_CHECK_TENSOR(b_down);
    MOEKIT_CHECK_TENSOR(u_out);
    MOEKIT_CHECK_TENSOR(out);
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes,
                                       moekit::experts::mlp_forward_workspace_bytes(c, num_tokens)));
    const moekit::experts::MlpForwardArgs args{num_tokens, x, w_gate_up, b_gate_up, w_down, b_down, u_out, out};
    return moekit::experts::mlp_forward(handle, c, args, workspace, static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_mlp_backward_workspace_size(const moekit_mlp_config_t* config, int64_t num_tokens,
                                                              int32_t has_saved_u, size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    moekit_mlp_config_t c;
    MOEKIT_TRY(moekit::experts::read_and_check(config, &c));
    MOEKIT_TRY(check_rows(num_tokens, "num_tokens"));
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    *workspace_bytes = moekit::experts::mlp_backward_workspace_bytes(c, num_tokens, has_saved_u != 0);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_mlp_backward(moekit_mlp_handle_t handle, const moekit_mlp_config_t* config,
                                               int64_t num_tokens, const void* x, const void* w_gate_up,
                                               const void* b_gate_up, const void* w_down, const void* b_down,
                                               const void* u, const void* grad_out, void* grad_x,
                                               void* grad_w_gate_up, void* grad_b_gate_up, void* grad_w_down,
                                               void* grad_b_down, void* workspace, size_t workspace_bytes,
                                               void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(handle);
    moekit_mlp_config_t c;
    MOEKIT_TRY(moekit::experts::read_and_check(config, &c));
    MOEKIT_TRY(check_rows(num_tokens, "num_tokens"));
    MOEKIT_CHECK_NOT_NULL(w_gate_up);
    MOEKIT_CHECK_NOT_NULL(w_down);
    if (num_tokens > 0) {
      MOEKIT_CHECK_NOT_NULL(x);
      MOEKIT_CHECK_NOT_NULL(grad_out);
    }
    MOEKIT_CHECK_ARG(grad_b_gate_up == nullptr || b_gate_up != nullptr,
                     "grad_b_gate_up is given but b_gate_up is NULL (the MLP has no gate-up bias)");
    MOEKIT_CHECK_ARG(grad_b_down == nullptr || b_down != nullptr,
                     "grad_b_down is given but b_down is NULL (the MLP has no down bias)");
    MOEKIT_CHECK_TENSOR(x);
    MOEKIT_CHECK_TENSOR(w_gate_up);
    MOEKIT_CHECK_TENSOR(b_gate_up);
    MOEKIT_CHECK_TENSOR(w_down);
    MOEKIT_CHECK_TENSOR(b_down);
    MOEKIT_CHECK_TENSOR(u);
    MOEKIT_CHECK_TENSOR(grad_out);
    MOEKIT_CHECK_TENSOR(grad_x);
    MOEKIT_CHECK_TENSOR(grad_w_gate_up);
    MOEKIT_CHECK_TENSOR(grad_b_gate_up);
    MOEKIT_CHECK_TENSOR(grad_w_down);
    MOEKIT_CHECK_TENSOR(grad_b_down);
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes,
                                       moekit::experts::mlp_backward_workspace_bytes(c, num_tokens, u != nullptr)));
    const moekit::experts::MlpBackwardArgs args{num_tokens, x,        w_gate_up, b_gate_up,      w_down,
                                                b_down,     u,        grad_out,  grad_x,         grad_w_gate_up,
                                                grad_b_gate_up, grad_w_down, grad_b_down};
    return moekit::experts::mlp_backward(handle, c, args, workspace, static_cast<cudaStream_t>(stream));
  });
}

}  // extern "C"
