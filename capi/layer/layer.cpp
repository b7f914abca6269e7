// C entry points of the MoE layer. Every argument is validated here, before anything is enqueued,
// so a rejected call writes nothing; src/layer then runs the families' host functions in order.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "capi/api.hpp"
#include "moekit/layer.h"
#include "src/common/error.hpp"
#include "src/common/workspace.hpp"
#include "src/ep/ep_ops.hpp"
#include "src/experts/experts_grouped.hpp"
#include "src/layer/layer.hpp"
#include "src/layer/layer_config.hpp"

using moekit::capi::check_aligned;
using moekit::capi::check_disjoint;
using moekit::capi::guarded;
using moekit::capi::Span;
namespace ly = moekit::layer;

namespace {

// A caller-owned buffer of at least `needed` bytes, 256-byte aligned (the saved buffer; the
// workspace goes through moekit::check_workspace, which names "workspace").
moekit_status_t check_saved(const void* saved, size_t saved_bytes, size_t needed) {
  if (saved_bytes < needed)
    return moekit::fail(MOEKIT_STATUS_WORKSPACE_TOO_SMALL,
                        "saved_bytes = %zu is smaller than the %zu bytes moekit_layer_saved_size returns",
                        saved_bytes, needed);
  MOEKIT_CHECK_ARG(saved != nullptr, "saved is NULL but %zu bytes are needed", needed);
  if (reinterpret_cast<uintptr_t>(saved) % MOEKIT_WORKSPACE_ALIGNMENT != 0)
    return moekit::fail(MOEKIT_STATUS_MISALIGNED, "saved = %p is not aligned to %d bytes", saved,
                        MOEKIT_WORKSPACE_ALIGNMENT);
  return MOEKIT_STATUS_SUCCESS;
}

void set_params_defaults(moekit_layer_params_t* p) {
  std::memset(static_cast<void*>(p), 0, sizeof(*p));
  p->struct_size = sizeof(*p);
}

void set_grads_defaults(moekit_layer_grads_t* g) {
  std::memset(static_cast<void*>(g), 0, sizeof(*g));
  g->struct_size = sizeof(*g);
}

// A pointer whose presence the config decides: required when `have`, NULL otherwise.
moekit_status_t check_presence(const void* ptr, bool have, const char* name, const char* why) {
  if (have) {
    MOEKIT_CHECK_ARG(ptr != nullptr, "%s is NULL but %s", name, why);
  } else {
    MOEKIT_CHECK_ARG(ptr == nullptr, "%s = %p is given but the layer has no such parameter (%s)", name, ptr, why);
  }
  return MOEKIT_STATUS_SUCCESS;
}

// Reads params and checks every pointer against the config: presence, 16-byte alignment (4 for the
// fp32 correction bias).
moekit_status_t read_params(const ly::LayerConfig& c, const moekit_layer_params_t* user, moekit_layer_params_t* p) {
  MOEKIT_TRY(moekit::capi::read_config(user, "params", ly::params_min_size(), set_params_defaults, p));
  const bool rb = c.layer.router_bias != 0, eb = c.layer.expert_bias != 0, sh = c.has_shared,
             sb = c.layer.shared_bias != 0, sg = c.gated_shared;
  MOEKIT_CHECK_ARG(p->router_weight != nullptr, "params->router_weight is NULL");
  MOEKIT_CHECK_ARG(p->w_gate_up != nullptr, "params->w_gate_up is NULL");
  MOEKIT_CHECK_ARG(p->w_down != nullptr, "params->w_down is NULL");
  MOEKIT_TRY(check_presence(p->router_bias, rb, "params->router_bias",
                            rb ? "config->router_bias = 1" : "config->router_bias = 0"));
  MOEKIT_TRY(check_presence(p->b_gate_up, eb, "params->b_gate_up",
                            eb ? "config->expert_bias = 1" : "config->expert_bias = 0"));
  MOEKIT_TRY(check_presence(p->b_down, eb, "params->b_down", eb ? "config->expert_bias = 1" : "config->expert_bias = 0"));
  MOEKIT_TRY(check_presence(p->shared_w_gate_up, sh, "params->shared_w_gate_up",
                            sh ? "config->shared is set" : "config->shared is NULL"));
  MOEKIT_TRY(check_presence(p->shared_w_down, sh, "params->shared_w_down",
                            sh ? "config->shared is set" : "config->shared is NULL"));
  MOEKIT_TRY(check_presence(p->shared_b_gate_up, sb, "params->shared_b_gate_up",
                            sb ? "config->shared_bias = 1" : "config->shared_bias = 0"));
  MOEKIT_TRY(check_presence(p->shared_b_down, sb, "params->shared_b_down",
                            sb ? "config->shared_bias = 1" : "config->shared_bias = 0"));
  MOEKIT_TRY(check_presence(p->shared_gate_weight, sg, "params->shared_gate_weight",
                            sg ? "config->shared_gate = 1" : "config->shared_gate = 0"));
  const size_t a = MOEKIT_LAYER_TENSOR_ALIGNMENT;
  MOEKIT_TRY(check_aligned(p->router_weight, a, "params->router_weight"));
  MOEKIT_TRY(check_aligned(p->router_bias, a, "params->router_bias"));
  MOEKIT_TRY(check_aligned(p->correction_bias, 4, "params->correction_bias"));
  MOEKIT_TRY(check_aligned(p->w_gate_up, a, "params->w_gate_up"));
  MOEKIT_TRY(check_aligned(p->b_gate_up, a, "params->b_gate_up"));
  MOEKIT_TRY(check_aligned(p->w_down, a, "params->w_down"));
  MOEKIT_TRY(check_aligned(p->b_down, a, "params->b_down"));
  MOEKIT_TRY(check_aligned(p->shared_w_gate_up, a, "params->shared_w_gate_up"));
  MOEKIT_TRY(check_aligned(p->shared_b_gate_up, a, "params->shared_b_gate_up"));
  MOEKIT_TRY(check_aligned(p->shared_w_down, a, "params->shared_w_down"));
  MOEKIT_TRY(check_aligned(p->shared_b_down, a, "params->shared_b_down"));
  MOEKIT_TRY(check_aligned(p->shared_gate_weight, a, "params->shared_gate_weight"));
  return MOEKIT_STATUS_SUCCESS;
}

// Reads grads (NULL: none) and checks each against its parameter: a gradient of a parameter the
// layer does not have must be NULL; 16-byte alignment.
moekit_status_t read_grads(const ly::LayerConfig& c, const moekit_layer_grads_t* user, moekit_layer_grads_t* g) {
  if (user == nullptr) {
    set_grads_defaults(g);
    return MOEKIT_STATUS_SUCCESS;
  }
  MOEKIT_TRY(moekit::capi::read_config(user, "grads", ly::grads_min_size(), set_grads_defaults, g));
  const bool rb = c.layer.router_bias != 0, eb = c.layer.expert_bias != 0, sh = c.has_shared,
             sb = c.layer.shared_bias != 0, sg = c.gated_shared;
  struct Item {
    void* ptr;
    bool allowed;
    const char* name;
    const char* why;
  };
  const Item items[] = {
      {g->router_weight, true, "grads->router_weight", ""},
      {g->router_bias, rb, "grads->router_bias", "config->router_bias = 0"},
      {g->w_gate_up, true, "grads->w_gate_up", ""},
      {g->b_gate_up, eb, "grads->b_gate_up", "config->expert_bias = 0"},
      {g->w_down, true, "grads->w_down", ""},
      {g->b_down, eb, "grads->b_down", "config->expert_bias = 0"},
      {g->shared_w_gate_up, sh, "grads->shared_w_gate_up", "config->shared is NULL"},
      {g->shared_b_gate_up, sb, "grads->shared_b_gate_up", "config->shared_bias = 0"},
      {g->shared_w_down, sh, "grads->shared_w_down", "config->shared is NULL"},
      {g->shared_b_down, sb, "grads->shared_b_down", "config->shared_bias = 0"},
      {g->shared_gate_weight, sg, "grads->shared_gate_weight", "config->shared_gate = 0"},
  };
  for (const Item& it : items) {
    MOEKIT_CHECK_ARG(it.allowed || it.ptr == nullptr, "%s = %p is given but the layer has no such parameter (%s)",
                     it.name, it.ptr, it.why);
    MOEKIT_TRY(check_aligned(it.ptr, MOEKIT_LAYER_TENSOR_ALIGNMENT, it.name));
  }
  return MOEKIT_STATUS_SUCCESS;
}

std::vector<Span> param_spans(const ly::LayerConfig& c, const moekit_layer_params_t& p) {
  const ly::ParamSizes s = ly::param_sizes(c);
  return {{p.router_weight, s.router_weight, "params->router_weight"},
          {p.router_bias, s.router_bias, "params->router_bias"},
          {p.correction_bias, s.correction_bias, "params->correction_bias"},
          {p.w_gate_up, s.w_gate_up, "params->w_gate_up"},
          {p.b_gate_up, s.b_gate_up, "params->b_gate_up"},
          {p.w_down, s.w_down, "params->w_down"},
          {p.b_down, s.b_down, "params->b_down"},
          {p.shared_w_gate_up, s.shared_w_gate_up, "params->shared_w_gate_up"},
          {p.shared_b_gate_up, s.shared_b_gate_up, "params->shared_b_gate_up"},
          {p.shared_w_down, s.shared_w_down, "params->shared_w_down"},
          {p.shared_b_down, s.shared_b_down, "params->shared_b_down"},
          {p.shared_gate_weight, s.shared_gate_weight, "params->shared_gate_weight"}};
}

std::vector<Span> grad_spans(const ly::LayerConfig& c, const moekit_layer_grads_t& g) {
  const ly::ParamSizes s = ly::param_sizes(c);
  return {{g.router_weight, s.router_weight, "grads->router_weight"},
          {g.router_bias, s.router_bias, "grads->router_bias"},
          {g.w_gate_up, s.w_gate_up, "grads->w_gate_up"},
          {g.b_gate_up, s.b_gate_up, "grads->b_gate_up"},
          {g.w_down, s.w_down, "grads->w_down"},
          {g.b_down, s.b_down, "grads->b_down"},
          {g.shared_w_gate_up, s.shared_w_gate_up, "grads->shared_w_gate_up"},
          {g.shared_b_gate_up, s.shared_b_gate_up, "grads->shared_b_gate_up"},
          {g.shared_w_down, s.shared_w_down, "grads->shared_w_down"},
          {g.shared_b_down, s.shared_b_down, "grads->shared_b_down"},
          {g.shared_gate_weight, s.shared_gate_weight, "grads->shared_gate_weight"}};
}

// The handle's device is current and can run the grouped experts; with expert parallelism the EP
// handle is still alive and its communicator's device is the current one.
moekit_status_t check_layer_device(const moekit_layer& layer) {
  int device = 0;
  MOEKIT_CUDA_TRY(cudaGetDevice(&device), "querying the current device");
  MOEKIT_CHECK_ARG(device == layer.device, "layer was created on device %d but device %d is current", layer.device,
                   device);
  MOEKIT_TRY(moekit::experts::check_device(layer.config.experts));
  if (layer.config.ep == nullptr) return MOEKIT_STATUS_SUCCESS;
  MOEKIT_CHECK_ARG(layer.config.ep->magic == moekit_ep::kMagic,
                   "the layer's expert_parallel handle %p was destroyed (it must outlive the layer)",
                   static_cast<void*>(layer.config.ep));
  return moekit::ep::check_device(*layer.config.ep);
}

// Exact expert-parallel mode reads the exchanged counts on the host in every forward: such a forward
// cannot be captured (capacity mode can).
moekit_status_t check_not_capturing(const ly::LayerConfig& c, cudaStream_t stream) {
  if (c.ep == nullptr || !c.ep_exact) return MOEKIT_STATUS_SUCCESS;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MOEKIT_CUDA_TRY(cudaStreamIsCapturing(stream, &capture), "querying the stream's capture status");
  MOEKIT_CHECK_ARG(capture == cudaStreamCaptureStatusNone,
                   "stream = %p is capturing, but config->expert_parallel is in exact mode, whose forward reads the "
                   "exchanged counts on the host (use MOEKIT_EP_MODE_CAPACITY to capture)",
                   static_cast<void*>(stream));
  return MOEKIT_STATUS_SUCCESS;
}

#define CHECK_TOKENS_DATA(ptr)                                                                   \
  MOEKIT_CHECK_ARG(num_tokens == 0 || (ptr) != nullptr, "%s is NULL (num_tokens = %lld)", #ptr, \
                   static_cast<long long>(num_tokens))

}  // namespace

extern "C" {

MOEKIT_API moekit_status_t moekit_layer_config_init(moekit_layer_config_t* config, size_t struct_size) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(config);
    MOEKIT_CHECK_ARG(struct_size >= ly::config_min_size(),
                     "struct_size = %zu is smaller than any released moekit_layer_config_t (%zu bytes)", struct_size,
                     ly::config_min_size());
    moekit_layer_config_t defaults;
    ly::set_defaults(&defaults);
    const size_t n = struct_size < sizeof(defaults) ? struct_size : sizeof(defaults);
    std::memcpy(static_cast<void*>(config), &defaults, n);
    config->struct_size = struct_size;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_layer_params_init(moekit_layer_params_t* params, size_t struct_size) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(params);
    MOEKIT_CHECK_ARG(struct_size >= ly::params_min_size(),
                     "struct_size = %zu is smaller than any released moekit_layer_params_t (%zu bytes)", struct_size,
                     ly::params_min_size());
    const size_t n = struct_size < sizeof(moekit_layer_params_t) ? struct_size : sizeof(moekit_layer_params_t);
    std::memset(static_cast<void*>(params), 0, n);
    params->struct_size = struct_size;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_layer_grads_init(moekit_layer_grads_t* grads, size_t struct_size) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(grads);
    MOEKIT_CHECK_ARG(struct_size >= ly::grads_min_size(),
                     "struct_size = %zu is smaller than any released moekit_layer_grads_t (%zu bytes)", struct_size,
                     ly::grads_min_size());
    const size_t n = struct_size < sizeof(moekit_layer_grads_t) ? struct_size : sizeof(moekit_layer_grads_t);
    std::memset(static_cast<void*>(grads), 0, n);
    grads->struct_size = struct_size;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_layer_config_check(const moekit_layer_config_t* config) {
  return guarded(__func__, [&] {
    ly::LayerConfig c;
    return ly::read_and_check(config, &c);
  });
}

MOEKIT_API moekit_status_t moekit_layer_saved_size(const moekit_layer_config_t* config, int64_t num_tokens,
                                                   size_t* saved_bytes) {
  return guarded(__func__, [&] {
    ly::LayerConfig c;
    MOEKIT_TRY(ly::read_and_check(config, &c));
    ly::CallShape shape;
    MOEKIT_TRY(ly::shape_for(c, num_tokens, &shape));
    MOEKIT_CHECK_NOT_NULL(saved_bytes);
    *saved_bytes = ly::saved_bytes(c, shape);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_layer_workspace_size(const moekit_layer_config_t* config, int64_t num_tokens,
                                                       size_t* forward_bytes, size_t* backward_bytes) {
  return guarded(__func__, [&] {
    ly::LayerConfig c;
    MOEKIT_TRY(ly::read_and_check(config, &c));
    ly::CallShape shape;
    MOEKIT_TRY(ly::shape_for(c, num_tokens, &shape));
    MOEKIT_CHECK_ARG(forward_bytes != nullptr || backward_bytes != nullptr,
                     "forward_bytes and backward_bytes are both NULL: nothing to return");
    if (forward_bytes) *forward_bytes = ly::forward_workspace_bytes(c, shape);
    if (backward_bytes) *backward_bytes = ly::backward_workspace_bytes(c, shape);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_layer_saved_view(const moekit_layer_config_t* config, int64_t num_tokens,
                                                   void* saved, size_t saved_bytes, moekit_layer_saved_view_t* view) {
  return guarded(__func__, [&] {
    ly::LayerConfig c;
    MOEKIT_TRY(ly::read_and_check(config, &c));
    ly::CallShape shape;
    MOEKIT_TRY(ly::shape_for(c, num_tokens, &shape));
    MOEKIT_CHECK_NOT_NULL(view);
    MOEKIT_CHECK_ARG(view->struct_size >= ly::saved_view_min_size(),
                     "view->struct_size = %zu is smaller than any released moekit_layer_saved_view_t (%zu bytes)",
                     view->struct_size, ly::saved_view_min_size());
    MOEKIT_TRY(check_saved(saved, saved_bytes, ly::saved_bytes(c, shape)));
    moekit_layer_saved_view_t v;
    std::memset(static_cast<void*>(&v), 0, sizeof(v));
    ly::saved_view(c, shape, saved, &v);
    const size_t n = view->struct_size < sizeof(v) ? view->struct_size : sizeof(v);
    const size_t keep = view->struct_size;
    std::memcpy(static_cast<void*>(view), &v, n);
    view->struct_size = keep;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_layer_create(const moekit_layer_config_t* config, moekit_layer_t* layer) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(layer);
    *layer = nullptr;
    ly::LayerConfig c;
    MOEKIT_TRY(ly::read_and_check(config, &c));
    return ly::create(c, layer);
  });
}

MOEKIT_API moekit_status_t moekit_layer_destroy(moekit_layer_t layer) {
  return guarded(__func__, [&] { return ly::destroy(layer); });
}

MOEKIT_API moekit_status_t moekit_layer_forward(moekit_layer_t layer, int64_t num_tokens, const void* x,
                                                const uint8_t* token_mask, const moekit_layer_params_t* params,
                                                void* y, int32_t* expert_load, float* aux_loss, void* saved,
                                                size_t saved_bytes, void* workspace, size_t workspace_bytes,
                                                void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(layer);
    const ly::LayerConfig& c = layer->config;
    ly::CallShape shape;
    MOEKIT_TRY(ly::shape_for(c, num_tokens, &shape));
    ly::ForwardCall call{};
    MOEKIT_TRY(read_params(c, params, &call.params));
    CHECK_TOKENS_DATA(x);
    CHECK_TOKENS_DATA(y);
    MOEKIT_TRY(check_aligned(x, MOEKIT_LAYER_TENSOR_ALIGNMENT, "x"));
    MOEKIT_TRY(check_aligned(y, MOEKIT_LAYER_TENSOR_ALIGNMENT, "y"));
    MOEKIT_TRY(check_aligned(expert_load, 4, "expert_load"));
    MOEKIT_TRY(check_aligned(aux_loss, 4, "aux_loss"));
    const size_t need_saved = ly::saved_bytes(c, shape), need_ws = ly::forward_workspace_bytes(c, shape);
    MOEKIT_TRY(check_saved(saved, saved_bytes, need_saved));
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes, need_ws));
    const uint64_t T = static_cast<uint64_t>(num_tokens), H = static_cast<uint64_t>(c.hidden);
    const uint64_t E = static_cast<uint64_t>(c.num_experts), es = moekit_dtype_size(c.dtype);
    std::vector<Span> inputs = param_spans(c, call.params);
    inputs.push_back({x, T * H * es, "x"});
    inputs.push_back({token_mask, T, "token_mask"});
    MOEKIT_TRY(check_disjoint({{y, T * H * es, "y"},
                               {expert_load, 4 * E, "expert_load"},
                               {aux_loss, 4, "aux_loss"},
                               {saved, need_saved, "saved"},
                               {workspace, need_ws, "workspace"}},
                              inputs));
    MOEKIT_TRY(check_layer_device(*layer));
    MOEKIT_TRY(check_not_capturing(c, static_cast<cudaStream_t>(stream)));
    call.num_tokens = num_tokens;
    call.x = x;
    call.token_mask = token_mask;
    call.y = y;
    call.expert_load = expert_load;
    call.aux_loss = aux_loss;
    call.saved = saved;
    call.workspace = workspace;
    call.stream = static_cast<cudaStream_t>(stream);
    return ly::forward(*layer, shape, call);
  });
}

MOEKIT_API moekit_status_t moekit_layer_backward(moekit_layer_t layer, int64_t num_tokens, const void* x,
                                                 const uint8_t* token_mask, const moekit_layer_params_t* params,
                                                 const void* saved, size_t saved_bytes, const void* grad_y,
                                                 float aux_loss_coeff, void* grad_x, const moekit_layer_grads_t* grads,
                                                 void* workspace, size_t workspace_bytes, void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(layer);
    const ly::LayerConfig& c = layer->config;
    ly::CallShape shape;
    MOEKIT_TRY(ly::shape_for(c, num_tokens, &shape));
    ly::BackwardCall call{};
    MOEKIT_TRY(read_params(c, params, &call.params));
    MOEKIT_TRY(read_grads(c, grads, &call.grads));
    CHECK_TOKENS_DATA(x);
    CHECK_TOKENS_DATA(grad_y);
    CHECK_TOKENS_DATA(grad_x);
    MOEKIT_CHECK_ARG(std::isfinite(aux_loss_coeff), "aux_loss_coeff = %g is not finite",
                     static_cast<double>(aux_loss_coeff));
    MOEKIT_TRY(check_aligned(x, MOEKIT_LAYER_TENSOR_ALIGNMENT, "x"));
    MOEKIT_TRY(check_aligned(grad_y, MOEKIT_LAYER_TENSOR_ALIGNMENT, "grad_y"));
    MOEKIT_TRY(check_aligned(grad_x, MOEKIT_LAYER_TENSOR_ALIGNMENT, "grad_x"));
    const size_t need_saved = ly::saved_bytes(c, shape), need_ws = ly::backward_workspace_bytes(c, shape);
    MOEKIT_TRY(check_saved(saved, saved_bytes, need_saved));
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes, need_ws));
    const uint64_t T = static_cast<uint64_t>(num_tokens), H = static_cast<uint64_t>(c.hidden);
    const uint64_t es = moekit_dtype_size(c.dtype);
    std::vector<Span> inputs = param_spans(c, call.params);
    inputs.push_back({x, T * H * es, "x"});
    inputs.push_back({token_mask, T, "token_mask"});
    inputs.push_back({saved, need_saved, "saved"});
    inputs.push_back({grad_y, T * H * es, "grad_y"});
    std::vector<Span> outputs = grad_spans(c, call.grads);
    outputs.push_back({grad_x, T * H * es, "grad_x"});
    outputs.push_back({workspace, need_ws, "workspace"});
    MOEKIT_TRY(check_disjoint(outputs, inputs));
    MOEKIT_TRY(check_layer_device(*layer));
    call.num_tokens = num_tokens;
    call.x = x;
    call.token_mask = token_mask;
    call.saved = saved;
    call.grad_y = grad_y;
    call.aux_loss_coeff = aux_loss_coeff;
    call.grad_x = grad_x;
    call.workspace = workspace;
    call.stream = static_cast<cudaStream_t>(stream);
    return ly::backward(*layer, shape, call);
  });
}

MOEKIT_API moekit_status_t moekit_layer_set_stage_events(moekit_layer_t layer, void* const* events,
                                                         int32_t num_events) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(layer);
    if (events != nullptr) {
      MOEKIT_CHECK_ARG(num_events == 2 * MOEKIT_LAYER_NUM_STAGES,
                       "num_events = %d differs from 2 * MOEKIT_LAYER_NUM_STAGES = %d", num_events,
                       2 * MOEKIT_LAYER_NUM_STAGES);
      for (int32_t i = 0; i < num_events; ++i)
        MOEKIT_CHECK_ARG(events[i] != nullptr, "events[%d] is NULL", i);
    }
    layer->stage_events.store(events, std::memory_order_release);
    return MOEKIT_STATUS_SUCCESS;
  });
}

}  // extern "C"
