// Grouped GEMM for bf16/f16 on tensor cores (sm_80 and later): mma.sync m16n8k16 with fp32
// accumulators, ldmatrix fragment loads, a kStages-deep cp.async shared-memory pipeline and a
// persistent grid walking the device-side tile schedule of grouped_problem.cuh; the fused
// epilogues of epilogue.cuh run straight from the accumulator registers.
//
// Maths: GroupedGemmProblem (grouped_problem.cuh): axis M, C[rows_g, N] = A[rows_g, K] B_g with B_g
// [K, N] (KN) or [N, K] (NK); axis K, C_g[M, N] = X_g^T Y_g over the group's rows. Every
// accumulation runs in fp32 in a fixed order (k ascending within a tile; no split-K within the
// kernel), so results are bitwise reproducible; axis-K row splits write fp32 partials that a
// second pass sums in split order.
//
// Tiles (TileConfig; chosen as docs/experts.md records): 128 x 256 x 32 per CTA, 8 warps as 2 (M) x
// 4 (N), 64 x 64 per warp (4 x 8 mma tiles, 128 fp32 accumulators per thread), 4 stages.
// Shared memory rows are padded by 8 elements (16 bytes): with row pitches of 80, 272 and 528 bytes
// the 8 row addresses of every ldmatrix phase fall into 8 distinct 16-byte bank groups, so
// fragment loads are free of bank conflicts.
// Out-of-range rows and columns are zero-filled by cp.async's src-size operand (their source
// address is the tensor's base, never read), so tails of any size are exact; nothing past a
// segment is read and no store leaves the tile's valid rows and columns.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/experts/epilogue.cuh"
#include "kernels/experts/grouped_problem.cuh"
#include "kernels/experts/mma_layout.cuh"

namespace moekit::kernels::experts::sm80 {

struct TileConfig {
  static constexpr int kBM = 128;
  static constexpr int kBN = 256;
  static constexpr int kBK = 32;
  static constexpr int kWarpsM = 2;
  static constexpr int kWarpsN = 4;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kStages = 4;
  static constexpr int kGroupM = 8;  // panel height of the tile swizzle
  static constexpr int kPad = 8;     // elements of padding per shared-memory row
  static constexpr int kWM = kBM / kWarpsM;
  static constexpr int kWN = kBN / kWarpsN;
  static constexpr int kMI = kWM / 16;
  static constexpr int kNI = kWN / 8;
};

template <int kAxis, bool kBNK, class Cfg>
struct SmemLayout {
  // A: axis M keeps [BM][BK + pad] (k contiguous); axis K keeps X^T as [BK][BM + pad].
  static constexpr int kAElems =
      kAxis == kAxisM ? Cfg::kBM * (Cfg::kBK + Cfg::kPad) : Cfg::kBK * (Cfg::kBM + Cfg::kPad);
  // B: KN keeps [BK][BN + pad] (n contiguous); NK keeps [BN][BK + pad].
  static constexpr int kBElems =
      kBNK ? Cfg::kBN * (Cfg::kBK + Cfg::kPad) : Cfg::kBK * (Cfg::kBN + Cfg::kPad);
  static constexpr size_t kPipelineBytes = size_t(Cfg::kStages) * (kAElems + kBElems) * 2;
  static constexpr size_t kDpBytes = size_t(Cfg::kBM) * Cfg::kWarpsN * sizeof(float);
  static size_t bytes(int num_groups) {
    const size_t prefix = kAxis == kAxisM ? (size_t(num_groups) + 1 + Cfg::kThreads / 32) * 4 : 0;
    return kPipelineBytes + kDpBytes + prefix;
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills the destination without reading the source.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Where one tile lives: everything the loads and the epilogue need.
template <class T>
struct TileCtx {
  const T* a;         // A (axis M) or X (axis K) base
  const T* b;         // B_g (axis M) or Y (axis K)
  int64_t row0;       // axis M: first row of the tile; axis K: first row of the split
  int64_t k_len;      // reduction length (K, or rows of the split)
  int rows_valid;     // axis M: rows of the tile inside the segment (<= BM)
  int m0;             // axis K: first output row
  int n0;             // first (virtual) output column
  int n_tile;
  int group;
  int split;
};

template <class T, int kAxis, bool kBNK, int kKind, class Cfg>
struct GroupedGemmSm80 {
  using Smem = SmemLayout<kAxis, kBNK, Cfg>;
  static constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kPad = Cfg::kPad;
  static constexpr int kThreads = Cfg::kThreads;
  static constexpr int kMI = Cfg::kMI, kNI = Cfg::kNI;

  static_assert(kAxis == kAxisM || !kBNK, "axis K reads Y row-major (KN)");
  static_assert((kBM * kBK / 8) % kThreads == 0 && (kBN * kBK / 8) % kThreads == 0, "even copy split");

  // Issues the cp.async copies of k tile kt into one pipeline stage.
  static __device__ __forceinline__ void load_stage(T* sA, T* sB, const TileCtx<T>& t,
                                                    const GroupedGemmProblem& prob, int kt, int tid) {
    const int k0 = kt * kBK;
    if constexpr (kAxis == kAxisM) {
      constexpr int kChunksPerRow = kBK / 8;
#pragma unroll
      for (int i = 0; i < kBM * kChunksPerRow / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int r = c / kChunksPerRow, kc = c % kChunksPerRow;
        const int64_t k = k0 + kc * 8;
        const bool valid = r < t.rows_valid && k < t.k_len;
        const T* src = valid ? t.a + (t.row0 + r) * prob.lda + k : t.a;
        cp_async_16(smem_addr(sA + r * (kBK + kPad) + kc * 8), src, valid);
      }
    } else {
      constexpr int kChunksPerRow = kBM / 8;
#pragma unroll
      for (int i = 0; i < kBK * kChunksPerRow / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int kr = c / kChunksPerRow, mc = c % kChunksPerRow;
        const int m = t.m0 + mc * 8;
        const bool valid = k0 + kr < t.k_len && m < prob.m;
        const T* src = valid ? t.a + (t.row0 + k0 + kr) * prob.lda + m : t.a;
        cp_async_16(smem_addr(sA + kr * (kBM + kPad) + mc * 8), src, valid);
      }
    }
    if constexpr (kBNK) {
      constexpr int kChunksPerRow = kBK / 8;
#pragma unroll
      for (int i = 0; i < kBN * kChunksPerRow / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int n = c / kChunksPerRow, kc = c % kChunksPerRow;
        const int64_t k = k0 + kc * 8;
        const bool valid = t.n0 + n < prob.n && k < t.k_len;
        const T* src = valid ? t.b + static_cast<int64_t>(t.n0 + n) * prob.ldb + k : t.b;
        cp_async_16(smem_addr(sB + n * (kBK + kPad) + kc * 8), src, valid);
      }
    } else {
      constexpr int kChunksPerRow = kBN / 8;
#pragma unroll
      for (int i = 0; i < kBK * kChunksPerRow / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int kr = c / kChunksPerRow, nc = c % kChunksPerRow;
        const int v = t.n0 + nc * 8;
        const bool valid = k0 + kr < t.k_len && v < prob.n;
        const int64_t krow = kAxis == kAxisM ? static_cast<int64_t>(k0 + kr) : t.row0 + k0 + kr;
        const T* src = valid ? t.b + krow * prob.ldb + b_column(v, prob.gate_up_half) : t.b;
        cp_async_16(smem_addr(sB + kr * (kBN + kPad) + nc * 8), src, valid);
      }
    }
  }

  // Two k16 steps of mma over one stage.
  static __device__ __forceinline__ void compute_stage(const T* sA, const T* sB, float (&acc)[kMI][kNI][4],
                                                       int wm, int wn, int lane) {
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[kMI][4];
      uint32_t bf[kNI][2];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        const int m = wm * Cfg::kWM + mi * 16;
        if constexpr (kAxis == kAxisM)
          ldmatrix_x4(af[mi], smem_addr(sA + ldsm_offset_a_mk(lane, m, kk, kBK + kPad)));
        else
          ldmatrix_x4_trans(af[mi], smem_addr(sA + ldsm_offset_a_km(lane, m, kk, kBM + kPad)));
      }
#pragma unroll
      for (int np = 0; np < kNI / 2; ++np) {
        uint32_t r[4];
        const int n = wn * Cfg::kWN + np * 16;
        if constexpr (kBNK)
          ldmatrix_x4(r, smem_addr(sB + ldsm_offset_b_nk(lane, n, kk, kBK + kPad)));
        else
          ldmatrix_x4_trans(r, smem_addr(sB + ldsm_offset_b_kn(lane, n, kk, kBN + kPad)));
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }

  static __device__ __forceinline__ bool make_tile(const GroupedGemmProblem& prob, const int32_t* s_prefix,
                                                   int tiles_m, int tiles_n, int64_t tile, TileCtx<T>* t) {
    t->a = static_cast<const T*>(prob.a);
    if constexpr (kAxis == kAxisM) {
      const RowTileSchedule sched{s_prefix, prob.num_groups, tiles_n, Cfg::kGroupM};
      const RowTile rt = sched.decode(tile);
      int64_t gb, ge;
      group_rows(prob.offsets, rt.group, prob.max_rows, &gb, &ge);
      t->group = rt.group;
      t->split = 0;
      t->row0 = gb + static_cast<int64_t>(rt.row_tile) * kBM;
      const int64_t rest = ge - t->row0;
      t->rows_valid = static_cast<int>(rest < kBM ? rest : kBM);
      t->k_len = prob.k;
      t->m0 = 0;
      t->n_tile = rt.n_tile;
      t->n0 = rt.n_tile * kBN;
      t->b = static_cast<const T*>(prob.b) + rt.group * prob.b_group_stride;
    } else {
      const WgradSchedule sched{prob.num_groups, tiles_m, tiles_n, prob.splits, Cfg::kGroupM};
      const WgradTile wt = sched.decode(tile);
      int64_t gb, ge, sb, se;
      group_rows(prob.offsets, wt.group, prob.max_rows, &gb, &ge);
      split_rows(gb, ge, wt.split, prob.splits, &sb, &se);
      t->group = wt.group;
      t->split = wt.split;
      t->row0 = sb;
      t->k_len = se - sb;
      t->rows_valid = 0;
      t->m0 = wt.m_tile * kBM;
      t->n_tile = wt.n_tile;
      t->n0 = wt.n_tile * kBN;
      t->b = static_cast<const T*>(prob.b);
    }
    return true;
  }

  static __device__ __forceinline__ void prologue(T* sA, T* sB, const TileCtx<T>& t,
                                                  const GroupedGemmProblem& prob, int tid) {
    const int64_t ktiles = (t.k_len + kBK - 1) / kBK;
#pragma unroll
    for (int s = 0; s < Cfg::kStages - 1; ++s) {
      if (s < ktiles) load_stage(sA + s * Smem::kAElems, sB + s * Smem::kBElems, t, prob, s, tid);
      cp_async_commit();
    }
  }

  static __device__ __forceinline__ void mainloop(T* sA, T* sB, const TileCtx<T>& t,
                                                  const GroupedGemmProblem& prob, float (&acc)[kMI][kNI][4],
                                                  int tid, int wm, int wn, int lane) {
    const int ktiles = static_cast<int>((t.k_len + kBK - 1) / kBK);
    for (int kt = 0; kt < ktiles; ++kt) {
      cp_async_wait<Cfg::kStages - 2>();
      __syncthreads();  // stage kt landed for every thread; stage kt - 1 is free again
      const int pf = kt + Cfg::kStages - 1;
      if (pf < ktiles) {
        const int s = pf % Cfg::kStages;
        load_stage(sA + s * Smem::kAElems, sB + s * Smem::kBElems, t, prob, pf, tid);
      }
      cp_async_commit();
      const int s = kt % Cfg::kStages;
      compute_stage(sA + s * Smem::kAElems, sB + s * Smem::kBElems, acc, wm, wn, lane);
    }
  }

  static __device__ __forceinline__ void epilogue(const TileCtx<T>& t, const GroupedGemmProblem& prob,
                                                  const EpilogueParams& ep, float (&acc)[kMI][kNI][4],
                                                  float* s_dp, int tid, int wm, int wn, int lane) {
    // Accumulator element (mi, ni, 2 half + e) sits at tile row wm kWM + 16 mi + acc_row(lane, 2 half)
    // and column wn kWN + 8 ni + acc_col(lane, e) (mma_layout.cuh).
    const int q = lane & 3;
    const int col_base = t.n0 + wn * Cfg::kWN + acc_col(lane, 0);
    if constexpr (kAxis == kAxisK) {
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int m = t.m0 + wm * Cfg::kWM + mi * 16 + acc_row(lane, 2 * half);
          if (m >= prob.m) continue;
#pragma unroll
          for (int ni = 0; ni < kNI; ++ni) {
            const int n = col_base + ni * 8;
            if (n < prob.n)
              wgrad_store_pair<T>(ep, prob.num_groups, prob.m, prob.n, t.group, t.split, prob.splits, m, n,
                                  acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
          }
        }
    } else {
      const T* bias = ep.bias ? static_cast<const T*>(ep.bias) + t.group * ep.bias_group_stride : nullptr;
      float dp[kMI][2];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int lr = wm * Cfg::kWM + mi * 16 + acc_row(lane, 2 * half);
          const int64_t row = t.row0 + lr;
          float dpsum = 0.0f;
          if (lr < t.rows_valid) {
            const float p = ep.row_weights ? ep.row_weights[row] : 1.0f;
            const EpilogueRow<T> er{ep, bias, row, p};
            if constexpr (kKind == kEpiGateUp) {
              if (!ep.interleaved) {
#pragma unroll
                for (int ni = 0; ni < kNI; ni += 2) {
                  const int v = col_base + ni * 8;  // virtual gate column (block ni even)
                  if (v < prob.n)
                    er.gate_up_pair2(paired_gate_index(v), acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1],
                                     acc[mi][ni + 1][2 * half], acc[mi][ni + 1][2 * half + 1]);
                }
              } else {
#pragma unroll
                for (int ni = 0; ni < kNI; ++ni) {
                  const int v = col_base + ni * 8;  // even: gate, v + 1: up
                  if (v < prob.n) er.gate_up_pair1(v >> 1, acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
                }
              }
            } else {
#pragma unroll
              for (int ni = 0; ni < kNI; ++ni) {
                const int c = col_base + ni * 8;
                if (c < prob.n)
                  dpsum += er.template plain_pair<kKind>(c, acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
              }
            }
          }
          dp[mi][half] = dpsum;
        }
      if constexpr (kKind == kEpiBwdAct) {
        // Row sums of G * act(u): the 4 lanes of a row (fixed xor tree), then the kWarpsN warps
        // of a row band in warp order.
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float v = dp[mi][half];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (q == 0) s_dp[wn * kBM + wm * Cfg::kWM + mi * 16 + acc_row(lane, 2 * half)] = v;
          }
        __syncthreads();
        if (tid < kBM && tid < t.rows_valid) {
          float s = 0.0f;
#pragma unroll
          for (int w = 0; w < Cfg::kWarpsN; ++w) s += s_dp[w * kBM + tid];
          ep.dp_partial[(t.row0 + tid) * ep.ld_dp + t.n_tile] = s;
        }
        __syncthreads();
      }
    }
  }

  static __device__ __forceinline__ void run(const GroupedGemmProblem& prob, const EpilogueParams& ep,
                                             unsigned char* smem_raw) {
    T* sA = reinterpret_cast<T*>(smem_raw);
    T* sB = sA + Cfg::kStages * Smem::kAElems;
    float* s_dp = reinterpret_cast<float*>(smem_raw + Smem::kPipelineBytes);
    int32_t* s_prefix = reinterpret_cast<int32_t*>(smem_raw + Smem::kPipelineBytes + Smem::kDpBytes);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;
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

    int64_t tile = blockIdx.x;
    TileCtx<T> cur{};
    if (tile < total) {
      make_tile(prob, s_prefix, tiles_m, tiles_n, tile, &cur);
      prologue(sA, sB, cur, prob, tid);
    }
    while (tile < total) {
      float acc[kMI][kNI][4];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
      mainloop(sA, sB, cur, prob, acc, tid, wm, wn, lane);
      cp_async_wait<0>();
      __syncthreads();  // every warp is done with the stages: the next tile may refill them
      const int64_t next = tile + gridDim.x;
      TileCtx<T> nxt{};
      if (next < total) {
        make_tile(prob, s_prefix, tiles_m, tiles_n, next, &nxt);
        prologue(sA, sB, nxt, prob, tid);  // overlaps this tile's epilogue
      }
      epilogue(cur, prob, ep, acc, s_dp, tid, wm, wn, lane);
      cur = nxt;
      tile = next;
    }
    cp_async_wait<0>();
  }
};

template <class T, int kAxis, bool kBNK, int kKind, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    grouped_gemm_sm80_kernel(const GroupedGemmProblem prob, const EpilogueParams ep) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  GroupedGemmSm80<T, kAxis, kBNK, kKind, Cfg>::run(prob, ep, smem_raw);
}

// Launch: a persistent grid of min(worst-case tile count, resident CTAs) blocks.
template <class T, int kAxis, bool kBNK, int kKind>
cudaError_t launch(const GroupedGemmProblem& prob, const EpilogueParams& ep, cudaStream_t stream) {
  using Cfg = TileConfig;
  using Smem = SmemLayout<kAxis, kBNK, Cfg>;
  auto kernel = grouped_gemm_sm80_kernel<T, kAxis, kBNK, kKind, Cfg>;
  const int tiles_n = (prob.n + Cfg::kBN - 1) / Cfg::kBN;
  int64_t max_tiles;
  if (kAxis == kAxisM)
    max_tiles = max_row_tiles(prob.max_rows, prob.num_groups, Cfg::kBM) * tiles_n;
  else
    max_tiles = WgradSchedule{prob.num_groups, (prob.m + Cfg::kBM - 1) / Cfg::kBM, tiles_n, prob.splits,
                              Cfg::kGroupM}
                    .total_tiles();
  if (max_tiles <= 0) return cudaSuccess;
  const size_t smem = Smem::bytes(prob.num_groups);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0, per_sm = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads, smem)) != cudaSuccess)
    return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  const int64_t resident = static_cast<int64_t>(sms) * per_sm;
  const int grid = static_cast<int>(max_tiles < resident ? max_tiles : resident);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(prob, ep);
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels::experts::sm80
