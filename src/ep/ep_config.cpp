#include "src/ep/ep_config.hpp"

#include <climits>
#include <cstddef>

#include "capi/api.hpp"
#include "src/common/dtype.hpp"
#include "src/common/error.hpp"

namespace moekit::ep {

// Size of moekit_ep_config_t in 0.1, the first release: callers' structs are never smaller.
constexpr size_t kConfigSizeV0_1 = offsetof(moekit_ep_config_t, capacity) + sizeof(int64_t);

void set_defaults(moekit_ep_config_t* c) {
  c->struct_size = sizeof(moekit_ep_config_t);
  c->num_ranks = 0;
  c->num_experts = 0;
  c->top_k = 0;
  c->dtype = MOEKIT_DTYPE_BF16;
  c->combine_dtype = -1;
  c->mode = MOEKIT_EP_MODE_EXACT;
  c->num_chunks = 1;  // measured: chunking lost bandwidth at 2 and 4 H200s (docs/ep.md)
  c->hidden = 0;
  c->max_tokens = 0;
  c->capacity = 0;
}

namespace {

bool is_dtype(int32_t v) {
  return v == MOEKIT_DTYPE_F32 || v == MOEKIT_DTYPE_F16 || v == MOEKIT_DTYPE_BF16;
}

// Largest H: keeps every per-row byte count far inside int64 and a row inside what one warp copies.
constexpr int64_t kMaxHidden = int64_t(1) << 24;

}  // namespace

moekit_status_t check_config(const moekit_ep_config_t& c) {
  MOEKIT_CHECK_ARG(c.num_ranks >= 1 && c.num_ranks <= MOEKIT_EP_MAX_RANKS,
                   "config->num_ranks = %d is outside [1, %d]", c.num_ranks, MOEKIT_EP_MAX_RANKS);
  MOEKIT_CHECK_ARG(c.num_experts >= 1 && c.num_experts <= MOEKIT_EP_MAX_EXPERTS,
                   "config->num_experts = %d is outside [1, %d]", c.num_experts,
                   MOEKIT_EP_MAX_EXPERTS);
  MOEKIT_CHECK_ARG(c.num_experts % c.num_ranks == 0,
                   "config->num_experts = %d is not a multiple of num_ranks = %d (experts are "
                   "split evenly over the ranks)",
                   c.num_experts, c.num_ranks);
  MOEKIT_CHECK_ARG(c.top_k >= 1 && c.top_k <= MOEKIT_MAX_TOP_K,
                   "config->top_k = %d is outside [1, %d]", c.top_k, MOEKIT_MAX_TOP_K);
  MOEKIT_CHECK_ARG(c.top_k <= c.num_experts, "config->top_k = %d exceeds num_experts = %d",
                   c.top_k, c.num_experts);
  MOEKIT_CHECK_ARG(is_dtype(c.dtype), "config->dtype = %d is not a moekit_dtype_t", c.dtype);
  MOEKIT_CHECK_ARG(c.combine_dtype == -1 || is_dtype(c.combine_dtype),
                   "config->combine_dtype = %d is neither -1 nor a moekit_dtype_t",
                   c.combine_dtype);
  MOEKIT_CHECK_ARG(c.mode == MOEKIT_EP_MODE_EXACT || c.mode == MOEKIT_EP_MODE_CAPACITY,
                   "config->mode = %d is not a moekit_ep_mode_t", c.mode);
  MOEKIT_CHECK_ARG(c.num_chunks >= 1 && c.num_chunks <= MOEKIT_EP_MAX_CHUNKS,
                   "config->num_chunks = %d is outside [1, %d]", c.num_chunks,
                   MOEKIT_EP_MAX_CHUNKS);
  MOEKIT_CHECK_ARG(c.hidden >= 1 && c.hidden <= kMaxHidden,
                   "config->hidden = %lld is outside [1, %lld]", static_cast<long long>(c.hidden),
                   static_cast<long long>(kMaxHidden));
  MOEKIT_CHECK_ARG(c.max_tokens >= 0 && c.max_tokens <= INT32_MAX,
                   "config->max_tokens = %lld is outside [0, %d]",
                   static_cast<long long>(c.max_tokens), INT32_MAX);
  // Received rows are int32 on the device: n * max_tokens (exact mode's worst case) must fit.
  MOEKIT_CHECK_ARG(static_cast<int64_t>(c.num_ranks) * c.max_tokens <= INT32_MAX,
                   "config->max_tokens = %lld times num_ranks = %d exceeds %d received rows",
                   static_cast<long long>(c.max_tokens), c.num_ranks, INT32_MAX);
  MOEKIT_CHECK_ARG(c.capacity >= 0 && c.capacity <= INT32_MAX,
                   "config->capacity = %lld is outside [0, %d]", static_cast<long long>(c.capacity),
                   INT32_MAX);
  if (c.mode == MOEKIT_EP_MODE_CAPACITY) {
    const int64_t cap = c.capacity > 0 ? c.capacity : c.max_tokens;
    const int64_t cc = (cap + c.num_chunks - 1) / c.num_chunks;
    MOEKIT_CHECK_ARG(static_cast<int64_t>(c.num_ranks) * c.num_chunks * cc <= INT32_MAX,
                     "config->capacity = %lld gives num_ranks * num_chunks * ceil(capacity / "
                     "num_chunks) = %lld received rows, more than %d",
                     static_cast<long long>(cap),
                     static_cast<long long>(static_cast<int64_t>(c.num_ranks) * c.num_chunks * cc),
                     INT32_MAX);
  }
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t read_and_check(const moekit_ep_config_t* user, moekit_ep_config_t* out) {
  MOEKIT_TRY(capi::read_config(user, "config", kConfigSizeV0_1, set_defaults, out));
  return check_config(*out);
}

Dims dims_of(const moekit_ep_config_t& c) {
  Dims d{};
  d.num_ranks = c.num_ranks;
  d.num_experts = c.num_experts;
  d.top_k = c.top_k;
  d.experts_per_rank = c.num_experts / c.num_ranks;
  d.max_dests = c.top_k < c.num_ranks ? c.top_k : c.num_ranks;
  d.num_chunks = c.num_chunks;
  d.meta_words = 2 * c.top_k + 1;
  d.capacity_mode = c.mode == MOEKIT_EP_MODE_CAPACITY;
  d.dtype = static_cast<moekit_dtype_t>(c.dtype);
  d.combine_dtype = static_cast<moekit_dtype_t>(c.combine_dtype < 0 ? c.dtype : c.combine_dtype);
  d.hidden = c.hidden;
  d.max_tokens = c.max_tokens;
  if (d.capacity_mode) {
    const int64_t cap = c.capacity > 0 ? c.capacity : c.max_tokens;
    d.chunk_capacity = (cap + c.num_chunks - 1) / c.num_chunks;
  }
  d.row_bytes = c.hidden * static_cast<int64_t>(dtype_bytes(d.dtype));
  d.combine_row_bytes = c.hidden * static_cast<int64_t>(dtype_bytes(d.combine_dtype));
  return d;
}

int32_t config_signature(const moekit_ep_config_t& c) {
  // FNV-1a over the fields that decide the exchange's shape and contents (not max_tokens, which
  // only sizes this rank's buffers in exact mode).
  uint32_t h = 2166136261u;
  auto mix = [&](int64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint32_t>((v >> (8 * i)) & 0xff);
      h *= 16777619u;
    }
  };
  mix(c.num_ranks);
  mix(c.num_experts);
  mix(c.top_k);
  mix(c.dtype);
  mix(c.combine_dtype < 0 ? c.dtype : c.combine_dtype);
  mix(c.mode);
  mix(c.num_chunks);
  mix(c.hidden);
  return static_cast<int32_t>(h & 0x7fffffffu);
}

}  // namespace moekit::ep
