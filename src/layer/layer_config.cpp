#include "src/layer/layer_config.hpp"

#include <cstring>
#include <string>

#include "capi/api.hpp"
#include "src/common/error.hpp"
#include "src/ep/ep_handle.hpp"
#include "src/ep/ep_plan.hpp"
#include "src/experts/experts_config.hpp"
#include "src/router/router_config.hpp"
#include "src/tokens/plan_config.hpp"

namespace moekit::layer {
namespace {

// The families report a bad field as "config->field"; inside a layer config the same field is
// "config->router->field". Rewrites the message the family just left (after the "api: " prefix)
// so that it names the path the caller wrote, and keeps the status.
moekit_status_t renamed(moekit_status_t status, const char* path) {
  std::string text = last_error();
  const char* api = current_api();
  if (api != nullptr) {
    const std::string prefix = std::string(api) + ": ";
    if (text.compare(0, prefix.size(), prefix) == 0) text.erase(0, prefix.size());
  }
  const std::string from = "config->", to = std::string(path) + "->";
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
  return fail(status, "%s", text.c_str());
}

#define MOEKIT_TRY_RENAMED(expr, path)                            \
  do {                                                            \
    const moekit_status_t layer_status_ = (expr);                 \
    if (layer_status_ != MOEKIT_STATUS_SUCCESS) return renamed(layer_status_, path); \
  } while (0)

const char* dtype_name(int32_t d) {
  switch (d) {
    case MOEKIT_DTYPE_F32: return "F32";
    case MOEKIT_DTYPE_F16: return "F16";
    case MOEKIT_DTYPE_BF16: return "BF16";
  }
  return "?";
}

// config->expert_parallel: NULL (every expert here), or a live EP handle whose configuration is
// this layer's (experts, K, dtype, H), with config->experts holding this rank's E / n experts.
moekit_status_t check_expert_parallel(const moekit_layer_config_t& c, const moekit_router_config_t& r,
                                      const moekit_experts_config_t& x, LayerConfig* out) {
  out->ep = nullptr;
  out->local_experts = r.num_experts;
  if (c.expert_parallel == nullptr) {
    MOEKIT_CHECK_ARG(x.num_experts == r.num_experts,
                     "config->experts->num_experts = %d differs from config->router->num_experts = %d (every "
                     "expert runs on this GPU: config->expert_parallel is NULL)",
                     x.num_experts, r.num_experts);
    return MOEKIT_STATUS_SUCCESS;
  }
  auto* h = static_cast<moekit_ep*>(c.expert_parallel);
  MOEKIT_CHECK_ARG(h->magic == moekit_ep::kMagic,
                   "config->expert_parallel = %p is not a live moekit_ep_handle_t (destroyed or never created)",
                   c.expert_parallel);
  const moekit_ep_config_t& e = h->config;
  const ep::Dims& d = h->dims;
  MOEKIT_CHECK_ARG(e.num_experts == r.num_experts,
                   "config->expert_parallel's num_experts = %d differs from config->router->num_experts = %d",
                   e.num_experts, r.num_experts);
  MOEKIT_CHECK_ARG(e.top_k == r.top_k, "config->expert_parallel's top_k = %d differs from config->router->top_k = %d",
                   e.top_k, r.top_k);
  MOEKIT_CHECK_ARG(e.dtype == c.dtype, "config->expert_parallel's dtype = %s differs from config->dtype = %s",
                   dtype_name(e.dtype), dtype_name(c.dtype));
  MOEKIT_CHECK_ARG(e.hidden == c.hidden, "config->expert_parallel's hidden = %lld differs from config->hidden = %d",
                   static_cast<long long>(e.hidden), c.hidden);
  // The partials are the local combine's output, which is of the layer's dtype.
  MOEKIT_CHECK_SUPPORTED(d.combine_dtype == d.dtype,
                         "config->expert_parallel's combine_dtype = %s differs from config->dtype = %s (the layer "
                         "sends its partial sums in its own dtype)",
                         dtype_name(d.combine_dtype), dtype_name(c.dtype));
  MOEKIT_CHECK_ARG(x.num_experts == d.experts_per_rank,
                   "config->experts->num_experts = %d differs from the %d experts each of the %d ranks of "
                   "config->expert_parallel owns (E / n = %d / %d)",
                   x.num_experts, d.experts_per_rank, d.num_ranks, r.num_experts, d.num_ranks);
  out->ep = h;
  out->ep_global_statistics = c.ep_global_statistics != 0;
  out->ep_exact = !d.capacity_mode;
  out->local_experts = d.experts_per_rank;
  out->ep_max_tokens = d.max_tokens;
  out->ep_recv_rows = ep::row_spaces(d, nullptr).recv_rows;
  out->ep_layout_bytes = ep::layout_bytes(d);
  out->ep_host_layout_count = ep::host_layout_count(d);
  out->ep_workspace_bytes = ep::workspace_bytes(d, ep::row_spaces(d, nullptr));
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace

size_t config_min_size() { return offsetof(moekit_layer_config_t, expert_parallel) + sizeof(void*); }
size_t params_min_size() { return offsetof(moekit_layer_params_t, shared_gate_weight) + sizeof(void*); }
size_t grads_min_size() { return offsetof(moekit_layer_grads_t, shared_gate_weight) + sizeof(void*); }
size_t saved_view_min_size() { return offsetof(moekit_layer_saved_view_t, shared_out) + sizeof(void*); }

void set_defaults(moekit_layer_config_t* c) {
  c->struct_size = sizeof(moekit_layer_config_t);
  c->hidden = 0;
  c->dtype = MOEKIT_DTYPE_BF16;
  c->router = nullptr;
  c->experts = nullptr;
  c->shared = nullptr;
  c->shared_gate = 0;
  c->router_bias = 0;
  c->expert_bias = 0;
  c->shared_bias = 0;
  c->router_fp32 = 0;
  c->alignment = 1;
  c->capacity = 0;
  c->drop_policy = MOEKIT_DROP_BY_POSITION;
  c->recompute = 0;
  c->expert_parallel = nullptr;
  c->ep_global_statistics = 0;
}

moekit_status_t read_and_check(const moekit_layer_config_t* user, LayerConfig* out) {
  moekit_layer_config_t c;
  MOEKIT_TRY(capi::read_config(user, "config", config_min_size(), set_defaults, &c));

  MOEKIT_CHECK_ARG(c.hidden > 0 && c.hidden <= experts::kMaxDim, "config->hidden = %d is outside [1, %d]", c.hidden,
                   experts::kMaxDim);
  MOEKIT_CHECK_ARG(c.hidden % 8 == 0, "config->hidden = %d is not a multiple of 8", c.hidden);
  MOEKIT_CHECK_SUPPORTED(c.dtype == MOEKIT_DTYPE_F32 || c.dtype == MOEKIT_DTYPE_F16 || c.dtype == MOEKIT_DTYPE_BF16,
                         "config->dtype = %d is not a supported moekit_dtype_t (F32, F16 or BF16)", c.dtype);
  MOEKIT_CHECK_ARG(c.router != nullptr, "config->router is NULL (a layer needs a router configuration)");
  MOEKIT_CHECK_ARG(c.experts != nullptr, "config->experts is NULL (a layer needs an experts configuration)");

  MOEKIT_TRY_RENAMED(router::read_and_check(c.router, &out->router), "config->router");
  MOEKIT_TRY_RENAMED(experts::read_and_check(c.experts, &out->experts), "config->experts");
  const moekit_router_config_t& r = out->router;
  const moekit_experts_config_t& x = out->experts;
  MOEKIT_TRY(check_expert_parallel(c, r, x, out));
  MOEKIT_CHECK_ARG(c.ep_global_statistics == 0 || c.expert_parallel != nullptr,
                   "config->ep_global_statistics = %d but config->expert_parallel is NULL (no communicator to sum "
                   "over)",
                   c.ep_global_statistics);
  MOEKIT_CHECK_ARG(r.num_experts <= MOEKIT_PLAN_MAX_LOCAL_EXPERTS,
                   "config->router->num_experts = %d exceeds MOEKIT_PLAN_MAX_LOCAL_EXPERTS = %d", r.num_experts,
                   MOEKIT_PLAN_MAX_LOCAL_EXPERTS);
  MOEKIT_CHECK_ARG(x.hidden == c.hidden, "config->experts->hidden = %d differs from config->hidden = %d", x.hidden,
                   c.hidden);
  MOEKIT_CHECK_ARG(x.dtype == c.dtype, "config->experts->dtype = %s differs from config->dtype = %s",
                   dtype_name(x.dtype), dtype_name(c.dtype));

  out->has_shared = c.shared != nullptr;
  if (out->has_shared) {
    MOEKIT_TRY_RENAMED(experts::read_and_check(c.shared, &out->shared), "config->shared");
    MOEKIT_CHECK_ARG(out->shared.hidden == c.hidden, "config->shared->hidden = %d differs from config->hidden = %d",
                     out->shared.hidden, c.hidden);
    MOEKIT_CHECK_ARG(out->shared.dtype == c.dtype, "config->shared->dtype = %s differs from config->dtype = %s",
                     dtype_name(out->shared.dtype), dtype_name(c.dtype));
  } else {
    experts::set_defaults(&out->shared);
    MOEKIT_CHECK_ARG(c.shared_gate == 0, "config->shared_gate = %d but config->shared is NULL (no shared MLP to gate)",
                     c.shared_gate);
    MOEKIT_CHECK_ARG(c.shared_bias == 0, "config->shared_bias = %d but config->shared is NULL (no shared MLP)",
                     c.shared_bias);
  }
  MOEKIT_CHECK_ARG(c.alignment >= 1, "config->alignment = %d is less than 1", c.alignment);
  MOEKIT_CHECK_ARG(c.capacity >= 0, "config->capacity = %d is negative", c.capacity);
  MOEKIT_CHECK_ARG(c.drop_policy == MOEKIT_DROP_BY_POSITION || c.drop_policy == MOEKIT_DROP_BY_WEIGHT,
                   "config->drop_policy = %d is not a moekit_drop_policy_t", c.drop_policy);

  tokens::set_defaults(&out->plan);
  out->plan.num_experts = r.num_experts;
  out->plan.top_k = r.top_k;
  out->plan.local_expert_begin = out->ep ? out->ep->rank * out->local_experts : 0;
  out->plan.num_local_experts = out->local_experts;
  out->plan.alignment = c.alignment;
  out->plan.capacity = c.capacity;
  out->plan.drop_policy = c.drop_policy;
  MOEKIT_TRY(tokens::check_config(out->plan));  // cannot fail after the checks above; kept as a guard

  c.router = nullptr;
  c.experts = nullptr;
  c.shared = nullptr;
  out->layer = c;
  out->dtype = static_cast<moekit_dtype_t>(c.dtype);
  out->logits_dtype = c.router_fp32 ? MOEKIT_DTYPE_F32 : out->dtype;
  out->mixed_router = c.router_fp32 != 0 && c.dtype != MOEKIT_DTYPE_F32;
  out->gated_shared = c.shared_gate != 0;
  out->num_experts = r.num_experts;
  out->top_k = r.top_k;
  out->hidden = c.hidden;
  out->expert_nu = experts::activation_spec(x.activation, x.gate_up_layout, x.act_alpha, x.act_limit).nu(x.inter);
  if (out->has_shared) {
    const moekit_mlp_config_t& s = out->shared;
    out->shared_inter = s.inter;
    out->shared_nu = experts::activation_spec(s.activation, s.gate_up_layout, s.act_alpha, s.act_limit).nu(s.inter);
  } else {
    out->shared_inter = 0;
    out->shared_nu = 0;
  }
  out->logits_stride = (static_cast<int64_t>(r.num_experts) + 7) / 8 * 8;
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit::layer
