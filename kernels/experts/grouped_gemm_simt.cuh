// Grouped GEMM for fp32 inputs on the CUDA cores (no TF32): the same GroupedGemmProblem, tile
// schedule and fused epilogues as the tensor-core kernel, for correctness-first fp32 training and
// reference runs. docs/experts.md records its speed.
//
// Tiles: 64 x 128 x 16 per CTA of 256 threads; thread (tx, ty) of a 16 x 16 grid owns rows
// 4 ty .. 4 ty + 3 and the virtual columns 16 j + 4 s + {0..3} and 16 j + 8 + 4 s + {0..3}
// (j = tx / 2, s = tx % 2): under gate/up pairing the first four are gate columns and the second
// four their up columns, so the activation fuses as in the tensor-core kernel. Accumulation is in
// fp32, k ascending, one CTA per output tile: deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/grid.hpp"
#include "kernels/experts/epilogue.cuh"
#include "kernels/experts/grouped_problem.cuh"

namespace moekit::kernels::experts::simt {

struct TileConfig {
  static constexpr int kBM = 64;
  static constexpr int kBN = 128;
  static constexpr int kBK = 16;
  static constexpr int kThreads = 256;
  static constexpr int kGroupM = 8;
  static constexpr int kPad = 4;
};

template <int kAxis, bool kBNK, int kKind>
struct GroupedGemmSimt {
  using Cfg = TileConfig;
  static constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kThreads = Cfg::kThreads;
  static constexpr int kAPitch = kBM + Cfg::kPad;
  static constexpr int kBPitch = kBN + Cfg::kPad;
  static constexpr size_t kTileBytes = size_t(kBK) * (kAPitch + kBPitch) * sizeof(float);

  static size_t smem_bytes(int num_groups) {
    const size_t prefix = kAxis == kAxisM ? (size_t(num_groups) + 1 + kThreads / 32) * 4 : 0;
    return kTileBytes + prefix;
  }

  static __device__ void run(const GroupedGemmProblem& prob, const EpilogueParams& ep, unsigned char* smem_raw) {
    float* sA = reinterpret_cast<float*>(smem_raw);  // [BK][BM + pad], k-major
    float* sB = sA + kBK * kAPitch;                  // [BK][BN + pad]
    int32_t* s_prefix = reinterpret_cast<int32_t*>(smem_raw + kTileBytes);
    const float* A = static_cast<const float*>(prob.a);
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int c0 = 16 * (tx >> 1) + 4 * (tx & 1);  // first column group; second at c0 + 8
    const int tiles_n = (prob.n + kBN - 1) / kBN;
    const int tiles_m = kAxis == kAxisK ? (prob.m + kBM - 1) / kBM : 0;

    int64_t total;
    if constexpr (kAxis == kAxisM) {
      build_row_tile_prefix<kThreads>(prob.offsets, prob.num_groups, prob.max_rows, kBM, s_prefix,
                                      s_prefix + prob.num_groups + 1);
      total = RowTileSchedule{s_prefix, prob.num_groups, tiles_n, Cfg::kGroupM}.total_tiles();
    } else {
      total = WgradSchedule{prob.num_groups, tiles_m, tiles_n, prob.splits, Cfg::kGroupM}.total_tiles();
    }

    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
      int group, split = 0, n_tile, rows_valid = 0, m0 = 0;
      int64_t row0, k_len;
      const float* B;
      if constexpr (kAxis == kAxisM) {
        const RowTile rt = RowTileSchedule{s_prefix, prob.num_groups, tiles_n, Cfg::kGroupM}.decode(tile);
        int64_t gb, ge;
        group_rows(prob.offsets, rt.group, prob.max_rows, &gb, &ge);
        group = rt.group;
        n_tile = rt.n_tile;
        row0 = gb + static_cast<int64_t>(rt.row_tile) * kBM;
        rows_valid = static_cast<int>(ge - row0 < kBM ? ge - row0 : kBM);
        k_len = prob.k;
        B = static_cast<const float*>(prob.b) + group * prob.b_group_stride;
      } else {
        const WgradTile wt = WgradSchedule{prob.num_groups, tiles_m, tiles_n, prob.splits, Cfg::kGroupM}.decode(tile);
        int64_t gb, ge, sb, se;
        group_rows(prob.offsets, wt.group, prob.max_rows, &gb, &ge);
        split_rows(gb, ge, wt.split, prob.splits, &sb, &se);
        group = wt.group;
        split = wt.split;
        n_tile = wt.n_tile;
        m0 = wt.m_tile * kBM;
        row0 = sb;
        k_len = se - sb;
        B = static_cast<const float*>(prob.b);
      }
      const int n0 = n_tile * kBN;

      float acc[4][8];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

      for (int64_t k0 = 0; k0 < k_len; k0 += kBK) {
        // A tile -> sA[k][m]
#pragma unroll
        for (int i = 0; i < kBM * kBK / kThreads; ++i) {
          const int e = tid + i * kThreads;
          float v = 0.0f;
          int kr, m;
          if constexpr (kAxis == kAxisM) {
            m = e / kBK;
            kr = e % kBK;
            if (m < rows_valid && k0 + kr < k_len) v = A[(row0 + m) * prob.lda + k0 + kr];
          } else {
            kr = e / kBM;
            m = e % kBM;
            if (k0 + kr < k_len && m0 + m < prob.m) v = A[(row0 + k0 + kr) * prob.lda + m0 + m];
          }
          sA[kr * kAPitch + m] = v;
        }
        // B tile -> sB[k][n] (virtual columns)
#pragma unroll
        for (int i = 0; i < kBN * kBK / kThreads; ++i) {
          const int e = tid + i * kThreads;
          float v = 0.0f;
          int kr, n;
          if constexpr (kBNK) {
            n = e / kBK;
            kr = e % kBK;
            if (n0 + n < prob.n && k0 + kr < k_len) v = B[static_cast<int64_t>(n0 + n) * prob.ldb + k0 + kr];
          } else {
            kr = e / kBN;
            n = e % kBN;
            if (k0 + kr < k_len && n0 + n < prob.n) {
              const int64_t krow = kAxis == kAxisM ? k0 + kr : row0 + k0 + kr;
              v = B[krow * prob.ldb + b_column(n0 + n, prob.gate_up_half)];
            }
          }
          sB[kr * kBPitch + n] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          const float4 a = *reinterpret_cast<const float4*>(sA + kk * kAPitch + 4 * ty);
          const float4 b0 = *reinterpret_cast<const float4*>(sB + kk * kBPitch + c0);
          const float4 b1 = *reinterpret_cast<const float4*>(sB + kk * kBPitch + c0 + 8);
          const float av[4] = {a.x, a.y, a.z, a.w};
          const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
      }

      // Epilogue: acc[i][t] is (row 4 ty + i, column c0 + t), acc[i][4 + t] is column c0 + 8 + t.
      if constexpr (kAxis == kAxisK) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = m0 + 4 * ty + i;
          if (m >= prob.m) continue;
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int t = 0; t < 4; t += 2) {
              const int n = n0 + c0 + 8 * h + t;
              if (n < prob.n)
                wgrad_store_pair<float>(ep, prob.num_groups, prob.m, prob.n, group, split, prob.splits, m, n,
                                        acc[i][4 * h + t], acc[i][4 * h + t + 1]);
            }
        }
      } else {
        const float* bias = ep.bias ? static_cast<const float*>(ep.bias) + group * ep.bias_group_stride : nullptr;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int lr = 4 * ty + i;
          const int64_t row = row0 + lr;
          float dpsum = 0.0f;
          if (lr < rows_valid) {
            const float p = ep.row_weights ? ep.row_weights[row] : 1.0f;
            const EpilogueRow<float> er{ep, bias, row, p};
            if constexpr (kKind == kEpiGateUp) {
              if (!ep.interleaved) {
#pragma unroll
                for (int t = 0; t < 4; t += 2) {
                  const int v = n0 + c0 + t;  // gate columns; their up columns are at + 8
                  if (v < prob.n)
                    er.gate_up_pair2(paired_gate_index(v), acc[i][t], acc[i][t + 1], acc[i][4 + t], acc[i][5 + t]);
                }
              } else {
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                  for (int t = 0; t < 4; t += 2) {
                    const int v = n0 + c0 + 8 * h + t;
                    if (v < prob.n) er.gate_up_pair1(v >> 1, acc[i][4 * h + t], acc[i][4 * h + t + 1]);
                  }
              }
            } else {
#pragma unroll
              for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int t = 0; t < 4; t += 2) {
                  const int c = n0 + c0 + 8 * h + t;
                  if (c < prob.n)
                    dpsum += er.template plain_pair<kKind>(c, acc[i][4 * h + t], acc[i][4 * h + t + 1]);
                }
            }
          }
          if constexpr (kKind == kEpiBwdAct) {
            // The 16 threads of a row band are one half-warp: fixed xor tree over tx.
#pragma unroll
            for (int d = 8; d >= 1; d >>= 1) dpsum += __shfl_xor_sync(0xffffffffu, dpsum, d);
            if (tx == 0 && lr < rows_valid) ep.dp_partial[row * ep.ld_dp + n_tile] = dpsum;
          }
        }
      }
    }
  }
};

template <int kAxis, bool kBNK, int kKind>
__global__ void __launch_bounds__(TileConfig::kThreads)
    grouped_gemm_simt_kernel(const GroupedGemmProblem prob, const EpilogueParams ep) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  GroupedGemmSimt<kAxis, kBNK, kKind>::run(prob, ep, smem_raw);
}

template <int kAxis, bool kBNK, int kKind>
cudaError_t launch(const GroupedGemmProblem& prob, const EpilogueParams& ep, cudaStream_t stream) {
  using G = GroupedGemmSimt<kAxis, kBNK, kKind>;
  auto kernel = grouped_gemm_simt_kernel<kAxis, kBNK, kKind>;
  const int tiles_n = (prob.n + TileConfig::kBN - 1) / TileConfig::kBN;
  int64_t max_tiles;
  if (kAxis == kAxisM)
    max_tiles = max_row_tiles(prob.max_rows, prob.num_groups, TileConfig::kBM) * tiles_n;
  else
    max_tiles = WgradSchedule{prob.num_groups, (prob.m + TileConfig::kBM - 1) / TileConfig::kBM, tiles_n,
                              prob.splits, TileConfig::kGroupM}
                    .total_tiles();
  if (max_tiles <= 0) return cudaSuccess;
  const size_t smem = G::smem_bytes(prob.num_groups);
  if (const cudaError_t err = ensure_dynamic_smem(kernel, smem)) return err;
  const int32_t grid = resident_grid(kernel, TileConfig::kThreads, smem, max_tiles);
  kernel<<<grid, TileConfig::kThreads, smem, stream>>>(prob, ep);
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels::experts::simt
