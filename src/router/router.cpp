#include "src/router/router.hpp"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels/common/grid.hpp"
#include "kernels/router/launch.hpp"
#include "kernels/router/tuning.hpp"
#include "src/common/error.hpp"
#include "src/common/workspace.hpp"
#include "src/router/router_config.hpp"

namespace moekit::router {

namespace k = moekit::kernels::router;

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int32_t clamp_blocks(int64_t blocks, int32_t max_blocks) {
  return static_cast<int32_t>(blocks < max_blocks ? blocks : max_blocks);
}

// The forward's partial statistics: one row per block. Used by the size query (base = nullptr)
// and by the run, so the two cannot drift apart.
struct ForwardWorkspace {
  int32_t* load_partial;
  float* score_partial;
  int32_t* count_partial;
};

ForwardWorkspace carve_forward(WorkspaceCarver& ws, int32_t num_experts, int32_t num_blocks) {
  const size_t rows = static_cast<size_t>(num_blocks);
  ForwardWorkspace w;
  w.load_partial = ws.take<int32_t>(rows * static_cast<size_t>(num_experts), "load_partial");
  w.score_partial = ws.take<float>(rows * static_cast<size_t>(num_experts), "score_partial");
  w.count_partial = ws.take<int32_t>(rows, "count_partial");
  return w;
}

// Every router kernel of a forward or backward (the forward, its statistics finalize, the backward)
// is launched as a programmatic dependent of the stream's previous kernel (kernels/common/pdl.cuh):
// its launch overlaps its predecessor's tail and it waits in-kernel before touching memory. That
// needs sm_90 (grid.hpp's per-device attribute cache) and a created stream (the legacy NULL stream
// synchronises with every other stream, which is not worth mixing with in-kernel dependency
// waits). MOEKIT_ROUTER_PROGRAMMATIC=0 in the environment (read once) launches them plainly, for an
// A/B measurement in one build (docs/router.md, seventh measurement).
bool launch_programmatically(cudaStream_t stream) {
  static const bool allowed = [] {
    const char* v = std::getenv("MOEKIT_ROUTER_PROGRAMMATIC");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  if (!allowed || stream == nullptr) return false;
  const int device = moekit::kernels::current_device();
  return moekit::kernels::cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(device, 0) >= 9;
}

}  // namespace

bool fast_path(const moekit_router_config_t& c) {
  if (c.num_experts > k::kFastMaxExperts) return false;
  if (c.num_groups == 1) return true;
  const k::FastShape fs = k::fast_shape(c.num_experts);
  const int group_size = c.num_experts / c.num_groups;
  if (group_size % fs.values_per_lane != 0) return false;
  const int lanes_per_group = group_size / fs.values_per_lane;
  if ((lanes_per_group & (lanes_per_group - 1)) != 0) return false;
  const int n = c.group_score == MOEKIT_GROUP_SCORE_TOPN_SUM ? c.group_score_topn
                : c.group_score == MOEKIT_GROUP_SCORE_MAX   ? 1
                                                            : 2;  // TOP2_SUM, or AUTO (max or top-2)
  return n <= 2;
}

k::RouterShape forward_shape(const moekit_router_config_t& c, int64_t num_tokens, int elem_bytes, bool stats) {
  k::RouterShape s{};
  if (fast_path(c)) {
    const k::FastShape fs = k::fast_shape(c.num_experts);
    s.fast = 1;
    s.values_per_lane = fs.values_per_lane;
    s.lanes_per_token = fs.lanes_per_token;
    s.threads = k::kFastThreads;
    const int64_t teams = k::kFastThreads / fs.lanes_per_token;
    s.num_blocks = clamp_blocks(ceil_div(num_tokens, teams), k::kMaxForwardBlocks);
  } else {
    // keys kept in shared memory where they are read again (groups, aux scores)
    const k::GenericLayout l = k::generic_layout(c.num_experts, c.num_groups, elem_bytes, c.num_groups > 1 || stats);
    s.fast = 0;
    s.threads = 32 * l.warps;
    s.num_blocks = clamp_blocks(ceil_div(num_tokens, l.warps), k::kMaxForwardBlocks);
    s.smem_bytes = static_cast<uint32_t>(l.bytes);
  }
  return s;
}

k::RouterShape backward_shape(const moekit_router_config_t& c, int64_t num_tokens, int elem_bytes) {
  k::RouterShape s{};
  if (c.num_experts <= k::kFastMaxExperts) {  // no selection: groups do not matter here
    const k::FastShape fs = k::fast_backward_shape(c.num_experts);
    s.fast = 1;
    s.values_per_lane = fs.values_per_lane;
    s.lanes_per_token = fs.lanes_per_token;
    s.threads = k::kFastThreads;
    const int64_t teams = k::kFastThreads / fs.lanes_per_token;
    s.num_blocks = clamp_blocks(ceil_div(num_tokens, teams), k::kMaxBackwardBlocks);
  } else {
    const k::GenericBackwardLayout l = k::generic_backward_layout(c.num_experts, elem_bytes);
    s.fast = 0;
    s.threads = 32 * l.warps;
    s.num_blocks = clamp_blocks(ceil_div(num_tokens, l.warps), k::kMaxBackwardBlocks);
    s.smem_bytes = static_cast<uint32_t>(l.bytes);
  }
  return s;
}

size_t forward_workspace_bytes(const moekit_router_config_t& c, int64_t num_tokens) {
  WorkspaceCarver ws(nullptr);
  // 4-byte rows: the most blocks any dtype launches (kernels/router/tuning.hpp, GenericLayout)
  carve_forward(ws, c.num_experts, forward_shape(c, num_tokens, 4, true).num_blocks);
  return ws.bytes();
}

size_t backward_workspace_bytes(const moekit_router_config_t&, int64_t) {
  return 0;  // the backward keeps nothing across blocks
}

int32_t vector_bytes(const void* ptr, int64_t stride_elements, size_t element_bytes) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  const uint64_t stride_bytes = static_cast<uint64_t>(stride_elements) * element_bytes;
  for (int32_t w = 16; w > static_cast<int32_t>(element_bytes); w /= 2)
    if (address % w == 0 && stride_bytes % w == 0) return w;
  return static_cast<int32_t>(element_bytes);
}

moekit_status_t run_forward(const ForwardCall& call) {
  const moekit_router_config_t& c = call.config;
  const int32_t E = c.num_experts;
  const bool need_stats = call.aux_score_sum != nullptr;  // S and N come together
  k::ForwardArgs a{};
  a.opt = resolve_options(c, call.bias != nullptr);
  a.shape = forward_shape(c, call.num_tokens, static_cast<int>(moekit_dtype_size(call.dtype)), need_stats);
  a.num_tokens = call.num_tokens;
  a.logits = call.logits;
  a.logits_stride = call.logits_row_stride;
  a.logits_vec_bytes = vector_bytes(call.logits, call.logits_row_stride, moekit_dtype_size(call.dtype));
  a.bias = call.bias;
  a.token_mask = call.token_mask;
  a.weights = call.weights;
  a.indices = call.indices;

  WorkspaceCarver ws(call.workspace);
  const ForwardWorkspace w = carve_forward(ws, E, a.shape.num_blocks);
  if (call.expert_load == nullptr) {
    a.load_mode = k::LoadMode::kNone;
  } else if (c.accumulate_load && !need_stats) {
    a.load_mode = k::LoadMode::kAtomic;  // adds straight into expert_load: no finalize needed
    a.expert_load = call.expert_load;
  } else {
    a.load_mode = k::LoadMode::kPartial;
    a.load_partial = w.load_partial;
  }
  if (need_stats) {
    a.score_partial = w.score_partial;
    a.count_partial = w.count_partial;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(call.stream);
  a.programmatic = call.num_tokens > 0 && launch_programmatically(stream);
  a.finalize_follows = a.load_mode == k::LoadMode::kPartial || need_stats;
  int32_t blocks = 0;  // partial rows written: one per block launched (<= the workspace's rows)
  MOEKIT_CUDA_TRY(k::launch_router_forward(call.dtype, a, stream, &blocks), "launching the router forward");

  if (a.finalize_follows) {
    k::FinalizeArgs f{};
    f.num_experts = E;
    f.num_blocks = blocks;
    f.load_partial = w.load_partial;
    f.score_partial = w.score_partial;
    f.count_partial = w.count_partial;
    f.expert_load = a.load_mode == k::LoadMode::kPartial ? call.expert_load : nullptr;
    f.accumulate = c.accumulate_load != 0;
    f.score_sum = call.aux_score_sum;
    f.token_count = call.aux_token_count;
    MOEKIT_CUDA_TRY(k::launch_router_finalize(f, a.programmatic, stream),
                    "launching the router statistics finalize");
  }
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t run_backward(const BackwardCall& call) {
  if (call.num_tokens == 0) return MOEKIT_STATUS_SUCCESS;
  const moekit_router_config_t& c = call.config;
  const size_t element = moekit_dtype_size(call.dtype);
  k::BackwardArgs a{};
  a.opt = resolve_options(c, call.bias != nullptr);
  a.shape = backward_shape(c, call.num_tokens, static_cast<int>(element));
  a.num_tokens = call.num_tokens;
  a.logits = call.logits;
  a.logits_stride = call.logits_row_stride;
  a.logits_vec_bytes = vector_bytes(call.logits, call.logits_row_stride, element);
  a.bias = call.bias;
  a.token_mask = call.token_mask;
  a.indices = call.indices;
  a.grad_weights = call.grad_weights;
  a.aux_coeff = call.aux_loss_coeff;
  a.expert_load = call.expert_load;
  a.token_count = call.aux_token_count;
  a.grad_logits = call.grad_logits;
  a.grad_stride = call.grad_logits_row_stride;
  a.grad_vec_bytes = vector_bytes(call.grad_logits, call.grad_logits_row_stride, element);
  a.programmatic = launch_programmatically(static_cast<cudaStream_t>(call.stream));
  MOEKIT_CUDA_TRY(k::launch_router_backward(call.dtype, a, static_cast<cudaStream_t>(call.stream)),
                  "launching the router backward");
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t run_aux_loss(int32_t num_experts, int32_t top_k, const int32_t* expert_load,
                             const float* aux_score_sum, const int32_t* aux_token_count,
                             float* aux_loss, void* stream) {
  MOEKIT_CUDA_TRY(k::launch_aux_loss(num_experts, top_k, expert_load, aux_score_sum, aux_token_count,
                                     aux_loss, static_cast<cudaStream_t>(stream)),
                  "launching the aux loss");
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t run_bias_update(int32_t num_experts, float update_rate, int32_t recenter,
                                float* correction_bias, int32_t* expert_load, int32_t reset_load,
                                void* stream) {
  MOEKIT_CUDA_TRY(k::launch_bias_update(num_experts, update_rate, recenter, correction_bias,
                                        expert_load, reset_load, static_cast<cudaStream_t>(stream)),
                  "launching the bias update");
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t run_fake_gate(const FakeGateCall& call) {
  cudaStream_t stream = static_cast<cudaStream_t>(call.stream);
  if (call.expert_load != nullptr && !call.accumulate_load)
    MOEKIT_CUDA_TRY(cudaMemsetAsync(call.expert_load, 0, sizeof(int32_t) * call.num_experts, stream),
                    "zeroing expert_load");
  if (call.num_tokens == 0) return MOEKIT_STATUS_SUCCESS;
  k::FakeGateArgs a{};
  a.num_tokens = call.num_tokens;
  a.num_experts = call.num_experts;
  a.top_k = call.top_k;
  a.skip_experts = call.skip_experts;
  a.noise = call.noise;
  a.seed = call.seed;
  a.offset = call.offset;
  a.token_mask = call.token_mask;
  a.weights = call.weights;
  a.indices = call.indices;
  a.expert_load = call.expert_load;
  k::fake_gate_shape(call.num_tokens, call.num_experts, call.skip_experts, call.noise, &a.num_blocks,
                     &a.warps_per_block, &a.smem_bytes);
  MOEKIT_CUDA_TRY(k::launch_fake_gate(a, stream), "launching the fake gate");
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit::router
