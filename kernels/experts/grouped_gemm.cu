// Grouped GEMM dispatch by dtype, and the tuning numbers of the experts family (in one place).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/experts/grouped_gemm.hpp"
#include "kernels/experts/grouped_gemm_instances.hpp"
#include "kernels/experts/grouped_gemm_sm90.hpp"
#include "kernels/experts/grouped_gemm_simt.cuh"
#include "kernels/experts/grouped_gemm_sm80.cuh"

namespace moekit::kernels::experts {

// ---- Tuning -----------------------------------------------------------------------------------
// Tile shapes: sm80::TileConfig (128 x 256 x 32, 8 warps of 64 x 64, 4 stages),
// sm90::TileConfig (128 x 256 x 64, 2 consumer warpgroups of 64 x 256 + 1 producer, 4 stages) and
// simt::TileConfig (64 x 128 x 16). docs/experts.md ("Tile choices") records the reasoning and the
// benchmark (bench/experts/moekit-bench-experts) that checks them.
//
// Weight-gradient row splits: a weight gradient has G * ceil(M/BM) * ceil(N/BN) tiles whatever the
// routing; below kWgradTargetTiles tiles the rows of each group are cut into up to
// kWgradMaxSplits chunks (each at least kWgradMinRowsPerSplit rows on average) whose fp32 partials
// a second pass sums in order.
constexpr int kWgradTargetTiles = 264;  // two waves of 132 SMs (H100 SXM)
constexpr int kWgradMaxSplits = 16;
constexpr int64_t kWgradMinRowsPerSplit = 256;
// ------------------------------------------------------------------------------------------------

// The dp partials of kEpiBwdAct have one column per column tile (grouped_tiles_n): both
// tensor-core paths must tile N alike.
static_assert(sm90::TileConfig::kBN == sm80::TileConfig::kBN, "sm_80 and sm_90a column tiles differ");

int grouped_tile_n(moekit_dtype_t dtype) {
  return dtype == MOEKIT_DTYPE_F32 ? simt::TileConfig::kBN : sm80::TileConfig::kBN;
}

int grouped_tile_m(moekit_dtype_t dtype) {
  return dtype == MOEKIT_DTYPE_F32 ? simt::TileConfig::kBM : sm80::TileConfig::kBM;
}

int grouped_wgrad_splits(moekit_dtype_t dtype, int num_groups, int m, int n, int64_t max_rows) {
  const int bm = grouped_tile_m(dtype), bn = grouped_tile_n(dtype);
  const int64_t tiles = static_cast<int64_t>(num_groups) * ((m + bm - 1) / bm) * ((n + bn - 1) / bn);
  if (tiles >= kWgradTargetTiles) return 1;
  int64_t splits = (kWgradTargetTiles + tiles - 1) / tiles;
  const int64_t rows_per_group = max_rows / (num_groups > 0 ? num_groups : 1);
  const int64_t by_rows = rows_per_group / kWgradMinRowsPerSplit;
  if (splits > by_rows) splits = by_rows;
  if (splits > kWgradMaxSplits) splits = kWgradMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

size_t grouped_max_smem_bytes(moekit_dtype_t dtype, int num_groups) {
  if (dtype == MOEKIT_DTYPE_F32) {
    const size_t a = simt::GroupedGemmSimt<kAxisM, true, kEpiStore>::smem_bytes(num_groups);
    const size_t b = simt::GroupedGemmSimt<kAxisK, false, kEpiWgrad>::smem_bytes(num_groups);
    return a > b ? a : b;
  }
  using Cfg = sm80::TileConfig;
  size_t most = 0;
  for (size_t s : {sm80::SmemLayout<kAxisM, false, Cfg>::bytes(num_groups),
                   sm80::SmemLayout<kAxisM, true, Cfg>::bytes(num_groups),
                   sm80::SmemLayout<kAxisK, false, Cfg>::bytes(num_groups)})
    most = s > most ? s : most;
  return most;
}

size_t grouped_sm90_smem_bytes(int num_groups) {
  if (!sm90_built()) return 0;
  // The staged activation-backward kernel adapts: 4 stages where they fit the device, else 3, so
  // what it needs is its 3-stage layout (never more than the 4-stage ring of the others).
  // The TMA-store kernels likewise (their 3-stage layout).
  const size_t a = sm90::SmemLayout::bytes(num_groups), b = sm90::SmemLayoutBwdAct<3>::bytes(num_groups);
  const size_t c = sm90::SmemLayoutTmaStore<3>::bytes(num_groups);
  const size_t ab = a > b ? a : b;
  return ab > c ? ab : c;
}

bool grouped_sm90_built() { return sm90_built(); }

cudaError_t launch_grouped_gemm(moekit_dtype_t dtype, const GroupedGemmProblem& problem, EpiKind epilogue,
                                const EpilogueParams& params, cudaStream_t stream, GemmPath path) {
  const bool backward = problem.axis == kAxisK || problem.b_nk;
  if (path == kGemmPathSm90 && dtype != MOEKIT_DTYPE_F32 && sm90::takes(problem, epilogue)) {
    if (dtype == MOEKIT_DTYPE_BF16)
      return backward ? launch_sm90_backward<__nv_bfloat16>(problem, epilogue, params, stream)
                      : launch_sm90_forward<__nv_bfloat16>(problem, epilogue, params, stream);
    return backward ? launch_sm90_backward<__half>(problem, epilogue, params, stream)
                    : launch_sm90_forward<__half>(problem, epilogue, params, stream);
  }
  switch (dtype) {
    case MOEKIT_DTYPE_BF16:
      return backward ? launch_sm80_backward<__nv_bfloat16>(problem, epilogue, params, stream)
                      : launch_sm80_forward<__nv_bfloat16>(problem, epilogue, params, stream);
    case MOEKIT_DTYPE_F16:
      return backward ? launch_sm80_backward<__half>(problem, epilogue, params, stream)
                      : launch_sm80_forward<__half>(problem, epilogue, params, stream);
    case MOEKIT_DTYPE_F32: return launch_simt(problem, epilogue, params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::kernels::experts
