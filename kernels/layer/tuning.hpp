// Tuning numbers of the layer family's glue kernels, in one place. Plain C++ (no device code): the
// host side (src/layer) sizes workspaces from them and the kernels are built with them. The glue is
// memory-bound and small next to the GEMMs; the numbers come from reasoning about an H100/H200
// (132 SMs, 2048 threads each), to be checked with the per-stage table of moekit-demo and
// bench/layer/moekit-bench-layer (the "shared" and "projection backward" rows).
#pragma once

#include <cstdint>

namespace moekit::kernels::layer {

// Warp-per-token kernels (shared-expert add and gate backward): 8 warps per block, a grid of at
// most this many blocks striding over the tokens (8 resident blocks per SM fill an H100 twice).
constexpr int kTokenWarpsPerBlock = 8;
constexpr int kTokenThreads = 32 * kTokenWarpsPerBlock;
constexpr int kMaxTokenBlocks = 2048;

// Elementwise kernels (sum into dx, conversions, bias add): 256 threads, grid-stride.
constexpr int kElementThreads = 256;
constexpr int kMaxElementBlocks = 4096;

// Column sums over rows (db_r = sum_t dz_t, dw_g = sum_t dg_t x_t): one thread per column and
// per split of the rows; splits of at least kColumnRowsPerSplit rows, at most kColumnMaxSplits of
// them (then a second pass sums the splits in order). Depends only on the row count, so the
// reduction order (and the bits) never depend on the device.
constexpr int kColumnThreads = 256;
constexpr int64_t kColumnRowsPerSplit = 128;
constexpr int kColumnMaxSplits = 64;

inline int column_sum_splits(int64_t rows) {
  const int64_t s = (rows + kColumnRowsPerSplit - 1) / kColumnRowsPerSplit;
  return static_cast<int>(s < 1 ? 1 : (s > kColumnMaxSplits ? kColumnMaxSplits : s));
}

// fp32 partials a column sum needs in the workspace (0 when one split does it).
inline int64_t column_sum_partial_floats(int64_t rows, int32_t cols) {
  const int s = column_sum_splits(rows);
  return s > 1 ? static_cast<int64_t>(s) * cols : 0;
}

}  // namespace moekit::kernels::layer
