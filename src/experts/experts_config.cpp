#include "src/experts/experts_config.hpp"

#include <cmath>
#include <cstddef>

#include "capi/api.hpp"
#include "src/common/error.hpp"

namespace moekit::experts {
namespace {

// Checks shared by both structs; `prefix` is "config->".
moekit_status_t check_common(int32_t hidden, int32_t inter, int32_t dtype, int32_t activation,
                             int32_t gate_up_layout, float alpha, float limit) {
  MOEKIT_CHECK_ARG(hidden > 0 && hidden <= kMaxDim, "config->hidden = %d is outside [1, %d]", hidden, kMaxDim);
  MOEKIT_CHECK_ARG(hidden % 8 == 0, "config->hidden = %d is not a multiple of 8", hidden);
  MOEKIT_CHECK_ARG(inter > 0 && inter <= kMaxDim, "config->inter = %d is outside [1, %d]", inter, kMaxDim);
  MOEKIT_CHECK_ARG(inter % 8 == 0, "config->inter = %d is not a multiple of 8", inter);
  MOEKIT_CHECK_ARG(dtype == MOEKIT_DTYPE_F32 || dtype == MOEKIT_DTYPE_F16 || dtype == MOEKIT_DTYPE_BF16,
                   "config->dtype = %d is not a moekit_dtype_t", dtype);
  MOEKIT_CHECK_ARG(activation >= MOEKIT_ACTIVATION_SWIGLU && activation <= MOEKIT_ACTIVATION_SWIGLU_OAI,
                   "config->activation = %d is not a moekit_activation_t", activation);
  MOEKIT_CHECK_ARG(gate_up_layout >= MOEKIT_GATE_UP_AUTO && gate_up_layout <= MOEKIT_GATE_UP_INTERLEAVED,
                   "config->gate_up_layout = %d is not a moekit_gate_up_layout_t", gate_up_layout);
  MOEKIT_CHECK_ARG(std::isfinite(alpha), "config->act_alpha = %g is not finite", static_cast<double>(alpha));
  MOEKIT_CHECK_ARG(std::isfinite(limit) && limit >= 0.0f, "config->act_limit = %g is not a finite value >= 0",
                   static_cast<double>(limit));
  MOEKIT_CHECK_ARG(activation != MOEKIT_ACTIVATION_QUICK_GEGLU || limit > 0.0f,
                   "config->act_limit = %g must be > 0 for MOEKIT_ACTIVATION_QUICK_GEGLU (which always "
                   "clamps; NeMo's default is 7.0)",
                   static_cast<double>(limit));
  MOEKIT_CHECK_ARG(limit == 0.0f || activation == MOEKIT_ACTIVATION_SWIGLU ||
                       activation == MOEKIT_ACTIVATION_QUICK_GEGLU || activation == MOEKIT_ACTIVATION_SWIGLU_OAI,
                   "config->act_limit = %g only applies to SWIGLU, QUICK_GEGLU and SWIGLU_OAI (activation = %d)",
                   static_cast<double>(limit), activation);
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace

size_t experts_config_min_size() { return offsetof(moekit_experts_config_t, act_limit) + sizeof(float); }
size_t mlp_config_min_size() { return offsetof(moekit_mlp_config_t, act_limit) + sizeof(float); }

void set_defaults(moekit_experts_config_t* c) {
  c->struct_size = sizeof(moekit_experts_config_t);
  c->num_experts = 0;
  c->hidden = 0;
  c->inter = 0;
  c->dtype = MOEKIT_DTYPE_BF16;
  c->activation = MOEKIT_ACTIVATION_SWIGLU;
  c->gate_up_layout = MOEKIT_GATE_UP_AUTO;
  c->weight_after_down = 0;
  c->act_alpha = 1.702f;
  c->act_limit = 0.0f;
  c->gemm_path = MOEKIT_GEMM_PATH_AUTO;
}

void set_defaults(moekit_mlp_config_t* c) {
  c->struct_size = sizeof(moekit_mlp_config_t);
  c->hidden = 0;
  c->inter = 0;
  c->dtype = MOEKIT_DTYPE_BF16;
  c->activation = MOEKIT_ACTIVATION_SWIGLU;
  c->gate_up_layout = MOEKIT_GATE_UP_AUTO;
  c->weight_layout = MOEKIT_WEIGHT_IN_OUT;
  c->act_alpha = 1.702f;
  c->act_limit = 0.0f;
}

moekit_status_t check_config(const moekit_experts_config_t& c) {
  MOEKIT_CHECK_ARG(c.num_experts >= 1 && c.num_experts <= MOEKIT_EXPERTS_MAX_EXPERTS,
                   "config->num_experts = %d is outside [1, %d]", c.num_experts, MOEKIT_EXPERTS_MAX_EXPERTS);
  MOEKIT_CHECK_ARG(c.gemm_path >= MOEKIT_GEMM_PATH_AUTO && c.gemm_path <= MOEKIT_GEMM_PATH_SM90,
                   "config->gemm_path = %d is not a moekit_gemm_path_t", c.gemm_path);
  return check_common(c.hidden, c.inter, c.dtype, c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
}

moekit_status_t check_config(const moekit_mlp_config_t& c) {
  MOEKIT_TRY(check_common(c.hidden, c.inter, c.dtype, c.activation, c.gate_up_layout, c.act_alpha, c.act_limit));
  MOEKIT_CHECK_ARG(c.weight_layout == MOEKIT_WEIGHT_IN_OUT || c.weight_layout == MOEKIT_WEIGHT_OUT_IN,
                   "config->weight_layout = %d is not a moekit_weight_layout_t", c.weight_layout);
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t read_and_check(const moekit_experts_config_t* user, moekit_experts_config_t* out) {
  MOEKIT_TRY(capi::read_config(user, "config", experts_config_min_size(),
                               [](moekit_experts_config_t* c) { set_defaults(c); }, out));
  return check_config(*out);
}

moekit_status_t read_and_check(const moekit_mlp_config_t* user, moekit_mlp_config_t* out) {
  MOEKIT_TRY(capi::read_config(user, "config", mlp_config_min_size(),
                               [](moekit_mlp_config_t* c) { set_defaults(c); }, out));
  return check_config(*out);
}

ActivationSpec activation_spec(int32_t activation, int32_t gate_up_layout, float alpha, float limit) {
  ActivationSpec s;
  s.act.kind = activation;
  s.act.alpha = alpha;
  s.act.limit = limit;
  s.gated = activation != MOEKIT_ACTIVATION_RELU2;
  const bool interleaved = gate_up_layout == MOEKIT_GATE_UP_INTERLEAVED ||
                           (gate_up_layout == MOEKIT_GATE_UP_AUTO && activation == MOEKIT_ACTIVATION_QUICK_GEGLU);
  s.interleaved = s.gated && interleaved;
  return s;
}

}  // namespace moekit::experts
