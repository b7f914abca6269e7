// C entry points of the routing plan: configs, size queries, buffer binding, build.
#include <cstring>

#include "capi/api.hpp"
#include "moekit/tokens.h"
#include "src/common/workspace.hpp"
#include "src/tokens/plan.hpp"
#include "src/tokens/plan_config.hpp"

using moekit::capi::guarded;
namespace tk = moekit::tokens;

namespace {

// Writes defaults into the first struct_size bytes of a caller's struct (which may be an older,
// smaller version) and sets its struct_size.
template <class Struct>
void write_defaults(Struct* user, const Struct& defaults, size_t struct_size) {
  const size_t n = struct_size < sizeof(Struct) ? struct_size : sizeof(Struct);
  std::memcpy(static_cast<void*>(user), &defaults, n);
  user->struct_size = struct_size;
}

}  // namespace

extern "C" {

MOEKIT_API moekit_status_t moekit_plan_config_init(moekit_plan_config_t* config,
                                                   size_t struct_size) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(config);
    MOEKIT_CHECK_ARG(struct_size >= offsetof(moekit_plan_config_t, drop_policy) + sizeof(int32_t),
                     "struct_size = %zu is smaller than any released moekit_plan_config_t",
                     struct_size);
    moekit_plan_config_t defaults;
    tk::set_defaults(&defaults);
    write_defaults(config, defaults, struct_size);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_plan_config_check(const moekit_plan_config_t* config) {
  return guarded(__func__, [&] {
    moekit_plan_config_t c;
    return tk::read_and_check(config, &c);
  });
}

MOEKIT_API moekit_status_t moekit_token_plan_init(moekit_token_plan_t* plan, size_t struct_size) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(plan);
    MOEKIT_CHECK_ARG(struct_size >= offsetof(moekit_token_plan_t, totals) + sizeof(int32_t*),
                     "struct_size = %zu is smaller than any released moekit_token_plan_t",
                     struct_size);
    moekit_token_plan_t defaults;
    tk::set_plan_defaults(&defaults);
    write_defaults(plan, defaults, struct_size);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_plan_max_rows(const moekit_plan_config_t* config,
                                                int64_t num_tokens, int64_t* max_rows) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    MOEKIT_TRY(tk::read_shape(config, num_tokens, &s));
    MOEKIT_CHECK_NOT_NULL(max_rows);
    *max_rows = s.max_rows;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_plan_workspace_size(const moekit_plan_config_t* config,
                                                      int64_t num_tokens,
                                                      size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    MOEKIT_TRY(tk::read_shape(config, num_tokens, &s));
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    *workspace_bytes = tk::plan_workspace_bytes(s);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_plan_buffer_size(const moekit_plan_config_t* config,
                                                   int64_t num_tokens, size_t* buffer_bytes) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    MOEKIT_TRY(tk::read_shape(config, num_tokens, &s));
    MOEKIT_CHECK_NOT_NULL(buffer_bytes);
    *buffer_bytes = tk::plan_buffer_bytes(s);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_plan_bind(const moekit_plan_config_t* config, int64_t num_tokens,
                                            void* buffer, size_t buffer_bytes,
                                            moekit_token_plan_t* plan) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    MOEKIT_TRY(tk::read_shape(config, num_tokens, &s));
    moekit_token_plan_t p;
    MOEKIT_TRY(tk::read_plan(plan, &p));
    MOEKIT_CHECK_NOT_NULL(buffer);
    const size_t needed = tk::plan_buffer_bytes(s);
    MOEKIT_CHECK_ARG(buffer_bytes >= needed,
                     "buffer_bytes = %zu is smaller than the %zu bytes moekit_plan_buffer_size "
                     "returns",
                     buffer_bytes, needed);
    if (reinterpret_cast<uintptr_t>(buffer) % alignof(int32_t) != 0)
      return moekit::fail(MOEKIT_STATUS_MISALIGNED, "buffer = %p is not 4-byte aligned", buffer);
    moekit::WorkspaceCarver carver(buffer);
    const moekit_token_plan_t bound = tk::carve_plan_buffer(carver, s);
    // Only the pointers of the caller's (possibly older) struct are written.
    p.expert_counts = bound.expert_counts;
    p.expert_offsets = bound.expert_offsets;
    p.row_of_slot = bound.row_of_slot;
    p.slot_of_row = bound.slot_of_row;
    p.totals = bound.totals;
    write_defaults(plan, p, plan->struct_size);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_plan_build(const moekit_plan_config_t* config,
                                             int64_t num_tokens, const int32_t* indices,
                                             const float* weights, const uint8_t* token_mask,
                                             const moekit_token_plan_t* plan, void* workspace,
                                             size_t workspace_bytes, void* stream) {
  return guarded(__func__, [&] {
    tk::PlanShape s;
    MOEKIT_TRY(tk::read_shape(config, num_tokens, &s));
    const long long t = static_cast<long long>(num_tokens);
    MOEKIT_CHECK_ARG(s.num_slots == 0 || indices != nullptr, "indices is NULL (num_tokens = %lld)", t);
    MOEKIT_CHECK_ARG(s.num_slots == 0 || !s.drop_by_weight || weights != nullptr,
                     "weights is NULL but config->capacity = %d with MOEKIT_DROP_BY_WEIGHT needs "
                     "them (num_tokens = %lld)",
                     s.capacity, t);
    moekit_token_plan_t p;
    MOEKIT_TRY(tk::read_plan(plan, &p));
    MOEKIT_CHECK_ARG(p.expert_counts != nullptr, "plan->expert_counts is NULL");
    MOEKIT_CHECK_ARG(p.expert_offsets != nullptr, "plan->expert_offsets is NULL");
    MOEKIT_CHECK_ARG(s.num_slots == 0 || p.row_of_slot != nullptr,
                     "plan->row_of_slot is NULL (num_tokens = %lld)", t);
    MOEKIT_CHECK_ARG(s.num_slots == 0 || p.slot_of_row != nullptr,
                     "plan->slot_of_row is NULL (num_tokens = %lld)", t);
    MOEKIT_CHECK_ARG(p.totals != nullptr, "plan->totals is NULL");
    MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes, tk::plan_workspace_bytes(s)));
    return tk::build_plan(s, indices, weights, token_mask, p, workspace, stream);
  });
}

}  // extern "C"
