// EP configuration as the host code sees it: the caller's extensible struct read into a full-size
// copy and validated, plus the derived sizes every tier uses (no NCCL, no CUDA: the CPU tests
// compile this file directly).
#pragma once

#include <cstdint>

#include "moekit/ep.h"

namespace moekit::ep {

// Defaults of every field (what moekit_ep_config_init writes).
void set_defaults(moekit_ep_config_t* config);

// Validates a full-size config; reports the first bad field with its value.
moekit_status_t check_config(const moekit_ep_config_t& config);

// Reads the caller's struct (any released size) into `out` and validates it.
moekit_status_t read_and_check(const moekit_ep_config_t* user, moekit_ep_config_t* out);

// Sizes derived from a valid config. Rows are int32 on the device: check_config keeps every row
// count below INT32_MAX.
struct Dims {
  int32_t num_ranks;         // n
  int32_t num_experts;       // E
  int32_t top_k;             // K
  int32_t experts_per_rank;  // E / n
  int32_t max_dests;         // D = min(K, n): most destinations of one token
  int32_t num_chunks;        // C
  int32_t meta_words;        // M = 2 K + 1 int32 words of metadata per dispatched row
  bool capacity_mode;
  moekit_dtype_t dtype;
  moekit_dtype_t combine_dtype;
  int64_t hidden;            // H
  int64_t max_tokens;        // T_max
  int64_t chunk_capacity;    // cc = ceil(capacity / C) (capacity mode), else 0
  int64_t row_bytes;         // H * size(dtype)
  int64_t combine_row_bytes; // H * size(combine_dtype)
};

Dims dims_of(const moekit_ep_config_t& config);

// Tokens per chunk for T tokens: L = ceil(T / C) (0 when T = 0).
inline int64_t chunk_tokens(int64_t num_tokens, int32_t num_chunks) {
  return (num_tokens + num_chunks - 1) / num_chunks;
}

// A 31-bit signature of everything that must agree between ranks (exchanged in exact mode).
int32_t config_signature(const moekit_ep_config_t& config);

}  // namespace moekit::ep
