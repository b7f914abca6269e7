// Which kernels build the routing plan (kernels/tokens/plan.cu). Plain C++, no device code.
//
//   kFused  one cooperative launch: count, grid barrier, scatter (plus the select kernel with
//           capacity by weight). Needs every block resident at once.
//   kSplit  two launches: count, then scatter (plus select): the kernel boundary is the barrier.
//   kAuto   a grid of one block (N <= kPlanTileSlots, T = 0 included): plan_single_block_kernel,
//           count and scatter in one plain launch with the block barrier between them; otherwise
//           kFused when its grid is sure to be resident (cooperative launch supported and at most
//           one block per SM), else kSplit. What launch_plan does.
// Both produce the same bits: the same block / tile / warp / step arithmetic (plan_steps.hpp) on
// the same grid (tuning.hpp plan_grid) and workspace.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/tokens/launch.hpp"

namespace moekit::kernels::tokens {

enum class PlanKernels : int { kAuto = 0, kFused = 1, kSplit = 2 };

cudaError_t launch_plan_kernels(const PlanArgs& args, PlanKernels which, cudaStream_t stream);

}  // namespace moekit::kernels::tokens
