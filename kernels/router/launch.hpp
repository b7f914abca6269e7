// Launchers of the router family's kernels: plain C++ declarations (no device code) so that the
// host tier (src/router) can include them. Each returns the first CUDA error of its launches.
// Arguments were validated by the caller (capi/router); sizes are in elements unless named bytes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/status.h"

namespace moekit::kernels::router {

// Where the forward's expert loads go.
enum class LoadMode : int32_t {
  kNone = 0,
  kAtomic = 1,   // integer atomics straight into expert_load (accumulating, no finalize)
  kPartial = 2,  // one row per block in load_partial, summed by the finalize kernel
};

// How one forward/backward is run, chosen on the host from the configuration and T only.
struct RouterShape {
  int32_t fast;             // nonzero: the register fast path (kernels/router/forward_fast.cuh)
  int32_t values_per_lane;  // fast path: V
  int32_t lanes_per_token;  // fast path: TPT
  int32_t threads;          // threads per block
  int32_t num_blocks;       // most blocks worth launching (forward: workspace rows of partials)
  uint32_t smem_bytes;      // dynamic shared memory (generic path)
};

// The options every router kernel reads, resolved on the host.
struct RouterOptions {
  int32_t num_experts;        // E
  int32_t top_k;              // K
  int32_t score_func;         // moekit_score_func_t
  int32_t topk_then_softmax;  // softmax with MOEKIT_TOPK_THEN_SOFTMAX
  int32_t normalize;          // config normalize && K > 1
  int32_t weights_use_bias;
  float route_scale;
  int32_t num_groups;         // G (1: no groups)
  int32_t groups_kept;        // G'
  int32_t group_score;        // resolved: MAX, TOP2_SUM or TOPN_SUM (never AUTO)
  int32_t group_topn;         // n of TOPN_SUM
  float group_mask_value;     // 0 or -inf
};

struct ForwardArgs {
  RouterOptions opt;
  RouterShape shape;
  int64_t num_tokens;
  // inputs
  const void* logits;         // [T, E] of the dtype, rows logits_stride elements apart
  int64_t logits_stride;
  int32_t logits_vec_bytes;   // widest access (16, 8, 4 or 2 bytes) the pointer and stride allow
  const float* bias;          // [E] or nullptr
  const uint8_t* token_mask;  // [T] or nullptr
  // outputs
  float* weights;             // [T, K]
  int32_t* indices;           // [T, K]
  LoadMode load_mode;
  int32_t* expert_load;       // kAtomic: [E], added to
  int32_t* load_partial;      // kPartial: [num_blocks, E]
  float* score_partial;       // [num_blocks, E] or nullptr (no aux statistics)
  int32_t* count_partial;     // [num_blocks] or nullptr
  bool programmatic;          // host: launch as a programmatic dependent (kernels/common/pdl.cuh)
  bool finalize_follows;      // the statistics finalize comes next: let it be scheduled at once
};

// Enqueues the forward kernel (no statistics finalize; see launch_router_finalize) on
// min(shape.num_blocks, blocks resident on the device) blocks, returned in *blocks: the number of
// partial rows written.
cudaError_t launch_router_forward(moekit_dtype_t dtype, const ForwardArgs& args,
                                  cudaStream_t stream, int32_t* blocks);

// Sums the forward's partial rows in block order: expert_load (overwritten, or added to when
// accumulate), aux_score_sum, aux_token_count; each output may be nullptr. With num_blocks = 0
// (T = 0) the outputs get zeros. Launched as a programmatic dependent of the forward on sm_90.
struct FinalizeArgs {
  int32_t num_experts;
  int32_t num_blocks;
  const int32_t* load_partial;
  const float* score_partial;
  const int32_t* count_partial;
  int32_t* expert_load;
  int32_t accumulate;
  float* score_sum;
  int32_t* token_count;
};
cudaError_t launch_router_finalize(const FinalizeArgs& args, bool programmatic,
                                   cudaStream_t stream);

struct BackwardArgs {
  RouterOptions opt;
  RouterShape shape;
  int64_t num_tokens;
  const void* logits;
  int64_t logits_stride;
  int32_t logits_vec_bytes;
  const float* bias;
  const uint8_t* token_mask;
  const int32_t* indices;         // [T, K]
  const float* grad_weights;      // [T, K] or nullptr
  float aux_coeff;                // 0: no aux term
  const int32_t* expert_load;     // [E] (aux term)
  const int32_t* token_count;     // [1] (aux term)
  void* grad_logits;              // [T, E] of the dtype, rows grad_stride elements apart
  int64_t grad_stride;
  int32_t grad_vec_bytes;
  bool programmatic;          // host: launch as a programmatic dependent (kernels/common/pdl.cuh)
};
cudaError_t launch_router_backward(moekit_dtype_t dtype, const BackwardArgs& args,
                                   cudaStream_t stream);

// aux = sum_i L_i S_i * E / (K N'^2), N' = max(N, 1), one block, fixed order.
cudaError_t launch_aux_loss(int32_t num_experts, int32_t top_k, const int32_t* expert_load,
                            const float* score_sum, const int32_t* token_count, float* aux_loss,
                            cudaStream_t stream);

// b_i += rate * sign(sum L - E L_i), optional recentring and load reset; one block.
cudaError_t launch_bias_update(int32_t num_experts, float rate, int32_t recenter, float* bias,
                               int32_t* expert_load, int32_t reset_load, cudaStream_t stream);

struct FakeGateArgs {
  int64_t num_tokens;
  int32_t num_experts;
  int32_t top_k;
  int32_t skip_experts;
  float noise;
  uint64_t seed;
  uint64_t offset;
  const uint8_t* token_mask;
  float* weights;
  int32_t* indices;
  int32_t* expert_load;  // [E] added to (the caller zeroes it first when not accumulating)
  int32_t num_blocks;
  int32_t warps_per_block;
  uint32_t smem_bytes;
};
cudaError_t launch_fake_gate(const FakeGateArgs& args, cudaStream_t stream);

// Blocks and shared memory of the fake gate for these sizes.
void fake_gate_shape(int64_t num_tokens, int32_t num_experts, int32_t skip_experts, float noise,
                     int32_t* num_blocks, int32_t* warps_per_block, uint32_t* smem_bytes);

}  // namespace moekit::kernels::router
