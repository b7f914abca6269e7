#include "src/tokens/plan.hpp"

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "kernels/tokens/launch.hpp"
#include "kernels/tokens/plan_launch.hpp"
#include "kernels/tokens/tuning.hpp"
#include "src/common/error.hpp"

namespace moekit::tokens {

namespace k = moekit::kernels::tokens;

PlanWorkspace carve_plan_workspace(WorkspaceCarver& ws, const PlanShape& s) {
  const k::PlanGrid grid = k::plan_grid(s.num_slots, s.num_local);
  PlanWorkspace w;
  w.table = ws.take<int32_t>(static_cast<size_t>(grid.blocks) * (static_cast<size_t>(s.num_local) + 1),
                             "per-block expert counts");
  if (s.drop_by_weight) {
    w.raw_counts = ws.take<int32_t>(s.num_local, "routed slots per expert");
    w.list_offsets = ws.take<int32_t>(s.num_local, "list start per over-capacity expert");
    w.list_slots = ws.take<int32_t>(static_cast<size_t>(s.num_slots), "slots of over-capacity experts");
    w.list_keys = ws.take<uint32_t>(static_cast<size_t>(s.num_slots), "weight keys of those slots");
  }
  return w;
}

size_t plan_workspace_bytes(const PlanShape& shape) {
  WorkspaceCarver counter(nullptr);
  (void)carve_plan_workspace(counter, shape);
  return counter.bytes();
}

moekit_token_plan_t carve_plan_buffer(WorkspaceCarver& buffer, const PlanShape& s) {
  moekit_token_plan_t p;
  set_plan_defaults(&p);
  p.expert_counts = buffer.take<int32_t>(s.num_local, "expert_counts");
  p.expert_offsets = buffer.take<int32_t>(static_cast<size_t>(s.num_local) + 1, "expert_offsets");
  p.row_of_slot = buffer.take<int32_t>(static_cast<size_t>(s.num_slots), "row_of_slot");
  p.slot_of_row = buffer.take<int32_t>(static_cast<size_t>(s.max_rows), "slot_of_row");
  p.totals = buffer.take<int32_t>(MOEKIT_PLAN_NUM_TOTALS, "totals");
  return p;
}

size_t plan_buffer_bytes(const PlanShape& shape) {
  WorkspaceCarver counter(nullptr);
  (void)carve_plan_buffer(counter, shape);
  return counter.bytes();
}

k::PlanKernels plan_kernels_from_env() {
  const char* v = std::getenv("MOEKIT_PLAN_KERNELS");
  if (v == nullptr) return k::PlanKernels::kAuto;
  if (std::strcmp(v, "fused") == 0) return k::PlanKernels::kFused;
  if (std::strcmp(v, "split") == 0) return k::PlanKernels::kSplit;
  return k::PlanKernels::kAuto;
}

moekit_status_t build_plan(const PlanShape& s, const int32_t* indices, const float* weights,
                           const uint8_t* token_mask, const moekit_token_plan_t& plan,
                           void* workspace, void* stream) {
  WorkspaceCarver carver(workspace);
  const PlanWorkspace ws = carve_plan_workspace(carver, s);
  const k::PlanGrid grid = k::plan_grid(s.num_slots, s.num_local);

  k::PlanArgs a{};
  a.indices = indices;
  a.weights = weights;
  a.token_mask = token_mask;
  a.num_slots = static_cast<int32_t>(s.num_slots);
  a.top_k = s.top_k;
  a.num_experts = s.num_experts;
  a.expert_begin = s.expert_begin;
  a.num_local = s.num_local;
  a.alignment = s.alignment;
  a.capacity = s.capacity;
  a.drop_by_weight = s.drop_by_weight ? 1 : 0;
  a.num_blocks = grid.blocks;
  a.slots_per_block = grid.slots_per_block;
  a.table = ws.table;
  a.raw_counts = ws.raw_counts;
  a.list_offsets = ws.list_offsets;
  a.list_slots = ws.list_slots;
  a.list_keys = ws.list_keys;
  a.expert_counts = plan.expert_counts;
  a.expert_offsets = plan.expert_offsets;
  a.row_of_slot = plan.row_of_slot;
  a.slot_of_row = plan.slot_of_row;
  a.totals = plan.totals;
  MOEKIT_CUDA_TRY(k::launch_plan_kernels(a, plan_kernels_from_env(), static_cast<cudaStream_t>(stream)),
                  "launching the plan kernels");
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit::tokens
