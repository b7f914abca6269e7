// C entry points of token movement: permute, combine and their backwards.
#include <cstdint>

#include "capi/api.hpp"
#include "moekit/tokens.h"
#include "src/tokens/movement.hpp"
#include "src/tokens/plan_config.hpp"

using moekit::capi::guarded;
namespace tk = moekit::tokens;

namespace {

// Checks shared by every movement call: config and T, the plan struct, H, dtype. Fills shape and
// plan.
moekit_status_t check_common(const moekit_plan_config_t* config, const moekit_token_plan_t* plan,
                             int64_t num_tokens, int64_t hidden, moekit_dtype_t dtype,
                             tk::PlanShape* shape, moekit_token_plan_t* p) {
  MOEKIT_TRY(tk::read_shape(config, num_tokens, shape));
  MOEKIT_TRY(tk::read_plan(plan, p));
  MOEKIT_CHECK_ARG(hidden >= 1 && hidden <= INT32_MAX, "hidden = %lld is outside [1, INT32_MAX]",
                   static_cast<long long>(hidden));
  MOEKIT_CHECK_SUPPORTED(dtype == MOEKIT_DTYPE_F32 || dtype == MOEKIT_DTYPE_F16 ||
                             dtype == MOEKIT_DTYPE_BF16,
                         "dtype = %d is not a supported moekit_dtype_t (F32, F16 or BF16)",
                         static_cast<int>(dtype));
  MOEKIT_CHECK_ARG(num_tokens == 0 || p->row_of_slot != nullptr,
                   "plan->row_of_slot is NULL (num_tokens = %lld)", static_cast<long long>(num_tokens));
  return MOEKIT_STATUS_SUCCESS;
}

// A token-side row stride: at least H, and T rows of it addressable in int64.
moekit_status_t check_stride(const char* name, int64_t stride, int64_t hidden, int64_t num_tokens) {
  MOEKIT_CHECK_ARG(stride >= hidden, "%s = %lld is less than hidden = %lld", name,
                   static_cast<long long>(stride), static_cast<long long>(hidden));
  MOEKIT_CHECK_ARG(num_tokens == 0 || stride <= INT64_MAX / 4 / num_tokens,
                   "%s = %lld times num_tokens = %lld overflows a 64-bit byte offset", name,
                   static_cast<long long>(stride), static_cast<long long>(num_tokens));
  return MOEKIT_STATUS_SUCCESS;
}

// The padding blocks read the counts and offsets when alignment > 1 and row outputs are written.
moekit_status_t check_padding_arrays(const tk::PlanShape& s, const moekit_token_plan_t& p) {
  if (s.num_tokens == 0 || s.alignment == 1) return MOEKIT_STATUS_SUCCESS;
  MOEKIT_CHECK_ARG(p.expert_counts != nullptr,
                   "plan->expert_counts is NULL (needed for padding rows, alignment = %d)",
                   s.alignment);
  MOEKIT_CHECK_ARG(p.expert_offsets != nullptr,
                   "plan->expert_offsets is NULL (needed for padding rows, alignment = %d)",
                   s.alignment);
  return MOEKIT_STATUS_SUCCESS;
}

#define CHECK_DATA(ptr)                                                                     \
  MOEKIT_CHECK_ARG(num_tokens == 0 || (ptr) != nullptr, "%s is NULL (num_tokens = %lld)", #ptr, \
                   static_cast<long long>(num_tokens))

}  // namespace

extern "C" {

MOEKIT_API moekit_status_t moekit_tokens_permute(const moekit_plan_config_t* config,
                                                 const moekit_token_plan_t* plan,
                                                 int64_t num_tokens, int64_t hidden,
                                                 moekit_dtype_t dtype, const void* x,
                                                 int64_t x_row_stride, const float* weights,
                                                 void* xp, float* row_weights, void* stream) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    moekit_token_plan_t p;
    MOEKIT_TRY(check_common(config, plan, num_tokens, hidden, dtype, &s, &p));
    CHECK_DATA(x);
    MOEKIT_TRY(check_stride("x_row_stride", x_row_stride, hidden, num_tokens));
    MOEKIT_CHECK_ARG((weights == nullptr) == (row_weights == nullptr),
                     "weights = %p and row_weights = %p: give both or neither",
                     static_cast<const void*>(weights), static_cast<void*>(row_weights));
    CHECK_DATA(xp);
    MOEKIT_TRY(check_padding_arrays(s, p));
    tk::MoveRequest r;
    r.op = tk::Movement::kPermute;
    r.hidden = hidden;
    r.dtype = dtype;
    r.token_in = x;
    r.token_in_stride = x_row_stride;
    r.rows_out = xp;
    r.weights = weights;
    r.row_weights = row_weights;
    return tk::run_move(s, p, r, stream);
  });
}

MOEKIT_API moekit_status_t moekit_tokens_combine(const moekit_plan_config_t* config,
                                                 const moekit_token_plan_t* plan,
                                                 int64_t num_tokens, int64_t hidden,
                                                 moekit_dtype_t dtype, const void* yp,
                                                 const float* weights, void* y,
                                                 int64_t y_row_stride, void* stream) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    moekit_token_plan_t p;
    MOEKIT_TRY(check_common(config, plan, num_tokens, hidden, dtype, &s, &p));
    CHECK_DATA(yp);
    CHECK_DATA(y);
    MOEKIT_TRY(check_stride("y_row_stride", y_row_stride, hidden, num_tokens));
    tk::MoveRequest r;
    r.op = tk::Movement::kCombine;
    r.hidden = hidden;
    r.dtype = dtype;
    r.rows_in = yp;
    r.weights = weights;
    r.token_out = y;
    r.token_out_stride = y_row_stride;
    return tk::run_move(s, p, r, stream);
  });
}

MOEKIT_API moekit_status_t moekit_tokens_permute_backward(
    const moekit_plan_config_t* config, const moekit_token_plan_t* plan, int64_t num_tokens,
    int64_t hidden, moekit_dtype_t dtype, const void* grad_xp, const float* grad_row_weights,
    void* grad_x, int64_t grad_x_row_stride, float* grad_weights, void* stream) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    moekit_token_plan_t p;
    MOEKIT_TRY(check_common(config, plan, num_tokens, hidden, dtype, &s, &p));
    CHECK_DATA(grad_xp);
    MOEKIT_CHECK_ARG((grad_row_weights == nullptr) == (grad_weights == nullptr),
                     "grad_row_weights = %p and grad_weights = %p: give both or neither",
                     static_cast<const void*>(grad_row_weights), static_cast<void*>(grad_weights));
    CHECK_DATA(grad_x);
    MOEKIT_TRY(check_stride("grad_x_row_stride", grad_x_row_stride, hidden, num_tokens));
    tk::MoveRequest r;
    r.op = tk::Movement::kPermuteBackward;
    r.hidden = hidden;
    r.dtype = dtype;
    r.rows_in = grad_xp;
    r.grad_row_weights = grad_row_weights;
    r.token_out = grad_x;
    r.token_out_stride = grad_x_row_stride;
    r.grad_weights = grad_weights;
    return tk::run_move(s, p, r, stream);
  });
}

MOEKIT_API moekit_status_t moekit_tokens_combine_backward(
    const moekit_plan_config_t* config, const moekit_token_plan_t* plan, int64_t num_tokens,
    int64_t hidden, moekit_dtype_t dtype, const void* grad_y, int64_t grad_y_row_stride,
    const float* weights, const void* yp, void* grad_yp, float* grad_weights, void* stream) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    moekit_token_plan_t p;
    MOEKIT_TRY(check_common(config, plan, num_tokens, hidden, dtype, &s, &p));
    CHECK_DATA(grad_y);
    MOEKIT_TRY(check_stride("grad_y_row_stride", grad_y_row_stride, hidden, num_tokens));
    MOEKIT_CHECK_ARG(grad_yp != nullptr || grad_weights != nullptr,
                     "grad_yp and grad_weights are both NULL: nothing to compute");
    MOEKIT_CHECK_ARG(num_tokens == 0 || grad_weights == nullptr || yp != nullptr,
                     "yp is NULL but grad_weights needs it (num_tokens = %lld)",
                     static_cast<long long>(num_tokens));
    if (grad_yp != nullptr) MOEKIT_TRY(check_padding_arrays(s, p));
    tk::MoveRequest r;
    r.op = tk::Movement::kCombineBackward;
    r.hidden = hidden;
    r.dtype = dtype;
    r.token_in = grad_y;
    r.token_in_stride = grad_y_row_stride;
    r.weights = weights;
    r.rows_in = grad_weights != nullptr ? yp : nullptr;
    r.rows_out = grad_yp;
    r.grad_weights = grad_weights;
    return tk::run_move(s, p, r, stream);
  });
}

}  // extern "C"
