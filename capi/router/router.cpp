// C entry points of the router family: forward, backward, aux loss, bias update, fake gate.
// Every argument is validated here, before anything is enqueued (a rejected call writes nothing).
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "capi/api.hpp"
#include "moekit/router.h"
#include "src/common/workspace.hpp"
#include "src/router/router.hpp"
#include "src/router/router_config.hpp"

using moekit::capi::check_aligned;
using moekit::capi::check_disjoint;
using moekit::capi::guarded;
using moekit::capi::Span;
namespace rt = moekit::router;

namespace {

moekit_status_t check_dtype(moekit_dtype_t dtype, const char* name) {
  MOEKIT_CHECK_SUPPORTED(dtype == MOEKIT_DTYPE_F32 || dtype == MOEKIT_DTYPE_F16 || dtype == MOEKIT_DTYPE_BF16,
                         "%s = %d is not a supported moekit_dtype_t (F32, F16 or BF16)", name,
                         static_cast<int>(dtype));
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t check_tokens(int64_t num_tokens) {
  MOEKIT_CHECK_ARG(num_tokens >= 0, "num_tokens = %lld is negative", static_cast<long long>(num_tokens));
  return MOEKIT_STATUS_SUCCESS;
}

// A [T, E] row stride: at least E, and T rows of it addressable with 64-bit byte offsets.
moekit_status_t check_stride(const char* name, int64_t stride, int32_t num_experts, int64_t num_tokens) {
  MOEKIT_CHECK_ARG(stride >= num_experts, "%s = %lld is less than num_experts = %d", name,
                   static_cast<long long>(stride), num_experts);
  MOEKIT_CHECK_ARG(num_tokens == 0 || stride <= INT64_MAX / 4 / num_tokens,
                   "%s = %lld times num_tokens = %lld overflows a 64-bit byte offset", name,
                   static_cast<long long>(stride), static_cast<long long>(num_tokens));
  return MOEKIT_STATUS_SUCCESS;
}

// Bytes of a [T, E] matrix with a row stride (0 when T = 0).
uint64_t matrix_bytes(int64_t num_tokens, int64_t stride, int32_t num_experts, size_t element) {
  if (num_tokens == 0) return 0;
  return (static_cast<uint64_t>(num_tokens - 1) * static_cast<uint64_t>(stride) + num_experts) * element;
}

#define CHECK_DATA(ptr)                                                                          \
  MOEKIT_CHECK_ARG(num_tokens == 0 || (ptr) != nullptr, "%s is NULL (num_tokens = %lld)", #ptr, \
                   static_cast<long long>(num_tokens))

}  // namespace

extern "C" {

MOEKIT_API moekit_status_t moekit_router_forward_workspace_size(const moekit_router_config_t* config,
                                                                int64_t num_tokens,
                                                                size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    moekit_router_config_t c;
    MOEKIT_TRY(rt::read_and_check(config, &c));
    MOEKIT_TRY(check_tokens(num_tokens));
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    *workspace_bytes = rt::forward_workspace_bytes(c, num_tokens);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_router_forward(
    const moekit_router_config_t* config, int64_t num_tokens, moekit_dtype_t logits_dtype,
    const void* logits, int64_t logits_row_stride, const float* correction_bias,
    const uint8_t* token_mask, float* weights, int32_t* indices, int32_t* expert_load,
    float* aux_score_sum, int32_t* aux_token_count, void* workspace, size_t workspace_bytes,
    void* stream) {
  return guarded(__func__, [&] {
    moekit_router_config_t c;
    MOEKIT_TRY(rt::read_and_check(config, &c));
    MOEKIT_TRY(check_tokens(num_tokens));
    MOEKIT_TRY(check_dtype(logits_dtype, "logits_dtype"));
    MOEKIT_TRY(check_stride("logits_row_stride", logits_row_stride, c.num_experts, num_tokens));
    CHECK_DATA(logits);
    CHECK_DATA(weights);
    CHECK_DATA(indices);
    MOEKIT_CHECK_ARG((aux_score_sum == nullptr) == (aux_token_count == nullptr),
                     "aux_score_sum = %p and aux_token_count = %p: give both or neither",
                     static_cast<void*>(aux_score_sum), static_cast<void*>(aux_token_count));
    const size_t element = moekit_dtype_size(logits_dtype);
    MOEKIT_TRY(check_aligned(logits, element, "logits"));
    MOEKIT_TRY(check_aligned(correction_bias, 4, "correction_bias"));
    MOEKIT_TRY(check_aligned(weights, 4, "weights"));
    MOEKIT_TRY(check_aligned(indices, 4, "indices"));
    MOEKIT_TRY(check_aligned(expert_load, 4, "expert_load"));
    MOEKIT_TRY(check_aligned(aux_score_sum, 4, "aux_score_sum"));
    MOEKIT_TRY(check_aligned(aux_token_count, 4, "aux_token_count"));
    const uint64_t T = static_cast<uint64_t>(num_tokens), E = static_cast<uint64_t>(c.num_experts),
                   K = static_cast<uint64_t>(c.top_k);
    MOEKIT_TRY(check_disjoint(
        {{weights, 4 * T * K, "weights"}, {indices, 4 * T * K, "indices"}, {expert_load, 4 * E, "expert_load"},
         {aux_score_sum, 4 * E, "aux_score_sum"}, {aux_token_count, 4, "aux_token_count"}},
        {{logits, matrix_bytes(num_tokens, logits_row_stride, c.num_experts, element), "logits"},
         {correction_bias, 4 * E, "correction_bias"}, {token_mask, T, "token_mask"}}));
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes, rt::forward_workspace_bytes(c, num_tokens)));
    rt::ForwardCall call{};
    call.config = c;
    call.num_tokens = num_tokens;
    call.dtype = logits_dtype;
    call.logits = logits;
    call.logits_row_stride = logits_row_stride;
    call.bias = correction_bias;
    call.token_mask = token_mask;
    call.weights = weights;
    call.indices = indices;
    call.expert_load = expert_load;
    call.aux_score_sum = aux_score_sum;
    call.aux_token_count = aux_token_count;
    call.workspace = workspace;
    call.stream = stream;
    return rt::run_forward(call);
  });
}

MOEKIT_API moekit_status_t moekit_aux_loss_forward(int32_t num_experts, int32_t top_k,
                                                   const int32_t* expert_load,
                                                   const float* aux_score_sum,
                                                   const int32_t* aux_token_count, float* aux_loss,
                                                   void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_ARG(num_experts >= 1 && num_experts <= MOEKIT_ROUTER_MAX_EXPERTS,
                     "num_experts = %d is outside [1, %d]", num_experts, MOEKIT_ROUTER_MAX_EXPERTS);
    MOEKIT_CHECK_ARG(top_k >= 1 && top_k <= MOEKIT_MAX_TOP_K, "top_k = %d is outside [1, %d]", top_k,
                     MOEKIT_MAX_TOP_K);
    MOEKIT_CHECK_ARG(top_k <= num_experts, "top_k = %d exceeds num_experts = %d", top_k, num_experts);
    MOEKIT_CHECK_NOT_NULL(expert_load);
    MOEKIT_CHECK_NOT_NULL(aux_score_sum);
    MOEKIT_CHECK_NOT_NULL(aux_token_count);
    MOEKIT_CHECK_NOT_NULL(aux_loss);
    MOEKIT_TRY(check_aligned(expert_load, 4, "expert_load"));
    MOEKIT_TRY(check_aligned(aux_score_sum, 4, "aux_score_sum"));
    MOEKIT_TRY(check_aligned(aux_token_count, 4, "aux_token_count"));
    MOEKIT_TRY(check_aligned(aux_loss, 4, "aux_loss"));
    const uint64_t E = static_cast<uint64_t>(num_experts);
    MOEKIT_TRY(check_disjoint({{aux_loss, 4, "aux_loss"}},
                              {{expert_load, 4 * E, "expert_load"}, {aux_score_sum, 4 * E, "aux_score_sum"},
                               {aux_token_count, 4, "aux_token_count"}}));
    return rt::run_aux_loss(num_experts, top_k, expert_load, aux_score_sum, aux_token_count, aux_loss,
                            stream);
  });
}

MOEKIT_API moekit_status_t moekit_router_backward_workspace_size(const moekit_router_config_t* config,
                                                                 int64_t num_tokens,
                                                                 size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    moekit_router_config_t c;
    MOEKIT_TRY(rt::read_and_check(config, &c));
    MOEKIT_TRY(check_tokens(num_tokens));
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    *workspace_bytes = rt::backward_workspace_bytes(c, num_tokens);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_router_backward(
    const moekit_router_config_t* config, int64_t num_tokens, moekit_dtype_t logits_dtype,
    const void* logits, int64_t logits_row_stride, const float* correction_bias,
    const uint8_t* token_mask, const int32_t* indices, const float* grad_weights,
    float aux_loss_coeff, const int32_t* expert_load, const int32_t* aux_token_count,
    void* grad_logits, int64_t grad_logits_row_stride, void* workspace, size_t workspace_bytes,
    void* stream) {
  return guarded(__func__, [&] {
    moekit_router_config_t c;
    MOEKIT_TRY(rt::read_and_check(config, &c));
    MOEKIT_TRY(check_tokens(num_tokens));
    MOEKIT_TRY(check_dtype(logits_dtype, "logits_dtype"));
    MOEKIT_TRY(check_stride("logits_row_stride", logits_row_stride, c.num_experts, num_tokens));
    MOEKIT_TRY(check_stride("grad_logits_row_stride", grad_logits_row_stride, c.num_experts, num_tokens));
    CHECK_DATA(logits);
    CHECK_DATA(indices);
    CHECK_DATA(grad_logits);
    MOEKIT_CHECK_ARG(std::isfinite(aux_loss_coeff), "aux_loss_coeff = %g is not finite",
                     static_cast<double>(aux_loss_coeff));
    if (aux_loss_coeff != 0.0f) {
      MOEKIT_CHECK_ARG(expert_load != nullptr, "expert_load is NULL but aux_loss_coeff = %g needs it",
                       static_cast<double>(aux_loss_coeff));
      MOEKIT_CHECK_ARG(aux_token_count != nullptr,
                       "aux_token_count is NULL but aux_loss_coeff = %g needs it",
                       static_cast<double>(aux_loss_coeff));
    }
    const size_t element = moekit_dtype_size(logits_dtype);
    MOEKIT_TRY(check_aligned(logits, element, "logits"));
    MOEKIT_TRY(check_aligned(grad_logits, element, "grad_logits"));
    MOEKIT_TRY(check_aligned(correction_bias, 4, "correction_bias"));
    MOEKIT_TRY(check_aligned(indices, 4, "indices"));
    MOEKIT_TRY(check_aligned(grad_weights, 4, "grad_weights"));
    MOEKIT_TRY(check_aligned(expert_load, 4, "expert_load"));
    MOEKIT_TRY(check_aligned(aux_token_count, 4, "aux_token_count"));
    const uint64_t T = static_cast<uint64_t>(num_tokens), E = static_cast<uint64_t>(c.num_experts),
                   K = static_cast<uint64_t>(c.top_k);
    const bool aux = aux_loss_coeff != 0.0f;
    MOEKIT_TRY(check_disjoint(
        {{grad_logits, matrix_bytes(num_tokens, grad_logits_row_stride, c.num_experts, element), "grad_logits"}},
        {{logits, matrix_bytes(num_tokens, logits_row_stride, c.num_experts, element), "logits"},
         {correction_bias, 4 * E, "correction_bias"}, {token_mask, T, "token_mask"},
         {indices, 4 * T * K, "indices"}, {grad_weights, 4 * T * K, "grad_weights"},
         {aux ? expert_load : nullptr, 4 * E, "expert_load"},
         {aux ? aux_token_count : nullptr, 4, "aux_token_count"}}));
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes, rt::backward_workspace_bytes(c, num_tokens)));
    rt::BackwardCall call{};
    call.config = c;
    call.num_tokens = num_tokens;
    call.dtype = logits_dtype;
    call.logits = logits;
    call.logits_row_stride = logits_row_stride;
    call.bias = correction_bias;
    call.token_mask = token_mask;
    call.indices = indices;
    call.grad_weights = grad_weights;
    call.aux_loss_coeff = aux_loss_coeff;
    call.expert_load = aux ? expert_load : nullptr;
    call.aux_token_count = aux ? aux_token_count : nullptr;
    call.grad_logits = grad_logits;
    call.grad_logits_row_stride = grad_logits_row_stride;
    call.stream = stream;
    return rt::run_backward(call);
  });
}

MOEKIT_API moekit_status_t moekit_router_bias_update(int32_t num_experts, float update_rate,
                                                     int32_t recenter, float* correction_bias,
                                                     int32_t* expert_load, int32_t reset_load,
                                                     void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_ARG(num_experts >= 1 && num_experts <= MOEKIT_ROUTER_MAX_EXPERTS,
                     "num_experts = %d is outside [1, %d]", num_experts, MOEKIT_ROUTER_MAX_EXPERTS);
    MOEKIT_CHECK_ARG(std::isfinite(update_rate), "update_rate = %g is not finite",
                     static_cast<double>(update_rate));
    MOEKIT_CHECK_NOT_NULL(correction_bias);
    MOEKIT_CHECK_NOT_NULL(expert_load);
    MOEKIT_TRY(check_aligned(correction_bias, 4, "correction_bias"));
    MOEKIT_TRY(check_aligned(expert_load, 4, "expert_load"));
    const uint64_t E = static_cast<uint64_t>(num_experts);
    MOEKIT_TRY(check_disjoint({{correction_bias, 4 * E, "correction_bias"}, {expert_load, 4 * E, "expert_load"}}, {}));
    return rt::run_bias_update(num_experts, update_rate, recenter, correction_bias, expert_load,
                               reset_load, stream);
  });
}

MOEKIT_API moekit_status_t moekit_fake_gate_forward(int64_t num_tokens, int32_t num_experts,
                                                    int32_t top_k, int32_t skip_experts,
                                                    float noise, uint64_t seed, uint64_t offset,
                                                    const uint8_t* token_mask, float* weights,
                                                    int32_t* indices, int32_t* expert_load,
                                                    int32_t accumulate_load, void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_TRY(check_tokens(num_tokens));
    MOEKIT_CHECK_ARG(num_tokens < (int64_t{1} << 48),
                     "num_tokens = %lld reaches 2^48 (the token field of the random stream)",
                     static_cast<long long>(num_tokens));
    MOEKIT_CHECK_ARG(num_experts >= 1 && num_experts <= MOEKIT_ROUTER_MAX_EXPERTS,
                     "num_experts = %d is outside [1, %d]", num_experts, MOEKIT_ROUTER_MAX_EXPERTS);
    MOEKIT_CHECK_ARG(skip_experts >= 0 && skip_experts < num_experts,
                     "skip_experts = %d is outside [0, num_experts - 1 = %d]", skip_experts,
                     num_experts - 1);
    const int32_t active = num_experts - skip_experts;
    MOEKIT_CHECK_ARG(top_k >= 1 && top_k <= MOEKIT_MAX_TOP_K, "top_k = %d is outside [1, %d]", top_k,
                     MOEKIT_MAX_TOP_K);
    MOEKIT_CHECK_ARG(top_k <= active, "top_k = %d exceeds num_experts - skip_experts = %d", top_k, active);
    MOEKIT_CHECK_ARG(noise >= 0.0f && noise <= 1.0f, "noise = %g is outside [0, 1]", static_cast<double>(noise));
    CHECK_DATA(weights);
    CHECK_DATA(indices);
    MOEKIT_TRY(check_aligned(weights, 4, "weights"));
    MOEKIT_TRY(check_aligned(indices, 4, "indices"));
    MOEKIT_TRY(check_aligned(expert_load, 4, "expert_load"));
    const uint64_t T = static_cast<uint64_t>(num_tokens), E = static_cast<uint64_t>(num_experts),
                   K = static_cast<uint64_t>(top_k);
    MOEKIT_TRY(check_disjoint(
        {{weights, 4 * T * K, "weights"}, {indices, 4 * T * K, "indices"}, {expert_load, 4 * E, "expert_load"}},
        {{token_mask, T, "token_mask"}}));
    rt::FakeGateCall call{};
    call.num_tokens = num_tokens;
    call.num_experts = num_experts;
    call.top_k = top_k;
    call.skip_experts = skip_experts;
    call.noise = noise;
    call.seed = seed;
    call.offset = offset;
    call.token_mask = token_mask;
    call.weights = weights;
    call.indices = indices;
    call.expert_load = expert_load;
    call.accumulate_load = accumulate_load;
    call.stream = stream;
    return rt::run_fake_gate(call);
  });
}

}  // extern "C"
