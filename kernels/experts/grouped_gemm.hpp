// Host-visible interface of the expert kernels: the fused epilogues a grouped GEMM can end in, and
// thin launchers (raw pointers, a stream, a cudaError_t back). Device code lives in the .cuh/.cu
// files beside this one; src/experts calls only what is declared here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/experts/activation.cuh"
#include "kernels/experts/grouped_problem.cuh"
#include "moekit/status.h"

namespace moekit::kernels::experts {

// What a grouped GEMM does with its fp32 accumulator tile. p is the row's routing weight
// (row_weights[r], or 1 when NULL); b the group's bias row; round() the one rounding to the dtype.
enum EpiKind : int {
  // axis M, gate/up pairing or interleaved pairs: u = acc + b_gu;
  //   u_out <- round(u) (optional); c = h <- round(act(g, v) * (weight_after_down ? 1 : p)).
  kEpiGateUp = 0,
  // axis M, relu2: same with h <- round(relu(u)^2 * (weight_after_down ? 1 : p)).
  kEpiRelu2 = 1,
  // axis M: c <- round(s * acc + p * b), s = p when weight_after_down else 1 (bias optional).
  kEpiStore = 2,
  // axis M over h columns (N = I), acc = G = dout W_down^T: reads the saved u, writes
  //   c = du <- round(act'(u) * p * G) (in u's column layout), h <- round(act(u) * p),
  //   dp_partial[r, n_tile] <- sum over the tile's columns of G * act(u) (fixed order).
  kEpiBwdAct = 3,
  // axis K: c_g <- round(acc) (splits == 1) or split_out[split, g] <- acc (fp32, splits > 1).
  kEpiWgrad = 4,
};

struct EpilogueParams {
  void* c = nullptr;                  // see EpiKind
  int64_t ldc = 0;
  const void* bias = nullptr;         // group g's row at bias + g * bias_group_stride, or NULL
  int64_t bias_group_stride = 0;
  const float* row_weights = nullptr; // p [R] or NULL
  void* u = nullptr;                  // kEpiGateUp/kEpiRelu2: u_out (or NULL); kEpiBwdAct: saved u
  int64_t ldu = 0;
  void* h = nullptr;                  // kEpiBwdAct: h' [R, I]
  int64_t ldh = 0;
  float* dp_partial = nullptr;        // kEpiBwdAct: [R, ld_dp]
  int64_t ld_dp = 0;
  float* split_out = nullptr;         // kEpiWgrad with splits > 1: [splits, G, M, N] fp32
  ActParams act{kActSwiglu, 1.702f, 0.0f};
  int interleaved = 0;                // gate/up columns interleaved (else concatenated / relu2)
  int inter = 0;                      // I
  int weight_after_down = 0;
};

// One partial slot per CTA of the persistent grid: 132, the SM count of every compute capability
// 9.0 part (on a device with more SMs the kernels run without the tail). A slot holds a 128 x 256
// fp32 tile; one flag per consumer warp.
constexpr int kStreamKSlots = 132;
constexpr int kStreamKSlotFloats = 128 * 256;
constexpr int kStreamKSlotFlags = 8;
// Slots worth reserving for an axis-M GEMM of R rows, G groups, N columns and depth K: none where
// K is too short for the tail (kStreamKMinKTiles k tiles of 64), else no more than it can have
// tiles (64-row tiles, the smallest), so small problems do not carry 16 MB of slots.
inline int stream_k_slots(int64_t max_rows, int num_groups, int n, int k) {
  if (max_rows <= 0 || (k + 63) / 64 < kStreamKMinKTiles) return 0;
  const int64_t tiles = max_row_tiles(max_rows, num_groups, 64) * ((n + 255) / 256);
  return static_cast<int>(tiles < kStreamKSlots ? tiles : kStreamKSlots);
}

// Tile shapes of each kernel family (docs/experts.md says how they were chosen). The dp partial
// buffer of kEpiBwdAct has one column per column tile of the I dimension.
int grouped_tile_n(moekit_dtype_t dtype);
int grouped_tile_m(moekit_dtype_t dtype);
inline int grouped_tiles_n(moekit_dtype_t dtype, int n) {
  const int bn = grouped_tile_n(dtype);
  return (n + bn - 1) / bn;
}
// Row splits of a weight gradient C_g[M, N] over G groups and R rows: > 1 only when the tiles of
// all groups together would leave most SMs idle (depends only on its arguments).
int grouped_wgrad_splits(moekit_dtype_t dtype, int num_groups, int m, int n, int64_t max_rows);

// Dynamic shared memory the largest grouped-GEMM instance of this dtype needs with G groups.
size_t grouped_max_smem_bytes(moekit_dtype_t dtype, int num_groups);

// Which tensor-core kernels a bf16/f16 grouped GEMM runs on (fp32 always runs the SIMT kernel).
enum GemmPath : int {
  kGemmPathSm80 = 0,  // mma.sync + cp.async (grouped_gemm_sm80.cuh)
  kGemmPathSm90 = 1,  // TMA + wgmma (grouped_gemm_sm90.cuh) where sm90::takes() the problem,
                      // else the sm_80 kernels; the caller checked the device and the build
};

// Runs one grouped GEMM with a fused epilogue: bf16/f16 through the mma.sync kernel (or the
// wgmma kernel on kGemmPathSm90), f32 through the SIMT kernel.
cudaError_t launch_grouped_gemm(moekit_dtype_t dtype, const GroupedGemmProblem& problem,
                                EpiKind epilogue, const EpilogueParams& params, cudaStream_t stream,
                                GemmPath path = kGemmPathSm80);

// Dynamic shared memory the sm_90a kernels need with G groups (0 when they are not built).
size_t grouped_sm90_smem_bytes(int num_groups);
// Whether this build holds the sm_90a kernels (gpu_archs containing 90).
bool grouped_sm90_built();

// dp finish: for every row r inside a segment,
//   grad_row_weights[r] = sum_{t < tiles} dp_partial[r, t] + <dout_r, b_down[e]> (b_down optional).
cudaError_t launch_dp_finish(moekit_dtype_t dtype, int num_groups, const int32_t* offsets,
                             int64_t max_rows, const float* dp_partial, int tiles,
                             const void* grad_out, const void* b_down, int hidden,
                             float* grad_row_weights, cudaStream_t stream);

// Column sums per group: out[g, c] = round(sum_{r in segment g} s_r x[r, c]) with s_r = scale[r]
// (or 1 when scale is NULL), rows in order, split into `splits` row chunks whose fp32 partials
// (workspace partial [splits, G, N]) are summed in chunk order. offsets NULL means one group of
// num_rows rows (the dense MLP).
cudaError_t launch_column_sums(moekit_dtype_t dtype, int num_groups, const int32_t* offsets,
                               int64_t num_rows, const void* x, int n, const float* scale,
                               int splits, float* partial, void* out, cudaStream_t stream);
int column_sum_splits(int num_groups, int n, int64_t num_rows);

// out[i] = round(sum_{s < splits} in[s * count + i]) in split order.
cudaError_t launch_split_sum(moekit_dtype_t dtype, const float* in, int splits, int64_t count,
                             void* out, cudaStream_t stream);

// Dense MLP elementwise activation, forward: from the fp32 GEMM output u32 [T, NU] (+ bias),
//   u_out <- round(u) (optional), h <- round(act(u)).
cudaError_t launch_mlp_act_forward(moekit_dtype_t dtype, const ActParams& act, int interleaved,
                                   int64_t rows, int inter, const float* u32, const void* bias,
                                   void* u_out, void* h, cudaStream_t stream);
// Backward: u either saved (dtype) or recomputed fp32 (+ bias, rounded to the dtype first, so
// both give bitwise the same result); G fp32 [T, I]. du <- round(act'(u) G), h' <- round(act(u)).
cudaError_t launch_mlp_act_backward(moekit_dtype_t dtype, const ActParams& act, int interleaved,
                                    int64_t rows, int inter, const void* u_saved,
                                    const float* u32, const void* bias, const float* grad_h,
                                    void* du, void* h, cudaStream_t stream);

}  // namespace moekit::kernels::experts
