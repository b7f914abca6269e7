// Router forward, register fast path (E <= 512; groups aligned to lanes).
//
// Maths (per token t, fp32; include/moekit/router.h has the contract):
//   s = softmax(z) | sigmoid(z) | sqrt(softplus(z));   c = (TOPK_THEN_SOFTMAX ? z : s) + b
//   groups: group key = max | top-2 sum of its c; the G' best groups are kept, the others' c
//           become the mask value (0 or -inf); idx = top-K of c (desc, ties to the lower index)
//   w = s[idx] | c[idx] (weights_use_bias) | softmax(z[idx]);  w /= sum w + 1e-20;  w *= rho
//   p = q / (sum q + 1e-20) with q = s (c with weights_use_bias);  S += m_t p;  L += m_t [i in idx]
//
// Shapes: logits [T, E] rows logits_stride apart; weights, indices [T, K]; partial rows
// [num_blocks, E]. Layout: a team of TPT lanes (a power of two) owns a token; lane l of the team
// holds experts [l V, l V + V) in registers; experts past E (padding) are never read from memory
// (every load stays inside [row, row + E): kernels/router/span.hpp): they are -inf logits (score
// 0) with selection value -inf and the highest indices, so they can only come after every real
// expert and are never picked (K <= E). Tokens go to teams in warp-major order: step i of warp w handles
// tokens (w + i * warps) * teams_per_warp + team; a warp loops while its first team has a token,
// so all of its lanes run every collective (teams past T work on zeros and write nothing).
//
// Selection: each lane caches its two best (key, slot) in registers; a pick is one max reduction
// over the team's heads (redux.sync with the team's mask) and a ballot: the lowest tied lane holds
// the lowest index (blocked layout). A lane that gave away both cached experts rescans its V keys
// below the last one it gave away (warp-uniform branch, rare: it needs three of the top-K in one
// lane). Groups: a lane's top-2 also give the group keys (a butterfly over the group's lanes),
// the groups' ranks come from G shuffles.
//
// Determinism: every sum has a fixed order (per lane, then a fixed butterfly; per block, teams in
// order); loads use integer atomics only (order-independent). No global float atomics.
#pragma once

#include "kernels/router/common.cuh"
#include "kernels/router/grid.cuh"
#include "kernels/router/launch.hpp"
#include "kernels/router/tuning.hpp"
#include "moekit/router.h"

namespace moekit::kernels::router {

template <class T, int V, int TPT>
__global__ void __launch_bounds__(kFastThreads, fast_min_blocks(V))
    router_forward_fast_kernel(const ForwardArgs a) {
  constexpr int kTeamsPerWarp = 32 / TPT;
  constexpr int kTeams = kFastThreads / TPT;
  constexpr int kEPad = V * TPT;
  constexpr int kKMax = kEPad < 32 ? kEPad : 32;
  constexpr int kRanks = (kKMax + TPT - 1) / TPT;  // output ranks per lane
  constexpr int kWords = Words<T, V>::kCount;
  // Weight source of each team's current token (later: the aux accumulators for the block sum).
  __shared__ __align__(16) float s_row[kTeams][kEPad];
  __shared__ int s_sel[kTeams][kKMax];
  __shared__ int s_load[kEPad];
  __shared__ float s_chunk[kFastThreads];
  __shared__ __align__(16) float s_bias[kEPad];  // correction bias, 0 past E (registers stay free)
  __shared__ int s_count;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Let the finalize kernel (a programmatic dependent) get scheduled early; it waits for us.
  asm volatile("griddepcontrol.launch_dependents;");
#endif

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
  // Elements of the row from this lane's first on: rem >= V a whole span, 0 < rem < V a span that
  // ends at E, rem <= 0 a lane past E (padding only). Compared directly, never clamped first
  // (kernels/router/span.hpp says why).
  const int rem = E - base;

  const bool need_load = a.load_mode != LoadMode::kNone;
  const bool need_score = a.score_partial != nullptr;
  const bool need_count = a.count_partial != nullptr;
  const int sf = o.score_func;
  const bool topk_softmax = o.topk_then_softmax != 0;
  const bool full_softmax = sf == MOEKIT_SCORE_SOFTMAX && (!topk_softmax || need_score);
  const bool wub = o.weights_use_bias != 0;

  for (int e = threadIdx.x; e < kEPad; e += kFastThreads) {
    s_load[e] = 0;
    s_bias[e] = (a.bias != nullptr && e < E) ? __ldg(a.bias + e) : 0.0f;
  }
  if (threadIdx.x == 0) s_count = 0;

  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.0f;
  int my_count = 0;

  // Group geometry (G > 1 here implies E = G S with S a multiple of V and S / V a power of two).
  const int G = o.num_groups;
  const int lanes_per_group = G > 1 ? (E / G) / V : 1;
  const int my_group = lt / lanes_per_group;
  const uint32_t mask_key = float_key(o.group_mask_value + 0.0f);

  const char* logits = static_cast<const char*>(a.logits);
  const int64_t row_bytes = a.logits_stride * static_cast<int64_t>(sizeof(T));
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (kFastThreads / 32);
  const int64_t warp_global = static_cast<int64_t>(blockIdx.x) * (kFastThreads / 32) + warp;

  uint32_t next_raw[kWords];
  bool next_mask = false;
  auto fetch = [&](int64_t t) {
    if (t < num_tokens) {
      const T* p = reinterpret_cast<const T*>(logits + t * row_bytes) + base;
      load_span<T, V>(p, a.logits_vec_bytes, rem, next_raw);  // -inf at and past E
      next_mask = a.token_mask == nullptr || __ldg(a.token_mask + t) != 0;
    } else {
#pragma unroll
      for (int i = 0; i < kWords; ++i) next_raw[i] = 0u;
      next_mask = false;
    }
  };

  __syncthreads();
  fetch(warp_global * kTeamsPerWarp + team_in_warp);

  for (int64_t step = warp_global; step * kTeamsPerWarp < num_tokens; step += warps_total) {
    const int64_t t = step * kTeamsPerWarp + team_in_warp;
    const bool active = t < num_tokens;
    uint32_t raw[kWords];
#pragma unroll
    for (int i = 0; i < kWords; ++i) raw[i] = next_raw[i];
    const bool m = next_mask;
    fetch((step + warps_total) * kTeamsPerWarp + team_in_warp);

    // ---- scores ------------------------------------------------------------------------------
    float z[V], s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) z[j] = Elem<T>::get(raw, j);
    lane_scores<V, TPT>(sf, full_softmax, z, s);

    // ---- selection keys, weight sources, aux statistics ---------------------------------------
    float bias[V];
#pragma unroll
    for (int j = 0; j < V / 4; ++j) {
      const float4 b4 = reinterpret_cast<const float4*>(&s_bias[base])[j];
      bias[4 * j] = b4.x;
      bias[4 * j + 1] = b4.y;
      bias[4 * j + 2] = b4.z;
      bias[4 * j + 3] = b4.w;
    }
    uint32_t key[V];
#pragma unroll
    for (int j = 0; j < V; ++j) key[j] = float_key(sanitize((topk_softmax ? z[j] : s[j]) + bias[j]));
    if (rem < V) {  // padding: -inf keys (a softmax score of 0 would otherwise outrank -inf)
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j >= rem) key[j] = float_key(-INFINITY);
    }
    __syncwarp();  // the previous token's readers of s_row / s_sel are done
    {
      float ws[V];
#pragma unroll
      for (int j = 0; j < V; ++j) ws[j] = topk_softmax ? z[j] : (wub ? s[j] + bias[j] : s[j]);
      float4* dst = reinterpret_cast<float4*>(&s_row[team][base]);
#pragma unroll
      for (int j = 0; j < V / 4; ++j) dst[j] = make_float4(ws[4 * j], ws[4 * j + 1], ws[4 * j + 2], ws[4 * j + 3]);
    }
    if (need_score) {
      float q[V];
#pragma unroll
      for (int j = 0; j < V; ++j) q[j] = wub ? s[j] + bias[j] : s[j];
      float f = 1.0f;
      if (o.normalize) {
        float sq = 0.0f;
#pragma unroll
        for (int j = 0; j < V; ++j) sq += q[j];
        f = 1.0f / (team_sum<TPT>(sq) + 1e-20f);
      }
      if (active && m) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = fmaf(q[j], f, acc[j]);
      }
    }
    if (active && m) ++my_count;

    // ---- per-lane top-2 ----------------------------------------------------------------------
    uint32_t k1 = key[0], k2 = key[1];
    int s1 = 0, s2 = 1;
    if (k2 > k1) {
      k1 = key[1];
      k2 = key[0];
      s1 = 1;
      s2 = 0;
    }
#pragma unroll
    for (int j = 2; j < V; ++j) {
      const bool gt1 = key[j] > k1;
      const bool gt2 = key[j] > k2;
      k2 = gt1 ? k1 : (gt2 ? key[j] : k2);
      s2 = gt1 ? s1 : (gt2 ? j : s2);
      k1 = gt1 ? key[j] : k1;
      s1 = gt1 ? j : s1;
    }

    // ---- groups ------------------------------------------------------------------------------
    bool masked = false;
    if (G > 1) {
      uint32_t gkey;
      if (o.group_score == MOEKIT_GROUP_SCORE_MAX ||
          (o.group_score == MOEKIT_GROUP_SCORE_TOPN_SUM && o.group_topn == 1)) {
        gkey = k1;
        for (int d = lanes_per_group / 2; d > 0; d >>= 1) {
          const uint32_t other = __shfl_xor_sync(kFullMask, gkey, d);
          gkey = other > gkey ? other : gkey;
        }
      } else {  // sum of the group's two largest selection values
        uint32_t a1 = k1, a2 = k2;
        for (int d = lanes_per_group / 2; d > 0; d >>= 1) {
          const uint32_t p1 = __shfl_xor_sync(kFullMask, a1, d);
          const uint32_t p2 = __shfl_xor_sync(kFullMask, a2, d);
          const uint32_t hi = a1 > p1 ? a1 : p1;
          const uint32_t lo = a1 > p1 ? p1 : a1;
          const uint32_t m2 = a2 > p2 ? a2 : p2;
          a1 = hi;
          a2 = lo > m2 ? lo : m2;
        }
        gkey = float_key(sanitize(key_float(a1) + key_float(a2)) + 0.0f);
      }
      int rank = 0;
      const int team_base = team_in_warp * TPT;
      for (int g = 0; g < G; ++g) {
        const uint32_t other = __shfl_sync(kFullMask, gkey, team_base + g * lanes_per_group);
        rank += (other > gkey || (other == gkey && g < my_group)) ? 1 : 0;
      }
      masked = my_group < G && rank >= o.groups_kept;
      if (masked) {
        k1 = mask_key;
        k2 = mask_key;
        s1 = 0;
        s2 = 1;
      }
    }

    // ---- top-K -------------------------------------------------------------------------------
    int cached = 2;
    int popped = 0;
    uint32_t bound_key = 0;
    int bound_slot = 0;
    for (int r = 0; r < K; ++r) {
      const uint32_t head = cached > 0 ? k1 : 0u;
      uint32_t best = head;
      if constexpr (TPT > 1) best = __reduce_max_sync(team_mask, head);
      const bool hit = head == best;
      const unsigned tied = __ballot_sync(kFullMask, hit) & team_mask;
      if (hit && (tied & lanemask_lt()) == 0) {
        s_sel[team][r] = base + s1;
        bound_key = k1;
        bound_slot = s1;
        k1 = k2;
        s1 = s2;
        --cached;
        ++popped;
      }
      const bool stale = active && cached == 0 && popped < V;
      if (__any_sync(kFullMask, stale)) {
        if (stale) {
          uint32_t n1 = 0u, n2 = 0u;
          int t1 = 0, t2 = 0;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const uint32_t kj = masked ? mask_key : key[j];
            const bool elig = kj < bound_key || (kj == bound_key && j > bound_slot);
            const bool gt1 = elig && kj > n1;
            const bool gt2 = elig && kj > n2;
            n2 = gt1 ? n1 : (gt2 ? kj : n2);
            t2 = gt1 ? t1 : (gt2 ? j : t2);
            n1 = gt1 ? kj : n1;
            t1 = gt1 ? j : t1;
          }
          k1 = n1;
          s1 = t1;
          k2 = n2;
          s2 = t2;
          cached = V - popped < 2 ? V - popped : 2;
        }
      }
    }
    __syncwarp();

    // ---- weights, indices, loads ---------------------------------------------------------------
    // Lane lt owns ranks r = lt + i TPT, i < kRanks (K <= kKMax).
    int idx[kRanks];
    float u[kRanks];
    bool has[kRanks];
#pragma unroll
    for (int i = 0; i < kRanks; ++i) {
      const int r = lt + i * TPT;
      has[i] = r < K;
      idx[i] = has[i] ? s_sel[team][r] : 0;
      u[i] = has[i] ? s_row[team][idx[i]] : 0.0f;
    }
    if (topk_softmax) picked_softmax<TPT>(u, has);
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
  if (need_count) {
    if (lt == 0 && my_count > 0) atomicAdd(&s_count, my_count);
  }
  __syncthreads();
  if (need_score) {
    if (rem > 0) {
      float4* dst = reinterpret_cast<float4*>(&s_row[team][base]);
#pragma unroll
      for (int j = 0; j < V / 4; ++j) dst[j] = make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
    }
    __syncthreads();
    float* out = a.score_partial + static_cast<int64_t>(blockIdx.x) * E;
    if constexpr (kEPad <= kFastThreads) {
      // Chunk c sums teams [c V, c V + V) (kTeams / chunks = V); then the chunks in order.
      constexpr int kChunks = kFastThreads / kEPad;
      const int e = threadIdx.x % kEPad;
      const int c = threadIdx.x / kEPad;
      float sum = 0.0f;
      if (e < E) {  // padding columns were never accumulated
#pragma unroll
        for (int i = 0; i < V; ++i) sum += s_row[c * V + i][e];
      }
      s_chunk[c * kEPad + e] = sum;
      __syncthreads();
      if (threadIdx.x < E) {
        float total = 0.0f;
#pragma unroll
        for (int i = 0; i < kChunks; ++i) total += s_chunk[i * kEPad + threadIdx.x];
        out[threadIdx.x] = total;
      }
    } else {
      for (int e = threadIdx.x; e < E; e += kFastThreads) {
        float total = 0.0f;
#pragma unroll
        for (int tm = 0; tm < kTeams; ++tm) total += s_row[tm][e];
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

template <class T, int V, int TPT>
cudaError_t launch_forward_fast(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  const int32_t grid = resident_grid(router_forward_fast_kernel<T, V, TPT>, kFastThreads, 0, a.shape.num_blocks);
  *blocks = grid;
  router_forward_fast_kernel<T, V, TPT><<<grid, kFastThreads, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

// Dispatches the fast shapes of kernels/router/tuning.hpp fast_shape().
template <class T>
cudaError_t launch_forward_fast_dtype(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  const int v = a.shape.values_per_lane;
  switch (a.shape.lanes_per_token) {
    case 1: if (v == 8) return launch_forward_fast<T, 8, 1>(a, stream, blocks); break;
    case 2: if (v == 8) return launch_forward_fast<T, 8, 2>(a, stream, blocks); break;
    case 4: if (v == 8) return launch_forward_fast<T, 8, 4>(a, stream, blocks); break;
    case 8: if (v == 8) return launch_forward_fast<T, 8, 8>(a, stream, blocks); break;
    case 16:
      if (v == 8) return launch_forward_fast<T, 8, 16>(a, stream, blocks);
      if (v == 16) return launch_forward_fast<T, 16, 16>(a, stream, blocks);
      break;
    case 32: if (v == 16) return launch_forward_fast<T, 16, 32>(a, stream, blocks); break;
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::kernels::router
