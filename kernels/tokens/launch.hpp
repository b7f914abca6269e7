// Launchers of the tokens family's kernels: plain C++ declarations (no device code) so that the
// host tier (src/tokens) can include them. Each returns the first CUDA error of its launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/status.h"

namespace moekit::kernels::tokens {

// Everything the plan kernels read and write. Sizes were validated by the caller: N = T K and
// every row index fit in int32.
struct PlanArgs {
  // inputs
  const int32_t* indices;    // [T, K]
  const float* weights;      // [T, K], read only by drop-by-weight
  const uint8_t* token_mask; // [T] or nullptr
  int32_t num_slots;         // N = T K
  int32_t top_k;             // K
  int32_t num_experts;       // global E
  int32_t expert_begin;      // e0
  int32_t num_local;         // E_local
  int32_t alignment;         // A >= 1
  int32_t capacity;          // C, 0 = dropless
  int32_t drop_by_weight;    // nonzero: MOEKIT_DROP_BY_WEIGHT (only with C > 0)
  // grid (kernels/tokens/tuning.hpp plan_grid)
  int32_t num_blocks;
  int64_t slots_per_block;
  // workspace
  int32_t* table;            // [num_blocks, E_local + 1]: per-block counts, last column invalid ids
  int32_t* raw_counts;       // [E_local] n_e (drop by weight)
  int32_t* list_offsets;     // [E_local] start of each over-capacity expert's list (drop by weight)
  int32_t* list_slots;       // [N] slots of over-capacity experts, per expert in slot order
  uint32_t* list_keys;       // [N] their weights as order-preserving keys
  // outputs (the plan)
  int32_t* expert_counts;    // [E_local]
  int32_t* expert_offsets;   // [E_local + 1]
  int32_t* row_of_slot;      // [N]
  int32_t* slot_of_row;      // [max_rows]
  int32_t* totals;           // [3]
};

// Enqueues the plan: count, scatter (and select for drop-by-weight) kernels.
cudaError_t launch_plan(const PlanArgs& args, cudaStream_t stream);

enum class MoveOp : int { kPermute = 0, kCombine = 1, kPermuteBackward = 2, kCombineBackward = 3 };

// Arguments of the token <-> row movement kernels. "Token side" tensors are [T, H] with a row
// stride; "row side" tensors are [max_rows, H] contiguous. Strides are in elements.
struct MoveArgs {
  MoveOp op;
  int64_t num_tokens;
  int32_t top_k;
  int32_t num_local;
  int32_t alignment;
  int32_t max_rows;
  int64_t hidden;
  // plan
  const int32_t* row_of_slot;
  const int32_t* expert_counts;   // padding (permute, combine backward with A > 1)
  const int32_t* expert_offsets;
  // token side
  const void* token_in;           // x (permute), grad_y (combine backward)
  int64_t token_in_stride;
  void* token_out;                // y (combine), grad_x (permute backward)
  int64_t token_out_stride;
  // row side
  const void* rows_in;            // yp (combine, combine backward), grad_xp (permute backward)
  void* rows_out;                 // xp (permute), grad_yp (combine backward)
  // routing weights
  const float* weights;           // [T, K] or nullptr (= 1)
  float* row_weights;             // permute: [max_rows] or nullptr
  const float* grad_row_weights;  // permute backward: [max_rows] or nullptr
  float* grad_weights;            // backwards: [T, K] or nullptr
};

// Enqueues one movement op. `vectorized`: every pointer and row stride allows 16-byte accesses
// and H * element size is a multiple of 16 (decided by the caller); otherwise the scalar path.
cudaError_t launch_move(moekit_dtype_t dtype, bool vectorized, const MoveArgs& args,
                        cudaStream_t stream);

}  // namespace moekit::kernels::tokens
