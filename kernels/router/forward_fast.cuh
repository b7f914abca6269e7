// Router forward, register fast path (E <= 512; groups aligned to lanes).
//
// Maths (per token t, fp32; include/moekit/router.h has the contract):
//   s = softmax(z) | sigmoid(z) | sqrt(softplus(z));   c = (TOPK_THEN_SOFTMAX ? z : s) + b
//   groups: group value = max | top-2 sum of its c; the G' best groups are kept, the others' c
//           become the mask value (0 or -inf); idx = top-K of c (desc, ties to the lower index)
//   w = s[idx] | c[idx] (weights_use_bias) | softmax(z[idx]);  w /= sum w + 1e-20;  w *= rho
//   p = q / (sum q + 1e-20) with q = s (c with weights_use_bias);  S += m_t p;  L += m_t [i in idx]
//
// Shapes: logits [T, E] rows logits_stride apart; weights, indices [T, K]; partial rows
// [num_blocks, E]. Layout: a team of TPT lanes (a power of two) owns a token; lane l of the team
// holds experts [l V, l V + V) in registers; experts past E (padding) are never read from memory
// (every load stays inside [row, row + E): kernels/router/span.hpp): they are -inf logits (score
// 0) with selection value -inf and the highest indices, so they can only come after every real
// expert and are never picked (K <= E). Tokens go to teams in warp-major order: step i of warp w
// handles tokens (w + i * warps) * teams_per_warp + team; a warp loops while its first team has a
// token, so all of its lanes run every collective (teams past T work on zeros and write nothing).
// The next token's logits are loaded while the current one is computed.
//
// The kernel is compiled per score function (Mode) and with / without groups, so each variant
// holds only its own instructions (a small loop body that stays in the instruction cache).
//
// Per value (the bulk of the work): the score, the selection value and the lane's top-2 cache
// (float compares on the selection values; a NaN never enters the cache, which is what "NaN is
// -inf, ties to the lower index" means for a cache seeded with the first two sanitised values).
// Selection: a pick is one max over the team's cached heads (redux.sync for TPT >= 16, a shuffle
// butterfly below) and a ballot: the lowest tied lane holds the lowest index (blocked layout).
// The winner records (expert, key) in shared memory and pops its cache; a lane that gave away
// both cached values rescans its V values below the last one it gave away (warp-uniform branch,
// rare: it needs three of the top-K in one lane). Groups: a lane's top-2 also give the group
// values (a butterfly over the group's lanes), the groups' ranks come from G shuffles.
// Weights: the lane owning rank r reads the pick; where the weight source differs from the
// selection value (a bias without weights_use_bias, groups: a masked pick is weighted by its
// unmasked score; a pick at -inf, which may have been a NaN) it re-reads z[idx] (an L1 hit: the
// row was just loaded) and recomputes the score with the same instructions as the selection's.
//
// Determinism: every sum has a fixed order (per lane, then a fixed butterfly; per block, teams in
// order); loads use integer atomics only (order-independent). No global float atomics.
#pragma once

#include "kernels/router/common.cuh"
#include "kernels/common/grid.hpp"
#include "kernels/common/pdl.cuh"
#include "kernels/router/launch.hpp"
#include "kernels/router/layout.hpp"
#include "kernels/router/tuning.hpp"
#include "moekit/router.h"

namespace moekit::kernels::router {

// Inserts value x of slot j into a lane's top-2 cache (f1, s1) >= (f2, s2): strict compares, so
// an earlier slot stays ahead of an equal later one and a NaN never enters.
__device__ __forceinline__ void top2_insert(float x, int j, float& f1, int& s1, float& f2, int& s2) {
  const bool g1 = x > f1;
  const bool g2 = x > f2;
  f2 = g1 ? f1 : (g2 ? x : f2);
  s2 = g1 ? s1 : (g2 ? j : s2);
  f1 = g1 ? x : f1;
  s1 = g1 ? j : s1;
}

template <class T, int V, int TPT, ScoreMode MODE, bool kGroups>
__global__ void __launch_bounds__(kFastThreads, fast_min_blocks(V, static_cast<int>(sizeof(T))))
    router_forward_fast_kernel(const ForwardArgs a) {
  constexpr int kTeamsPerWarp = 32 / TPT;
  constexpr int kTeams = kFastThreads / TPT;
  constexpr int kEPad = V * TPT;
  constexpr int kKMax = kEPad < 32 ? kEPad : 32;
  constexpr int kRanks = (kKMax + TPT - 1) / TPT;  // output ranks per lane
  constexpr int kWords = Words<T, V>::kCount;
  constexpr int kChunks = V / 4;  // float4 chunks of a lane's span
  constexpr bool kSoftmaxFirst = MODE == ScoreMode::kSoftmax;
  constexpr bool kTopk = MODE == ScoreMode::kTopkSoftmax;

  // Correction bias and each team's aux sums, chunk-major ([chunk][lane of a team]: a warp's float4
  // accesses are consecutive, free of bank conflicts); bias 0 past E. Picks: (expert, key) per
  // rank of each team's current token; after the token loop the same bytes hold the chunk sums of
  // the block's aux reduction.
  constexpr size_t kPickBytes = sizeof(uint2) * kTeams * kKMax;
  constexpr size_t kChunkBytes = sizeof(float) * kFastThreads;
  constexpr size_t kBufBytes = kPickBytes > kChunkBytes ? kPickBytes : kChunkBytes;
  __shared__ __align__(16) float4 s_bias[kChunks][TPT];
  __shared__ __align__(16) float4 s_acc[kTeams][kChunks][TPT];
  __shared__ __align__(16) float4 s_sel[kTeams][kChunks][TPT];  // current selection values (refills)
  __shared__ __align__(16) unsigned char s_buf[kBufBytes];
  __shared__ int s_load[kEPad];
  __shared__ int s_count;
  uint2(*s_pick)[kKMax] = reinterpret_cast<uint2(*)[kKMax]>(s_buf);

  // A following finalize (a few blocks) may be scheduled at once: it waits for us. Any other next
  // kernel only once our token loop is done: its blocks, resident early and waiting, slowed the
  // last blocks of long forwards by 2-6 % (docs/router.md, seventh measurement). Then wait for our
  // own predecessor before the first global access (kernels/common/pdl.cuh).
  if (a.finalize_follows) pdl_launch_dependents();
  pdl_wait();

  const RouterOptions& o = a.opt;
  const int E = o.num_experts;
  const int K = o.top_k;
  const int64_t num_tokens = a.num_tokens;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lt = lane % TPT;
  const int team_in_warp = lane / TPT;
  const int team = warp * kTeamsPerWarp + team_in_warp;
  const unsigned team_mask =
      TPT == 32 ? kFullMask : (((1u << TPT) - 1u) << (team_in_warp * TPT));
  const int base = lt * V;
  const unsigned below_in_team = team_mask & lanemask_lt();  // lanes of this team below this one
  // Elements of the row from this lane's first on: rem >= V a whole span, 0 < rem < V a span that
  // ends at E, rem <= 0 a lane past E (padding only). Compared directly, never clamped first
  // (kernels/router/span.hpp says why).
  const int rem = E - base;

  const bool need_load = a.load_mode != LoadMode::kNone;
  const bool need_score = a.score_partial != nullptr;
  const bool need_count = a.count_partial != nullptr;
  const bool has_bias = a.bias != nullptr;
  const bool wub = o.weights_use_bias != 0;
  // The softmax over all E: the selection needs it (softmax first), the aux scores always.
  const bool full_softmax = kSoftmaxFirst || (kTopk && need_score);
  // Weight source = the picked selection value, or a recompute from z[idx] (see the top).
  const bool recompute_weight = kGroups || (has_bias && !wub);
  const uint32_t neg_inf_key = float_key(-INFINITY);

  int my_count = 0;

  // Group geometry (G > 1 here implies E = G S with S a multiple of V and S / V a power of two).
  const int G = kGroups ? o.num_groups : 1;
  const int lanes_per_group = kGroups ? (E / G) / V : 1;
  const int my_group = lt / lanes_per_group;
  // rounds of the group-rank comparisons (a divide: once, and kept in a register)
  const int group_rounds = kGroups ? static_cast<int>(pinned(static_cast<uint32_t>((G + lanes_per_group - 1) / lanes_per_group))) : 0;

  // Token t of this team and its row advance by fixed strides per step (no 64-bit multiplies in
  // the loop): the first team of a warp walks steps warp_global, warp_global + warps_total, ...
  const int64_t row_bytes = a.logits_stride * static_cast<int64_t>(sizeof(T));
  const TokenWalk walk = token_walk(static_cast<int64_t>(blockIdx.x) * (kFastThreads / 32) + warp,
                                    static_cast<int64_t>(gridDim.x) * (kFastThreads / 32), kTeamsPerWarp, team_in_warp);
  const int64_t t_stride = pinned(walk.stride);  // (pinned: not rebuilt at every step)
  const int64_t row_stride_step = pinned(t_stride * row_bytes);
  int64_t t = walk.first_token;                                          // this step's token
  const char* row = static_cast<const char*>(a.logits) + t * row_bytes;  // its row

  uint32_t next_raw[kWords];
  bool next_mask = false;
  // Loads token tn's span (row pointer p) into next_raw / next_mask.
  // The common case, decided once: a whole span of 16-byte vectors (kernels/router/span.hpp's
  // first branch, without its width dispatch at every token).
  const bool whole16 = rem >= V && a.logits_vec_bytes >= 16;
  auto fetch = [&](int64_t tn, const char* p) {
    if (tn < num_tokens) {
      const T* span = reinterpret_cast<const T*>(p) + base;
      if (whole16) {
#pragma unroll
        for (int i = 0; i < kWords / 4; ++i) {
          const uint4 v = __ldg(reinterpret_cast<const uint4*>(span) + i);
          next_raw[4 * i] = v.x;
          next_raw[4 * i + 1] = v.y;
          next_raw[4 * i + 2] = v.z;
          next_raw[4 * i + 3] = v.w;
        }
      } else {
        load_span<T, V>(span, a.logits_vec_bytes, rem, next_raw);  // -inf past E
      }
      next_mask = a.token_mask == nullptr || __ldg(a.token_mask + tn) != 0;
    } else {
#pragma unroll
      for (int i = 0; i < kWords; ++i) next_raw[i] = 0u;
      next_mask = false;
    }
  };

  // The first token's loads are issued before the bias is staged (its stores wait for their
  // loads), so the prologue's two global round trips (first row, bias) overlap.
  fetch(t, row);
  for (int e = threadIdx.x; e < kEPad; e += kFastThreads)  // chunk-major (kernels/router/layout.hpp)
    reinterpret_cast<float*>(&s_bias[0][0])[chunk_major_offset_of_expert(e, V, TPT)] =
        (has_bias && e < E) ? __ldg(a.bias + e) : 0.0f;
  for (int e = threadIdx.x; e < kEPad; e += kFastThreads) s_load[e] = 0;
  if (threadIdx.x == 0) s_count = 0;
  if (need_score) {
#pragma unroll
    for (int j = 0; j < kChunks; ++j) s_acc[team][j][lt] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  __syncthreads();

  for (int64_t first = walk.first_of_warp; first < num_tokens;
       first += t_stride, t = opaque_add(t, t_stride), row = opaque_add(row, row_stride_step)) {
    const bool active = t < num_tokens;
    float c[V];  // logits, then scores, then selection values
#pragma unroll
    for (int j = 0; j < V; ++j) c[j] = Elem<T>::get(next_raw, j);
    const bool m = next_mask;
    fetch(t + t_stride, row + row_stride_step);

    // ---- scores --------------------------------------------------------------------------------
    float mx = 0.0f, inv = 1.0f;  // softmax: row max and 1 / sum (the recompute of a weight needs them)
    if (kSoftmaxFirst || (kTopk && full_softmax)) {
      float zmax = c[0];
#pragma unroll
      for (int j = 1; j < V; ++j) zmax = fmaxf(zmax, c[j]);
      mx = team_max<TPT>(zmax);
    }
    float s[V];  // the scores (softmax over all E; for top-k-then-softmax only with aux statistics)
    if constexpr (MODE == ScoreMode::kSigmoid) {
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = sigmoid_f(c[j]);
    } else if constexpr (MODE == ScoreMode::kSqrtSoftplus) {
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = sqrt_softplus_f(c[j]);
    } else {
      if (full_softmax) {
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          s[j] = softmax_num(c[j], mx);
          sum += s[j];
        }
        inv = 1.0f / team_sum<TPT>(sum);
#pragma unroll
        for (int j = 0; j < V; ++j) s[j] = __fmul_rn(s[j], inv);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) s[j] = 0.0f;
      }
    }

    // ---- aux statistics: p = q / (sum q + 1e-20), q = s (s + b with weights_use_bias) ---------
    if (need_score) {
      float q[V];
#pragma unroll
      for (int j = 0; j < V / 4; ++j) {
        const float4 b4 = wub ? s_bias[j][lt] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        q[4 * j] = wub ? s[4 * j] + b4.x : s[4 * j];
        q[4 * j + 1] = wub ? s[4 * j + 1] + b4.y : s[4 * j + 1];
        q[4 * j + 2] = wub ? s[4 * j + 2] + b4.z : s[4 * j + 2];
        q[4 * j + 3] = wub ? s[4 * j + 3] + b4.w : s[4 * j + 3];
      }
      float f = 1.0f;
      if (o.normalize) {
        float sq = 0.0f;
#pragma unroll
        for (int j = 0; j < V; ++j) sq += q[j];
        f = 1.0f / (team_sum<TPT>(sq) + 1e-20f);
      }
      if (active && m) {  // this lane's sums live in shared memory (registers stay free)
#pragma unroll
        for (int j = 0; j < kChunks; ++j) {
          float4 a4 = s_acc[team][j][lt];
          a4.x = fmaf(q[4 * j], f, a4.x);
          a4.y = fmaf(q[4 * j + 1], f, a4.y);
          a4.z = fmaf(q[4 * j + 2], f, a4.z);
          a4.w = fmaf(q[4 * j + 3], f, a4.w);
          s_acc[team][j][lt] = a4;
        }
      }
    }
    if (active && m) ++my_count;

    // ---- selection values c = (top-k softmax ? z : s) + b; padding -inf ------------------------
    if constexpr (!kTopk) {
#pragma unroll
      for (int j = 0; j < V; ++j) c[j] = s[j];
    }
    if (has_bias) {
#pragma unroll
      for (int j = 0; j < V / 4; ++j) {
        const float4 b4 = s_bias[j][lt];
        c[4 * j] += b4.x;
        c[4 * j + 1] += b4.y;
        c[4 * j + 2] += b4.z;
        c[4 * j + 3] += b4.w;
      }
    }
    if (rem < V) {  // a softmax score of 0 (or 0 + 0 bias) would otherwise outrank -inf
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j >= rem) c[j] = -INFINITY;
    }

    // The selection values stay in shared memory for the rare refill (registers stay free).
#pragma unroll
    for (int j = 0; j < kChunks; ++j) s_sel[team][j][lt] = make_float4(c[4 * j], c[4 * j + 1], c[4 * j + 2], c[4 * j + 3]);

    // ---- per-lane top-2 ------------------------------------------------------------------------
    float f1 = sanitize(c[0]), f2 = sanitize(c[1]);
    int s1 = 0, s2 = 1;
    if (f2 > f1) {
      const float tf = f1;
      f1 = f2;
      f2 = tf;
      s1 = 1;
      s2 = 0;
    }
#pragma unroll
    for (int j = 2; j < V; ++j) top2_insert(c[j], j, f1, s1, f2, s2);

    // ---- groups ------------------------------------------------------------------------------
    bool masked = false;
    if constexpr (kGroups) {
      float g;
      if (o.group_score == MOEKIT_GROUP_SCORE_MAX ||
          (o.group_score == MOEKIT_GROUP_SCORE_TOPN_SUM && o.group_topn == 1)) {
        g = f1;
        for (int d = lanes_per_group / 2; d > 0; d >>= 1) g = fmaxf(g, __shfl_xor_sync(kFullMask, g, d));
      } else {  // sum of the group's two largest selection values
        float a1 = f1, a2 = f2;
        for (int d = lanes_per_group / 2; d > 0; d >>= 1) {
          const float p1 = __shfl_xor_sync(kFullMask, a1, d);
          const float p2 = __shfl_xor_sync(kFullMask, a2, d);
          const float lo = fminf(a1, p1);
          a1 = fmaxf(a1, p1);
          a2 = fmaxf(lo, fmaxf(a2, p2));
        }
        g = sanitize(a1 + a2);
      }
      // Rank among the team's groups (ties: the lower group index), as keys (-0 became +0): the
      // lanes_per_group lanes of a group share the G comparisons (lane `sub` of the group compares
      // with groups sub, sub + lanes_per_group, ...), then add their counts (a butterfly). The
      // iteration count is warp-uniform; lanes past E (my_group >= G) are never masked.
      const uint32_t gk = float_key(g + 0.0f);
      const int team_base = team_in_warp * TPT;
      const int sub = lt & (lanes_per_group - 1);
      int rank = 0;
      for (int it = 0; it < group_rounds; ++it) {
        const int gi = sub + it * lanes_per_group;
        const int src = team_base + (gi < G ? gi : G - 1) * lanes_per_group;
        const uint32_t other = __shfl_sync(kFullMask, gk, src);
        rank += static_cast<int>((gi < G) & ((other > gk) | ((other == gk) & (gi < my_group))));
      }
      for (int d = lanes_per_group / 2; d > 0; d >>= 1) rank += __shfl_xor_sync(kFullMask, rank, d);
      masked = my_group < G && rank >= o.groups_kept;
      if (masked) {
        f1 = o.group_mask_value;
        f2 = o.group_mask_value;
        s1 = 0;
        s2 = 1;
      }
    }
    const uint32_t mask_key = float_key(o.group_mask_value + 0.0f);

    // ---- top-K -------------------------------------------------------------------------------
    // Cached keys (0 = none: below every real key, float_key(-inf) = 0x007fffff). A pick updates
    // every lane with selects (no divergent branch); only the winner stores. A winner that gave
    // away its last cached value is refilled by its whole team at once: every lane of the team
    // examines V / TPT of the dry lane's selection values (shared memory), then a max (ties: the
    // lower slot) over the team gives the dry lane its next value below the one it gave away; it
    // holds one value from then on (k2 = none), so a lane that keeps winning is refilled again.
    uint32_t k1 = float_key(f1 + 0.0f), k2 = float_key(f2 + 0.0f);
    // (pinned: a register, not rebuilt from the thread index at every pick)
    const uint32_t picks = pinned(static_cast<uint32_t>(__cvta_generic_to_shared(&s_pick[team][0])));
    const uint32_t base_u = pinned(static_cast<uint32_t>(base));
    const unsigned masked_bits = kGroups ? __ballot_sync(kFullMask, masked) : 0u;
    __syncwarp();  // the previous token's readers of s_pick are done
    for (int r = 0; r < K; ++r) {
      const uint32_t best = team_umax<TPT>(k1, team_in_warp);
      const bool hit = k1 == best;
      const unsigned hits = __ballot_sync(kFullMask, hit);  // every lane (no short-circuit around it)
      const bool win = hit & ((hits & below_in_team) == 0u);
      if (win) st_shared_u32x2(picks + 8u * static_cast<uint32_t>(r), base_u + static_cast<uint32_t>(s1), k1);
      k1 = win ? k2 : k1;
      s1 = win ? s2 : s1;
      k2 = win ? 0u : k2;
      // A lane emptied by the last pick is not refilled: nothing is picked after it (r, K are
      // warp-uniform, so the branch below stays uniform).
      const bool dry = win && k1 == 0u && r + 1 < K;
      const unsigned dry_bits = __ballot_sync(kFullMask, dry);
      if (dry_bits != 0u) {  // warp-uniform: a team refills its dry lane
        __syncwarp();        // the winner's pick record is visible to its team
        uint32_t cand_key = 0u;
        int cand_slot = V;
        const unsigned team_dry = dry_bits & team_mask;
        if (team_dry != 0u) {
          const int d = __ffs(team_dry) - 1 - team_in_warp * TPT;  // the dry lane of this team
          const uint2 last = s_pick[team][r];                     // what it just gave away
          const uint32_t bound_key = last.y;
          const int bound_slot = static_cast<int>(last.x) - d * V;
          const bool d_masked = kGroups && ((masked_bits >> (team_in_warp * TPT + d)) & 1u) != 0u;
          const float* sel = reinterpret_cast<const float*>(&s_sel[team][0][0]);
#pragma unroll
          for (int jj = 0; jj < (V + TPT - 1) / TPT; ++jj) {
            const int j = lt + jj * TPT;  // slot of the dry lane examined here (ascending per lane)
            if (j < V) {
              const float x = sel[chunk_major_offset(d, j, TPT)];
              const uint32_t kj = d_masked ? mask_key : float_key(sanitize(x) + 0.0f);
              const bool elig = kj < bound_key || (kj == bound_key && j > bound_slot);
              if (elig && kj > cand_key) {
                cand_key = kj;
                cand_slot = j;
              }
            }
          }
        }
        const uint32_t m = team_umax<TPT>(cand_key, team_in_warp);
        const uint32_t sl =
            team_umin<TPT>(cand_key == m ? static_cast<uint32_t>(cand_slot) : 0xffffffffu, team_in_warp);
        if (dry) {  // m = 0: nothing left below (a lane of a team past T, or every value given)
          k1 = m;
          s1 = m != 0u ? static_cast<int>(sl) : 0;
        }
      }
    }
    __syncwarp();

    // ---- weights, indices, loads ---------------------------------------------------------------
    // Lane lt owns ranks r = lt + i TPT, i < kRanks (K <= kKMax).
    const T* zrow = reinterpret_cast<const T*>(row);  // read only for an active token
    int idx[kRanks];
    float u[kRanks];
    bool has[kRanks];
#pragma unroll
    for (int i = 0; i < kRanks; ++i) {
      const int r = lt + i * TPT;
      has[i] = r < K;
      idx[i] = 0;
      u[i] = 0.0f;
      if (i * TPT >= K) continue;  // warp-uniform: no lane has a rank this far (K <= TPT: i = 0 only)
      const uint2 p = has[i] ? s_pick[team][r] : make_uint2(0u, 0u);
      idx[i] = static_cast<int>(p.x);
      if (has[i]) {
        // The key of -inf also stands for a NaN selection value (sanitised): recomputed, so a
        // NaN score stays NaN in the weights.
        if (!recompute_weight && p.y != neg_inf_key) {
          u[i] = key_float(p.y);  // the selection value is the weight source
        } else if (active) {
          const float z = Elem<T>::load1(zrow + idx[i]);
          float w;
          if constexpr (kTopk) {
            w = z;
          } else {
            if constexpr (MODE == ScoreMode::kSigmoid) w = sigmoid_f(z);
            else if constexpr (MODE == ScoreMode::kSqrtSoftplus) w = sqrt_softplus_f(z);
            else w = __fmul_rn(softmax_num(z, mx), inv);
            if (wub && has_bias) w += __ldg(a.bias + idx[i]);
          }
          u[i] = w;
        }
      }
    }
    if constexpr (kTopk) picked_softmax<TPT>(u, has);
    if (o.normalize) {
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) sum += has[i] ? u[i] : 0.0f;
      const float denom = team_sum<TPT>(sum) + 1e-20f;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) u[i] = u[i] / denom;
    }
    if (active) {
      const int64_t out = t * K;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) {
        if (i * TPT >= K) break;
        if (has[i]) {
          const int r = lt + i * TPT;
          a.weights[out + r] = o.route_scale * u[i];
          a.indices[out + r] = idx[i];
          if (need_load && m) atomicAdd(&s_load[idx[i]], 1);
        }
      }
    }
  }

  // ---- block epilogue: loads, aux statistics, token count -------------------------------------
  if (!a.finalize_follows) pdl_launch_dependents();
  if (need_count) {
    if (lt == 0 && my_count > 0) atomicAdd(&s_count, my_count);
  }
  __syncthreads();  // every team is done with s_pick and its aux sums
  if (need_score) {
    auto acc_at = [&](int tm, int e) -> float {
      return reinterpret_cast<const float*>(&s_acc[tm][0][0])[chunk_major_offset_of_expert(e, V, TPT)];
    };
    float* out = a.score_partial + static_cast<int64_t>(blockIdx.x) * E;
    if constexpr (kEPad <= kFastThreads) {
      // Chunk ch sums teams [ch V, ch V + V) (kTeams / chunks = V); then the chunks in order.
      constexpr int kSumChunks = kFastThreads / kEPad;
      float* s_chunk = reinterpret_cast<float*>(s_buf);
      const int e = threadIdx.x % kEPad;
      const int ch = threadIdx.x / kEPad;
      float sum = 0.0f;
      if (e < E) {  // padding columns were never accumulated
#pragma unroll
        for (int i = 0; i < V; ++i) sum += acc_at(ch * V + i, e);
      }
      s_chunk[ch * kEPad + e] = sum;
      __syncthreads();
      if (threadIdx.x < E) {
        float total = 0.0f;
#pragma unroll
        for (int i = 0; i < kSumChunks; ++i) total += s_chunk[i * kEPad + threadIdx.x];
        out[threadIdx.x] = total;
      }
    } else {
      for (int e = threadIdx.x; e < E; e += kFastThreads) {
        float total = 0.0f;
#pragma unroll
        for (int tm = 0; tm < kTeams; ++tm) total += acc_at(tm, e);
        out[e] = total;
      }
    }
  }
  if (need_load) {
    for (int e = threadIdx.x; e < E; e += kFastThreads) {
      const int v = s_load[e];
      if (a.load_mode == LoadMode::kPartial)
        a.load_partial[static_cast<int64_t>(blockIdx.x) * E + e] = v;
      else if (v != 0)
        atomicAdd(a.expert_load + e, v);
    }
  }
  if (need_count && threadIdx.x == 0) a.count_partial[blockIdx.x] = s_count;
}

template <class T, int V, int TPT, ScoreMode MODE, bool kGroups>
cudaError_t launch_forward_fast(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  auto kernel = router_forward_fast_kernel<T, V, TPT, MODE, kGroups>;
  const int32_t grid = resident_grid(kernel, kFastThreads, 0, a.shape.num_blocks);
  *blocks = grid;
  return launch_programmatic(kernel, dim3(grid), dim3(kFastThreads), 0, stream, a.programmatic, a);
}

template <class T, int V, int TPT, ScoreMode MODE>
cudaError_t launch_forward_fast_groups(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  if constexpr (TPT > 1) {  // a group of whole lanes needs two lanes or more per token
    if (a.opt.num_groups > 1) return launch_forward_fast<T, V, TPT, MODE, true>(a, stream, blocks);
  }
  return launch_forward_fast<T, V, TPT, MODE, false>(a, stream, blocks);
}

template <class T, int V, int TPT>
cudaError_t launch_forward_fast_mode(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  switch (score_mode(a.opt.score_func, a.opt.topk_then_softmax)) {
    case ScoreMode::kSoftmax: return launch_forward_fast_groups<T, V, TPT, ScoreMode::kSoftmax>(a, stream, blocks);
    case ScoreMode::kSigmoid: return launch_forward_fast_groups<T, V, TPT, ScoreMode::kSigmoid>(a, stream, blocks);
    case ScoreMode::kSqrtSoftplus:
      return launch_forward_fast_groups<T, V, TPT, ScoreMode::kSqrtSoftplus>(a, stream, blocks);
    case ScoreMode::kTopkSoftmax:
      return launch_forward_fast_groups<T, V, TPT, ScoreMode::kTopkSoftmax>(a, stream, blocks);
  }
  return cudaErrorInvalidValue;
}

// Dispatches the fast shapes of kernels/router/tuning.hpp fast_shape().
template <class T>
cudaError_t launch_forward_fast_dtype(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  const int v = a.shape.values_per_lane;
  switch (a.shape.lanes_per_token) {
    case 1: if (v == 8) return launch_forward_fast_mode<T, 8, 1>(a, stream, blocks); break;
    case 2: if (v == 8) return launch_forward_fast_mode<T, 8, 2>(a, stream, blocks); break;
    case 4: if (v == 8) return launch_forward_fast_mode<T, 8, 4>(a, stream, blocks); break;
    case 8:
      if (v == 8) return launch_forward_fast_mode<T, 8, 8>(a, stream, blocks);
      if (v == 16) return launch_forward_fast_mode<T, 16, 8>(a, stream, blocks);
      break;
    case 16:
      if (v == 8) return launch_forward_fast_mode<T, 8, 16>(a, stream, blocks);
      if (v == 16) return launch_forward_fast_mode<T, 16, 16>(a, stream, blocks);
      break;
    case 32: if (v == 16) return launch_forward_fast_mode<T, 16, 32>(a, stream, blocks); break;
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::kernels::router
