// Grouped GEMM for bf16/f16 on Hopper (sm_90a): TMA loads into a kStages-deep shared-memory ring
// completing on mbarriers, wgmma.mma_async issued by two consumer warpgroups (one for the 64-row
// tile; TileConfigT, sm90::choose_tile; clusters of two with B multicast for the forward kinds), a
// producer warp, setmaxnreg, and a persistent grid walking the device-side tile schedule of grouped_problem.cuh
// (tiles -> (group, row tile, column tile) from the device offsets; empty groups own no tile).
// The fused epilogues of epilogue.cuh run straight from the accumulator registers, except the
// activation-backward dgrad's default staged epilogue (through shared memory, 16-byte accesses;
// epilogue_bwd_act_staged below, kernels GroupedGemmSm90<T, true, kEpiBwdAct, 4 or 3>).
//
// Problems (GroupedGemmProblem): axis M, C[rows_g, N] = A[rows_g, K] B_g with B_g KN (forward:
// kEpiGateUp, kEpiRelu2, kEpiStore) or NK (dgrad: kEpiStore, kEpiBwdAct), GroupedGemmSm90; axis K,
// the weight gradients C_g = X_g^T Y_g (kEpiWgrad), GroupedWgradSm90 further down. Tile,
// shared-memory layout, tensor maps and wgmma descriptors: grouped_gemm_sm90.hpp.
//
// Pipeline (both kernels; per CTA, `it` counts k tiles over all the CTA's tiles, stage =
// it % kStages, phase = (it / kStages) & 1):
//   full[s]   (count 1): the producer's arrive.expect_tx(bytes of the boxes it issues) plus the
//             TMA transactions; consumers wait on it with parity `phase`.
//   empty[s]  (count 4 kConsumers): lane 0 of every consumer warp arrives once its wgmma reading
//             stage s have completed (wgmma.wait_group); the producer waits with parity
//             phase ^ 1 before refilling s (a fresh barrier passes parity 1 at once).
// Consumers keep one wgmma batch (the 4 k16 steps of a k tile) in flight: after committing k tile
// kt they wait until k tile kt - 1's batch is done and release its stage. The producer runs up to
// kStages k tiles ahead, into the next tile while the consumers run the epilogue.
// Rows of a tile past its group's end are computed (TMA loads whatever rows follow, zeros past R)
// but never stored; k past K and columns past N are zero-filled by TMA; a B box entirely past the
// columns is not issued (its stale shared memory only feeds accumulator columns that are never
// stored).
// Stream-K tail (StreamKTail, grouped_problem.cuh; problems with partial slots): a first launch
// runs the whole tiles of all waves but the last two, a second launch of the same size (kSkTail)
// the last two cut along k, each cut tile finished by the CTA holding its first part from the
// fp32 partial of the next CTA (flags in global memory, release/acquire).
// Determinism: every accumulator sums k in ascending order in one CTA, or (a tail tile cut in two)
// adds the fp32 sum of its second part to that of its first, in that order; no atomics.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "kernels/common/grid.hpp"
#include "kernels/common/pdl.cuh"
#include "kernels/experts/epilogue.cuh"
#include "kernels/experts/grouped_gemm_sm90.hpp"
#include "kernels/experts/grouped_problem.cuh"
#include "kernels/experts/tma.hpp"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "grouped_gemm_sm90.cuh is built only for -gencode=arch=compute_90a,code=sm_90a"
#endif

namespace moekit::kernels::experts::sm90 {

// ---- PTX wrappers -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the barrier initialisations visible to the async proxy (TMA) and to the other threads
// (with the __syncthreads that follows).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// A phase that never completes is a bug (an expect_tx byte count or a parity that does not match
// what arrives), and a spinning CTA would hang the process and the caller's GPU time with it. After
// kMbarHangNs of waiting the thread traps instead: the launch fails with an error the caller sees
// (a kernel error is sticky for the context). Legitimate waits are one stage's TMA loads or one
// tile's epilogue: microseconds to milliseconds, far below the bound also under compute-sanitizer.
// Costs nothing while phases complete promptly (the timer is read only after a failed try).
constexpr uint64_t kMbarHangNs = 20ull * 1000ull * 1000ull * 1000ull;

// Spins until done() holds, or traps after kMbarHangNs (the mbarrier waits and the stream-K
// flags).
template <class Done>
__device__ __forceinline__ void spin_until(Done&& done) {
  if (done()) return;
  const uint64_t start = global_ns();
  uint32_t spins = 0;
  while (!done()) {
    if ((++spins & 1023u) == 0 && global_ns() - start > kMbarHangNs) __trap();
  }
}

// Spins until the phase of parity `parity` has completed (or traps after kMbarHangNs).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  spin_until([&] { return mbar_try_wait(bar, parity); });
}

// ---- Clusters (TileConfigT::kClusterM = 2) ----
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// Every thread of every CTA of the cluster (the barrier initialisations of each CTA are visible to
// the others before any multicast or remote arrive reaches them).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Arrives on the mbarrier at the same shared-memory offset as `bar` in CTA `rank` of the cluster,
// with the default (.release, .cta) semantics: what it orders is the caller's wgmma reads of a
// stage, already complete (wgmma.wait_group), before the peer's TMA refills it. A .release.cluster
// arrive made every k tile wait on a cluster-scope fence: the cluster tile ran at 38 % of the SM
// throughput the single CTA reaches (ncu, 6bbf63e).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
// tma_load_4d into the same offset of every CTA in `mask`, completing on each one's barrier at
// `bar`'s offset.
__device__ __forceinline__ void tma_load_4d_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                                      int c1, int c2, int c3, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
      "{%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "h"(mask)
      : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Asks L2 to fetch [p, p + bytes) from global memory (p and bytes multiples of 16); a hint with
// no completion to wait for and no effect on the values any load returns.
__device__ __forceinline__ void bulk_prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(reinterpret_cast<uint64_t>(p)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kN>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kN) : "memory");
}

// Pins accumulator registers at this point of the program: the compiler may not move reads of
// them above it (after wgmma_wait: the asynchronous writes have landed) or writes below it.
__device__ __forceinline__ void fence_acc(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// threadIdx.x read where it is used: a volatile read is never hoisted, so a value derived from it
// (the u prefetch's row of the tile, once per tile) is not kept in a register across the k loop
// and the epilogue, where ptxas would rather spill it.
__device__ __forceinline__ int thread_index_here() {
  int v;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v));
  return v;
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// One wgmma.mma_async m64n256k16 with fp32 accumulators d[128] += A (descriptor) x B (descriptor),
// TYPE bf16 or f16; operands %128 / %129 the descriptors, %130 / %131 the transpose flags of A
// and B (1: M- / N-major in shared memory), %132 the scale-d predicate's source (always 1).
#define MOEKIT_WGMMA_M64N256K16(TYPE) \
  asm volatile( \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %132, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {" \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
    "}, %128, %129, p, 1, 1, %130, %131;\n}\n" \
    : \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
      "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
      "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
      "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
      "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
      "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
      "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
      "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
    : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB), "r"(1) \
    : "memory")

// d += A x B over one k16 step; kTransA = 1 for A M-major (X^T of a weight gradient), 0 for
// K-major; kTransB = 1 for B N-major (KN in memory), 0 for K-major (NK).
template <class T, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    MOEKIT_WGMMA_M64N256K16("bf16");
  } else {
    MOEKIT_WGMMA_M64N256K16("f16");
  }
}

#undef MOEKIT_WGMMA_M64N256K16

// Shared-memory accesses of the staged epilogue (volatile with a memory clobber: never moved across
// the named barriers that order them).
__device__ __forceinline__ void st_shared_f32x2(uint32_t addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ float4 ld_shared_f32x4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
// Barrier of the `threads` threads (whole warps) that use named barrier `id`.
__device__ __forceinline__ void bar_sync_named(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- TMA stores (the TMA-store epilogue, MOEKIT_SM90_TMA_STORE) ----
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes visible to the async proxy (the TMA
// store that a barrier later lets another thread issue reads them there).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void st_shared_b16(uint32_t addr, uint16_t v) {
  asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(addr), "h"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
// v, which the compiler may not treat as a value known before this point (keeps addresses that do
// not change from tile to tile from being hoisted out of the tile loop into registers that would
// then stay live across the k loop next to the 128 accumulators).
__device__ __forceinline__ uint32_t opaque_u32(uint32_t v) {
  asm volatile("mov.b32 %0, %1;\n" : "=r"(v) : "r"(v));
  return v;
}
__device__ __forceinline__ uint64_t opaque_u64(uint64_t v) {
  asm volatile("mov.b64 %0, %1;\n" : "=l"(v) : "l"(v));
  return v;
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until every committed bulk group of this thread has finished reading shared memory.
__device__ __forceinline__ void bulk_wait_group_read0() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// Until at most the newest committed bulk group of this thread is still reading shared memory.
__device__ __forceinline__ void bulk_wait_group_read1() {
  asm volatile("cp.async.bulk.wait_group.read 1;\n" ::: "memory");
}
// Until every committed bulk group of this thread has completed (its global writes included).
__device__ __forceinline__ void bulk_wait_group0() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// One consumer warpgroup's TMA-store epilogue: the elected thread (ctid 0) owns the bulk groups.
// `value(j, h)` returns the two fp32 values of accumulator chunk j, row half h (the caller's
// epilogue maths); the warpgroup writes them as T into its region and `store(box, col_in_tile)`
// (elected thread only) issues the TMA store of one [64][64] box. The tile's 256 columns go out
// as four boxes through the region's two box buffers (box q in buffer q % 2), one bulk group per
// box. Order per box: wait.read 1 (every bulk group but the newest has been read: the one that
// last used this buffer, two boxes back, possibly the previous tile's) + barrier, the fragment
// writes, fence.proxy.async + barrier (they are visible to the async proxy), the store, commit.
// Two buffers because one (a [64][128] half per group, waited with wait.read 0) made every tile
// wait for its first half's store to be read out of shared memory before writing the second.
// Fragment (warp, lane, h, j): warpgroup row 16 warp + lane / 4 + 8 h, box column
// 8 (j % 8) + 2 (lane % 4): a warp's 32 4-byte writes of one (h, j) cover 8 rows of one 16-byte
// chunk column, which the swizzle spreads over 8 distinct chunks: 32 distinct banks.
template <class T, class Value, class Store>
__device__ __forceinline__ void tma_store_tile(uint32_t region, uint32_t bar, int ctid, Value&& value,
                                               Store&& store) {
  const int warp = ctid >> 5, lane = ctid & 31, q = lane & 3;
#pragma unroll
  for (int box = 0; box < 4; ++box) {
    const uint32_t buf = static_cast<uint32_t>(box & 1);
    if (ctid == 0) bulk_wait_group_read1();
    bar_sync_named(bar, TileConfig::kWarpgroupThreads);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t r = static_cast<uint32_t>(16 * warp + (lane >> 2) + 8 * h);
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const float2 v = value(8 * box + jj, h);
        st_shared_b32(region + tma_store_offset(r, static_cast<uint32_t>(TileConfig::kBoxCols * buf + 8 * jj + 2 * q)),
                      pack_pair_bits<T>(v.x, v.y));
      }
    }
    fence_proxy_async_smem();
    bar_sync_named(bar, TileConfig::kWarpgroupThreads);
    if (ctid == 0) {
      store(region + buf * kTmaStoreBoxBytes, TileConfig::kBoxCols * box);
      bulk_commit_group();
    }
  }
}

// ---- Stream-K tail flags (StreamKTail, grouped_problem.cuh) ----
__device__ __forceinline__ void st_release_gpu(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_gpu(int* p, int v) {
  asm volatile("st.relaxed.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// Spins until *flag is nonzero (acquire: the partial written before its release is visible), or
// traps after kMbarHangNs like mbar_wait. The writer is the first unit of the next CTA's range,
// which waits on nothing: a legitimate wait lasts until that CTA is resident and has run it.
__device__ __forceinline__ void wait_flag(const int* flag) {
  spin_until([&] { return ld_acquire_gpu(flag) != 0; });
}

// ---- The kernel ----------------------------------------------------------------------------------

struct TileInfo {
  int group;
  int n_tile;
  int n0;          // first (virtual) output column
  int rows_valid;  // rows of the tile inside the group's segment (1 .. BM)
  int64_t row0;    // first row of the tile
};

// Cfg_: the tile configuration (TileConfigT: 128 or 64 rows); ring depths of the staged and
// TMA-store instances are Cfg_'s deepest or one less (ring_stages).
// kSkTail: the stream-K tail kernel (StreamKTail): a second launch of the same GEMM that runs only
// the tail's units, while the first runs only the whole tiles before it (see run()).
template <class T, bool kBNK, int kKind, int kStagedStages = 0, int kStoreStages = 0, class Cfg_ = TileConfig,
          bool kSkTail = false>
struct GroupedGemmSm90 {
  using Cfg = Cfg_;
  // kStagedStages > 0 (kEpiBwdAct only): the staged activation-backward epilogue with its staging
  // regions and a ring of kStagedStages (4, or 3 where the prefix of many groups leaves no room);
  // a separate kernel from the register-direct one, so neither epilogue's registers constrain the
  // other's.
  static constexpr bool kStaged = kStagedStages > 0;
  static_assert(!kStaged || (kKind == kEpiBwdAct && kBwdActStaged && kStagedStages >= 2 && kStagedStages <= 4),
                "staged epilogue: kEpiBwdAct only, 2 to 4 stages");
  // kStoreStages > 0 (kEpiStore only): the TMA-store epilogue (tma_store_tile) with its staging
  // regions and a ring of kStoreStages (4, or 3 where the prefix of many groups leaves no room).
  // kEpiGateUp / kEpiRelu2 (B KN) likewise: epilogue_gate_up_tma (MOEKIT_SM90_TMA_STORE_GATE_UP).
  static constexpr bool kTmaSt = kStoreStages > 0;
  static_assert(!kTmaSt || ((kKind == kEpiStore || (!kBNK && (kKind == kEpiGateUp || kKind == kEpiRelu2))) &&
                            !kStaged && kStoreStages >= 2 && kStoreStages <= 4),
                "TMA-store epilogue: kEpiStore, kEpiGateUp, kEpiRelu2 only, 2 to 4 stages");
  using Smem = typename std::conditional<
      kStaged, SmemLayoutBwdAct<kStaged ? kStagedStages : Cfg::kStages, Cfg>,
      typename std::conditional<kTmaSt, SmemLayoutTmaStore<kTmaSt ? kStoreStages : Cfg::kStages, Cfg>,
                                SmemLayoutOf<Cfg>>::type>::type;
  static constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kStages = Smem::kStages;
  static constexpr int kConsumerWarps = 4 * Cfg::kConsumers;
  static constexpr int kTransB = kBNK ? 0 : 1;
  static_assert(kBNK ? (kKind == kEpiStore || kKind == kEpiBwdAct)
                     : (kKind == kEpiGateUp || kKind == kEpiRelu2 || kKind == kEpiStore),
                "forward kinds read B as KN, dgrad kinds as NK");
  static_assert(kBN == 2 * 128 && kBN / Cfg::kBoxCols == 4, "gate/up pairing: boxes 0, 1 gate, 2, 3 up");
  // Clusters of kCluster CTAs (TileConfigT::kClusterM): cluster c walks the schedule's tiles
  // c, c + clusters, ...; CTA rank r of it takes rows [128 r, 128 r + 128) of each 256-row tile and
  // issues B boxes 2 r, 2 r + 1 for both CTAs (multicast). A stage may be refilled only when the
  // consumers of both CTAs have released it: every consumer warp arrives on the empty barrier of
  // each CTA, and each producer, before it leaves, waits until its ring's last fills are released
  // (no remote arrive may reach a CTA that has exited).
  static constexpr int kCluster = Cfg::kClusterM;
  static_assert(kCluster == 1 || !kBNK, "B multicast: the forward kinds (B KN) only");
  static __device__ __forceinline__ int64_t first_tile() { return blockIdx.x / kCluster; }
  static __device__ __forceinline__ int64_t tile_stride() { return gridDim.x / kCluster; }
  static __device__ __forceinline__ int cta_rank() {
    if constexpr (kCluster > 1) return static_cast<int>(cluster_ctarank());
    return 0;
  }
  // Consumer release of a stage: its empty barrier in every CTA of the cluster.
  static __device__ __forceinline__ void release_stage(uint32_t empty_bar) {
    mbar_arrive(empty_bar);
    if constexpr (kCluster > 1) mbar_arrive_cluster(empty_bar, static_cast<uint32_t>(cta_rank() ^ 1));
  }

  static __device__ __forceinline__ TileInfo decode(const RowTileSchedule& sched, const GroupedGemmProblem& prob,
                                                    int64_t tile) {
    const RowTile rt = sched.decode32(static_cast<uint32_t>(tile));  // sm90::takes: the count fits
    int64_t gb, ge;
    group_rows(prob.offsets, rt.group, prob.max_rows, &gb, &ge);
    TileInfo t;
    t.group = rt.group;
    t.n_tile = rt.n_tile;
    t.n0 = rt.n_tile * kBN;
    t.row0 = gb + static_cast<int64_t>(rt.row_tile) * Cfg::kSchedBM + static_cast<int64_t>(cta_rank()) * kBM;
    const int64_t rest = ge - t.row0;  // > -kBM; <= 0: a cluster's second CTA past the group (nothing stored)
    t.rows_valid = static_cast<int>(rest < kBM ? rest : kBM);
    return t;
  }

  // The TMA loads of k tiles [kb, ke) of tile t into the ring (`it`: the producer's fill count).
  static __device__ __forceinline__ void produce_tile(const CUtensorMap* tma_a, const CUtensorMap* tma_b,
                                                      const GroupedGemmProblem& prob, const TileInfo& t, int kb,
                                                      int ke, uint32_t smem, uint32_t& it) {
    const bool paired = prob.gate_up_half > 0;
    // Columns of B's tensor map along which the boxes step (see tma_spec_b_kn).
    const int box_cols = paired ? prob.gate_up_half : prob.n;
    const int rank = cta_rank();
    // KN boxes: column of box j (boxes past the columns are not issued).
    int col[4];
    uint32_t boxes = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      col[j] = kn_box_column(t.n0, j, paired);
      boxes += col[j] < box_cols ? 1u : 0u;
    }
    const uint32_t tx = kBNK ? Smem::kStageBytes : Smem::kABytes + boxes * Smem::kBBoxBytes;
    const int row0 = static_cast<int>(t.row0);
    for (int kt = kb; kt < ke; ++kt, ++it) {
      const uint32_t s = it % kStages;
      const uint32_t phase = (it / kStages) & 1u;
      const uint32_t full = smem + Smem::kFullBarrier + 8 * s;
      mbar_wait(smem + Smem::kEmptyBarrier + 8 * s, phase ^ 1u);
      mbar_arrive_expect_tx(full, tx);
      const int k0 = kt * kBK;
      tma_load_2d(smem + Smem::a_offset(s), tma_a, full, k0, row0);
      if constexpr (kBNK) {
        tma_load_3d(smem + Smem::b_offset(s), tma_b, full, k0, t.n0, t.group);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (col[j] < box_cols) {
            if constexpr (kCluster == 1) {
              tma_load_4d(smem + Smem::b_offset(s) + j * Smem::kBBoxBytes, tma_b, full, col[j],
                          kn_box_half(j, paired), k0, t.group);
            } else if ((j >> 1) == rank) {
              tma_load_4d_multicast(smem + Smem::b_offset(s) + j * Smem::kBBoxBytes, tma_b, full, col[j],
                                    kn_box_half(j, paired), k0, t.group, static_cast<uint16_t>(0x3));
            }
          }
      }
    }
  }

  // One thread: every TMA load of the CTA's tiles, in the consumers' order: the whole tiles
  // [0, total) of the round robin, or (kSkTail) the CTA's tail units.
  static __device__ __forceinline__ void producer(const CUtensorMap* tma_a, const CUtensorMap* tma_b,
                                                  const GroupedGemmProblem& prob, const RowTileSchedule& sched,
                                                  int64_t total, const StreamKTail& tail, uint32_t smem) {
    prefetch_tensor_map(tma_a);
    prefetch_tensor_map(tma_b);
    const int ktiles = (prob.k + kBK - 1) / kBK;
    uint32_t it = 0;
    if constexpr (kSkTail) {
      WorkUnit u;
      for (uint32_t done = 0; tail_unit(tail, blockIdx.x, done, &u); done += u.k_end - u.k_begin)
        produce_tile(tma_a, tma_b, prob, decode(sched, prob, u.tile), u.k_begin, u.k_end, smem, it);
    } else {
      for (int64_t tile = first_tile(); tile < total; tile += tile_stride())
        produce_tile(tma_a, tma_b, prob, decode(sched, prob, tile), 0, ktiles, smem, it);
    }
    if constexpr (kCluster > 1) {  // the ring's last fills released by both CTAs' consumers
      for (int k = 0; k < kStages; ++k, ++it)
        mbar_wait(smem + Smem::kEmptyBarrier + 8 * (it % kStages), ((it / kStages) & 1u) ^ 1u);
    }
  }

  // The stream-K tail (StreamKTail): every axis-M kind but the activation backward (whose u
  // prefetch is placed by the tile's last k tiles), on single-CTA tiles. The tail kernel of the
  // gate-up kinds stores register-direct (their TMA-store epilogue next to the fixup's partial
  // loads made ptxas spill 16 bytes), so the 64-row tile, which has no register-direct instance,
  // runs them without a tail.
  static constexpr bool kStreamK = kCluster == 1 && kKind != kEpiBwdAct &&
                                   (kKind == kEpiStore || kStoreStages == 0 || std::is_same<Cfg, TileConfig>::value);
  static constexpr int kTailStoreStages = kKind == kEpiStore ? kStoreStages : 0;
  static_assert(!kSkTail || kStreamK, "the tail kernel: kinds and tiles with the stream-K tail only");
  static_assert(kBM * kBN <= kStreamKSlotFloats && kConsumerWarps <= kStreamKSlotFlags,
                "a partial slot holds a tile's accumulators and a flag per consumer warp");

  // This consumer thread's part of partial slot `slot` (this CTA's, or the next CTA's: next = 1):
  // consumer warp w's 32 lanes x 128 accumulators, float4 i of lane l at [i][l], so a warp's store
  // or load of one i covers 512 contiguous bytes. Thread and block index read afresh
  // (thread_index_here, opaque_u32): addresses hoisted out of the unit loop were kept across its k
  // loop and spilled.
  static __device__ __forceinline__ uint32_t consumer_thread() {
    return static_cast<uint32_t>(thread_index_here()) - Cfg::kWarpgroupThreads;  // 0 .. 128 kConsumers - 1
  }
  static __device__ __forceinline__ float4* partial_of(const GroupedGemmProblem& prob, uint32_t next) {
    const uint32_t slot = opaque_u32(blockIdx.x) + next, ctid = consumer_thread();
    return reinterpret_cast<float4*>(prob.sk_partials) + slot * (kStreamKSlotFloats / 4) + (ctid >> 5) * (32 * 32) +
           (ctid & 31);
  }
  static __device__ __forceinline__ int* flag_of(const GroupedGemmProblem& prob, uint32_t next) {
    return prob.sk_flags + (opaque_u32(blockIdx.x) + next) * kStreamKSlotFlags + (consumer_thread() >> 5);
  }

  // kUnitPartial: this warp's accumulators to the CTA's slot (through L2), then its flag (release,
  // after the whole warp's stores).
  static __device__ __forceinline__ void write_partial(const GroupedGemmProblem& prob, const float (&d)[128],
                                                       int lane) {
    float4* dst = partial_of(prob, 0);
#pragma unroll
    for (int i = 0; i < 32; ++i) __stcg(dst + 32 * i, make_float4(d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]));
    __syncwarp();
    if (lane == 0) {
      __threadfence();
      st_release_gpu(flag_of(prob, 0), 1);
    }
  }

  // kUnitFixup, after its k loop: waits for the next CTA's partial of this tile (the tile's k
  // tiles past this unit's), resets its flag for the next launch (every flag raised is consumed
  // once, so a launch leaves them all zero) and adds it: d = (k tiles [0, k)) + partial, one
  // order. Loaded into the accumulators before the k loop instead, ptxas serialized the kernel's
  // wgmma (C7515: non-wgmma instructions defining accumulators).
  static __device__ __forceinline__ void add_partial(const GroupedGemmProblem& prob, float (&d)[128], int lane) {
    if (lane == 0) {
      int* flag = flag_of(prob, 1);
      wait_flag(flag);
      st_relaxed_gpu(flag, 0);
    }
    __syncwarp();
    const float4* src = partial_of(prob, 1);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const float4 v = __ldcg(src + 32 * i);
      d[4 * i] += v.x;
      d[4 * i + 1] += v.y;
      d[4 * i + 2] += v.z;
      d[4 * i + 3] += v.w;
    }
  }

  // Whether this kind's values read the routing weight: kEpiStore's (store_values) only scale by
  // it after the down projection or with a bias. The forward down projection of the default
  // placement has neither, and its epilogue no longer waits on a load of p it never uses.
  static __device__ __forceinline__ bool reads_row_weight(const EpilogueParams& ep, const T* bias) {
    if (ep.row_weights == nullptr) return false;
    return kKind != kEpiStore || ep.weight_after_down || bias != nullptr;
  }

  // Concatenated gate/up, row half h of the thread: chunk j < 16 holds gate columns i, i + 1,
  // chunk j + 16 their up columns (kAct: gate_up_h2's activation kind, -1 = ep.act.kind).
  template <int kAct>
  static __device__ __forceinline__ void gate_up_paired_row(const EpilogueRow<T>& er, const TileInfo& t, int I,
                                                            const float (&d)[128], int h, int q) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int i = paired_h_column(t.n0, j, q);
      if (i < I)
        er.template gate_up_pair2<kAct>(i, d[4 * j + 2 * h], d[4 * j + 2 * h + 1], d[4 * (j + 16) + 2 * h],
                                        d[4 * (j + 16) + 2 * h + 1]);
    }
  }

  // Epilogue of one consumer thread: rows lr0 and lr0 + 8 of the tile; accumulator chunk j
  // (d[4 j .. 4 j + 3]) covers tile columns 8 j + 2 q, + 1 (q = lane % 4), d[4 j + 2 h + e] row
  // lr0 + 8 h (the mma.sync m16n8 C layout per chunk, mma_layout.cuh).
  static __device__ __forceinline__ void epilogue(const TileInfo& t, const GroupedGemmProblem& prob,
                                                  const EpilogueParams& ep, const float (&d)[128], int lr0,
                                                  int lane) {
    const int q = lane & 3;
    const T* bias = ep.bias ? static_cast<const T*>(ep.bias) + t.group * ep.bias_group_stride : nullptr;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lr = lr0 + 8 * h;
      const bool valid = lr < t.rows_valid;
      const int64_t row = t.row0 + lr;
      if (valid) {
        const float p = reads_row_weight(ep, bias) ? ep.row_weights[row] : 1.0f;
        const EpilogueRow<T> er{ep, bias, row, p};
        if constexpr (kKind == kEpiGateUp) {
          if (prob.gate_up_half > 0) {
            // SwiGLU without a limit (every model of the benchmark but GPT-OSS) gets its own copy
            // of the row's 32 activations with the kind fixed: only its operations (same order,
            // same values), about 10 instructions each instead of 30 for the run-time kind's.
            with_gated_kind(ep.act, [&](auto kind) {
              gate_up_paired_row<decltype(kind)::value>(er, t, prob.gate_up_half, d, h, q);
            });
          } else {
            // Interleaved: columns 2i (gate), 2i + 1 (up) side by side.
#pragma unroll
            for (int j = 0; j < 32; ++j) {
              const int v = plain_column(t.n0, j, q);
              if (v < prob.n) er.gate_up_pair1(v >> 1, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
            }
          }
        } else {
#pragma unroll
          for (int j = 0; j < 32; ++j) {
            const int c = plain_column(t.n0, j, q);
            if (c < prob.n) er.template plain_pair<kKind>(c, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
          }
        }
      }
    }
  }

  // kEpiBwdAct: the saved u its epilogue reads (u was written by the forward long before, so it
  // is in DRAM, not L2) is prefetched into L2 by bulk prefetches kUPrefetchKTiles k tiles before
  // the tile's k loop ends (about 1 us per k tile, a few DRAM latencies ahead, late enough that the
  // k loop's own traffic does not evict it first). Consumer thread i of 256 takes tile row i / 2,
  // half i % 2: concatenated gate or up columns [n0, n1) (n1 = min(n0 + 256, I)), interleaved the
  // first or second half of u columns [2 n0, 2 n1), relu2 (half 0 only) u columns [n0, n1). Rows
  // past the group's end, and ranges whose start or length is not a multiple of 16 bytes, are
  // skipped: a prefetch is only a hint, the epilogue's loads return the same values either way.
  static constexpr int kUPrefetchKTiles = 8;
  static __device__ __forceinline__ void prefetch_u(const TileInfo& t, const GroupedGemmProblem& prob,
                                                    const EpilogueParams& ep, int i) {
    const int r = i >> 1, half = i & 1;
    const int w = (prob.n < t.n0 + kBN ? prob.n : t.n0 + kBN) - t.n0;  // h columns of the tile
    if (r >= t.rows_valid || w <= 0) return;
    const T* urow = static_cast<const T*>(ep.u) + (t.row0 + r) * ep.ldu;
    const T* src;
    if (ep.act.kind == kActRelu2) {
      if (half) return;
      src = urow + t.n0;
    } else if (ep.interleaved) {
      src = urow + 2 * t.n0 + half * w;
    } else {
      src = urow + (half ? ep.inter : 0) + t.n0;
    }
    const uint32_t bytes = static_cast<uint32_t>(w) * static_cast<uint32_t>(sizeof(T));
    if (((reinterpret_cast<uintptr_t>(src) | bytes) & 15u) != 0) return;
    bulk_prefetch_l2(src, bytes);
  }

  // kEpiBwdAct (acc = G over h columns): the thread's rows lr0 and lr0 + 8, 32 column pairs
  // each, walked as kBwdSteps batches of kBwdBatch pairs (row lr0's batches, then row lr0 + 8's).
  // The saved-u loads of batch s + 1 are issued before batch s's activation backward and its
  // du / h' stores, so a tile exposes about one global-load latency instead of one per column pair
  // (a load of u may not move above a store to du or h': the compiler cannot rule out aliasing).
  // Values and dp order are those of plain_pair<kEpiBwdAct> column by column: per row the pairs
  // in column order, then the row's 4 lanes by a fixed xor tree; one dp writer per row and
  // column tile.
  static constexpr int kBwdBatch = 4;
  static constexpr int kBwdPerRow = 32 / kBwdBatch;
  static constexpr int kBwdSteps = 2 * kBwdPerRow;
  template <int kLayout, int kAct>
  static __device__ __forceinline__ void epilogue_bwd_act_as(const TileInfo& t, const GroupedGemmProblem& prob,
                                                             const EpilogueParams& ep, const float (&d)[128],
                                                             int lr0, int lane) {
    const int q = lane & 3;
    const bool valid[2] = {lr0 < t.rows_valid, lr0 + 8 < t.rows_valid};
    const int64_t row[2] = {t.row0 + lr0, t.row0 + lr0 + 8};
    const float p0 = valid[0] && ep.row_weights ? ep.row_weights[row[0]] : 1.0f;
    const float p1 = valid[1] && ep.row_weights ? ep.row_weights[row[1]] : 1.0f;
    const EpilogueRow<T> er[2] = {{ep, nullptr, row[0], p0}, {ep, nullptr, row[1], p1}};
    float dp[2] = {0.0f, 0.0f};
    BwdActIn<T> buf[2][kBwdBatch];
#pragma unroll
    for (int step = 0; step <= kBwdSteps; ++step) {
      if (step < kBwdSteps) {  // loads of batch `step`
        const int h = step / kBwdPerRow, j0 = (step % kBwdPerRow) * kBwdBatch;
#pragma unroll
        for (int jj = 0; jj < kBwdBatch; ++jj) {
          const int c = plain_column(t.n0, j0 + jj, q);
          if (valid[h] && c < prob.n) buf[step & 1][jj] = er[h].template bwd_act_load_as<kLayout>(c);
        }
      }
      if (step > 0) {  // activation backward and stores of batch step - 1
        const int s = step - 1;
        const int h = s / kBwdPerRow, j0 = (s % kBwdPerRow) * kBwdBatch;
#pragma unroll
        for (int jj = 0; jj < kBwdBatch; ++jj) {
          const int j = j0 + jj;
          const int c = plain_column(t.n0, j, q);
          if (valid[h] && c < prob.n)
            dp[h] += er[h].template bwd_act_apply_as<kLayout, kAct>(c, buf[s & 1][jj], d[4 * j + 2 * h],
                                                                   d[4 * j + 2 * h + 1]);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = dp[h];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (valid[h] && q == 0) ep.dp_partial[row[h] * ep.ld_dp + t.n_tile] = v;
    }
  }

  // The layout and the gated activation kind, chosen once per tile instead of per column pair:
  // each instance's column loop is straight-line code for one activation (act_gated_grad with a
  // constant kind keeps only that kind's operations, in the same order: the same values), about a
  // third of the run-time-kind form's instructions for SwiGLU. Kinds outside the enum keep the
  // run-time form.
  static __device__ __forceinline__ void epilogue_bwd_act(const TileInfo& t, const GroupedGemmProblem& prob,
                                                          const EpilogueParams& ep, const float (&d)[128], int lr0,
                                                          int lane) {
    using Row = EpilogueRow<T>;
    if (ep.act.kind == kActRelu2) {
      epilogue_bwd_act_as<Row::kBwdRelu2, kActRelu2>(t, prob, ep, d, lr0, lane);
    } else if (ep.interleaved) {
      bwd_act_by_kind<Row::kBwdInterleaved>(t, prob, ep, d, lr0, lane);
    } else {
      bwd_act_by_kind<Row::kBwdConcat>(t, prob, ep, d, lr0, lane);
    }
  }
  template <int kLayout>
  static __device__ __forceinline__ void bwd_act_by_kind(const TileInfo& t, const GroupedGemmProblem& prob,
                                                         const EpilogueParams& ep, const float (&d)[128], int lr0,
                                                         int lane) {
    // -1 (the run-time kind) is EpilogueRow<T>::kBwdRuntimeKind
    with_gated_kind(ep.act, [&](auto kind) {
      epilogue_bwd_act_as<kLayout, decltype(kind)::value>(t, prob, ep, d, lr0, lane);
    });
  }

  // ---- kEpiBwdAct, staged (kStaged; MOEKIT_SM90_BWD_ACT_STAGED) ----
  // The register-direct epilogue above walks each thread's 64 column pairs of two rows: 4-byte
  // loads and stores, 16 bytes per row per warp instruction, and (fully unrolled so the
  // accumulator indices stay constant) ~12 k straight-line instructions per tile that stream
  // through the instruction cache. Here each consumer warpgroup instead stages its accumulators
  // (G, fp32, exact) through its own shared-memory region (Smem::kStaging + c kBwdStageRegionBytes)
  // one pass of 32 rows x 64 columns at a time (sub-tile s = tile columns [64 s, 64 s + 64), pass P
  // = warpgroup rows [32 P, 32 P + 32), the rows of warps 2 P and 2 P + 1; rows padded to
  // kBwdStageStride floats: the fragment stores of a half-warp hit 32 distinct banks), and its 128
  // threads walk each pass row-major in items of 8 h columns of one row: thread t takes column
  // chunk t % 8 of row 32 P + 16 i + t / 8 (i = 0, 1), so a warp's access covers 4 rows x 8 chunks,
  // 128 contiguous bytes of each of u's gate / up ranges, du's and h''s. Per item: 16-byte loads of
  // u (relu2: one, gated: two), two 16-byte loads of G from shared memory, the activation backward
  // of 8 columns (the same functions, operations and roundings as EpilogueRow::bwd_act_apply_as:
  // the same du and h' bits), 16-byte stores of du (one or two) and h'. The 16 items of a tile
  // (geometry: bwd_stage_* in grouped_gemm_sm90.hpp) run in a rolled loop (one copy of the
  // activation code per instance), the u loads issued two items ahead of the item computed (in
  // effect one: epilogue_bwd_act_staged_as says why that stays). Order per pass: named barrier (the previous pass's reads are done), fragment stores of the
  // pass's two warps, named barrier, the thread's 2 items.
  // dp partial of a row (one per row and column tile, fixed order, independent of scheduling): per
  // item the 8 columns' G a in column order (pairs a0 act0 + a1 act1, summed in pair order), per
  // thread its row's 4 items (one per sub-tile) in order, then the row's 8 threads (lanes 8 m .. 8 m + 7) by a
  // fixed xor tree (1, 2, 4); lane t % 8 == 0 writes. Not the register-direct epilogue's order (it
  // sums per lane quad), so dp may differ from it in the last bits; du and h' do not.
  static constexpr uint32_t kStageBarrier0 = 2;  // named barriers 2, 3: consumer warpgroup 0, 1
  static constexpr int kStageSub = kBN / kBwdStageCols;  // sub-tiles per tile: 4
  static constexpr int kItemsPerSub = kBwdStageRows * (kBwdStageCols / 8) / Cfg::kWarpgroupThreads;
  static constexpr int kStagedItems = kStageSub * kItemsPerSub;  // 16
  static_assert(kItemsPerSub == 4 && kBwdStageCols == 64 && kBwdStageRows == 64,
                "item mapping: 8 threads per row, 16 rows per item step, 4 per sub-tile; the dp rotation keeps 4 rows");
  static_assert(!kStaged || Smem::kStagingBytes >= Cfg::kConsumers * kBwdStageRegionBytes, "staging regions");
  static_assert(kBwdStagePassRows == 32, "a pass is the rows of warps 2 P and 2 P + 1 (items k with k / 2 % 2 == P)");

  struct StagedIn {
    uint4 a, b;  // raw u: concatenated gate / up columns h0 .. h0 + 7; interleaved u columns
                 // 2 h0 .. 2 h0 + 7 / 2 h0 + 8 .. 2 h0 + 15; relu2 u columns h0 .. h0 + 7 (a only)
    float p;     // routing weight of the row (1 when none)
  };

  // Item k (0 .. 15) of consumer thread ctid of warpgroup c: sub-tile k / 4, pass (k / 2) % 2.
  static __device__ __forceinline__ int staged_tile_row(int c, int ctid, int k) {
    return kBwdStageRows * c + bwd_stage_item_row(ctid, k);
  }
  static __device__ __forceinline__ int staged_column(const TileInfo& t, int ctid, int k) {
    return t.n0 + bwd_stage_item_column(ctid, k);
  }

  template <int kLayout>
  static __device__ __forceinline__ StagedIn staged_load(const TileInfo& t, const GroupedGemmProblem& prob,
                                                         const EpilogueParams& ep, int c, int ctid, int k) {
    using Row = EpilogueRow<T>;
    StagedIn in;
    in.a = make_uint4(0u, 0u, 0u, 0u);
    in.b = in.a;
    in.p = 1.0f;
    const int tr = staged_tile_row(c, ctid, k);
    const int h0 = staged_column(t, ctid, k);
    if (tr < t.rows_valid && h0 < prob.n) {
      const int64_t row = t.row0 + tr;
      const T* u = static_cast<const T*>(ep.u) + row * ep.ldu;
      if constexpr (kLayout == Row::kBwdRelu2) {
        in.a = *reinterpret_cast<const uint4*>(u + h0);
      } else if constexpr (kLayout == Row::kBwdInterleaved) {
        in.a = *reinterpret_cast<const uint4*>(u + 2 * h0);
        in.b = *reinterpret_cast<const uint4*>(u + 2 * h0 + 8);
      } else {
        in.a = *reinterpret_cast<const uint4*>(u + h0);
        in.b = *reinterpret_cast<const uint4*>(u + ep.inter + h0);
      }
      if (ep.row_weights) in.p = ep.row_weights[row];
    }
    return in;
  }

  // The activation backward of item k from its staged G; returns its dp contribution.
  template <int kLayout, int kAct>
  static __device__ __forceinline__ float staged_apply(const TileInfo& t, const GroupedGemmProblem& prob,
                                                       const EpilogueParams& ep, int c, int ctid, int k,
                                                       const StagedIn& in, uint32_t stage) {
    using Row = EpilogueRow<T>;
    const int tr = staged_tile_row(c, ctid, k);
    const int h0 = staged_column(t, ctid, k);
    if (!(tr < t.rows_valid && h0 < prob.n)) return 0.0f;
    const uint32_t src = stage + static_cast<uint32_t>(bwd_stage_load_index(ctid, k)) * 4u;
    const float4 ga = ld_shared_f32x4(src), gb = ld_shared_f32x4(src + 16);
    const float G[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
    const uint32_t ua[4] = {in.a.x, in.a.y, in.a.z, in.a.w};
    const uint32_t ub[4] = {in.b.x, in.b.y, in.b.z, in.b.w};
    const float p = in.p;
    const ActParams act = act_params_as<kAct>(ep.act);  // Row::kBwdRuntimeKind = -1: as given
    const int64_t row = t.row0 + tr;
    T* du = static_cast<T*>(ep.c) + row * ep.ldc;
    T* hp = static_cast<T*>(ep.h) + row * ep.ldh;
    uint32_t o0[4], o1[4], oh[4];
    uint32_t oi[8];  // interleaved du: 8 words (gate, up) of h columns h0 .. h0 + 7
    float part = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {  // h columns h0 + 2 e, h0 + 2 e + 1
      const float a0 = G[2 * e], a1 = G[2 * e + 1];
      const float pg0 = p * a0, pg1 = p * a1;
      float act0, act1;
      if constexpr (kLayout == Row::kBwdRelu2) {
        const float2 uu = unpack_pair_bits<T>(ua[e]);
        act0 = act_relu2(uu.x);
        act1 = act_relu2(uu.y);
        o0[e] = pack_pair_bits<T>(act_relu2_grad(uu.x) * pg0, act_relu2_grad(uu.y) * pg1);
      } else if constexpr (kLayout == Row::kBwdInterleaved) {
        // word m of (a, b) (m < 4 in a, m >= 4 in b): gate and up of h column h0 + m
        const uint32_t words[8] = {ua[0], ua[1], ua[2], ua[3], ub[0], ub[1], ub[2], ub[3]};
        const float2 gv0 = unpack_pair_bits<T>(words[2 * e]);
        const float2 gv1 = unpack_pair_bits<T>(words[2 * e + 1]);
        const GatedGrad d0 = act_gated_grad(act, gv0.x, gv0.y);
        const GatedGrad d1 = act_gated_grad(act, gv1.x, gv1.y);
        act0 = d0.act;
        act1 = d1.act;
        const uint32_t w0 = pack_pair_bits<T>(d0.d_gate * pg0, d0.d_up * pg0);
        const uint32_t w1 = pack_pair_bits<T>(d1.d_gate * pg1, d1.d_up * pg1);
        oi[2 * e] = w0;  // du words of h columns h0 + 2 e, h0 + 2 e + 1
        oi[2 * e + 1] = w1;
      } else {
        const float2 g = unpack_pair_bits<T>(ua[e]);
        const float2 v = unpack_pair_bits<T>(ub[e]);
        const GatedGrad d0 = act_gated_grad(act, g.x, v.x);
        const GatedGrad d1 = act_gated_grad(act, g.y, v.y);
        act0 = d0.act;
        act1 = d1.act;
        o0[e] = pack_pair_bits<T>(d0.d_gate * pg0, d1.d_gate * pg1);
        o1[e] = pack_pair_bits<T>(d0.d_up * pg0, d1.d_up * pg1);
      }
      oh[e] = pack_pair_bits<T>(act0 * p, act1 * p);
      part += a0 * act0 + a1 * act1;
    }
    if constexpr (kLayout == Row::kBwdRelu2) {
      *reinterpret_cast<uint4*>(du + h0) = make_uint4(o0[0], o0[1], o0[2], o0[3]);
    } else if constexpr (kLayout == Row::kBwdInterleaved) {
      *reinterpret_cast<uint4*>(du + 2 * h0) = make_uint4(oi[0], oi[1], oi[2], oi[3]);
      *reinterpret_cast<uint4*>(du + 2 * h0 + 8) = make_uint4(oi[4], oi[5], oi[6], oi[7]);
    } else {
      *reinterpret_cast<uint4*>(du + h0) = make_uint4(o0[0], o0[1], o0[2], o0[3]);
      *reinterpret_cast<uint4*>(du + ep.inter + h0) = make_uint4(o1[0], o1[1], o1[2], o1[3]);
    }
    *reinterpret_cast<uint4*>(hp + h0) = make_uint4(oh[0], oh[1], oh[2], oh[3]);
    return part;
  }

  template <int kLayout, int kAct>
  static __device__ __forceinline__ void epilogue_bwd_act_staged_as(const TileInfo& t, const GroupedGemmProblem& prob,
                                                                    const EpilogueParams& ep, const float (&d)[128],
                                                                    uint32_t smem, int c, int ctid) {
    const int warp = ctid >> 5, lane = ctid & 31;
    const uint32_t stage = smem + Smem::kStaging + static_cast<uint32_t>(c) * kBwdStageRegionBytes;
    const uint32_t bar = kStageBarrier0 + static_cast<uint32_t>(c);
    // Fragment store address of (h, jj) = (0, 0); the others are constant offsets from it.
    const uint32_t wr = stage + static_cast<uint32_t>(bwd_stage_store_index(warp, lane, 0, 0)) * 4u;
    // dp of the thread's 4 rows, rotated every item so that dp0 always belongs to item k's row.
    float dp0 = 0.0f, dp1 = 0.0f, dp2 = 0.0f, dp3 = 0.0f;
    // One item: (every second item) stage the pass's fragments, then the activation backward.
    auto item = [&](int k, const StagedIn& in) {
      if ((k & 1) == 0) {
        bar_sync_named(bar, Cfg::kWarpgroupThreads);  // every read of the previous pass is done
        const int s = k >> 2;
        const bool writer = bwd_stage_writer_pass(warp) == bwd_stage_item_pass(k);
#pragma unroll
        for (int ss = 0; ss < kStageSub; ++ss) {
          if (writer && ss == s) {
#pragma unroll
            for (int jj = 0; jj < kBwdStageCols / 8; ++jj) {
              const int j = (kBwdStageCols / 8) * ss + jj;
#pragma unroll
              for (int h = 0; h < 2; ++h)
                st_shared_f32x2(wr + static_cast<uint32_t>(bwd_stage_store_index(0, 0, h, jj)) * 4u, d[4 * j + 2 * h],
                                d[4 * j + 2 * h + 1]);
            }
          }
        }
        bar_sync_named(bar, Cfg::kWarpgroupThreads);  // the pass is staged
      }
      const float part = staged_apply<kLayout, kAct>(t, prob, ep, c, ctid, k, in, stage);
      const float acc = dp0 + part;
      dp0 = dp1;
      dp1 = dp2;
      dp2 = dp3;
      dp3 = acc;
    };
    // u one item ahead in a rolled loop. The rotation (cur = b0; b0 = b1) is a register move of
    // the load issued one item before, which waits for it; three statically named buffers (two
    // items of cover, three copies of the item) were measured on an H200 and changed nothing (act
    // step qwen3 1 483 vs 1 453 us, dsv3 1 989 vs 2 005, mixtral 4 588 vs 4 465; 182741b): the
    // epilogue is bound by issuing its ~830 instructions per item, not by the u loads
    // (docs/experts.md), so the single copy stays.
    StagedIn b0 = staged_load<kLayout>(t, prob, ep, c, ctid, 0);
    StagedIn b1 = staged_load<kLayout>(t, prob, ep, c, ctid, 1);
#pragma unroll 1
    for (int k = 0; k < kStagedItems; ++k) {
      const StagedIn cur = b0;
      b0 = b1;
      if (k + 2 < kStagedItems) b1 = staged_load<kLayout>(t, prob, ep, c, ctid, k + 2);
      item(k, cur);
    }
    const float dps[4] = {dp0, dp1, dp2, dp3};
#pragma unroll
    for (int i = 0; i < kItemsPerSub; ++i) {
      float v = dps[i];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      const int tr = staged_tile_row(c, ctid, i);
      if ((ctid & 7) == 0 && tr < t.rows_valid) ep.dp_partial[(t.row0 + tr) * ep.ld_dp + t.n_tile] = v;
    }
  }

  static __device__ __forceinline__ void epilogue_bwd_act_staged(const TileInfo& t, const GroupedGemmProblem& prob,
                                                                 const EpilogueParams& ep, const float (&d)[128],
                                                                 uint32_t smem, int c, int ctid) {
    using Row = EpilogueRow<T>;
    if (ep.act.kind == kActRelu2) {
      epilogue_bwd_act_staged_as<Row::kBwdRelu2, kActRelu2>(t, prob, ep, d, smem, c, ctid);
    } else if (ep.interleaved) {
      with_gated_kind(ep.act, [&](auto kind) {  // -1 (the run-time kind) is Row::kBwdRuntimeKind
        epilogue_bwd_act_staged_as<Row::kBwdInterleaved, decltype(kind)::value>(t, prob, ep, d, smem, c, ctid);
      });
    } else {
      with_gated_kind(ep.act, [&](auto kind) {
        epilogue_bwd_act_staged_as<Row::kBwdConcat, decltype(kind)::value>(t, prob, ep, d, smem, c, ctid);
      });
    }
  }

  // ---- kEpiStore, TMA stores (kTmaSt; MOEKIT_SM90_TMA_STORE) ----
  // The values of EpilogueRow::store_values (the register-direct epilogue's plain_pair<kEpiStore>
  // maths, one definition), rounded to T by pack_pair_bits (store_pair's conversion): the same
  // bits. Only for a warpgroup whose 64 rows all lie inside the tile's group (the caller checks);
  // columns at or past N are written as zeros into the staging region and clipped by the tensor
  // map (a box starting at or past N is not issued).
  static constexpr uint32_t kTmaStoreBarrier0 = 4;  // named barriers 4, 5: consumer warpgroup 0, 1
  struct StoreValue {
    const TileInfo& t;
    const GroupedGemmProblem& prob;
    const float (&d)[128];
    const EpilogueRow<T> (&er)[2];
    int q;
    __device__ __forceinline__ float2 operator()(int j, int h) const {
      const int col = plain_column(t.n0, j, q);
      return col < prob.n ? er[h].store_values(col, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]) : make_float2(0.0f, 0.0f);
    }
  };
  struct StoreBox {
    const CUtensorMap* map;
    int n0, n, row0;
    __device__ __forceinline__ void operator()(uint32_t src, int col) const {
      if (n0 + col < n) tma_store_2d(map, src, n0 + col, row0);
    }
  };
  static __device__ __forceinline__ void epilogue_tma_store(const TileInfo& t, const GroupedGemmProblem& prob,
                                                            const EpilogueParams& ep, const float (&d)[128],
                                                            const CUtensorMap* tma_c, uint32_t smem, int c,
                                                            int ctid) {
    const int warp = ctid >> 5, lane = ctid & 31;
    const T* bias = ep.bias ? static_cast<const T*>(ep.bias) + t.group * ep.bias_group_stride : nullptr;
    const int64_t row = t.row0 + 64 * c + 16 * warp + (lane >> 2);
    const bool use_p = reads_row_weight(ep, bias);
    const float p0 = use_p ? ep.row_weights[row] : 1.0f;
    const float p1 = use_p ? ep.row_weights[row + 8] : 1.0f;
    const EpilogueRow<T> er[2] = {{ep, bias, row, p0}, {ep, bias, row + 8, p1}};
    const uint32_t region = smem + Smem::kStaging + static_cast<uint32_t>(c) * kTmaStoreRegionBytes;
    tma_store_tile<T>(region, kTmaStoreBarrier0 + static_cast<uint32_t>(c), ctid,
                      StoreValue{t, prob, d, er, lane & 3},
                      StoreBox{tma_c, t.n0, prob.n, static_cast<int>(t.row0) + 64 * c});
  }

  // ---- kEpiGateUp / kEpiRelu2, TMA stores (kTmaSt; MOEKIT_SM90_TMA_STORE_GATE_UP) ----
  // Phases of 128 output columns through the warpgroup's staging region (grouped_gemm_sm90.hpp
  // lists them per layout; h last, so the accumulators die during the last phase). Per phase: the
  // elected thread (ctid 0, the only one that commits bulk groups) waits until the region's
  // previous bulk group has been read, barrier, every thread writes its fragment values as T (the
  // values of EpilogueRow's gate_up_* / relu2_* functions, which the register-direct epilogue
  // stores, rounded the same way; columns past the output's end as zeros), fence.proxy.async,
  // barrier. Then a warpgroup whose 64 rows all lie in the group has the elected thread issue the
  // phase's two boxes (a box starting at or past the output's columns is not issued, the other
  // clips there) and commit one bulk group; a group's tail warpgroup (1 .. 63 rows) copies its
  // valid rows out of the region by thread, 16 bytes at a time (columns, offsets and strides are
  // multiples of 8 elements: tma_store_gate_up_takes), and the next phase's first barrier orders
  // those shared loads before the region is rewritten. The last phase's bulk group drains while
  // the warpgroup runs the next tile's k loop.
  struct GuOut {
    const CUtensorMap* map;
    T* base;     // the output: h (ep.c) or u (ep.u)
    int64_t ld;  // its row stride
    int col0;    // first column of the phase (tensor-map column coordinate)
    int half;    // concatenated u: 0 gate, 1 up (3D map {I, 2, R}); -1: a 2D map {cols, R}
    int cols;    // columns of the output (of one half for the 3D map)
  };
  template <class Write>
  static __device__ __forceinline__ void gu_phase(uint32_t region, uint32_t bar, int ctid, int64_t row0, int rows,
                                                  const GuOut& o, Write&& write) {
    if (o.col0 >= o.cols) return;  // tile-uniform: no column of this phase is in the output
    if (ctid == 0) bulk_wait_group_read0();
    bar_sync_named(bar, Cfg::kWarpgroupThreads);
    write();
    fence_proxy_async_smem();
    bar_sync_named(bar, Cfg::kWarpgroupThreads);
    if (rows >= kTmaStoreRows) {
      if (ctid == 0) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const int col = o.col0 + Cfg::kBoxCols * b;
          const uint32_t src = region + static_cast<uint32_t>(b) * kTmaStoreBoxBytes;
          if (col < o.cols) {
            if (o.half < 0)
              tma_store_2d(o.map, src, col, static_cast<int>(row0));
            else
              tma_store_3d(o.map, src, col, o.half, static_cast<int>(row0));
          }
        }
        bulk_commit_group();
      }
    } else {
      // Thread ctid copies 16-byte chunk ch = ctid % 16 of the phase's 128 columns (box ch / 8)
      // of rows r = ctid / 16 + 8 k < rows: every such row has r % 8 = ctid / 16 % 8, so the
      // swizzled chunk stays put and the shared address steps by 8 rows (1024 bytes).
      const int ch = ctid & 15, rb = ctid >> 4;
      if (o.col0 + 8 * ch < o.cols) {
        const int64_t ld = static_cast<int64_t>(opaque_u64(static_cast<uint64_t>(o.ld)));
        T* dst = reinterpret_cast<T*>(opaque_u64(reinterpret_cast<uint64_t>(o.base))) +
                 (o.half > 0 ? static_cast<int64_t>(o.half) * o.cols : 0) + o.col0 + 8 * ch + (row0 + rb) * ld;
        const int64_t step = 8 * ld;
        uint32_t src = region + tma_store_chunk_offset(static_cast<uint32_t>(rb), static_cast<uint32_t>(ch));
#pragma unroll 1
        for (int r = rb; r < rows; r += 8, src += 8u * 128u, dst += step)
          *reinterpret_cast<uint4*>(dst) = ld_shared_v4(src);
      }
    }
  }

  static __device__ __forceinline__ void epilogue_gate_up_tma(const TileInfo& t, const GroupedGemmProblem& prob,
                                                              const EpilogueParams& ep, const float (&d)[128],
                                                              const CUtensorMap* tma_c, const CUtensorMap* tma_u,
                                                              uint32_t smem_in) {
    // Everything below that does not change from tile to tile is derived here, per tile, from
    // opaque values (opaque_u32, thread_index_here): hoisted out of the tile loop it would hold
    // registers across the k loop next to the 128 accumulators (ptxas spilled them there).
    const uint32_t tid = static_cast<uint32_t>(thread_index_here());
    const int c = static_cast<int>(tid / Cfg::kWarpgroupThreads) - 1;  // consumer warpgroup 0, 1
    const int ctid = static_cast<int>(tid % Cfg::kWarpgroupThreads);
    const int rows = t.rows_valid - 64 * c;  // of this warpgroup's 64 rows, those in the group
    if (rows <= 0) return;                   // warpgroup-uniform: nothing to store
    const uint32_t smem = opaque_u32(smem_in);
    const int warp = ctid >> 5, lane = ctid & 31, q = lane & 3;
    const int lr = 16 * warp + (lane >> 2);  // the thread's warpgroup rows lr, lr + 8
    const int64_t row0 = t.row0 + 64 * c;
    const T* bias = ep.bias ? static_cast<const T*>(ep.bias) + t.group * ep.bias_group_stride : nullptr;
    // Rows past the group are staged (never stored) with weight 1: no read past the group's rows.
    const float p0 = ep.row_weights && lr < rows ? ep.row_weights[row0 + lr] : 1.0f;
    const float p1 = ep.row_weights && lr + 8 < rows ? ep.row_weights[row0 + lr + 8] : 1.0f;
    const EpilogueRow<T> er[2] = {{ep, bias, row0 + lr, p0}, {ep, bias, row0 + lr + 8, p1}};
    const uint32_t region = smem + Smem::kStaging + static_cast<uint32_t>(c) * kTmaStoreRegionBytes;
    const uint32_t bar = kTmaStoreBarrier0 + static_cast<uint32_t>(c);
    // Staging address of the thread's row lr + 8 h, phase column col (= tma_store_offset, see
    // tma_store_col_offset): the XOR leaves the 1024-byte-aligned region's bits alone, so it may
    // apply to region + row base; rows lr and lr + 8 are 1024 bytes apart. Columns 8 j + 2 q
    // (pairs) and 4 j + q (interleaved h) add their byte inside the chunk, 4 q or 2 q, after it.
    const uint32_t base0 = region + tma_store_row_base(static_cast<uint32_t>(lr));
    const uint32_t base1 = base0 + 128u * 8u;
    auto at = [&](int h, int col) {  // col: a compile-time constant after unrolling
      return tma_store_col_offset(h ? opaque_u32(base1) : opaque_u32(base0), static_cast<uint32_t>(col));
    };
    const uint32_t qb4 = 4u * static_cast<uint32_t>(q), qb2 = 2u * static_cast<uint32_t>(q);
    T* const hout = static_cast<T*>(ep.c);
    T* const uout = static_cast<T*>(ep.u);
    const int N = prob.n;
    if constexpr (kKind == kEpiGateUp) {
      if (prob.gate_up_half > 0) {
        // Concatenated: chunk j < 16 holds gate columns i, i + 1 (i = n0 / 2 + 8 j + 2 q), chunk
        // j + 16 their up columns; phase column 8 j + 2 q.
        const int I = prob.gate_up_half;
        const int i0 = t.n0 / 2;
        if (uout) {
#pragma unroll
          for (int half = 0; half < 2; ++half)
            gu_phase(region, bar, ctid, row0, rows, GuOut{tma_u, uout, ep.ldu, i0, half, I}, [&] {
#pragma unroll
              for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < 16; ++j) {
                  const int i = paired_h_column(t.n0, j, q);
                  if (i < I) {
                    const auto x = er[h].gate_up_biased2(i, d[4 * j + 2 * h], d[4 * j + 2 * h + 1],
                                                         d[4 * (j + 16) + 2 * h], d[4 * (j + 16) + 2 * h + 1]);
                    st_shared_b32(at(h, 8 * j) + qb4,
                                  half == 0 ? pack_pair_bits<T>(x.g0, x.g1) : pack_pair_bits<T>(x.v0, x.v1));
                  }
                }
            });
        }
        auto h_phase = [&](auto act_kind) {
          constexpr int kAct = decltype(act_kind)::value;
#pragma unroll
          for (int jh = 0; jh < 32; ++jh) {  // chunk j = jh / 2 of both rows, then j + 1
            const int j = jh >> 1, h = jh & 1;
            const int i = paired_h_column(t.n0, j, q);
            if (i < I) {
              const float2 o = er[h].template gate_up_h2<kAct>(er[h].gate_up_biased2(
                  i, d[4 * j + 2 * h], d[4 * j + 2 * h + 1], d[4 * (j + 16) + 2 * h], d[4 * (j + 16) + 2 * h + 1]));
              st_shared_b32(at(h, 8 * j) + qb4, pack_pair_bits<T>(o.x, o.y));
            }
          }
        };
        gu_phase(region, bar, ctid, row0, rows, GuOut{tma_c, hout, ep.ldc, i0, -1, I}, [&] {
          // SwiGLU without a limit (the common case) without the other kinds' instructions and
          // the clamp's: the same values.
          with_gated_kind(ep.act, h_phase);
        });
      } else {
        // Interleaved: accumulator pair (v, v + 1), v = n0 + 8 j + 2 q, is (gate, up) of h column
        // v / 2 (phase column 4 j + q of h, one element) and u columns v, v + 1.
        if (uout) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            gu_phase(region, bar, ctid, row0, rows, GuOut{tma_u, uout, ep.ldu, t.n0 + kTmaStoreCols * hf, -1, N},
                     [&] {
#pragma unroll
                       for (int h = 0; h < 2; ++h)
#pragma unroll
                         for (int jj = 0; jj < 16; ++jj) {
                           const int j = 16 * hf + jj;
                           const int v = plain_column(t.n0, j, q);
                           if (v < N) {
                             const float2 gv = er[h].gate_up_biased1(v >> 1, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
                             st_shared_b32(at(h, 8 * jj) + qb4, pack_pair_bits<T>(gv.x, gv.y));
                           }
                         }
                     });
        }
        gu_phase(region, bar, ctid, row0, rows, GuOut{tma_c, hout, ep.ldc, t.n0 / 2, -1, N / 2}, [&] {
#pragma unroll
          for (int j = 0; j < 32; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int v = plain_column(t.n0, j, q);
              if (v < N) {
                st_shared_b16(at(h, 4 * j) + qb2,
                              pack_one_bits<T>(er[h].gate_up_h1(
                                  er[h].gate_up_biased1(v >> 1, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]))));
              }
            }
        });
      }
    } else {
      static_assert(kKind == kEpiRelu2, "gate-up TMA-store epilogue: kEpiGateUp or kEpiRelu2");
      // relu2: accumulator pair (c, c + 1), c = n0 + 8 j + 2 q: phase hf = j / 16, column 8 (j % 16) + 2 q.
      if (uout) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          gu_phase(region, bar, ctid, row0, rows, GuOut{tma_u, uout, ep.ldu, t.n0 + kTmaStoreCols * hf, -1, N}, [&] {
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int jj = 0; jj < 16; ++jj) {
                const int j = 16 * hf + jj;
                const int col = plain_column(t.n0, j, q);
                if (col < N) {
                  const float2 a = er[h].relu2_biased(col, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
                  st_shared_b32(at(h, 8 * jj) + qb4, pack_pair_bits<T>(a.x, a.y));
                }
              }
          });
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        gu_phase(region, bar, ctid, row0, rows, GuOut{tma_c, hout, ep.ldc, t.n0 + kTmaStoreCols * hf, -1, N}, [&] {
#pragma unroll
          for (int jj = 0; jj < 16; ++jj)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int j = 16 * hf + jj;
              const int col = plain_column(t.n0, j, q);
              if (col < N) {
                const float2 o = er[h].relu2_h(er[h].relu2_biased(col, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]));
                st_shared_b32(at(h, 8 * jj) + qb4, pack_pair_bits<T>(o.x, o.y));
              }
            }
        });
    }
  }

  // Where the consumers decode a tile: under its first wgmma batch (see the k loop), except in
  // the gate-up TMA-store kernels, whose epilogue needs every register there is: decoding inside
  // the k loop made ptxas spill 72 bytes there (measured), so they decode before it.
  static constexpr bool kDecodeUnderWgmma = !(kTmaSt && kKind != kEpiStore);

  // Waits for stage s (parity `phase`) and issues its wgmma batch, the 4 k16 steps of a k tile,
  // into d (committed, not waited for).
  static __device__ __forceinline__ void issue_k_tile(float (&d)[128], uint32_t smem, uint32_t s, uint32_t phase,
                                                      uint32_t a_rows) {
    mbar_wait(smem + Smem::kFullBarrier + 8 * s, phase);
    const uint64_t da = wgmma_desc(smem + Smem::a_offset(s) + a_rows, kDescALbo, kDescASbo);
    const uint64_t db = kBNK ? wgmma_desc(smem + Smem::b_offset(s), kDescBNkLbo, kDescBNkSbo)
                             : wgmma_desc(smem + Smem::b_offset(s), kDescBKnLbo, kDescBKnSbo);
    constexpr uint32_t kBStep = kBNK ? kBNkStepBytes : kBKnStepBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)
      wgmma_m64n256k16<T, 0, kTransB>(d, da + ((kk * kAStepBytes) >> 4), db + ((kk * kBStep) >> 4));
    wgmma_commit();
  }

  // The tile's epilogue from a consumer warpgroup's accumulators, by kind and instance.
  static __device__ __forceinline__ void epilogue_tile(const TileInfo& t, const GroupedGemmProblem& prob,
                                                       const EpilogueParams& ep, float (&d)[128],
                                                       const CUtensorMap* tma_c, const CUtensorMap* tma_u,
                                                       uint32_t smem, int c, int ctid) {
    const int warp = ctid >> 5, lane = ctid & 31;
    if constexpr (kStaged) {
      epilogue_bwd_act_staged(t, prob, ep, d, smem, c, ctid);
    } else if constexpr (kKind == kEpiBwdAct) {
      epilogue_bwd_act(t, prob, ep, d, 64 * c + 16 * warp + (lane >> 2), lane);
    } else if constexpr (kTmaSt && kKind != kEpiStore) {
      // Tail warpgroups included (they copy their rows out of the staging region): this
      // instance holds no register-direct epilogue.
      epilogue_gate_up_tma(t, prob, ep, d, tma_c, tma_u, smem);
    } else if constexpr (kTmaSt) {
      // A warpgroup with rows past its group's end (the group's last row tile) stores
      // register-direct: a box would write them into the next group's rows (warpgroup-uniform).
      if (64 * c + 64 <= t.rows_valid)
        epilogue_tma_store(t, prob, ep, d, tma_c, smem, c, ctid);
      else
        epilogue(t, prob, ep, d, 64 * c + 16 * warp + (lane >> 2), lane);
    } else {
      epilogue(t, prob, ep, d, 64 * c + 16 * warp + (lane >> 2), lane);
    }
  }

  // A consumer warpgroup (c = 0, 1): rows [64 c, 64 c + 64) of every tile, the whole tiles
  // [0, total) of the round robin.
  static __device__ __forceinline__ void consumer(const GroupedGemmProblem& prob, const EpilogueParams& ep,
                                                  const CUtensorMap* tma_c, const CUtensorMap* tma_u,
                                                  const RowTileSchedule& sched,
                                                  int64_t total, uint32_t smem, int c, int ctid) {
    const int lane = ctid & 31;
    const int ktiles = (prob.k + kBK - 1) / kBK;
    const int prefetch_kt = ktiles > kUPrefetchKTiles ? ktiles - kUPrefetchKTiles : 0;  // kEpiBwdAct
    const uint32_t a_rows = static_cast<uint32_t>(c) * 64u * 128u;  // this warpgroup's 64 rows of A
    uint32_t it = 0;
    for (int64_t tile = first_tile(); tile < total; tile += tile_stride()) {
      // Zeroed, not left to a first wgmma with scale-d 0: undefined accumulators read by that
      // wgmma count as live across the previous tile's epilogue, and ptxas then spills the
      // TMA-store kernels (72 bytes, measured).
      float d[128];
#pragma unroll
      for (int i = 0; i < 128; ++i) d[i] = 0.0f;
      TileInfo t;
      if constexpr (!kDecodeUnderWgmma) t = decode(sched, prob, tile);
      uint32_t prev = 0;
      for (int kt = 0; kt < ktiles; ++kt, ++it) {
        const uint32_t s = it % kStages;
        issue_k_tile(d, smem, s, (it / kStages) & 1u, a_rows);
        // The tile's decode (three divisions and a binary search over the prefix in shared
        // memory, a chain of dependent loads) runs while its first wgmma batch executes, not
        // between the previous tile's epilogue and this k loop (the asm's memory clobber keeps
        // its shared loads below the commit). K >= 1 (sm90::takes): every tile has a k tile 0.
        if constexpr (kDecodeUnderWgmma) {
          if (kt == 0) t = decode(sched, prob, tile);
        }
        if constexpr (kKind == kEpiBwdAct) {
          // c * kWarpgroupThreads + ctid, read afresh (thread_index_here)
          if (kt == prefetch_kt) prefetch_u(t, prob, ep, thread_index_here() - Cfg::kWarpgroupThreads);
        }
        wgmma_wait<1>();  // k tile kt - 1's batch is done: its stage may be refilled
        if (kt > 0 && lane == 0) release_stage(smem + Smem::kEmptyBarrier + 8 * prev);
        prev = s;
      }
      wgmma_wait<0>();
      fence_acc(d);
      if (lane == 0) release_stage(smem + Smem::kEmptyBarrier + 8 * prev);
      epilogue_tile(t, prob, ep, d, tma_c, tma_u, smem, c, ctid);
    }
    // The staging regions must outlive the bulk stores reading them (and their global writes are
    // complete before the CTA retires).
    if constexpr (kTmaSt) {
      if (ctid == 0) bulk_wait_group0();
    }
  }

  // A consumer warpgroup of the tail kernel: the CTA's tail units (partial, whole, fixup). Only the
  // unit's tile and k range stay live across its k loop (the role follows from the range: k_begin
  // > 0 partial, k_end < KT fixup; the tile is decoded after it): the k loop has no more registers
  // to spare here than in consumer().
  static __device__ __forceinline__ void consumer_tail(const GroupedGemmProblem& prob, const EpilogueParams& ep,
                                                       const CUtensorMap* tma_c, const CUtensorMap* tma_u,
                                                       const RowTileSchedule& sched, const StreamKTail& tail,
                                                       uint32_t smem, int c, int ctid) {
    const int lane = ctid & 31;
    const int ktiles = (prob.k + kBK - 1) / kBK;
    const uint32_t a_rows = static_cast<uint32_t>(c) * 64u * 128u;
    uint32_t it = 0;  // k tiles of the CTA's earlier units: also tail_unit's `done`
    WorkUnit u;
    while (tail_unit(tail, blockIdx.x, it, &u)) {
      float d[128];
#pragma unroll
      for (int i = 0; i < 128; ++i) d[i] = 0.0f;
      for (int kt = u.k_begin; kt < u.k_end; ++kt, ++it) {
        issue_k_tile(d, smem, it % kStages, (it / kStages) & 1u, a_rows);
        wgmma_wait<1>();
        if (kt > u.k_begin && lane == 0) release_stage(smem + Smem::kEmptyBarrier + 8 * ((it - 1) % kStages));
      }
      wgmma_wait<0>();
      fence_acc(d);
      if (lane == 0) release_stage(smem + Smem::kEmptyBarrier + 8 * ((it - 1) % kStages));
      if (u.k_begin > 0) {  // kUnitPartial
        write_partial(prob, d, lane);
        continue;
      }
      if (u.k_end < ktiles) add_partial(prob, d, lane);  // kUnitFixup
      epilogue_tile(decode(sched, prob, u.tile), prob, ep, d, tma_c, tma_u, smem, c, ctid);
    }
    if constexpr (kTmaSt) {
      if (ctid == 0) bulk_wait_group0();
    }
  }

  static __device__ __forceinline__ void run(const CUtensorMap* tma_a, const CUtensorMap* tma_b,
                                             const CUtensorMap* tma_c, const CUtensorMap* tma_u,
                                             const GroupedGemmProblem& prob, const EpilogueParams& ep,
                                             unsigned char* smem_raw) {
    // Swizzled tiles start on 1024-byte atoms: round the dynamic shared memory up (bytes() keeps
    // kAlign bytes of slack for it).
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t pad = ((raw + Smem::kAlign - 1) & ~(Smem::kAlign - 1)) - raw;
    const uint32_t smem = raw + pad;
    int32_t* s_prefix = reinterpret_cast<int32_t*>(smem_raw + pad + Smem::kPrefix);
    const int tid = threadIdx.x;
    const int tiles_n = (prob.n + kBN - 1) / kBN;
    build_row_tile_prefix<Cfg::kThreads>(prob.offsets, prob.num_groups, prob.max_rows, Cfg::kSchedBM, s_prefix,
                                         s_prefix + prob.num_groups + 1);
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        mbar_init(smem + Smem::kFullBarrier + 8 * s, 1);
        mbar_init(smem + Smem::kEmptyBarrier + 8 * s, kConsumerWarps * kCluster);
      }
      fence_barrier_init();
    }
    if constexpr (kCluster > 1) {
      cluster_sync();
    } else {
      __syncthreads();
    }
    const RowTileSchedule sched{s_prefix, prob.num_groups, tiles_n, Cfg::kGroupM};
    // The whole tiles [0, total) of this launch: all of them, or (kStreamK, partial slots given)
    // those before the stream-K tail, which the tail kernel, launched next with the same grid,
    // runs; it may start on the SMs this grid leaves (programmatic dependent launch), reads
    // nothing this grid writes, and waits for it before it completes.
    StreamKTail tail;
    if constexpr (kStreamK) {
      tail = make_stream_k_tail(static_cast<uint32_t>(sched.total_tiles()), static_cast<int>(gridDim.x),
                                (prob.k + kBK - 1) / kBK, prob.sk_slots);
      if constexpr (!kSkTail) pdl_launch_dependents();
    }
    const int64_t total = kSkTail ? 0 : kStreamK ? static_cast<int64_t>(tail.dp_tiles) : sched.total_tiles();
    const int wg = tid / Cfg::kWarpgroupThreads;
    // No block-wide barrier after this point: the producer warpgroup's idle threads leave.
    if (wg == 0) {
      setmaxnreg_dec<Cfg::kProducerRegs>();
      if (tid == 0) {
        producer(tma_a, tma_b, prob, sched, total, tail, smem);
        if constexpr (kSkTail) pdl_wait();  // completes after the whole-tile grid (see above)
      }
    } else {
      setmaxnreg_inc<Cfg::kConsumerRegs>();
      if constexpr (kTmaSt) {
        if (tid == Cfg::kWarpgroupThreads || tid == 2 * Cfg::kWarpgroupThreads) {
          prefetch_tensor_map(tma_c);
          if (kKind != kEpiStore && ep.u != nullptr) prefetch_tensor_map(tma_u);
        }
      }
      if constexpr (kSkTail)
        consumer_tail(prob, ep, tma_c, tma_u, sched, tail, smem, wg - 1, tid - wg * Cfg::kWarpgroupThreads);
      else
        consumer(prob, ep, tma_c, tma_u, sched, total, smem, wg - 1, tid - wg * Cfg::kWarpgroupThreads);
    }
  }
};

// tma_c: the output's tensor map of the TMA-store instances (kStoreStages > 0; unused otherwise;
// the gate-up kinds' h); tma_u: the gate-up kinds' u (TMA-store instances with ep.u only).
template <class T, bool kBNK, int kKind, int kStagedStages, int kStoreStages, class Cfg, bool kSkTail = false>
__global__ void __launch_bounds__(Cfg::kMaxThreads, 1)
    grouped_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tma_a, const __grid_constant__ CUtensorMap tma_b,
                             const __grid_constant__ CUtensorMap tma_c, const __grid_constant__ CUtensorMap tma_u,
                             const GroupedGemmProblem prob, const EpilogueParams ep) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  GroupedGemmSm90<T, kBNK, kKind, kStagedStages, kStoreStages, Cfg, kSkTail>::run(&tma_a, &tma_b, &tma_c, &tma_u,
                                                                                  prob, ep, smem_raw);
}

// ---- Weight gradients (axis K) -------------------------------------------------------------------
// C_g[M, N] = X_g^T Y_g over the rows of split `split` of group g (grouped_problem.cuh), tile
// 128 (m) x 256 (n) x 64 rows: A is X^T, two [64 rows][64 m] boxes (one per consumer warpgroup,
// M-major, imm-trans-a = 1), B is Y, four [64 rows][64 n] boxes (N-major, as B KN). The rows of a
// split start anywhere and its last k tile may end inside the box: TMA then loads rows of the
// next group (real data), so before that k tile's wgmma both consumer warpgroups zero the rows
// past the split's end in every box of the stage (generic stores, fence.proxy.async so the async
// proxy sees them, one 256-thread named barrier), as the sm_80 path's zero fill does for both
// operands (no 0 x inf from rows that are not the group's). A split without rows owns its tiles
// all the same and stores zeros (the empty expert's gradient).

__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void st_shared_zero16(uint32_t addr) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
}

struct WgradTileInfo {
  int group, split, m0, n0;
  int64_t row0;  // first row of the split
  int ktiles;    // k tiles of 64 rows
  int k_last;    // rows of the last k tile (1 .. 64), or 0 without rows
};

// kStoreStages > 0 (splits == 1 only): the TMA-store epilogue (tma_store_tile) into C [G][M][N]
// through a {N, M, G} tensor map, with a ring of kStoreStages.
template <class T, int kStoreStages = 0>
struct GroupedWgradSm90 {
  using Cfg = TileConfig;
  static constexpr bool kTmaSt = kStoreStages > 0;
  static_assert(kStoreStages == 0 || kStoreStages == 3 || kStoreStages == 4, "TMA-store epilogue: 3 or 4 stages");
  using Smem = typename std::conditional<kTmaSt, SmemLayoutTmaStore<kTmaSt ? kStoreStages : 4>, SmemLayout>::type;
  static constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kStages = Smem::kStages;
  static constexpr uint32_t kTmaStoreBarrier0 = 4;  // named barriers 4, 5: consumer warpgroup 0, 1
  struct StoreValue {
    const float (&d)[128];
    __device__ __forceinline__ float2 operator()(int j, int h) const {
      return make_float2(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
    }
  };
  struct StoreBox {
    const CUtensorMap* map;
    int n0, n, m, group;
    __device__ __forceinline__ void operator()(uint32_t src, int col) const {
      if (n0 + col < n) tma_store_3d(map, src, n0 + col, m, group);
    }
  };
  static constexpr int kConsumerWarps = 4 * Cfg::kConsumers;
  static constexpr uint32_t kZeroBarrier = 1;  // named barrier of the two consumer warpgroups

  static __device__ __forceinline__ WgradTileInfo decode(const WgradSchedule& sched, const GroupedGemmProblem& prob,
                                                         int64_t tile) {
    const WgradTile wt = sched.decode(tile);
    int64_t gb, ge, sb, se;
    group_rows(prob.offsets, wt.group, prob.max_rows, &gb, &ge);
    split_rows(gb, ge, wt.split, prob.splits, &sb, &se);
    WgradTileInfo t;
    t.group = wt.group;
    t.split = wt.split;
    t.m0 = wt.m_tile * kBM;
    t.n0 = wt.n_tile * kBN;
    t.row0 = sb;
    const int64_t len = se - sb;
    t.ktiles = static_cast<int>((len + kBK - 1) / kBK);
    t.k_last = static_cast<int>(len - static_cast<int64_t>(t.ktiles > 0 ? t.ktiles - 1 : 0) * kBK);
    return t;
  }

  static __device__ __forceinline__ void producer(const CUtensorMap* tma_x, const CUtensorMap* tma_y,
                                                  const GroupedGemmProblem& prob, const WgradSchedule& sched,
                                                  int64_t total, uint32_t smem) {
    prefetch_tensor_map(tma_x);
    prefetch_tensor_map(tma_y);
    uint32_t it = 0;
    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const WgradTileInfo t = decode(sched, prob, tile);
      uint32_t boxes = 0;
#pragma unroll
      for (int b = 0; b < 2; ++b) boxes += t.m0 + Cfg::kBoxCols * b < prob.m ? 1u : 0u;
#pragma unroll
      for (int j = 0; j < 4; ++j) boxes += t.n0 + Cfg::kBoxCols * j < prob.n ? 1u : 0u;
      const uint32_t tx = boxes * Smem::kBBoxBytes;
      for (int kt = 0; kt < t.ktiles; ++kt, ++it) {
        const uint32_t s = it % kStages;
        const uint32_t phase = (it / kStages) & 1u;
        const uint32_t full = smem + Smem::kFullBarrier + 8 * s;
        mbar_wait(smem + Smem::kEmptyBarrier + 8 * s, phase ^ 1u);
        mbar_arrive_expect_tx(full, tx);
        const int row = static_cast<int>(t.row0 + static_cast<int64_t>(kt) * kBK);
#pragma unroll
        for (int b = 0; b < 2; ++b)
          if (t.m0 + Cfg::kBoxCols * b < prob.m)
            tma_load_2d(smem + Smem::a_offset(s) + b * Smem::kBBoxBytes, tma_x, full, t.m0 + Cfg::kBoxCols * b, row);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (t.n0 + Cfg::kBoxCols * j < prob.n)
            tma_load_2d(smem + Smem::b_offset(s) + j * Smem::kBBoxBytes, tma_y, full, t.n0 + Cfg::kBoxCols * j, row);
      }
    }
  }

  // Zeroes rows [valid, 64) of the six boxes of stage s (two of A, four of B; 128-byte rows, so
  // the swizzle inside a row does not matter); `t` in [0, 256) over both consumer warpgroups.
  static __device__ __forceinline__ void zero_tail_rows(uint32_t smem, uint32_t s, int valid, int t) {
    const int chunks = (kBK - valid) * 8;  // 16-byte chunks per box
    for (int i = t; i < 6 * chunks; i += Cfg::kConsumers * Cfg::kWarpgroupThreads) {
      const int box = i / chunks, rest = i - box * chunks;
      const uint32_t base = box < 2 ? Smem::a_offset(s) + box * Smem::kBBoxBytes
                                    : Smem::b_offset(s) + (box - 2) * Smem::kBBoxBytes;
      st_shared_zero16(smem + base + static_cast<uint32_t>(valid * 128 + rest * 16));
    }
    fence_proxy_async_shared();
    named_barrier_sync(kZeroBarrier, Cfg::kConsumers * Cfg::kWarpgroupThreads);
  }

  static __device__ __forceinline__ void consumer(const GroupedGemmProblem& prob, const EpilogueParams& ep,
                                                  const CUtensorMap* tma_c, const WgradSchedule& sched,
                                                  int64_t total, uint32_t smem, int c, int ctid) {
    const int warp = ctid >> 5, lane = ctid & 31, q = lane & 3;
    uint32_t it = 0;
    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const WgradTileInfo t = decode(sched, prob, tile);
      float d[128];
#pragma unroll
      for (int i = 0; i < 128; ++i) d[i] = 0.0f;
      uint32_t prev = 0;
      for (int kt = 0; kt < t.ktiles; ++kt, ++it) {
        const uint32_t s = it % kStages;
        const uint32_t phase = (it / kStages) & 1u;
        mbar_wait(smem + Smem::kFullBarrier + 8 * s, phase);
        if (kt + 1 == t.ktiles && t.k_last < kBK) zero_tail_rows(smem, s, t.k_last, c * Cfg::kWarpgroupThreads + ctid);
        const uint64_t da = wgmma_desc(smem + Smem::a_offset(s) + c * Smem::kBBoxBytes, kDescAMnLbo, kDescAMnSbo);
        const uint64_t db = wgmma_desc(smem + Smem::b_offset(s), kDescBKnLbo, kDescBKnSbo);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk)
          wgmma_m64n256k16<T, 1, 1>(d, da + ((kk * kAMnStepBytes) >> 4), db + ((kk * kBKnStepBytes) >> 4));
        wgmma_commit();
        wgmma_wait<1>();
        if (kt > 0 && lane == 0) mbar_arrive(smem + Smem::kEmptyBarrier + 8 * prev);
        prev = s;
      }
      wgmma_wait<0>();
      fence_acc(d);
      if (t.ktiles > 0 && lane == 0) mbar_arrive(smem + Smem::kEmptyBarrier + 8 * prev);
      if constexpr (kTmaSt) {
        // Rows m0 + 64 c .. + 63 of group t.group (m and n tails clip at the tensor map's M and
        // N; a warpgroup entirely past M stores nothing: warpgroup-uniform).
        const int m = t.m0 + 64 * c;
        if (m < prob.m)
          tma_store_tile<T>(smem + Smem::kStaging + static_cast<uint32_t>(c) * kTmaStoreRegionBytes,
                            kTmaStoreBarrier0 + static_cast<uint32_t>(c), ctid, StoreValue{d},
                            StoreBox{tma_c, t.n0, prob.n, m, t.group});
      } else {
        // Rows m = m0 + 64 c + 16 warp + lane / 4 (+ 8), columns n0 + 8 j + 2 q (+ 1).
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = t.m0 + 64 * c + 16 * warp + (lane >> 2) + 8 * h;
          if (m >= prob.m) continue;
#pragma unroll
          for (int j = 0; j < 32; ++j) {
            const int n = plain_column(t.n0, j, q);
            if (n < prob.n)
              wgrad_store_pair<T>(ep, prob.num_groups, prob.m, prob.n, t.group, t.split, prob.splits, m, n,
                                  d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
          }
        }
      }
    }
    if constexpr (kTmaSt) {  // the staging regions outlive the bulk stores reading them
      if (ctid == 0) bulk_wait_group0();
    }
  }

  static __device__ __forceinline__ void run(const CUtensorMap* tma_x, const CUtensorMap* tma_y,
                                             const CUtensorMap* tma_c, const GroupedGemmProblem& prob,
                                             const EpilogueParams& ep, unsigned char* smem_raw) {
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t smem = ((raw + Smem::kAlign - 1) & ~(Smem::kAlign - 1));
    const int tid = threadIdx.x;
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        mbar_init(smem + Smem::kFullBarrier + 8 * s, 1);
        mbar_init(smem + Smem::kEmptyBarrier + 8 * s, kConsumerWarps);
      }
      fence_barrier_init();
    }
    __syncthreads();
    const WgradSchedule sched{prob.num_groups, (prob.m + kBM - 1) / kBM, (prob.n + kBN - 1) / kBN, prob.splits,
                              Cfg::kGroupM};
    const int64_t total = sched.total_tiles();
    const int wg = tid / Cfg::kWarpgroupThreads;
    if (wg == 0) {
      setmaxnreg_dec<Cfg::kProducerRegs>();
      if (tid == 0) producer(tma_x, tma_y, prob, sched, total, smem);
    } else {
      setmaxnreg_inc<Cfg::kConsumerRegs>();
      if constexpr (kTmaSt) {
        if (tid == Cfg::kWarpgroupThreads || tid == 2 * Cfg::kWarpgroupThreads) prefetch_tensor_map(tma_c);
      }
      consumer(prob, ep, tma_c, sched, total, smem, wg - 1, tid - wg * Cfg::kWarpgroupThreads);
    }
  }
};

template <class T, int kStoreStages>
__global__ void __launch_bounds__(TileConfig::kThreads, 1)
    grouped_wgrad_sm90_kernel(const __grid_constant__ CUtensorMap tma_x, const __grid_constant__ CUtensorMap tma_y,
                              const __grid_constant__ CUtensorMap tma_c, const GroupedGemmProblem prob,
                              const EpilogueParams ep) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  GroupedWgradSm90<T, kStoreStages>::run(&tma_x, &tma_y, &tma_c, prob, ep, smem_raw);
}

// setmaxnreg.inc only returns once the pool holds the registers it asks for: the producer's
// setmaxnreg.dec frees (entry - kProducerRegs) per producer thread, the consumers need
// (kConsumerRegs - entry) each, so the kernel's entry allocation must be at least
// (128 kProducerRegs + 256 kConsumerRegs) / 384 = 168 registers. ptxas gives exactly that under
// __launch_bounds__(384, 1) today; a build that gives fewer (a -maxrregcount, another compiler)
// would hang every CTA, so it is refused here instead (checked once per kernel, host only).
// (TileConfig64: 256 threads compiled under the same bound, (128 x 40 + 128 x 232) / 256 = 136.)
template <class C = TileConfig>
inline cudaError_t check_register_budget(const void* kernel, std::atomic<int>& verdict) {
  int v = verdict.load(std::memory_order_acquire);
  if (v == 0) {
    cudaFuncAttributes attr{};
    const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    const int need = C::kWarpgroupThreads * C::kProducerRegs + C::kConsumers * C::kWarpgroupThreads * C::kConsumerRegs;
    v = attr.numRegs * C::kThreads >= need ? 1 : 2;
    verdict.store(v, std::memory_order_release);
  }
  return v == 1 ? cudaSuccess : cudaErrorNotSupported;
}

// kStoreStages > 0: the TMA-store epilogue with that ring depth (callers check tma_store_takes and
// tma_store_stages first).
template <class T, int kStoreStages = 0>
cudaError_t launch_wgrad(const GroupedGemmProblem& prob, const EpilogueParams& ep, cudaStream_t stream) {
  using Cfg = TileConfig;
  auto kernel = grouped_wgrad_sm90_kernel<T, kStoreStages>;
  static std::atomic<int> registers_ok{0};
  if (const cudaError_t e = check_register_budget(reinterpret_cast<const void*>(kernel), registers_ok))
    return e;
  const int64_t total = WgradSchedule{prob.num_groups, (prob.m + Cfg::kBM - 1) / Cfg::kBM,
                                      (prob.n + Cfg::kBN - 1) / Cfg::kBN, prob.splits, Cfg::kGroupM}
                            .total_tiles();
  if (total <= 0) return cudaSuccess;
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  CUtensorMap map_x, map_y;
  cudaError_t err = encode_tensor_map(&map_x, kBf16, tma_spec_rows(prob.max_rows, prob.m, prob.lda), prob.a);
  if (err != cudaSuccess) return err;
  if ((err = encode_tensor_map(&map_y, kBf16, tma_spec_rows(prob.max_rows, prob.n, prob.ldb), prob.b)) != cudaSuccess)
    return err;
  CUtensorMap map_c{};
  if constexpr (kStoreStages > 0) {
    if ((err = encode_tensor_map(&map_c, kBf16, tma_spec_store_wgrad(prob.num_groups, prob.m, prob.n), ep.c)) !=
        cudaSuccess)
      return err;
  }
  const size_t smem = GroupedWgradSm90<T, kStoreStages>::Smem::bytes(0);
  if ((err = ensure_dynamic_smem(kernel, smem)) != cudaSuccess) return err;
  const int32_t grid = resident_grid(kernel, Cfg::kThreads, smem, total);  // one CTA per SM
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(map_x, map_y, map_c, prob, ep);
  return cudaPeekAtLastError();
}

// Launch: tensor maps encoded here (host only), a persistent grid of min(worst-case tile count,
// SMs) CTAs (one per SM: the ring takes ~160-225 KB of shared memory).
// kStagedStages > 0: the staged activation-backward epilogue with that ring depth (callers check
// bwd_act_staged_takes and bwd_act_staged_stages first).
// kStoreStages > 0: the TMA-store epilogue with that ring depth (callers check tma_store_takes and
// tma_store_stages first).
template <class T, bool kBNK, int kKind, int kStagedStages = 0, int kStoreStages = 0, class Cfg = TileConfig>
cudaError_t launch(const GroupedGemmProblem& prob, const EpilogueParams& ep, cudaStream_t stream) {
  auto kernel = grouped_gemm_sm90_kernel<T, kBNK, kKind, kStagedStages, kStoreStages, Cfg>;
  static std::atomic<int> registers_ok{0};
  if (const cudaError_t e = check_register_budget<Cfg>(reinterpret_cast<const void*>(kernel), registers_ok))
    return e;
  const int tiles_n = (prob.n + Cfg::kBN - 1) / Cfg::kBN;
  const int64_t max_tiles = max_row_tiles(prob.max_rows, prob.num_groups, Cfg::kSchedBM) * tiles_n;
  if (max_tiles <= 0 || prob.max_rows <= 0) return cudaSuccess;
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  CUtensorMap map_a, map_b;
  cudaError_t err = encode_tensor_map(&map_a, kBf16, tma_spec_a(prob.max_rows, prob.k, prob.lda, Cfg::kBM), prob.a);
  if (err != cudaSuccess) return err;
  const TmaSpec spec_b = kBNK ? tma_spec_b_nk(prob.num_groups, prob.k, prob.n, prob.ldb, prob.b_group_stride)
                              : tma_spec_b_kn(prob.num_groups, prob.k, prob.n, prob.ldb, prob.b_group_stride,
                                              prob.gate_up_half);
  if ((err = encode_tensor_map(&map_b, kBf16, spec_b, prob.b)) != cudaSuccess) return err;
  CUtensorMap map_c{}, map_u{};
  if constexpr (kStoreStages > 0) {
    if constexpr (kKind == kEpiStore) {
      err = encode_tensor_map(&map_c, kBf16, tma_spec_store_rows(prob.max_rows, prob.n, ep.ldc), ep.c);
    } else {  // the gate-up kinds (callers check tma_store_gate_up_takes): h, and u when asked
      err = encode_tensor_map(&map_c, kBf16,
                              tma_spec_store_rows(prob.max_rows, gate_up_h_cols(prob, static_cast<EpiKind>(kKind)),
                                                  ep.ldc),
                              ep.c);
      if (err == cudaSuccess && ep.u != nullptr)
        err = encode_tensor_map(&map_u, kBf16, tma_spec_store_u(prob, ep.ldu), ep.u);
    }
    if (err != cudaSuccess) return err;
  }
  const size_t smem =
      GroupedGemmSm90<T, kBNK, kKind, kStagedStages, kStoreStages, Cfg>::Smem::bytes(prob.num_groups);
  if ((err = ensure_dynamic_smem(kernel, smem)) != cudaSuccess) return err;
  if constexpr (Cfg::kClusterM > 1) {  // one cluster per schedule tile at most
    const int32_t grid = resident_cluster_grid(kernel, Cfg::kThreads, smem, Cfg::kClusterM, max_tiles);
    if (grid < 1) return cudaErrorNotSupported;
    const cudaLaunchAttribute cluster = cluster_attribute(Cfg::kClusterM);
    return launch_with_attribute(kernel, dim3(static_cast<unsigned>(grid)), dim3(Cfg::kThreads), smem, stream,
                                 &cluster, map_a, map_b, map_c, map_u, prob, ep);
  } else {
    const int32_t grid = resident_grid(kernel, Cfg::kThreads, smem, max_tiles);
    using Gemm = GroupedGemmSm90<T, kBNK, kKind, kStagedStages, kStoreStages, Cfg>;
    if constexpr (Gemm::kStreamK) {
      // The stream-K tail (StreamKTail): where a partial slot per CTA is given and the tile count
      // may exceed the grid, this grid runs the whole tiles and a second one of the same size
      // the tail (Gemm::kTailStoreStages: the gate-up kinds' register-direct instance), each CTA
      // of it resident at once (its fixups wait on the next CTA's partial). Otherwise this grid
      // runs every tile (sk_slots = 0 for it).
      using TailGemm = GroupedGemmSm90<T, kBNK, kKind, kStagedStages, Gemm::kTailStoreStages, Cfg, true>;
      auto tail_kernel = grouped_gemm_sm90_kernel<T, kBNK, kKind, kStagedStages, Gemm::kTailStoreStages, Cfg, true>;
      const size_t tail_smem = TailGemm::Smem::bytes(prob.num_groups);
      // What the host can rule out (make_stream_k_tail decides the rest on the device, where the
      // tile count is): without these the tail launch would find nothing to do.
      bool tail = prob.sk_slots >= grid && prob.sk_partials != nullptr && prob.sk_flags != nullptr &&
                  max_tiles > grid && (prob.k + Cfg::kBK - 1) / Cfg::kBK >= kStreamKMinKTiles;
      if (tail) {
        static std::atomic<int> tail_registers_ok{0};
        if (const cudaError_t e = check_register_budget<Cfg>(reinterpret_cast<const void*>(tail_kernel),
                                                             tail_registers_ok))
          return e;
        if ((err = ensure_dynamic_smem(tail_kernel, tail_smem)) != cudaSuccess) return err;
        tail = resident_grid(tail_kernel, Cfg::kThreads, tail_smem, grid) == grid;
      }
      GroupedGemmProblem whole = prob;
      if (!tail) whole.sk_slots = 0;
      kernel<<<grid, Cfg::kThreads, smem, stream>>>(map_a, map_b, map_c, map_u, whole, ep);
      if ((err = cudaPeekAtLastError()) != cudaSuccess || !tail) return err;
      return launch_programmatic(tail_kernel, dim3(static_cast<unsigned>(grid)), dim3(Cfg::kThreads), tail_smem,
                                 stream, stream != nullptr, map_a, map_b, map_c, map_u, prob, ep);
    } else {
      kernel<<<grid, Cfg::kThreads, smem, stream>>>(map_a, map_b, map_c, map_u, prob, ep);
      return cudaPeekAtLastError();
    }
  }
}

}  // namespace moekit::kernels::experts::sm90
