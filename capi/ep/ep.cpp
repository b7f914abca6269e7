// C entry points of expert parallelism: validate every argument, then call src/ep.
#include <cstring>

#include "capi/api.hpp"
#include "moekit/ep.h"
#include "src/common/workspace.hpp"
#include "src/ep/ep_config.hpp"
#include "src/ep/ep_handle.hpp"
#include "src/ep/ep_ops.hpp"
#include "src/ep/ep_plan.hpp"

using moekit::capi::guarded;
namespace ep = moekit::ep;

namespace {

// The handle, checked: non-NULL and alive. (Whether the current device is the communicator's is
// checked last, after every argument, right before the call is enqueued.)
moekit_status_t check_handle(moekit_ep_handle_t handle) {
  MOEKIT_CHECK_NOT_NULL(handle);
  MOEKIT_CHECK_ARG(handle->magic == moekit_ep::kMagic,
                   "handle = %p is not a live moekit_ep_handle_t (destroyed or never created)",
                   static_cast<void*>(handle));
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t check_tokens(const moekit_ep& h, int64_t num_tokens) {
  MOEKIT_CHECK_ARG(num_tokens >= 0 && num_tokens <= h.config.max_tokens,
                   "num_tokens = %lld is outside [0, config->max_tokens = %lld]",
                   static_cast<long long>(num_tokens),
                   static_cast<long long>(h.config.max_tokens));
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t check_layout_pointer(const moekit_ep& h, const void* layout, size_t layout_bytes,
                                     bool check_size) {
  MOEKIT_CHECK_NOT_NULL(layout);
  if (reinterpret_cast<uintptr_t>(layout) % MOEKIT_WORKSPACE_ALIGNMENT != 0)
    return moekit::fail(MOEKIT_STATUS_MISALIGNED, "layout = %p is not aligned to %d bytes", layout,
                        MOEKIT_WORKSPACE_ALIGNMENT);
  if (check_size) {
    const size_t needed = ep::layout_bytes(h.dims);
    MOEKIT_CHECK_ARG(layout_bytes >= needed,
                     "layout_bytes = %zu is smaller than the %zu bytes moekit_ep_layout_size "
                     "returns",
                     layout_bytes, needed);
  }
  return MOEKIT_STATUS_SUCCESS;
}

// host_layout: required and valid for this T in exact mode, NULL in capacity mode.
moekit_status_t check_host_layout_arg(const moekit_ep& h, int64_t num_tokens,
                                      const int64_t* host_layout) {
  if (h.dims.capacity_mode) {
    MOEKIT_CHECK_ARG(host_layout == nullptr,
                     "host_layout = %p must be NULL in capacity mode (it has no host layout)",
                     static_cast<const void*>(host_layout));
    return MOEKIT_STATUS_SUCCESS;
  }
  return ep::check_host_layout(h.dims, h.signature, h.rank, num_tokens, host_layout);
}

// Everything dispatch, combine and the backwards share. *rows gets the layout's row spaces.
moekit_status_t check_exchange_call(moekit_ep_handle_t handle, int64_t num_tokens,
                                    const void* layout, const int64_t* host_layout,
                                    const void* workspace, size_t workspace_bytes,
                                    ep::RowSpaces* rows) {
  MOEKIT_TRY(check_handle(handle));
  const moekit_ep& h = *handle;
  MOEKIT_TRY(check_tokens(h, num_tokens));
  MOEKIT_TRY(check_layout_pointer(h, layout, 0, false));
  MOEKIT_TRY(check_host_layout_arg(h, num_tokens, host_layout));
  *rows = ep::row_spaces(h.dims, host_layout);
  return moekit::check_workspace(workspace, workspace_bytes,
                                 ep::workspace_bytes(h.dims, *rows));
}

// A [rows, ...] array that must be given when rows > 0.
#define MOEKIT_CHECK_ROWS(ptr, rows, what)                                                   \
  MOEKIT_CHECK_ARG((ptr) != nullptr || (rows) == 0, "%s is NULL but %s = %lld", #ptr, what, \
                   static_cast<long long>(rows))

}  // namespace

extern "C" {

MOEKIT_API moekit_status_t moekit_ep_config_init(moekit_ep_config_t* config, size_t struct_size) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(config);
    MOEKIT_CHECK_ARG(struct_size >= offsetof(moekit_ep_config_t, capacity) + sizeof(int64_t),
                     "struct_size = %zu is smaller than any released moekit_ep_config_t",
                     struct_size);
    moekit_ep_config_t defaults;
    ep::set_defaults(&defaults);
    // A caller compiled against an older header has a smaller struct: write only its part.
    const size_t n = struct_size < sizeof(defaults) ? struct_size : sizeof(defaults);
    std::memcpy(static_cast<void*>(config), &defaults, n);
    config->struct_size = struct_size;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_ep_config_check(const moekit_ep_config_t* config) {
  return guarded(__func__, [&] {
    moekit_ep_config_t c;
    return ep::read_and_check(config, &c);
  });
}

MOEKIT_API moekit_status_t moekit_ep_nccl_version(int32_t* version) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(version);
    return ep::nccl_version(version);
  });
}

MOEKIT_API moekit_status_t moekit_ep_layout_size(const moekit_ep_config_t* config,
                                                 size_t* layout_bytes, size_t* host_layout_count) {
  return guarded(__func__, [&] {
    moekit_ep_config_t c;
    MOEKIT_TRY(ep::read_and_check(config, &c));
    const ep::Dims d = ep::dims_of(c);
    if (layout_bytes != nullptr) *layout_bytes = ep::layout_bytes(d);
    if (host_layout_count != nullptr) *host_layout_count = ep::host_layout_count(d);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_ep_max_recv_rows(const moekit_ep_config_t* config,
                                                   int64_t* rows) {
  return guarded(__func__, [&] {
    moekit_ep_config_t c;
    MOEKIT_TRY(ep::read_and_check(config, &c));
    MOEKIT_CHECK_NOT_NULL(rows);
    *rows = ep::row_spaces(ep::dims_of(c), nullptr).recv_rows;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_ep_workspace_size(const moekit_ep_config_t* config,
                                                    const int64_t* host_layout,
                                                    size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    moekit_ep_config_t c;
    MOEKIT_TRY(ep::read_and_check(config, &c));
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    const ep::Dims d = ep::dims_of(c);
    if (host_layout != nullptr) {
      MOEKIT_CHECK_ARG(!d.capacity_mode,
                       "host_layout = %p must be NULL in capacity mode (it has no host layout)",
                       static_cast<const void*>(host_layout));
      // Any rank's layout of this configuration: the rank is taken from the array itself.
      const int64_t rank = host_layout[ep::kHlRank];
      MOEKIT_CHECK_ARG(rank >= 0 && rank < d.num_ranks,
                       "host_layout = %p was not filled by moekit_ep_layout for this "
                       "configuration",
                       static_cast<const void*>(host_layout));
      MOEKIT_TRY(ep::check_host_layout(d, ep::config_signature(c), static_cast<int32_t>(rank), -1,
                                       host_layout));
    }
    *workspace_bytes = ep::workspace_bytes(d, ep::row_spaces(d, host_layout));
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_ep_create(const moekit_ep_config_t* config, void* nccl_comm,
                                            moekit_ep_handle_t* handle) {
  return guarded(__func__, [&] {
    moekit_ep_config_t c;
    MOEKIT_TRY(ep::read_and_check(config, &c));
    MOEKIT_CHECK_NOT_NULL(nccl_comm);
    MOEKIT_CHECK_NOT_NULL(handle);
    moekit_ep* created = nullptr;
    MOEKIT_TRY(ep::create(c, nccl_comm, &created));
    *handle = created;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_ep_destroy(moekit_ep_handle_t handle) {
  return guarded(__func__, [&] {
    if (handle == nullptr) return MOEKIT_STATUS_SUCCESS;
    MOEKIT_CHECK_ARG(handle->magic == moekit_ep::kMagic,
                     "handle = %p is not a live moekit_ep_handle_t (destroyed or never created)",
                     static_cast<void*>(handle));
    ep::destroy(handle);
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_ep_layout(moekit_ep_handle_t handle, int64_t num_tokens,
                                            const int32_t* indices, const uint8_t* token_mask,
                                            void* layout, size_t layout_bytes,
                                            int64_t* host_layout, int64_t* num_recv_rows,
                                            int32_t* dropped, void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_TRY(check_handle(handle));
    moekit_ep& h = *handle;
    MOEKIT_TRY(check_tokens(h, num_tokens));
    MOEKIT_CHECK_ARG(indices != nullptr || num_tokens == 0, "indices is NULL but num_tokens = %lld",
                     static_cast<long long>(num_tokens));
    MOEKIT_TRY(check_layout_pointer(h, layout, layout_bytes, true));
    if (h.dims.capacity_mode)
      MOEKIT_CHECK_ARG(host_layout == nullptr,
                       "host_layout = %p must be NULL in capacity mode (it has no host layout)",
                       static_cast<const void*>(host_layout));
    else
      MOEKIT_CHECK_ARG(host_layout != nullptr,
                       "host_layout is NULL, but exact mode writes the exchanged counts there");
    MOEKIT_TRY(ep::check_device(*handle));  // NOT_AVAILABLE when built without NCCL
    return ep::layout(h, num_tokens, indices, token_mask, layout, host_layout, num_recv_rows,
                      dropped, static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_ep_layout_counts(moekit_ep_handle_t handle,
                                                   const int64_t* host_layout, int64_t* send_rows,
                                                   int64_t* recv_rows) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(handle);
    MOEKIT_CHECK_ARG(handle->magic == moekit_ep::kMagic,
                     "handle = %p is not a live moekit_ep_handle_t (destroyed or never created)",
                     static_cast<void*>(handle));
    const moekit_ep& h = *handle;
    MOEKIT_CHECK_ARG(!h.dims.capacity_mode,
                     "the handle is in capacity mode, whose counts stay on the device");
    MOEKIT_TRY(ep::check_host_layout(h.dims, h.signature, h.rank, -1, host_layout));
    for (int32_t p = 0; p < h.dims.num_ranks; ++p) {
      int64_t s = 0, r = 0;
      for (int32_t c = 0; c < h.dims.num_chunks; ++c) {
        s += ep::hl_send_count(h.dims, host_layout, p, c);
        r += ep::hl_recv_count(h.dims, host_layout, p, c);
      }
      if (send_rows != nullptr) send_rows[p] = s;
      if (recv_rows != nullptr) recv_rows[p] = r;
    }
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_ep_dispatch(
    moekit_ep_handle_t handle, int64_t num_tokens, const void* layout, const int64_t* host_layout,
    const void* x, const int32_t* indices, const float* weights, void* recv_x,
    int32_t* recv_indices, float* recv_weights, int32_t* recv_src_token, uint8_t* recv_mask,
    void* workspace, size_t workspace_bytes, void* stream) {
  return guarded(__func__, [&] {
    ep::RowSpaces rows{};
    MOEKIT_TRY(check_exchange_call(handle, num_tokens, layout, host_layout, workspace,
                                   workspace_bytes, &rows));
    MOEKIT_CHECK_ROWS(x, num_tokens, "num_tokens");
    MOEKIT_CHECK_ROWS(indices, num_tokens, "num_tokens");
    MOEKIT_CHECK_ROWS(weights, num_tokens, "num_tokens");
    MOEKIT_CHECK_ROWS(recv_x, rows.recv_rows, "num_recv_rows");
    MOEKIT_CHECK_ROWS(recv_indices, rows.recv_rows, "num_recv_rows");
    MOEKIT_CHECK_ROWS(recv_weights, rows.recv_rows, "num_recv_rows");
    MOEKIT_TRY(ep::check_device(*handle));  // NOT_AVAILABLE when built without NCCL
    return ep::dispatch(*handle, num_tokens, layout, host_layout, x, indices, weights, recv_x,
                        recv_indices, recv_weights, recv_src_token, recv_mask, workspace,
                        static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_ep_combine(moekit_ep_handle_t handle, int64_t num_tokens,
                                             const void* layout, const int64_t* host_layout,
                                             const void* partials, void* y, void* workspace,
                                             size_t workspace_bytes, void* stream) {
  return guarded(__func__, [&] {
    ep::RowSpaces rows{};
    MOEKIT_TRY(check_exchange_call(handle, num_tokens, layout, host_layout, workspace,
                                   workspace_bytes, &rows));
    MOEKIT_CHECK_ROWS(partials, rows.recv_rows, "num_recv_rows");
    MOEKIT_CHECK_ROWS(y, num_tokens, "num_tokens");
    MOEKIT_TRY(ep::check_device(*handle));  // NOT_AVAILABLE when built without NCCL
    return ep::combine(*handle, num_tokens, layout, host_layout, partials, y, workspace,
                       static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_ep_dispatch_backward(
    moekit_ep_handle_t handle, int64_t num_tokens, const void* layout, const int64_t* host_layout,
    const int32_t* indices, const void* grad_recv_x, const float* grad_recv_weights, void* grad_x,
    float* grad_weights, void* workspace, size_t workspace_bytes, void* stream) {
  return guarded(__func__, [&] {
    ep::RowSpaces rows{};
    MOEKIT_TRY(check_exchange_call(handle, num_tokens, layout, host_layout, workspace,
                                   workspace_bytes, &rows));
    MOEKIT_CHECK_ROWS(grad_recv_x, rows.recv_rows, "num_recv_rows");
    MOEKIT_CHECK_ROWS(grad_x, num_tokens, "num_tokens");
    // Weight gradients move when either side is given (every rank must agree, the NCCL groups
    // must match); a side with no rows may pass NULL (a zero-size tensor often has no address).
    const bool with_weights = grad_weights != nullptr || grad_recv_weights != nullptr;
    if (with_weights) {
      MOEKIT_CHECK_ROWS(grad_weights, num_tokens, "num_tokens");
      MOEKIT_CHECK_ROWS(grad_recv_weights, rows.recv_rows, "num_recv_rows");
      MOEKIT_CHECK_ROWS(indices, num_tokens, "num_tokens");
    }
    MOEKIT_TRY(ep::check_device(*handle));  // NOT_AVAILABLE when built without NCCL
    return ep::dispatch_backward(*handle, num_tokens, layout, host_layout, indices, grad_recv_x,
                                 grad_recv_weights, grad_x, grad_weights, workspace,
                                 static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_ep_combine_backward(
    moekit_ep_handle_t handle, int64_t num_tokens, const void* layout, const int64_t* host_layout,
    const void* grad_y, void* grad_partials, void* workspace, size_t workspace_bytes,
    void* stream) {
  return guarded(__func__, [&] {
    ep::RowSpaces rows{};
    MOEKIT_TRY(check_exchange_call(handle, num_tokens, layout, host_layout, workspace,
                                   workspace_bytes, &rows));
    MOEKIT_CHECK_ROWS(grad_y, num_tokens, "num_tokens");
    MOEKIT_CHECK_ROWS(grad_partials, rows.recv_rows, "num_recv_rows");
    MOEKIT_TRY(ep::check_device(*handle));  // NOT_AVAILABLE when built without NCCL
    return ep::combine_backward(*handle, num_tokens, layout, host_layout, grad_y, grad_partials,
                                workspace, static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_ep_allreduce_expert_load(void* nccl_comm, int32_t num_experts,
                                                           int32_t* expert_load, void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(nccl_comm);
    MOEKIT_CHECK_ARG(num_experts >= 1, "num_experts = %d is less than 1", num_experts);
    MOEKIT_CHECK_NOT_NULL(expert_load);
    return ep::allreduce_expert_load(nccl_comm, num_experts, expert_load,
                                     static_cast<cudaStream_t>(stream));
  });
}

MOEKIT_API moekit_status_t moekit_ep_aux_stats_workspace_size(void* nccl_comm, int32_t num_experts,
                                                              size_t* workspace_bytes) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(nccl_comm);
    MOEKIT_CHECK_ARG(num_experts >= 1, "num_experts = %d is less than 1", num_experts);
    MOEKIT_CHECK_NOT_NULL(workspace_bytes);
    int32_t n = 0;
    MOEKIT_TRY(ep::comm_size(nccl_comm, &n));
    moekit::WorkspaceCarver carver(nullptr);
    carver.take<float>(static_cast<size_t>(n) * static_cast<size_t>(num_experts), "gathered");
    *workspace_bytes = carver.bytes();
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_ep_allreduce_aux_stats(void* nccl_comm, int32_t num_experts,
                                                         float* aux_score_sum,
                                                         int32_t* aux_token_count,
                                                         void* workspace, size_t workspace_bytes,
                                                         void* stream) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(nccl_comm);
    MOEKIT_CHECK_ARG(num_experts >= 1, "num_experts = %d is less than 1", num_experts);
    MOEKIT_CHECK_ARG(aux_score_sum != nullptr || aux_token_count != nullptr,
                     "aux_score_sum and aux_token_count are both NULL");
    int32_t n = 0;
    MOEKIT_TRY(ep::comm_size(nccl_comm, &n));
    if (aux_score_sum != nullptr) {
      moekit::WorkspaceCarver carver(nullptr);
      carver.take<float>(static_cast<size_t>(n) * static_cast<size_t>(num_experts), "gathered");
      MOEKIT_TRY(moekit::check_workspace(workspace, workspace_bytes, carver.bytes()));
    }
    return ep::allreduce_aux_stats(nccl_comm, n, num_experts, aux_score_sum, aux_token_count,
                                   workspace, static_cast<cudaStream_t>(stream));
  });
}

}  // extern "C"
