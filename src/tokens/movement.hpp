// Token <-> row movement over a plan (permute, combine, backwards): the choice between the 16-byte
// and the scalar path, and the launch.
#pragma once

#include <cstdint>

#include "moekit/tokens.h"
#include "src/tokens/plan_config.hpp"

namespace moekit::tokens {

enum class Movement { kPermute, kCombine, kPermuteBackward, kCombineBackward };

// The data of one movement call, already validated. Token-side tensors have row strides in
// elements; row-side tensors are [max_rows, H] contiguous.
struct MoveRequest {
  Movement op;
  int64_t hidden = 0;
  moekit_dtype_t dtype = MOEKIT_DTYPE_F32;
  const void* token_in = nullptr;   // x | grad_y
  int64_t token_in_stride = 0;
  void* token_out = nullptr;        // y | grad_x
  int64_t token_out_stride = 0;
  const void* rows_in = nullptr;    // yp | grad_xp | yp (combine backward)
  void* rows_out = nullptr;         // xp | grad_yp
  const float* weights = nullptr;
  float* row_weights = nullptr;
  const float* grad_row_weights = nullptr;
  float* grad_weights = nullptr;
};

// True when H and every pointer and stride of the request allow 16-byte accesses.
bool vector_path(const MoveRequest& request);

// Enqueues one movement op (nothing when T = 0).
moekit_status_t run_move(const PlanShape& shape, const moekit_token_plan_t& plan,
                         const MoveRequest& request, void* stream);

}  // namespace moekit::tokens
