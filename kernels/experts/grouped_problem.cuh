// The grouped GEMM as a problem description plus a tile schedule over device offsets: what every
// grouped-GEMM kernel family of moekit implements (the sm_80 mma.sync kernel and the fp32 SIMT
// kernel here; a Hopper TMA/wgmma family can implement the same description and reuse the
// schedule). Host- and device-callable, so the CPU tests check the index maths.
//
// Groups are experts: group g owns rows [offsets[g], offsets[g + 1]) of an expert-major matrix.
// Offsets are clamped per group, begin_g = clamp(offsets[g], 0, R) and
// end_g = clamp(offsets[g + 1], begin_g, R), so a kernel never touches a row outside [0, R)
// whatever the array holds. Rows outside every segment (at or past offsets[G]) are never written
// and never feed a stored result; the sm_90a path's TMA loads of a row tile that runs past its
// group's end do read them (inside [0, R)), into accumulator rows that are never stored.
//
// Two shapes of grouped GEMM (row-major everywhere, fp32 accumulation):
//   axis M (forward and dgrad):  C[rows_g, N] = A[rows_g, K] * B_g          per group g
//       A: [R, K] with row stride lda; rows of group g are the group's segment.
//       B_g: KN = [K, N] row-major (x @ W)  or  NK = [N, K] row-major (x @ W^T), group stride
//            b_group_stride elements.
//   axis K (weight gradients):   C_g[M, N] = X_g^T * Y_g                    per group g
//       X: [R, M] (stride lda), Y: [R, N] (stride ldb); the reduction runs over the group's rows,
//       in row order, optionally cut into `splits` contiguous row chunks whose fp32 partials a
//       second pass sums in chunk order (deterministic).
// Gate/up pairing (axis M, KN only): with gate_up_half = I > 0 the kernel works in a "virtual"
// column order in which 8-column block 2j is gate columns [8j, 8j + 8) and block 2j + 1 is up
// columns [I + 8j, I + 8j + 8), so a thread owns a gate column and its up column together and the
// activation runs in the GEMM epilogue (b_column maps virtual to stored columns).
//
// Tile schedule, axis M: a group has ceil(rows_g / BM) row tiles times tiles_n column tiles;
// row-tile counts are prefix-summed over groups (on the device, from the offsets: no host copy),
// and the flattened tile index t of a persistent grid maps to (group, row tile, column tile)
// through a panel swizzle (panels of group_m row tiles walk all column tiles, for L2 reuse) and a
// binary search in the prefix. Empty groups own no tile and cost nothing.
// Axis K: every group owns tiles_m * tiles_n * splits tiles (a group without rows still writes its
// zero gradient), ordered group-major.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace moekit::kernels::experts {

enum GroupedAxis : int { kAxisM = 0, kAxisK = 1 };

struct GroupedGemmProblem {
  int axis;                // GroupedAxis
  int num_groups;          // G >= 1
  const int32_t* offsets;  // device [G + 1]
  int64_t max_rows;        // R
  int m;                   // axis K: M (rows of C_g); unused for axis M
  int n;                   // N (virtual column count; with gate/up pairing still 2I)
  int k;                   // axis M: K; unused for axis K
  const void* a;           // axis M: A [R, K]; axis K: X [R, M]
  int64_t lda;
  const void* b;           // axis M: B_0; axis K: Y [R, N]
  int64_t ldb;
  int64_t b_group_stride;  // axis M: elements between B_g and B_{g+1}
  int b_nk;                // axis M: nonzero when B_g is [N, K] (x @ W^T)
  int gate_up_half;        // axis M, KN: I when gate/up pairing is on, else 0
  int splits;              // axis K: row chunks per group (>= 1)
  // Workspace of the stream-K tail (axis M, sm_90a kernels, not the activation-backward kind;
  // StreamKTail below): sk_slots fp32 partial tiles of kStreamKSlotFloats and kStreamKSlotFlags
  // flags each, the flags zero before the launch (the kernels leave them zero). sk_slots = 0:
  // every tile runs whole.
  float* sk_partials;
  int* sk_flags;
  int sk_slots;
};

// Rows [*begin, *end) of group g, clamped into [0, max_rows].
__host__ __device__ inline void group_rows(const int32_t* offsets, int g, int64_t max_rows,
                                           int64_t* begin, int64_t* end) {
  int64_t b = offsets[g];
  int64_t e = offsets[g + 1];
  b = b < 0 ? 0 : (b > max_rows ? max_rows : b);
  e = e < b ? b : (e > max_rows ? max_rows : e);
  *begin = b;
  *end = e;
}

// Stored column of virtual column v (see the gate/up pairing above).
__host__ __device__ inline int b_column(int v, int gate_up_half) {
  if (gate_up_half <= 0) return v;
  const int block = v >> 3;
  const int base = (block >> 1) << 3;
  return ((block & 1) ? gate_up_half + base : base) + (v & 7);
}

// h column (index i of gate i / up i) of a virtual gate column v under the pairing.
__host__ __device__ inline int paired_gate_index(int v) { return ((v >> 4) << 3) + (v & 7); }

// Panel swizzle of a (tiles_m x tiles_n) grid: index w in [0, tiles_m * tiles_n) -> (mt, nt).
__host__ __device__ inline void swizzle_panel(int64_t w, int64_t tiles_m, int tiles_n, int group_m,
                                              int64_t* mt, int* nt) {
  const int64_t panel_tiles = static_cast<int64_t>(group_m) * tiles_n;
  const int64_t panel = w / panel_tiles;
  const int64_t within = w - panel * panel_tiles;
  const int64_t first = panel * group_m;
  const int64_t rest = tiles_m - first;
  const int64_t height = rest < group_m ? rest : group_m;
  *mt = first + within % height;
  *nt = static_cast<int>(within / height);
}

struct RowTile {
  int group;
  int row_tile;  // within the group
  int n_tile;
};

// Axis M schedule over a prefix of row tiles (in shared memory on the device).
struct RowTileSchedule {
  const int32_t* prefix;  // [G + 1]: row tiles of groups before g
  int num_groups;
  int tiles_n;
  int group_m;

  __host__ __device__ int64_t total_tiles() const {
    return static_cast<int64_t>(prefix[num_groups]) * tiles_n;
  }

  // The last group whose first row tile is <= global_row_tile (skips empty groups): a binary
  // search over the prefix (Index int32_t or int64_t, as the caller's arithmetic).
  template <class Index>
  __host__ __device__ int group_of(Index global_row_tile) const {
    int lo = 0, hi = num_groups - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (prefix[mid] <= global_row_tile) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  __host__ __device__ RowTile decode(int64_t t) const {
    int64_t global_row_tile;
    int n_tile;
    swizzle_panel(t, prefix[num_groups], tiles_n, group_m, &global_row_tile, &n_tile);
    const int lo = group_of(global_row_tile);
    RowTile r;
    r.group = lo;
    r.row_tile = static_cast<int>(global_row_tile - prefix[lo]);
    r.n_tile = n_tile;
    return r;
  }

  // decode(t) in 32-bit arithmetic, for schedules whose total_tiles() is at most INT32_MAX (the
  // sm_90a path requires it of its worst case on the host, sm90::takes): the same tile for every
  // t (a CPU test compares them). Three unsigned 32-bit divisions instead of 64-bit ones, which
  // are subroutines of their own: fewer instructions and registers where a kernel decodes next to
  // its live accumulators.
  __host__ __device__ RowTile decode32(uint32_t t) const {
    const uint32_t tiles_m = static_cast<uint32_t>(prefix[num_groups]);
    const uint32_t gm = static_cast<uint32_t>(group_m);
    const uint32_t panel_tiles = gm * static_cast<uint32_t>(tiles_n);
    const uint32_t panel = t / panel_tiles;
    const uint32_t within = t - panel * panel_tiles;
    const uint32_t first = panel * gm;
    const uint32_t rest = tiles_m - first;
    const uint32_t height = rest < gm ? rest : gm;
    const int32_t global_row_tile = static_cast<int32_t>(first + within % height);
    const int lo = group_of(global_row_tile);
    RowTile r;
    r.group = lo;
    r.row_tile = global_row_tile - prefix[lo];
    r.n_tile = static_cast<int>(within / height);
    return r;
  }
};

// Stream-K tail of an axis-M persistent grid (the sm_90a kernels; docs/experts.md, "The stream-K
// tail"). Dealing T tiles round robin to C CTAs leaves the last partial wave, T mod C tiles,
// running alone for a whole tile time while the other CTAs idle (DeepSeek-V3's gate-up: 4096 tiles
// on 132 SMs, 3 % of the GEMM). Instead the grid runs the first dp_tiles = (T / C - 1) C tiles
// whole, C + T mod C per wave, and the last full wave and the partial one (the tail) are cut along
// k: their k tiles, tile after tile, make S = (C + T mod C) KT iterations, and CTA c of the tail
// takes the contiguous range [S c / C, S (c + 1) / C). A range is at least KT long, so a tile lies
// in at most two ranges. A tile cut between CTAs c and c + 1:
//   c + 1 runs the tile's rest [k, KT) as the first unit of its range (kUnitPartial): it writes
//     its fp32 accumulators to partial slot c + 1 and raises the slot's flags;
//   c runs the first part [0, k) as the last unit of its range (kUnitFixup): it waits for slot
//     c + 1, adds it to its accumulators and runs the tile's epilogue.
// Every accumulator of such a tile is (sum over [0, k)) + (sum over [k, KT)), each in ascending k:
// the same run after run for a given C, not bitwise the whole tile's sum. No wait cycle: a partial
// unit comes first in its range and waits on nothing. The sm_90a path runs the whole tiles and
// the tail as two launches of one kernel (grouped_gemm_sm90.cuh, run()).
// Used only where it paid in the tile benchmark (docs/experts.md; H200): the partial wave at most
// C / 8 tiles (kStreamKMaxRestDiv), so the ranges' k offsets drift by at most KT / 8 from CTA to
// CTA and neighbours still share their A and B k slices in L2 (half-full waves put neighbours half
// a tile apart: Mixtral's down projection, K = 14336, ran 3-10 % slower, memory-bound), and at
// least kStreamKMinKTiles k tiles per tile, so that the 7/8 of a tile won outweighs the second
// launch (Qwen3's down projection, 12 k tiles, ran 1.5 % slower); T > C and a partial slot for
// every CTA. In 32-bit arithmetic (no 64-bit division subroutine in a kernel): the tile count fits
// (sm90::takes), and the tail is used only where S does.
constexpr int kStreamKMaxRestDiv = 8;
constexpr int kStreamKMinKTiles = 40;
struct StreamKTail {
  uint32_t dp_tiles = 0;  // tiles [0, dp_tiles) run whole, CTA c taking c, c + C, ...
  uint32_t sk_iters = 0;  // S; 0: no stream-K tail (dp_tiles is then T)
  uint32_t ctas = 1;      // C
  uint32_t ktiles = 1;    // KT
};

__host__ __device__ inline StreamKTail make_stream_k_tail(uint32_t total_tiles, int ctas, int ktiles, int slots) {
  StreamKTail t;
  t.dp_tiles = total_tiles;
  t.ctas = static_cast<uint32_t>(ctas);
  t.ktiles = static_cast<uint32_t>(ktiles);
  if (ctas < 2 || slots < ctas || ktiles < kStreamKMinKTiles || total_tiles <= t.ctas) return t;
  const uint32_t rest = total_tiles % t.ctas;
  if (rest == 0 || rest > t.ctas / kStreamKMaxRestDiv) return t;
  const uint64_t iters = static_cast<uint64_t>(t.ctas + rest) * t.ktiles;
  if (iters > 0x7fffffffu) return t;
  t.dp_tiles = total_tiles - t.ctas - rest;
  t.sk_iters = static_cast<uint32_t>(iters);
  return t;
}

enum WorkUnitRole : int {
  kUnitWhole = 0,    // k tiles [0, KT): accumulate, epilogue
  kUnitPartial = 1,  // [k, KT), k > 0: accumulate, write partial slot (this CTA), raise its flags
  kUnitFixup = 2,    // [0, k), k < KT: accumulate, wait for slot (this CTA + 1), add it, epilogue
};

struct WorkUnit {
  uint32_t tile;
  int k_begin;
  int k_end;
  int role;  // WorkUnitRole
};

// The tail unit CTA `cta` runs after `done` k tiles of its earlier tail units (0 first; each unit
// adds k_end - k_begin), false past its last: a range holds at most three units (partial, whole,
// fixup), run in this order by the CTA's producer and consumers alike.
__host__ __device__ inline bool tail_unit(const StreamKTail& t, uint32_t cta, uint32_t done, WorkUnit* u) {
  if (t.sk_iters == 0) return false;
  // CTA c's range [S c / C, S (c + 1) / C), as q c + r c / C with q = S / C, r = S % C (no
  // product past 32 bits: r c < C^2).
  const uint32_t q = t.sk_iters / t.ctas, r = t.sk_iters - q * t.ctas;
  const uint32_t pos = q * cta + r * cta / t.ctas + done;
  const uint32_t end = q * (cta + 1) + r * (cta + 1) / t.ctas;
  if (pos >= end) return false;
  const uint32_t tile = pos / t.ktiles;
  const uint32_t kb = pos - tile * t.ktiles;
  const uint32_t ke = end - pos < t.ktiles - kb ? kb + (end - pos) : t.ktiles;
  u->tile = t.dp_tiles + tile;
  u->k_begin = static_cast<int>(kb);
  u->k_end = static_cast<int>(ke);
  u->role = kb > 0 ? kUnitPartial : (ke < t.ktiles ? kUnitFixup : kUnitWhole);
  return true;
}

// Row-tile count of a group with `rows` rows.
__host__ __device__ inline int32_t row_tiles_of(int64_t rows, int block_m) {
  return static_cast<int32_t>((rows + block_m - 1) / block_m);
}

// Host-side worst case of RowTileSchedule::total_tiles (sizes a grid): sum_g ceil(rows_g / BM)
// <= floor(R / BM) + G.
__host__ __device__ inline int64_t max_row_tiles(int64_t max_rows, int num_groups, int block_m) {
  return max_rows / block_m + num_groups;
}

struct WgradTile {
  int group;
  int split;
  int m_tile;
  int n_tile;
};

// Axis K schedule: group-major, then split, then a panel-swizzled (tiles_m x tiles_n) grid.
struct WgradSchedule {
  int num_groups;
  int tiles_m;
  int tiles_n;
  int splits;
  int group_m;

  __host__ __device__ int64_t tiles_per_group() const {
    return static_cast<int64_t>(tiles_m) * tiles_n * splits;
  }
  __host__ __device__ int64_t total_tiles() const { return tiles_per_group() * num_groups; }

  __host__ __device__ WgradTile decode(int64_t t) const {
    const int64_t per_group = tiles_per_group();
    const int64_t per_split = static_cast<int64_t>(tiles_m) * tiles_n;
    WgradTile r;
    r.group = static_cast<int>(t / per_group);
    const int64_t rest = t - r.group * per_group;
    r.split = static_cast<int>(rest / per_split);
    int64_t mt;
    swizzle_panel(rest - r.split * per_split, tiles_m, tiles_n, group_m, &mt, &r.n_tile);
    r.m_tile = static_cast<int>(mt);
    return r;
  }
};

// Rows [*begin, *end) of split `split` of a group with rows [gb, ge): contiguous chunks of
// ceil(len / splits) rows in order.
__host__ __device__ inline void split_rows(int64_t gb, int64_t ge, int split, int splits,
                                           int64_t* begin, int64_t* end) {
  const int64_t len = ge - gb;
  const int64_t chunk = (len + splits - 1) / splits;
  int64_t b = gb + chunk * split;
  int64_t e = b + chunk;
  b = b > ge ? ge : b;
  e = e > ge ? ge : e;
  *begin = b;
  *end = e;
}

#ifdef __CUDACC__
// Builds the axis-M row-tile prefix [G + 1] of a block in shared memory from the device offsets
// (every thread of the block calls it; ends with __syncthreads). scratch: kThreads / 32 int32.
template <int kThreads>
__device__ inline void build_row_tile_prefix(const int32_t* __restrict__ offsets, int num_groups,
                                             int64_t max_rows, int block_m, int32_t* prefix,
                                             int32_t* scratch) {
  static_assert(kThreads % 32 == 0, "whole warps");
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int per_thread = (num_groups + kThreads - 1) / kThreads;
  const int g0 = tid * per_thread;
  int32_t local = 0;
  for (int i = 0; i < per_thread; ++i) {
    const int g = g0 + i;
    if (g < num_groups) {
      int64_t b, e;
      group_rows(offsets, g, max_rows, &b, &e);
      local += row_tiles_of(e - b, block_m);
    }
  }
  // Inclusive warp scan, then warp totals.
  int32_t inclusive = local;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int32_t other = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  int32_t warp_base = 0;
  for (int w = 0; w < warp; ++w) warp_base += scratch[w];
  int32_t running = warp_base + inclusive - local;  // exclusive prefix of this thread
  for (int i = 0; i < per_thread; ++i) {
    const int g = g0 + i;
    if (g < num_groups) {
      prefix[g] = running;
      int64_t b, e;
      group_rows(offsets, g, max_rows, &b, &e);
      running += row_tiles_of(e - b, block_m);
    }
  }
  if (tid == kThreads - 1) {
    int32_t total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
    prefix[num_groups] = total;
  }
  __syncthreads();
}
#endif

}  // namespace moekit::kernels::experts
