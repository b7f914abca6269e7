// Building a routing plan: the workspace layout (one function for the size query and the run),
// the layout of a single buffer holding the plan arrays, and the launch.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/tokens/plan_launch.hpp"
#include "moekit/tokens.h"
#include "src/common/workspace.hpp"
#include "src/tokens/plan_config.hpp"

namespace moekit::tokens {

struct PlanWorkspace {
  int32_t* table = nullptr;         // [blocks, E_local + 1] per-block counts
  int32_t* raw_counts = nullptr;    // [E_local] (drop by weight)
  int32_t* list_offsets = nullptr;  // [E_local] (drop by weight)
  int32_t* list_slots = nullptr;    // [N] (drop by weight)
  uint32_t* list_keys = nullptr;    // [N] (drop by weight)
};

// The one layout of the plan workspace (count-only when ws has a null base).
PlanWorkspace carve_plan_workspace(WorkspaceCarver& ws, const PlanShape& shape);
size_t plan_workspace_bytes(const PlanShape& shape);

// The one layout of a buffer holding all five plan arrays.
moekit_token_plan_t carve_plan_buffer(WorkspaceCarver& buffer, const PlanShape& shape);
size_t plan_buffer_bytes(const PlanShape& shape);

// The plan kernels to use: MOEKIT_PLAN_KERNELS=fused|split in the environment forces one (tests
// and benchmarks compare both); unset or anything else: automatic (kernels/tokens/plan_launch.hpp).
kernels::tokens::PlanKernels plan_kernels_from_env();

// Enqueues the plan kernels. Arguments already validated (plan pointers present as the shape
// needs them, workspace checked).
moekit_status_t build_plan(const PlanShape& shape, const int32_t* indices, const float* weights,
                           const uint8_t* token_mask, const moekit_token_plan_t& plan,
                           void* workspace, void* stream);

}  // namespace moekit::tokens
