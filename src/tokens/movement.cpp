#include "src/tokens/movement.hpp"

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/tokens/launch.hpp"
#include "src/common/error.hpp"

namespace moekit::tokens {

namespace k = moekit::kernels::tokens;

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

k::MoveOp kernel_op(Movement op) {
  switch (op) {
    case Movement::kPermute: return k::MoveOp::kPermute;
    case Movement::kCombine: return k::MoveOp::kCombine;
    case Movement::kPermuteBackward: return k::MoveOp::kPermuteBackward;
    case Movement::kCombineBackward: return k::MoveOp::kCombineBackward;
  }
  return k::MoveOp::kPermute;
}

const char* op_name(Movement op) {
  switch (op) {
    case Movement::kPermute: return "launching permute";
    case Movement::kCombine: return "launching combine";
    case Movement::kPermuteBackward: return "launching permute backward";
    case Movement::kCombineBackward: return "launching combine backward";
  }
  return "launching token movement";
}

}  // namespace

bool vector_path(const MoveRequest& r) {
  const int64_t element = static_cast<int64_t>(moekit_dtype_size(r.dtype));
  if ((r.hidden * element) % 16 != 0) return false;
  // Null pointers are unused and do not constrain; strides matter only for used tensors.
  if (!aligned16(r.token_in) || !aligned16(r.token_out) || !aligned16(r.rows_in) ||
      !aligned16(r.rows_out))
    return false;
  if (r.token_in != nullptr && (r.token_in_stride * element) % 16 != 0) return false;
  if (r.token_out != nullptr && (r.token_out_stride * element) % 16 != 0) return false;
  return true;
}

moekit_status_t run_move(const PlanShape& s, const moekit_token_plan_t& plan,
                         const MoveRequest& r, void* stream) {
  if (s.num_tokens == 0) return MOEKIT_STATUS_SUCCESS;
  k::MoveArgs a{};
  a.op = kernel_op(r.op);
  a.num_tokens = s.num_tokens;
  a.top_k = s.top_k;
  a.num_local = s.num_local;
  a.alignment = s.alignment;
  a.max_rows = static_cast<int32_t>(s.max_rows);
  a.hidden = r.hidden;
  a.row_of_slot = plan.row_of_slot;
  a.expert_counts = plan.expert_counts;
  a.expert_offsets = plan.expert_offsets;
  a.token_in = r.token_in;
  a.token_in_stride = r.token_in_stride;
  a.token_out = r.token_out;
  a.token_out_stride = r.token_out_stride;
  a.rows_in = r.rows_in;
  a.rows_out = r.rows_out;
  a.weights = r.weights;
  a.row_weights = r.row_weights;
  a.grad_row_weights = r.grad_row_weights;
  a.grad_weights = r.grad_weights;
  MOEKIT_CUDA_TRY(k::launch_move(r.dtype, vector_path(r), a, static_cast<cudaStream_t>(stream)),
                  op_name(r.op));
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit::tokens
