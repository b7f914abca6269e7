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
#include <utility>

#include "kernels/common/grid.hpp"
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
  // Axis M: the routing weights of a tile's rows, double-buffered by tile parity (loaded before
  // the main loop, read by the epilogue, so their latency hides behind the k loop).
  static constexpr size_t kRowWeightBytes = kAxis == kAxisM ? size_t(2) * Cfg::kBM * sizeof(float) : 0;
  static size_t bytes(int num_groups) {
    const size_t prefix = kAxis == kAxisM ? (size_t(num_groups) + 1 + Cfg::kThreads / 32) * 4 : 0;
    return kPipelineBytes + kDpBytes + kRowWeightBytes + prefix;
  }
};

// Calls f(std::integral_constant<int, i>{}) for i = 0 .. N - 1 in order: an unrolled loop whose
// index is a constant expression in the body, for the epilogue, whose per-row code is too large
// for the compiler's unroll budget (a rolled loop would index the accumulators at run time and
// move them to local memory).
template <class F, int... kI>
__device__ __forceinline__ void static_for_impl(F&& f, std::integer_sequence<int, kI...>) {
  (f(std::integral_constant<int, kI>{}), ...);
}
template <int kN, class F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, kN>{});
}

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
// 4-byte async copy (.ca: the only cache mode for sizes below 16); src_bytes = 0 zero-fills.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
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

// One operand's share of the cp.async copies of a thread (copy_row / copy_col, mma_layout.cuh):
// the global address of its chunk 0 at the current k tile, advanced by a fixed step per k tile;
// chunk i lies i * chunk_stride elements further. Which chunks are inside the operand is settled
// per tile (outer_mask: rows of the segment, or output columns) and per k tile (the k bound); an
// outside chunk copies 0 bytes (zero fill) from the tensor's base address, never read.
struct OperandCopy {
  uint64_t addr;          // byte address of chunk 0 at the current k tile (may lie past the tensor
                          // when the chunk is outside; then it is never used)
  int64_t chunk_stride;   // bytes between chunks i and i + 1
  int64_t k_step;         // bytes per k tile
  uint32_t outer_mask;    // bit i: chunk i is inside the rows / columns of the operand
  int k_first;            // k offset inside the k tile of chunk 0 (k along columns: of every chunk)
};

template <class T, int kAxis, bool kBNK, int kKind, class Cfg>
struct GroupedGemmSm80 {
  using Smem = SmemLayout<kAxis, kBNK, Cfg>;
  static constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kPad = Cfg::kPad;
  static constexpr int kThreads = Cfg::kThreads;
  static constexpr int kMI = Cfg::kMI, kNI = Cfg::kNI;
  static constexpr int kKSteps = kBK / 16;

  // Stored tiles: A is [BM][BK] (axis M, k along columns) or [BK][BM] (axis K, k along rows);
  // B is [BN][BK] (NK, k along columns) or [BK][BN] (KN, k along rows); every row padded by kPad.
  static constexpr bool kAKCols = kAxis == kAxisM;
  static constexpr int kACols = kAKCols ? kBK : kBM;
  static constexpr int kAPitch = kACols + kPad;
  static constexpr int kACpr = kACols / 8;
  static constexpr int kAChunks = kBM * kBK / 8 / kThreads;
  static constexpr int kARowStep = kThreads / kACpr;
  static constexpr bool kBKCols = kBNK;
  static constexpr int kBCols = kBKCols ? kBK : kBN;
  static constexpr int kBPitch = kBCols + kPad;
  static constexpr int kBCpr = kBCols / 8;
  static constexpr int kBChunks = kBN * kBK / 8 / kThreads;
  static constexpr int kBRowStep = kThreads / kBCpr;
  static constexpr uint32_t kAStageBytes = Smem::kAElems * 2;
  static constexpr uint32_t kBStageBytes = Smem::kBElems * 2;

  static_assert(kAxis == kAxisM || !kBNK, "axis K reads Y row-major (KN)");
  static_assert(kBK % 32 == 0, "k steps come in pairs (fragment double buffer)");
  static_assert((kBM * kBK / 8) % kThreads == 0 && (kBN * kBK / 8) % kThreads == 0, "even copy split");
  static_assert(kThreads % kACpr == 0 && kThreads % kBCpr == 0, "whole rows per thread group");
  static_assert((kACpr == 4 || kACpr % 8 == 0) && (kBCpr == 4 || kBCpr % 8 == 0), "copy_row layouts");
  static_assert(kAChunks <= 32 && kBChunks <= 32, "outer masks are 32 bits");

  // Copy state of A and B for tile t, positioned at k tile kt0.
  static __device__ __forceinline__ void make_copies(const TileCtx<T>& t, const GroupedGemmProblem& prob, int tid,
                                                     int kt0, OperandCopy* ca, OperandCopy* cb) {
    const int64_t esz = static_cast<int64_t>(sizeof(T));
    {
      const int r0 = copy_row(tid, 0, kACpr, kThreads), col = copy_col(tid, kACpr);
      int64_t elem;  // element offset of chunk 0 at k tile 0
      if constexpr (kAKCols) {
        // A [rows][K]: chunk rows are tile rows, the column is k.
        elem = (t.row0 + r0) * prob.lda + col;
        ca->chunk_stride = static_cast<int64_t>(kARowStep) * prob.lda * esz;
        ca->k_step = static_cast<int64_t>(kBK) * esz;
        uint32_t mask = 0;
#pragma unroll
        for (int i = 0; i < kAChunks; ++i) mask |= (r0 + i * kARowStep < t.rows_valid ? 1u : 0u) << i;
        ca->outer_mask = mask;
        ca->k_first = col;
      } else {
        // X [rows][M] read as X^T: chunk rows are k (rows of the split), the column is m.
        elem = (t.row0 + r0) * prob.lda + t.m0 + col;
        ca->chunk_stride = static_cast<int64_t>(kARowStep) * prob.lda * esz;
        ca->k_step = static_cast<int64_t>(kBK) * prob.lda * esz;
        ca->outer_mask = t.m0 + col < prob.m ? ~0u : 0u;
        ca->k_first = r0;
      }
      ca->addr = reinterpret_cast<uint64_t>(t.a) + static_cast<uint64_t>(elem * esz) +
                 static_cast<uint64_t>(kt0) * static_cast<uint64_t>(ca->k_step);
    }
    {
      const int r0 = copy_row(tid, 0, kBCpr, kThreads), col = copy_col(tid, kBCpr);
      int64_t elem;
      if constexpr (kBKCols) {
        // B_g [N][K]: chunk rows are output columns, the column is k.
        elem = static_cast<int64_t>(t.n0 + r0) * prob.ldb + col;
        cb->chunk_stride = static_cast<int64_t>(kBRowStep) * prob.ldb * esz;
        cb->k_step = static_cast<int64_t>(kBK) * esz;
        uint32_t mask = 0;
#pragma unroll
        for (int i = 0; i < kBChunks; ++i) mask |= (t.n0 + r0 + i * kBRowStep < prob.n ? 1u : 0u) << i;
        cb->outer_mask = mask;
        cb->k_first = col;
      } else {
        // B_g [K][N] (axis M) or Y [rows][N] (axis K): chunk rows are k, the column is a
        // (virtual) output column, stored at b_column (gate/up pairing).
        const int v = t.n0 + col;
        const int64_t krow = kAxis == kAxisM ? static_cast<int64_t>(r0) : t.row0 + r0;
        elem = krow * prob.ldb + (v < prob.n ? b_column(v, prob.gate_up_half) : 0);
        cb->chunk_stride = static_cast<int64_t>(kBRowStep) * prob.ldb * esz;
        cb->k_step = static_cast<int64_t>(kBK) * prob.ldb * esz;
        cb->outer_mask = v < prob.n ? ~0u : 0u;
        cb->k_first = r0;
      }
      cb->addr = reinterpret_cast<uint64_t>(t.b) + static_cast<uint64_t>(elem * esz) +
                 static_cast<uint64_t>(kt0) * static_cast<uint64_t>(cb->k_step);
    }
  }

  // Issues one operand's chunks of the current k tile (k_rem = reduction length left from the
  // tile's first k) into a stage at shared address dst0 (this thread's chunk 0), then steps on.
  template <int kChunks, bool kKCols, int kRowStep, int kPitch>
  static __device__ __forceinline__ void copy_operand(OperandCopy& c, uint32_t dst0, int k_rem,
                                                      const void* fallback) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int k = kKCols ? c.k_first : c.k_first + i * kRowStep;
      const bool valid = ((c.outer_mask >> i) & 1u) && k < k_rem;
      const void* src = valid ? reinterpret_cast<const void*>(c.addr + static_cast<uint64_t>(i * c.chunk_stride))
                              : fallback;
      cp_async_16(dst0 + static_cast<uint32_t>(i * kRowStep * kPitch * 2), src, valid);
    }
    c.addr += static_cast<uint64_t>(c.k_step);
  }

  // Reduction length of k tile kt inside the tile's range, clamped to [0, BK]: BK for the full k
  // tiles, the tail for the last, 0 past the end (then every chunk zero-fills: no branch needed).
  static __device__ __forceinline__ int k_rem_of(const TileCtx<T>& t, int kt) {
    const int64_t left = t.k_len - static_cast<int64_t>(kt) * kBK;
    return left >= kBK ? kBK : (left > 0 ? static_cast<int>(left) : 0);
  }

  // The copies of k tile kt (A, then B) into stage `stage`, k_rem = k_rem_of(t, kt).
  static __device__ __forceinline__ void load_stage(uint32_t sA_copy, uint32_t sB_copy, OperandCopy& ca,
                                                    OperandCopy& cb, const GroupedGemmProblem& prob, int k_rem,
                                                    int stage) {
    copy_operand<kAChunks, kAKCols, kARowStep, kAPitch>(ca, sA_copy + stage * kAStageBytes, k_rem, prob.a);
    copy_operand<kBChunks, kBKCols, kBRowStep, kBPitch>(cb, sB_copy + stage * kBStageBytes, k_rem, prob.b);
  }

  // Shared addresses of this thread's chunk 0 in stage 0 (copies) and of its ldmatrix rows for
  // k step 0 of stage 0 (fragments).
  static __device__ __forceinline__ uint32_t copy_dst_a(uint32_t sA, int tid) {
    return sA + static_cast<uint32_t>((copy_row(tid, 0, kACpr, kThreads) * kAPitch + copy_col(tid, kACpr)) * 2);
  }
  static __device__ __forceinline__ uint32_t copy_dst_b(uint32_t sB, int tid) {
    return sB + static_cast<uint32_t>((copy_row(tid, 0, kBCpr, kThreads) * kBPitch + copy_col(tid, kBCpr)) * 2);
  }

  // Fragments of one k16 step: A for the warp's kMI m16 blocks, B for its kNI n8 blocks.
  struct Frags {
    uint32_t a[kMI][4];
    uint32_t b[kNI][2];
  };

  // ldmatrix of k step kk (0 .. kKSteps - 1) from a stage; a_rd / b_rd: the lane's addresses for
  // m block 0 / n block pair 0 at k step 0 of that stage. Offsets of the other blocks and k steps
  // are compile-time constants.
  static __device__ __forceinline__ void load_frags(Frags& f, uint32_t a_rd, uint32_t b_rd, int kk) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
      if constexpr (kAKCols)
        ldmatrix_x4(f.a[mi], a_rd + static_cast<uint32_t>((mi * 16 * kAPitch + kk * 16) * 2));
      else
        ldmatrix_x4_trans(f.a[mi], a_rd + static_cast<uint32_t>((kk * 16 * kAPitch + mi * 16) * 2));
    }
#pragma unroll
    for (int np = 0; np < kNI / 2; ++np) {
      uint32_t r[4];
      if constexpr (kBKCols)
        ldmatrix_x4(r, b_rd + static_cast<uint32_t>((np * 16 * kBPitch + kk * 16) * 2));
      else
        ldmatrix_x4_trans(r, b_rd + static_cast<uint32_t>((kk * 16 * kBPitch + np * 16) * 2));
      f.b[2 * np][0] = r[0];
      f.b[2 * np][1] = r[1];
      f.b[2 * np + 1][0] = r[2];
      f.b[2 * np + 1][1] = r[3];
    }
  }

  static __device__ __forceinline__ void mma_frags(float (&acc)[kMI][kNI][4], const Frags& f) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) mma_16816<T>(acc[mi][ni], f.a[mi], f.b[ni]);
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

  // Issues the copies of k tiles 0 .. kStages - 2 (one commit group each, empty past the end).
  static __device__ __forceinline__ void prologue(uint32_t sA_copy, uint32_t sB_copy, const TileCtx<T>& t,
                                                  const GroupedGemmProblem& prob, int tid) {
    OperandCopy ca, cb;
    make_copies(t, prob, tid, 0, &ca, &cb);
    const int64_t ktiles = (t.k_len + kBK - 1) / kBK;
#pragma unroll
    for (int s = 0; s < Cfg::kStages - 1; ++s) {
      if (s < ktiles) load_stage(sA_copy, sB_copy, ca, cb, prob, k_rem_of(t, s), s);
      cp_async_commit();
    }
  }

  // The k loop of one tile, after its prologue. Per k tile, with kKSteps = BK / 16 k steps:
  //   step kk:  ldmatrix of step kk + 1 into the other fragment buffer (for the last step: step 0
  //             of the next stage), then the mma of step kk from the buffer loaded one step
  //             earlier, so every ldmatrix has a whole step of mma to land behind;
  //   step 0:   also issues the copies of k tile kt + kStages - 1 into the stage read during k
  //             tile kt - 1 (every warp finished reading it before the barrier of k tile kt - 1);
  //   step kKSteps - 2: commit, wait until k tile kt + 1 landed (at most kStages - 2 groups in
  //             flight), one __syncthreads: its data is visible to every warp before anyone's
  //             ldmatrix of it, and nobody still reads the stage that the next copies overwrite.
  // So one barrier per k tile, and it sits while the tensor pipe still works through the mma just
  // issued; the copies of a k tile overlap the mma of the kStages - 1 before it.
  static __device__ __forceinline__ void mainloop(uint32_t sA_copy, uint32_t sB_copy, uint32_t a_rd0,
                                                  uint32_t b_rd0, const TileCtx<T>& t,
                                                  const GroupedGemmProblem& prob, float (&acc)[kMI][kNI][4],
                                                  int tid) {
    const int ktiles = static_cast<int>((t.k_len + kBK - 1) / kBK);
    if (ktiles <= 0) return;
    // k tile pf = kt + kStages - 1 is full while pf < full_tiles, has `tail` elements at
    // pf == full_tiles and none after (32-bit: the k loop never sees the 64-bit length).
    const int full_tiles = static_cast<int>(t.k_len / kBK);
    const int tail = static_cast<int>(t.k_len - static_cast<int64_t>(full_tiles) * kBK);
    OperandCopy ca, cb;
    make_copies(t, prob, tid, Cfg::kStages - 1, &ca, &cb);
    Frags f[2];
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();  // k tile 0 landed and is visible
    load_frags(f[0], a_rd0, b_rd0, 0);
    int read_stage = 0;
    int write_stage = Cfg::kStages - 1;
    for (int kt = 0; kt < ktiles; ++kt) {
      const uint32_t a_rd = a_rd0 + read_stage * kAStageBytes;
      const uint32_t b_rd = b_rd0 + read_stage * kBStageBytes;
      const int next_stage = read_stage + 1 == Cfg::kStages ? 0 : read_stage + 1;
      static_for<kKSteps>([&](auto step) {
        constexpr int kk = decltype(step)::value;  // constant: f[] stays in registers
        if constexpr (kk + 1 < kKSteps) {
          load_frags(f[(kk + 1) & 1], a_rd, b_rd, kk + 1);
        } else {
          if (kt + 1 < ktiles)
            load_frags(f[(kk + 1) & 1], a_rd0 + next_stage * kAStageBytes, b_rd0 + next_stage * kBStageBytes, 0);
        }
        if constexpr (kk == 0) {
          // Predicated, not branched (past the end every chunk zero-fills a stage nobody reads),
          // so the copies interleave freely with the mma below.
          const int pf = kt + Cfg::kStages - 1;
          const int k_rem = pf < full_tiles ? kBK : (pf == full_tiles ? tail : 0);
          load_stage(sA_copy, sB_copy, ca, cb, prob, k_rem, write_stage);
          cp_async_commit();
        }
        mma_frags(acc, f[kk & 1]);
        if constexpr (kk == kKSteps - 2) {
          cp_async_wait<Cfg::kStages - 2>();
          // The barrier (a counting one: its result is 0) feeds the fragments of step kk + 1,
          // so ptxas keeps that step's mma after it. Otherwise it hoists every mma of the k tile
          // above the barrier (they only need registers), and after the barrier the warp has
          // nothing to issue while the next stage's ldmatrix land: the tensor pipe idles.
          const uint32_t zero = static_cast<uint32_t>(__syncthreads_count(0));
#pragma unroll
          for (int mi = 0; mi < kMI; ++mi) f[(kk + 1) & 1].a[mi][0] += zero;
        }
      });
      read_stage = next_stage;
      write_stage = write_stage + 1 == Cfg::kStages ? 0 : write_stage + 1;
    }
  }

  struct RowAcc {
    float v[kNI][2];  // columns col_base + 8 ni + {0, 1} of one row
  };

  // Axis-M epilogue of one row inside the segment (tile row lr); returns its dp contribution
  // (kEpiBwdAct, else 0).
  static __device__ __forceinline__ float row_epilogue(const TileCtx<T>& t, const GroupedGemmProblem& prob,
                                                       const EpilogueParams& ep, const T* bias, const float* s_p,
                                                       int lr, int col_base, const RowAcc r) {
    const float p = ep.row_weights ? s_p[lr] : 1.0f;
    const EpilogueRow<T> er{ep, bias, t.row0 + lr, p};
    float dpsum = 0.0f;
    if constexpr (kKind == kEpiGateUp) {
      if (!ep.interleaved) {
        static_for<kNI / 2>([&](auto j) {
          constexpr int ni = 2 * decltype(j)::value;
          const int v = col_base + ni * 8;  // virtual gate column (block ni even)
          if (v < prob.n)
            er.gate_up_pair2(paired_gate_index(v), r.v[ni][0], r.v[ni][1], r.v[ni + 1][0], r.v[ni + 1][1]);
        });
      } else {
        static_for<kNI>([&](auto j) {
          constexpr int ni = decltype(j)::value;
          const int v = col_base + ni * 8;  // even: gate, v + 1: up
          if (v < prob.n) er.gate_up_pair1(v >> 1, r.v[ni][0], r.v[ni][1]);
        });
      }
    } else {
      static_for<kNI>([&](auto j) {
        constexpr int ni = decltype(j)::value;
        const int c = col_base + ni * 8;
        if (c < prob.n) dpsum += er.template plain_pair<kKind>(c, r.v[ni][0], r.v[ni][1]);
      });
    }
    return dpsum;
  }

  static __device__ __forceinline__ void epilogue(const TileCtx<T>& t, const GroupedGemmProblem& prob,
                                                  const EpilogueParams& ep, float (&acc)[kMI][kNI][4],
                                                  float* s_dp, const float* s_p, int tid, int wm, int wn,
                                                  int lane) {
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
      static_for<2 * kMI>([&](auto rr) {
        constexpr int mi = decltype(rr)::value / 2, half = decltype(rr)::value % 2;
        RowAcc r;
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) {
          r.v[ni][0] = acc[mi][ni][2 * half];
          r.v[ni][1] = acc[mi][ni][2 * half + 1];
        }
        const int lr = wm * Cfg::kWM + mi * 16 + acc_row(lane, 2 * half);
        dp[mi][half] = lr < t.rows_valid ? row_epilogue(t, prob, ep, bias, s_p, lr, col_base, r) : 0.0f;
      });
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

  // Axis M: copies the routing weights of tile t's rows into s_p (4-byte cp.async in the current
  // commit group, so the k loop's first wait covers them; rows outside the segment get 0, never
  // read). Nothing without row weights.
  static __device__ __forceinline__ void load_row_weights(const TileCtx<T>& t, const EpilogueParams& ep,
                                                          float* s_p, int tid) {
    if (ep.row_weights == nullptr || tid >= kBM) return;
    const bool valid = tid < t.rows_valid;
    const float* src = valid ? ep.row_weights + t.row0 + tid : ep.row_weights;
    cp_async_4(smem_addr(s_p + tid), src, valid);
  }

  static __device__ __forceinline__ void run(const GroupedGemmProblem& prob, const EpilogueParams& ep,
                                             unsigned char* smem_raw) {
    T* sA = reinterpret_cast<T*>(smem_raw);
    T* sB = sA + Cfg::kStages * Smem::kAElems;
    float* s_dp = reinterpret_cast<float*>(smem_raw + Smem::kPipelineBytes);
    float* s_p = reinterpret_cast<float*>(smem_raw + Smem::kPipelineBytes + Smem::kDpBytes);
    int32_t* s_prefix = reinterpret_cast<int32_t*>(smem_raw + Smem::kPipelineBytes + Smem::kDpBytes +
                                                   Smem::kRowWeightBytes);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;
    const int tiles_n = (prob.n + kBN - 1) / kBN;
    const int tiles_m = kAxis == kAxisK ? (prob.m + kBM - 1) / kBM : 0;

    // Shared addresses: this thread's copy destinations and its ldmatrix rows (stage 0, k step 0).
    const uint32_t sA_addr = smem_addr(sA), sB_addr = smem_addr(sB);
    const uint32_t sA_copy = copy_dst_a(sA_addr, tid), sB_copy = copy_dst_b(sB_addr, tid);
    uint32_t a_rd0, b_rd0;
    if constexpr (kAKCols)
      a_rd0 = sA_addr + 2u * ldsm_offset_a_mk(lane, wm * Cfg::kWM, 0, kAPitch);
    else
      a_rd0 = sA_addr + 2u * ldsm_offset_a_km(lane, wm * Cfg::kWM, 0, kAPitch);
    if constexpr (kBKCols)
      b_rd0 = sB_addr + 2u * ldsm_offset_b_nk(lane, wn * Cfg::kWN, 0, kBPitch);
    else
      b_rd0 = sB_addr + 2u * ldsm_offset_b_kn(lane, wn * Cfg::kWN, 0, kBPitch);

    int64_t total;
    if constexpr (kAxis == kAxisM) {
      build_row_tile_prefix<kThreads>(prob.offsets, prob.num_groups, prob.max_rows, kBM, s_prefix,
                                      s_prefix + prob.num_groups + 1);
      total = RowTileSchedule{s_prefix, prob.num_groups, tiles_n, Cfg::kGroupM}.total_tiles();
    } else {
      total = WgradSchedule{prob.num_groups, tiles_m, tiles_n, prob.splits, Cfg::kGroupM}.total_tiles();
    }

    int64_t tile = blockIdx.x;
    int buf = 0;  // row-weight buffer of the current tile (tile parity)
    TileCtx<T> cur{};
    if (tile < total) {
      make_tile(prob, s_prefix, tiles_m, tiles_n, tile, &cur);
      if constexpr (kAxis == kAxisM) load_row_weights(cur, ep, s_p, tid);
      prologue(sA_copy, sB_copy, cur, prob, tid);
    }
    while (tile < total) {
      float acc[kMI][kNI][4];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
      mainloop(sA_copy, sB_copy, a_rd0, b_rd0, cur, prob, acc, tid);
      cp_async_wait<0>();
      __syncthreads();  // every warp is done with the stages: the next tile may refill them; this
                        // tile's row weights have landed and are visible
      const int64_t next = tile + gridDim.x;
      TileCtx<T> nxt{};
      if (next < total) {
        make_tile(prob, s_prefix, tiles_m, tiles_n, next, &nxt);
        // The other row-weight buffer: its last reader, the previous tile's epilogue, finished
        // before the barriers of this tile's k loop.
        if constexpr (kAxis == kAxisM) load_row_weights(nxt, ep, s_p + (buf ^ 1) * kBM, tid);
        prologue(sA_copy, sB_copy, nxt, prob, tid);  // overlaps this tile's epilogue
      }
      epilogue(cur, prob, ep, acc, s_dp, s_p + buf * kBM, tid, wm, wn, lane);
      cur = nxt;
      tile = next;
      buf ^= 1;
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
  if (const cudaError_t err = ensure_dynamic_smem(kernel, smem)) return err;
  const int32_t grid = resident_grid(kernel, Cfg::kThreads, smem, max_tiles);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(prob, ep);
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels::experts::sm80
