// Router backward: dL/dz [T, E] from dL/dw [T, K] and the aux-loss coefficient.
//
// Maths (per token, fp32; u = the forward's weights before normalisation and route scale):
//   u_k = src[idx_k] with src = s (c = s + b with weights_use_bias), or u = softmax(z[idx])
//   gv = rho gw;  normalise: D = sum u + 1e-20, v = u / D, gu = (gv - <gv, v>) / D;  else gu = gv
//   TOPK_THEN_SOFTMAX: dz[idx_k] += u_k (gu_k - <gu, u>)           (softmax over the K picked)
//   otherwise:          ds[idx_k] += gu_k
//   aux (coeff != 0, m_t = 1): a_e = coeff L_e E / (K N'^2), q = s (c with weights_use_bias);
//       normalise: D_q = sum q + 1e-20, gq = (a - <a, q> / D_q) / D_q;  else gq = a;  ds += gq
//   score: softmax dz += s (ds - <ds, s>);  sigmoid dz = ds s (1 - s);
//          sqrt-softplus dz = ds sigmoid(z) / (2 s) (e^(z/2) / 2 below z = -20, so s = 0 is safe)
// Selection (top-k, groups) is piecewise constant: no gradient through it. Indices outside
// [0, E) contribute nothing; repeated indices add up (scattered in k order).
//
// Evaluation order (the same maths, arranged so that rounding errors scale with the size of the
// result, not with the size of the terms that cancel; docs/router.md, "Backward precision"):
//   - gv - <gv, v> is computed as (gv - c) - <gv - c, v> + c (1 - sum v), c = gv of the largest
//     weight (lowest rank among equals), 1 - sum v = 1e-20 / D exactly: the dominant term is
//     subtracted exactly instead of through a rounded mean. The picked softmax likewise subtracts
//     c = gu of its largest weight (its backward ignores constants: sum u = 1).
//   - the full softmax's <ds, s> over the selection part, with normalisation, is
//     sum_k gu_k u_k = 1e-20 <gv, v> / D exactly (minus sum_k gu_k b_idx_k with weights_use_bias):
//     an analytically ~0 sum is not formed from O(|gv|) terms.
//   - aux: a'_e = a_e - a_ref with a_ref = the a of the mean load K N / E (a shift by a constant):
//     the softmax ignores constants in ds (gq = (a' - a'_top) / D_q, a'_top at the largest score,
//     so its term in <ds, s> is exactly 0); otherwise gq = ((a' - <a', q> / D_q) + a_ref 1e-20 /
//     D_q) / D_q, or a itself without normalisation.
//
// Fast path (E <= 512): the team layout of the fast forward (kernels/router/forward_fast.cuh),
// values in registers, the weight sources and the scattered gradient of each team in shared
// memory; every global access stays inside [row, row + E) (kernels/router/span.hpp). Generic
// path: one warp per token, lane-strided over the row, the scattered gradient in shared memory, z
// re-read through L1 for each pass. Every output element is written once by one thread; sums have
// a fixed order: deterministic.
#pragma once

#include "kernels/router/common.cuh"
#include "kernels/common/grid.hpp"
#include "kernels/common/pdl.cuh"
#include "kernels/router/launch.hpp"
#include "kernels/router/tuning.hpp"
#include "moekit/router.h"

namespace moekit::kernels::router {

// The aux term is on when its coefficient is nonzero (the host then guarantees the load and count).
__device__ __forceinline__ bool aux_enabled(const BackwardArgs& a) { return a.aux_coeff != 0.0f; }

// Per-expert aux gradient a_e = scale L_e with scale = coeff E / (K N'^2), read from the device
// count, and the reference load lref = K N / E (the mean load when the loads are this count's):
// the kernels use a'_e = scale (L_e - lref) and a_ref = scale lref.
struct AuxScale {
  float scale;
  float lref;
  float aref;
};

__device__ __forceinline__ AuxScale aux_scale(const BackwardArgs& a) {
  AuxScale r{0.0f, 0.0f, 0.0f};
  if (!aux_enabled(a)) return r;
  const int32_t n = __ldg(a.token_count);
  const float np = static_cast<float>(n > 1 ? n : 1);
  const float E = static_cast<float>(a.opt.num_experts);
  const float K = static_cast<float>(a.opt.top_k);
  r.scale = a.aux_coeff * E / (K * np * np);
  r.lref = K * static_cast<float>(n > 0 ? n : 0) / E;
  r.aref = r.scale * r.lref;
  return r;
}

__device__ __forceinline__ float aux_shifted(const AuxScale& x, int32_t load) {
  return x.scale * (static_cast<float>(load) - x.lref);
}

// The reference rank of a team's K ranks (lane lt holds ranks lt + i TPT): the largest valid u,
// the lowest rank among equals. Returns g at that rank on every lane of the team (0 when no rank
// is valid). Every lane of the warp must call it (team reductions and a full-warp shuffle).
template <int TPT, int R>
__device__ __forceinline__ float rank_shift(const float (&u)[R], const bool (&valid)[R], const float (&g)[R],
                                            int lt, int team_base) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < R; ++i)
    if (valid[i]) mx = fmaxf(mx, u[i]);
  mx = team_max<TPT>(mx);
  unsigned mine = 0xffffffffu;
  float mine_g = 0.0f;
#pragma unroll
  for (int i = R - 1; i >= 0; --i) {  // the lowest matching rank of this lane wins
    if (valid[i] && u[i] == mx) {
      mine = static_cast<unsigned>(lt + i * TPT);
      mine_g = g[i];
    }
  }
  const unsigned best = team_umin<TPT>(mine, team_base / TPT);
  const int src = team_base + (best == 0xffffffffu ? 0 : static_cast<int>(best % TPT));
  const float c = __shfl_sync(kFullMask, mine_g, src);
  return best == 0xffffffffu ? 0.0f : c;
}

template <class T, int V, int TPT, ScoreMode MODE>
__global__ void __launch_bounds__(kFastThreads, fast_backward_min_blocks(V, TPT, static_cast<int>(sizeof(T))))
    router_backward_fast_kernel(const BackwardArgs a) {
  // This grid's predecessor, before any global access (kernels/common/pdl.cuh). No early trigger:
  // the next kernel is scheduled as this one exits (blocks of the next call resident and waiting
  // beside the last ones of a long backward slowed it, docs/router.md, seventh measurement).
  pdl_wait();
  constexpr int kTeamsPerWarp = 32 / TPT;
  constexpr int kTeams = kFastThreads / TPT;
  constexpr int kEPad = V * TPT;
  constexpr int kKMax = kEPad < 32 ? kEPad : 32;
  constexpr int kRanks = (kKMax + TPT - 1) / TPT;
  constexpr int kWords = Words<T, V>::kCount;
  __shared__ __align__(16) float s_row[kTeams][kEPad];  // weight source of the team's token
  __shared__ __align__(16) float g_row[kTeams][kEPad];  // gradient scattered at the picked experts
  __shared__ __align__(16) float s_bias[kEPad];         // correction bias, 0 past E
  __shared__ __align__(16) float s_aux[kEPad];          // shifted aux gradient a'_e, 0 past E

  const RouterOptions& o = a.opt;
  const int E = o.num_experts;
  const int K = o.top_k;
  const int64_t num_tokens = a.num_tokens;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lt = lane % TPT;
  const int team_in_warp = lane / TPT;
  const int team = warp * kTeamsPerWarp + team_in_warp;
  const int team_base = team_in_warp * TPT;
  const int base = lt * V;
  const int rem = E - base;  // row elements from this lane's first on (kernels/router/span.hpp)
  constexpr int sf = score_func_of(MODE);  // compiled per score function
  constexpr bool topk_softmax = MODE == ScoreMode::kTopkSoftmax;
  const bool aux_on = aux_enabled(a);
  const bool full_softmax = sf == MOEKIT_SCORE_SOFTMAX && (!topk_softmax || aux_on);
  const bool wub = o.weights_use_bias != 0;

  const char* logits = static_cast<const char*>(a.logits);
  const int64_t row_bytes = a.logits_stride * static_cast<int64_t>(sizeof(T));
  char* grad = static_cast<char*>(a.grad_logits);
  const int64_t grad_row_bytes = a.grad_stride * static_cast<int64_t>(sizeof(T));
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (kFastThreads / 32);
  const int64_t warp_global = static_cast<int64_t>(blockIdx.x) * (kFastThreads / 32) + warp;

  uint32_t next_raw[kWords];
  int next_idx[kRanks];
  float next_gw[kRanks];
  bool next_mask = false;
  auto fetch = [&](int64_t t) {
    const bool ok = t < num_tokens;
    if (ok) {
      const T* p = reinterpret_cast<const T*>(logits + t * row_bytes) + base;
      load_span<T, V>(p, a.logits_vec_bytes, rem, next_raw);  // -inf at and past E
      next_mask = a.token_mask == nullptr || __ldg(a.token_mask + t) != 0;
    } else {
#pragma unroll
      for (int i = 0; i < kWords; ++i) next_raw[i] = 0u;
      next_mask = false;
    }
#pragma unroll
    for (int i = 0; i < kRanks; ++i) {
      const int r = lt + i * TPT;
      const bool has = ok && r < K;
      next_idx[i] = has ? __ldg(a.indices + t * K + r) : -1;
      next_gw[i] = (has && a.grad_weights != nullptr) ? __ldg(a.grad_weights + t * K + r) : 0.0f;
    }
  };
  // The first token is loaded before the bias / aux staging below, so the two global round trips
  // of the prologue overlap instead of following each other.
  fetch(warp_global * kTeamsPerWarp + team_in_warp);

  const AuxScale aux = aux_scale(a);
  for (int e = threadIdx.x; e < kEPad; e += kFastThreads) {
    s_bias[e] = (a.bias != nullptr && e < E) ? __ldg(a.bias + e) : 0.0f;
    s_aux[e] = (aux_on && e < E) ? aux_shifted(aux, __ldg(a.expert_load + e)) : 0.0f;
  }
  __syncthreads();

  for (int64_t step = warp_global; step * kTeamsPerWarp < num_tokens; step += warps_total) {
    const int64_t t = step * kTeamsPerWarp + team_in_warp;
    const bool active = t < num_tokens;
    uint32_t raw[kWords];
    int idx[kRanks];
    float gw[kRanks];
#pragma unroll
    for (int i = 0; i < kWords; ++i) raw[i] = next_raw[i];
#pragma unroll
    for (int i = 0; i < kRanks; ++i) {
      idx[i] = next_idx[i];
      gw[i] = next_gw[i];
    }
    const bool m = next_mask;
    fetch((step + warps_total) * kTeamsPerWarp + team_in_warp);

    // Registers: per value only s[] (turned into ds/dz below) and the next token's prefetched
    // logits stay live across the token; bias, aux values, weight sources and the scattered
    // gradient are re-read from shared memory in float4 chunks where they are used
    // (fast_backward_min_blocks() caps the registers; ptxas 13.0 spills a few words, at most
    // ~40 bytes, in some instances: fp32 V = 8 with 2 or 4 lanes and V = 16 on sm_80 and sm_90,
    // 16-bit ones on sm_80; -Xptxas -v lists them).
    float s[V];
    {
      float z[V];
#pragma unroll
      for (int j = 0; j < V; ++j) z[j] = Elem<T>::get(raw, j);
      lane_scores<V, TPT>(sf, full_softmax, z, s);
    }
    __syncwarp();  // the previous token's readers of s_row / g_row are done
    {
      float4* src = reinterpret_cast<float4*>(&s_row[team][base]);
      float4* gdst = reinterpret_cast<float4*>(&g_row[team][base]);
#pragma unroll
      for (int j = 0; j < V / 4; ++j) {
        const float4 b4 = reinterpret_cast<const float4*>(&s_bias[base])[j];
        const float b[4] = {b4.x, b4.y, b4.z, b4.w};
        float w4[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int jj = 4 * j + q;
          w4[q] = topk_softmax ? Elem<T>::get(raw, jj) : (wub ? s[jj] + b[q] : s[jj]);
        }
        src[j] = make_float4(w4[0], w4[1], w4[2], w4[3]);
        gdst[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
    // From here s[] is what dz needs: softmax s, sigmoid s (1 - s), sqrt-softplus d s / d z (the
    // aux scores q of those two are their weight sources, read back from s_row).
    if (sf == MOEKIT_SCORE_SIGMOID) {
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = s[j] * (1.0f - s[j]);
    } else if (sf != MOEKIT_SCORE_SOFTMAX) {
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = sqrt_softplus_grad(Elem<T>::get(raw, j), s[j]);
    }
    __syncwarp();

    // ---- gradient of the weights, per rank ---------------------------------------------------
    bool valid[kRanks];
    float u[kRanks], gv[kRanks];
#pragma unroll
    for (int i = 0; i < kRanks; ++i) {
      valid[i] = idx[i] >= 0 && idx[i] < E;
      u[i] = valid[i] ? s_row[team][idx[i]] : 0.0f;
      gv[i] = valid[i] ? o.route_scale * gw[i] : 0.0f;
    }
    if (topk_softmax) picked_softmax<TPT>(u, valid);
    float sel_dot = 0.0f;  // full softmax with normalisation: <selection part of ds, s>
    if (o.normalize) {
      float su = 0.0f;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) su += u[i];
      su = team_sum<TPT>(su);
      const float denom = su + 1e-20f;
      const float c = rank_shift<TPT>(u, valid, gv, lt, team_base);
      float d = 0.0f;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) d += valid[i] ? (gv[i] - c) * u[i] : 0.0f;
      const float dotp = team_sum<TPT>(d) / denom;  // <gv - c, v>
      const float corr = c * (1e-20f / denom);      // c (1 - sum v)
#pragma unroll
      for (int i = 0; i < kRanks; ++i) gv[i] = valid[i] ? (((gv[i] - c) - dotp) + corr) / denom : 0.0f;
      if (sf == MOEKIT_SCORE_SOFTMAX && !topk_softmax) {
        const float gbar = c * (su / denom) + dotp;  // <gv, v>
        sel_dot = (1e-20f / denom) * gbar;           // sum_k gu_k u_k
        if (wub) {                                   // u = s + b: sum_k gu_k s_k = that - sum_k gu_k b_k
          float gb = 0.0f;
#pragma unroll
          for (int i = 0; i < kRanks; ++i)
            if (valid[i]) gb += gv[i] * s_bias[idx[i]];
          sel_dot -= team_sum<TPT>(gb);
        }
      }
    }
    if (topk_softmax) {
      const float c = rank_shift<TPT>(u, valid, gv, lt, team_base);
      float d = 0.0f;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) d += valid[i] ? (gv[i] - c) * u[i] : 0.0f;
      d = team_sum<TPT>(d);
#pragma unroll
      for (int i = 0; i < kRanks; ++i) gv[i] = valid[i] ? u[i] * ((gv[i] - c) - d) : 0.0f;
    }
    // Scatter in k order, one rank per round (repeated indices add up deterministically). With
    // K <= TPT (one rank per lane, rank 0) and no index repeated in a team (every moekit
    // forward), the ranks touch distinct entries: one round does it, in any order, with the same
    // result.
    bool one_round = false;
    if constexpr (TPT > 1) {
      if (K <= TPT) {  // warp-uniform
        const uint32_t tag = valid[0] ? (static_cast<uint32_t>(idx[0]) | (static_cast<uint32_t>(team_in_warp) << 16))
                                      : (0x80000000u | static_cast<uint32_t>(lane));
        one_round = __all_sync(kFullMask, __match_any_sync(kFullMask, tag) == (1u << lane));
      }
    }
    if (one_round) {
      if (valid[0]) g_row[team][idx[0]] += gv[0];
      __syncwarp();
    } else {
#pragma unroll
      for (int i = 0; i < kRanks; ++i) {
        if (i * TPT >= K) break;
        for (int l = 0; l < TPT && l + i * TPT < K; ++l) {
          if (lt == l && valid[i]) g_row[team][idx[i]] += gv[i];
          __syncwarp();
        }
      }
    }

    // ---- ds = selection part (not for the picked softmax: its gradient goes to z directly)
    //      + aux part; dsum collects what <ds, s> needs beyond sel_dot --------------------------
    const bool sel_in_dot = sf == MOEKIT_SCORE_SOFTMAX && !topk_softmax && !o.normalize;
    float gs[V];
    float dsum = 0.0f;
#pragma unroll
    for (int j = 0; j < V / 4; ++j) {
      const float4 g4 = reinterpret_cast<const float4*>(&g_row[team][base])[j];
      const float g[4] = {g4.x, g4.y, g4.z, g4.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        gs[4 * j + q] = topk_softmax ? 0.0f : g[q];
        if (sel_in_dot) dsum += g[q] * s[4 * j + q];
      }
    }
    // Collectives run on every lane (aux_on, normalize, sf are uniform); masked tokens add nothing.
    if (aux_on) {
      float inv_q = 1.0f, dq = 0.0f, corr = 0.0f;
      if (o.normalize) {
        float sq = 0.0f, saq = 0.0f;
#pragma unroll
        for (int j = 0; j < V / 4; ++j) {
          const float4 a4 = reinterpret_cast<const float4*>(&s_aux[base])[j];
          const float av[4] = {a4.x, a4.y, a4.z, a4.w};
          float qv[4];
          if (sf == MOEKIT_SCORE_SOFTMAX) {  // q = s (+ b); s_row may hold logits (top-k softmax)
            const float4 b4 = reinterpret_cast<const float4*>(&s_bias[base])[j];
            const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) qv[q] = wub ? s[4 * j + q] + b[q] : s[4 * j + q];
          } else {  // q is the weight source
            const float4 q4 = reinterpret_cast<const float4*>(&s_row[team][base])[j];
            qv[0] = q4.x;
            qv[1] = q4.y;
            qv[2] = q4.z;
            qv[3] = q4.w;
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            sq += qv[q];
            saq += av[q] * qv[q];
          }
        }
        inv_q = 1.0f / (team_sum<TPT>(sq) + 1e-20f);
        if (sf != MOEKIT_SCORE_SOFTMAX) {
          dq = team_sum<TPT>(saq) * inv_q;      // <a', q> / D_q
          corr = aux.aref * (1e-20f * inv_q);  // a_ref (1 - sum q / D_q)
        }
      }
      // Softmax: shift by the a' of the largest score (lowest index among equals), so that the
      // term of an expert with s ~ 1 is exactly 0 in <ds, s> instead of cancelling there.
      float a_top = 0.0f;
      if (sf == MOEKIT_SCORE_SOFTMAX) {
        float smax = s[0];
#pragma unroll
        for (int j = 1; j < V; ++j) smax = fmaxf(smax, s[j]);
        smax = team_max<TPT>(smax);
        unsigned first = 0xffffffffu;
#pragma unroll
        for (int j = V - 1; j >= 0; --j)
          if (s[j] == smax) first = static_cast<unsigned>(base + j);
        first = team_umin<TPT>(first, team_in_warp);
        a_top = first < static_cast<unsigned>(kEPad) ? s_aux[first] : 0.0f;  // 0 past E
      }
      if (m) {
#pragma unroll
        for (int j = 0; j < V / 4; ++j) {
          const float4 a4 = reinterpret_cast<const float4*>(&s_aux[base])[j];
          const float av[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int jj = 4 * j + q;
            float gq;
            if (sf == MOEKIT_SCORE_SOFTMAX) {  // the softmax's backward ignores constants in ds
              gq = (av[q] - a_top) * inv_q;
              dsum += gq * s[jj];
            } else if (o.normalize) {
              gq = ((av[q] - dq) + corr) * inv_q;
            } else {
              gq = av[q] + aux.aref;
            }
            gs[jj] += gq;
          }
        }
      }
    }

    // ---- through the score function (dz over ds, in place) ----------------------------------
    if (sf == MOEKIT_SCORE_SOFTMAX) {
      const float dot = team_sum<TPT>(dsum) + sel_dot;
#pragma unroll
      for (int j = 0; j < V / 4; ++j) {
        const float4 g4 = reinterpret_cast<const float4*>(&g_row[team][base])[j];
        const float g[4] = {g4.x, g4.y, g4.z, g4.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int jj = 4 * j + q;
          gs[jj] = s[jj] * (gs[jj] - dot) + (topk_softmax ? g[q] : 0.0f);
        }
      }
    } else {  // s[] holds d s / d z here
#pragma unroll
      for (int j = 0; j < V; ++j) gs[j] = gs[j] * s[j];
    }
    if (active && rem > 0) {
      T* p = reinterpret_cast<T*>(grad + t * grad_row_bytes) + base;
      store_span<T, V>(p, a.grad_vec_bytes, rem, gs);  // only the elements below E
    }
  }
}

template <class T, int V, int TPT, ScoreMode MODE>
cudaError_t launch_backward_fast_mode(const BackwardArgs& a, cudaStream_t stream) {
  auto kernel = router_backward_fast_kernel<T, V, TPT, MODE>;
  const int32_t grid = resident_grid(kernel, kFastThreads, 0, a.shape.num_blocks);
  return launch_programmatic(kernel, dim3(grid), dim3(kFastThreads), 0, stream, a.programmatic, a);
}

template <class T, int V, int TPT>
cudaError_t launch_backward_fast(const BackwardArgs& a, cudaStream_t stream) {
  switch (score_mode(a.opt.score_func, a.opt.topk_then_softmax)) {
    case ScoreMode::kSoftmax: return launch_backward_fast_mode<T, V, TPT, ScoreMode::kSoftmax>(a, stream);
    case ScoreMode::kSigmoid: return launch_backward_fast_mode<T, V, TPT, ScoreMode::kSigmoid>(a, stream);
    case ScoreMode::kSqrtSoftplus: return launch_backward_fast_mode<T, V, TPT, ScoreMode::kSqrtSoftplus>(a, stream);
    case ScoreMode::kTopkSoftmax: return launch_backward_fast_mode<T, V, TPT, ScoreMode::kTopkSoftmax>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <class T>
cudaError_t launch_backward_fast_dtype(const BackwardArgs& a, cudaStream_t stream) {
  const int v = a.shape.values_per_lane;
  switch (a.shape.lanes_per_token) {
    case 1: if (v == 8) return launch_backward_fast<T, 8, 1>(a, stream); break;
    case 2: if (v == 8) return launch_backward_fast<T, 8, 2>(a, stream); break;
    case 4: if (v == 8) return launch_backward_fast<T, 8, 4>(a, stream); break;
    case 8:
      if (v == 8) return launch_backward_fast<T, 8, 8>(a, stream);
      if (v == 16) return launch_backward_fast<T, 16, 8>(a, stream);
      break;
    case 16:
      if (v == 8) return launch_backward_fast<T, 8, 16>(a, stream);
      if (v == 16) return launch_backward_fast<T, 16, 16>(a, stream);
      break;
    case 32: if (v == 16) return launch_backward_fast<T, 16, 32>(a, stream); break;
    default: break;
  }
  return cudaErrorInvalidValue;
}

// ---- generic path ----------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kGenericMaxWarps * 32, 4)
    router_backward_generic_kernel(const BackwardArgs a) {
  extern __shared__ __align__(16) float g_smem[];
  pdl_wait();  // as the fast kernel
  const RouterOptions& o = a.opt;
  const int E = o.num_experts;
  const int K = o.top_k;
  const int64_t num_tokens = a.num_tokens;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // Per warp: the scattered gradient [E], then two staging buffers for logits rows (the current
  // token's and the next one's; kernels/router/tuning.hpp, GenericBackwardLayout): every pass over
  // the row reads shared memory while the next row is in flight (kernels/router/common.cuh).
  const GenericBackwardLayout layout = generic_backward_layout(E, static_cast<int>(sizeof(T)));
  float* g_row = g_smem + static_cast<size_t>(warp) * layout.warp_words;
  const uint32_t* zbuf = reinterpret_cast<const uint32_t*>(g_row + layout.grad_words);
  const uint32_t zbuf_addr = static_cast<uint32_t>(__cvta_generic_to_shared(zbuf));
  const int row_bytes = E * static_cast<int>(sizeof(T));
  const int64_t stride_bytes = a.logits_stride * static_cast<int64_t>(sizeof(T));
  const int sf = o.score_func;
  const bool topk_softmax = o.topk_then_softmax != 0;
  const bool aux_on = aux_enabled(a);
  const bool full_softmax = sf == MOEKIT_SCORE_SOFTMAX && (!topk_softmax || aux_on);
  const bool wub = o.weights_use_bias != 0;
  const AuxScale aux = aux_scale(a);
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);

  auto stage = [&](int64_t tok, int buf) {  // the row of token tok into buffer buf (if it exists)
    if (tok < num_tokens)
      stage_row<sizeof(T)>(zbuf_addr + 4u * static_cast<uint32_t>(buf * layout.row_words),
                           static_cast<const char*>(a.logits) + tok * stride_bytes, row_bytes, a.logits_vec_bytes, lane);
    cp_async_commit();
  };
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  stage(t0, 0);
  int buf = 0;
  for (int64_t t = t0; t < num_tokens; t += warps_total, buf ^= 1) {
    __syncwarp();  // every lane is done with the other buffer (the token before last)
    stage(t + warps_total, buf ^ 1);
    cp_async_wait<1>();  // this token's row is complete
    __syncwarp();        // ... and visible to the whole warp
    const T* zrow = reinterpret_cast<const T*>(zbuf + buf * layout.row_words);
    auto load_z = [&](int e) { return smem_elem<T>(zrow, e); };
    T* grow = reinterpret_cast<T*>(static_cast<char*>(a.grad_logits) +
                                   t * a.grad_stride * static_cast<int64_t>(sizeof(T)));
    const bool m = a.token_mask == nullptr || __ldg(a.token_mask + t) != 0;
    const RowScore score = row_score(sf, full_softmax, E, load_z);
    auto bias_at = [&](int e) -> float { return a.bias != nullptr ? __ldg(a.bias + e) : 0.0f; };
    auto aux_at = [&](int e) -> float { return aux_shifted(aux, __ldg(a.expert_load + e)); };  // a'_e

    __syncwarp();  // the previous token's readers of g_row are done
    for (int e = lane; e < E; e += 32) g_row[e] = 0.0f;

    // weights gradient: lane r < K owns rank r (the maths and order of the fast path)
    const bool has = lane < K;
    const int idx = has ? __ldg(a.indices + t * K + lane) : -1;
    const bool valid = has && idx >= 0 && idx < E;
    float u = 0.0f;
    if (valid) {
      const float z = load_z(idx);
      u = topk_softmax ? z : (wub ? score(z) + bias_at(idx) : score(z));
    }
    float gv = (valid && a.grad_weights != nullptr) ? o.route_scale * __ldg(a.grad_weights + t * K + lane) : 0.0f;
    if (topk_softmax) {
      const float zmax = warp_max(valid ? u : -INFINITY);
      u = valid ? softmax_num(u, zmax) : 0.0f;
      u = u / warp_sum(u);
    }
    // gv of the largest weight, the lowest rank among equals (rank_shift of the fast path)
    auto shift = [&]() -> float {
      const float umax = warp_max(valid ? u : -INFINITY);
      const unsigned tied = __ballot_sync(kFullMask, valid && u == umax);
      const float c = __shfl_sync(kFullMask, gv, tied != 0u ? __ffs(tied) - 1 : 0);
      return tied != 0u ? c : 0.0f;
    };
    float sel_dot = 0.0f;
    if (o.normalize) {
      const float su = warp_sum(u);
      const float denom = su + 1e-20f;
      const float c = shift();
      const float dotp = warp_sum(valid ? (gv - c) * u : 0.0f) / denom;
      const float corr = c * (1e-20f / denom);
      gv = valid ? (((gv - c) - dotp) + corr) / denom : 0.0f;
      if (sf == MOEKIT_SCORE_SOFTMAX && !topk_softmax) {
        sel_dot = (1e-20f / denom) * (c * (su / denom) + dotp);
        if (wub) sel_dot -= warp_sum(valid ? gv * bias_at(idx) : 0.0f);
      }
    }
    if (topk_softmax) {
      const float c = shift();
      const float d = warp_sum(valid ? (gv - c) * u : 0.0f);
      gv = valid ? u * ((gv - c) - d) : 0.0f;
    }
    __syncwarp();
    for (int r = 0; r < K; ++r) {
      if (lane == r && valid) g_row[idx] += gv;
      __syncwarp();
    }

    // aux term: gq_e from a'_e (see the file comment); sums over the row first
    float inv_q = 1.0f, dq = 0.0f;
    if (aux_on && o.normalize) {
      float sq = 0.0f, saq = 0.0f;
      for (int e = lane; e < E; e += 32) {
        const float sv = score(load_z(e));
        const float q = wub ? sv + bias_at(e) : sv;
        sq += q;
        saq += aux_at(e) * q;
      }
      inv_q = 1.0f / (warp_sum(sq) + 1e-20f);
      dq = warp_sum(saq) * inv_q;
    }
    const float corr_q = aux.aref * (1e-20f * inv_q);
    // softmax: shift by the a' of the largest score (the largest logit, lowest index among equals)
    float a_top = 0.0f;
    if (aux_on && sf == MOEKIT_SCORE_SOFTMAX) {
      unsigned first = 0xffffffffu;
      for (int e = lane; e < E; e += 32)
        if (first == 0xffffffffu && load_z(e) == score.mx) first = static_cast<unsigned>(e);
      first = __reduce_min_sync(kFullMask, first);
      a_top = first < static_cast<unsigned>(E) ? aux_at(static_cast<int>(first)) : 0.0f;
    }
    auto gq_at = [&](int e) -> float {
      if (!aux_on || !m) return 0.0f;
      if (sf == MOEKIT_SCORE_SOFTMAX) return (aux_at(e) - a_top) * inv_q;
      if (o.normalize) return ((aux_at(e) - dq) + corr_q) * inv_q;
      return aux_at(e) + aux.aref;
    };
    const bool sel_in_dot = !topk_softmax && !o.normalize;
    float dot = sel_dot;
    if (sf == MOEKIT_SCORE_SOFTMAX) {
      float d = 0.0f;
      for (int e = lane; e < E; e += 32) {
        const float sv = score(load_z(e));
        d += ((sel_in_dot ? g_row[e] : 0.0f) + gq_at(e)) * sv;
      }
      dot = warp_sum(d) + sel_dot;
    }
    for (int e = lane; e < E; e += 32) {
      const float z = load_z(e);
      const float sv = score(z);
      float gz;
      if (sf == MOEKIT_SCORE_SOFTMAX) {
        const float gs = (topk_softmax ? 0.0f : g_row[e]) + gq_at(e);
        gz = sv * (gs - dot) + (topk_softmax ? g_row[e] : 0.0f);
      } else if (sf == MOEKIT_SCORE_SIGMOID) {
        gz = (g_row[e] + gq_at(e)) * (sv * (1.0f - sv));
      } else {
        gz = (g_row[e] + gq_at(e)) * sqrt_softplus_grad(z, sv);
      }
      grow[e] = from_float<T>(gz);
    }
  }
  cp_async_wait<0>();  // nothing in flight when the warp exits
}

template <class T>
cudaError_t launch_backward_generic(const BackwardArgs& a, cudaStream_t stream) {
  const size_t smem = a.shape.smem_bytes;
  const cudaError_t e = ensure_dynamic_smem(router_backward_generic_kernel<T>, smem);
  if (e != cudaSuccess) return e;
  const int32_t grid = resident_grid(router_backward_generic_kernel<T>, a.shape.threads, smem, a.shape.num_blocks);
  return launch_programmatic(router_backward_generic_kernel<T>, dim3(grid), dim3(a.shape.threads), smem, stream,
                             a.programmatic, a);
}

template <class T>
cudaError_t launch_backward_dtype(const BackwardArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  return a.shape.fast ? launch_backward_fast_dtype<T>(a, stream) : launch_backward_generic<T>(a, stream);
}

cudaError_t launch_router_backward_f32(const BackwardArgs& a, cudaStream_t stream);
cudaError_t launch_router_backward_f16(const BackwardArgs& a, cudaStream_t stream);
cudaError_t launch_router_backward_bf16(const BackwardArgs& a, cudaStream_t stream);

}  // namespace moekit::kernels::router
