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
// Fast path (E <= 512): the team layout of the fast forward (kernels/router/forward_fast.cuh),
// values in registers, the weight sources and the scattered gradient of each team in shared
// memory. Generic path: one warp per token, lane-strided over the row, the scattered gradient in
// shared memory, z re-read through L1 for each pass. Every output element is written once by one
// thread; sums have a fixed order: deterministic.
#pragma once

#include "kernels/router/common.cuh"
#include "kernels/router/grid.cuh"
#include "kernels/router/launch.hpp"
#include "kernels/router/tuning.hpp"
#include "moekit/router.h"

namespace moekit::kernels::router {

// The aux term is on when its coefficient is nonzero (the host then guarantees the load and count).
__device__ __forceinline__ bool aux_enabled(const BackwardArgs& a) { return a.aux_coeff != 0.0f; }

// Per-expert aux gradient scale coeff E / (K N'^2), read from the device count.
__device__ __forceinline__ float aux_scale(const BackwardArgs& a) {
  if (!aux_enabled(a)) return 0.0f;
  const int32_t n = __ldg(a.token_count);
  const float np = static_cast<float>(n > 1 ? n : 1);
  return a.aux_coeff * static_cast<float>(a.opt.num_experts) /
         (static_cast<float>(a.opt.top_k) * np * np);
}

template <class T, int V, int TPT>
__global__ void __launch_bounds__(kFastThreads, fast_backward_min_blocks(V, TPT))
    router_backward_fast_kernel(const BackwardArgs a) {
  constexpr int kTeamsPerWarp = 32 / TPT;
  constexpr int kTeams = kFastThreads / TPT;
  constexpr int kEPad = V * TPT;
  constexpr int kKMax = kEPad < 32 ? kEPad : 32;
  constexpr int kRanks = (kKMax + TPT - 1) / TPT;
  constexpr int kWords = Words<T, V>::kCount;
  __shared__ __align__(16) float s_row[kTeams][kEPad];  // weight source of the team's token
  __shared__ __align__(16) float g_row[kTeams][kEPad];  // gradient scattered at the picked experts
  __shared__ __align__(16) float s_bias[kEPad];         // correction bias, 0 past E
  __shared__ __align__(16) float s_aux[kEPad];          // aux gradient a_e = coeff L_e E / (K N'^2)

  const RouterOptions& o = a.opt;
  const int E = o.num_experts;
  const int K = o.top_k;
  const int64_t num_tokens = a.num_tokens;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lt = lane % TPT;
  const int team_in_warp = lane / TPT;
  const int team = warp * kTeamsPerWarp + team_in_warp;
  const int base = lt * V;
  const int nvalid = E - base < 0 ? 0 : (E - base < V ? E - base : V);
  const int sf = o.score_func;
  const bool topk_softmax = o.topk_then_softmax != 0;
  const bool aux_on = aux_enabled(a);
  const bool full_softmax = sf == MOEKIT_SCORE_SOFTMAX && (!topk_softmax || aux_on);
  const bool wub = o.weights_use_bias != 0;

  const float scale = aux_scale(a);
  for (int e = threadIdx.x; e < kEPad; e += kFastThreads) {
    s_bias[e] = (a.bias != nullptr && e < E) ? __ldg(a.bias + e) : 0.0f;
    s_aux[e] = (aux_on && e < E) ? scale * static_cast<float>(__ldg(a.expert_load + e)) : 0.0f;
  }
  __syncthreads();
  // V consecutive floats of a shared row as registers.
  auto row_values = [&](const float* src, float (&v)[V]) {
#pragma unroll
    for (int j = 0; j < V / 4; ++j) {
      const float4 f4 = reinterpret_cast<const float4*>(src + base)[j];
      v[4 * j] = f4.x;
      v[4 * j + 1] = f4.y;
      v[4 * j + 2] = f4.z;
      v[4 * j + 3] = f4.w;
    }
  };

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
      if (nvalid == V)
        load_span<T, V>(p, a.logits_vec_bytes, next_raw);
      else
        load_span_partial<T, V>(p, nvalid, next_raw);
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
  fetch(warp_global * kTeamsPerWarp + team_in_warp);

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

    float z[V], s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) z[j] = Elem<T>::get(raw, j);
    lane_scores<V, TPT>(sf, full_softmax, z, s);

    float bias[V];
    row_values(s_bias, bias);
    __syncwarp();  // the previous token's readers of s_row / g_row are done
    {
      float4* src = reinterpret_cast<float4*>(&s_row[team][base]);
      float4* gdst = reinterpret_cast<float4*>(&g_row[team][base]);
#pragma unroll
      for (int j = 0; j < V / 4; ++j) {
        float w4[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int jj = 4 * j + q;
          w4[q] = topk_softmax ? z[jj] : (wub ? s[jj] + bias[jj] : s[jj]);
        }
        src[j] = make_float4(w4[0], w4[1], w4[2], w4[3]);
        gdst[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
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
    if (o.normalize) {
      float su = 0.0f;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) su += u[i];
      const float denom = team_sum<TPT>(su) + 1e-20f;
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) dot += gv[i] * (u[i] / denom);
      dot = team_sum<TPT>(dot);
#pragma unroll
      for (int i = 0; i < kRanks; ++i) gv[i] = valid[i] ? (gv[i] - dot) / denom : 0.0f;
    }
    if (topk_softmax) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kRanks; ++i) dot += gv[i] * u[i];
      dot = team_sum<TPT>(dot);
#pragma unroll
      for (int i = 0; i < kRanks; ++i) gv[i] = u[i] * (gv[i] - dot);
    }
    // Scatter in k order, one rank per round (repeated indices add up deterministically).
#pragma unroll
    for (int i = 0; i < kRanks; ++i) {
      if (i * TPT >= K) break;
      for (int l = 0; l < TPT && l + i * TPT < K; ++l) {
        if (lt == l && valid[i]) g_row[team][idx[i]] += gv[i];
        __syncwarp();
      }
    }

    float gsel[V];
    {
      const float4* gsrc = reinterpret_cast<const float4*>(&g_row[team][base]);
#pragma unroll
      for (int j = 0; j < V / 4; ++j) {
        const float4 g4 = gsrc[j];
        gsel[4 * j] = g4.x;
        gsel[4 * j + 1] = g4.y;
        gsel[4 * j + 2] = g4.z;
        gsel[4 * j + 3] = g4.w;
      }
    }

    // ---- aux term ----------------------------------------------------------------------------
    float gq[V];
#pragma unroll
    for (int j = 0; j < V; ++j) gq[j] = 0.0f;
    if (aux_on) {
      float aux_a[V];
      row_values(s_aux, aux_a);
      float q[V];
#pragma unroll
      for (int j = 0; j < V; ++j) q[j] = wub ? s[j] + bias[j] : s[j];
      if (o.normalize) {
        float sq = 0.0f, saq = 0.0f;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          sq += q[j];
          saq += aux_a[j] * q[j];
        }
        const float inv = 1.0f / (team_sum<TPT>(sq) + 1e-20f);
        const float dq = team_sum<TPT>(saq) * inv;
#pragma unroll
        for (int j = 0; j < V; ++j) gq[j] = (aux_a[j] - dq) * inv;
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) gq[j] = aux_a[j];
      }
      if (!m) {
#pragma unroll
        for (int j = 0; j < V; ++j) gq[j] = 0.0f;
      }
    }

    // ---- through the score function ----------------------------------------------------------
    float gz[V];
    if (sf == MOEKIT_SCORE_SOFTMAX) {
      float gs[V];
      float dot = 0.0f;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        gs[j] = (topk_softmax ? 0.0f : gsel[j]) + gq[j];
        dot += gs[j] * s[j];
      }
      dot = team_sum<TPT>(dot);
#pragma unroll
      for (int j = 0; j < V; ++j) gz[j] = s[j] * (gs[j] - dot) + (topk_softmax ? gsel[j] : 0.0f);
    } else if (sf == MOEKIT_SCORE_SIGMOID) {
#pragma unroll
      for (int j = 0; j < V; ++j) gz[j] = (gsel[j] + gq[j]) * (s[j] * (1.0f - s[j]));
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) gz[j] = (gsel[j] + gq[j]) * sqrt_softplus_grad(z[j], s[j]);
    }
    if (active && nvalid > 0) {
      T* p = reinterpret_cast<T*>(grad + t * grad_row_bytes) + base;
      store_span<T, V>(p, a.grad_vec_bytes, nvalid, gz);
    }
  }
}

template <class T, int V, int TPT>
cudaError_t launch_backward_fast(const BackwardArgs& a, cudaStream_t stream) {
  const int32_t grid = resident_grid(router_backward_fast_kernel<T, V, TPT>, kFastThreads, 0, a.shape.num_blocks);
  router_backward_fast_kernel<T, V, TPT><<<grid, kFastThreads, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

template <class T>
cudaError_t launch_backward_fast_dtype(const BackwardArgs& a, cudaStream_t stream) {
  const int v = a.shape.values_per_lane;
  switch (a.shape.lanes_per_token) {
    case 1: if (v == 8) return launch_backward_fast<T, 8, 1>(a, stream); break;
    case 2: if (v == 8) return launch_backward_fast<T, 8, 2>(a, stream); break;
    case 4: if (v == 8) return launch_backward_fast<T, 8, 4>(a, stream); break;
    case 8: if (v == 8) return launch_backward_fast<T, 8, 8>(a, stream); break;
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
__global__ void __launch_bounds__(kGenericMaxWarps * 32)
    router_backward_generic_kernel(const BackwardArgs a) {
  extern __shared__ __align__(16) float g_smem[];
  const RouterOptions& o = a.opt;
  const int E = o.num_experts;
  const int K = o.top_k;
  const int64_t num_tokens = a.num_tokens;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float* g_row = g_smem + static_cast<size_t>(warp) * E;
  const int sf = o.score_func;
  const bool topk_softmax = o.topk_then_softmax != 0;
  const bool aux_on = aux_enabled(a);
  const bool full_softmax = sf == MOEKIT_SCORE_SOFTMAX && (!topk_softmax || aux_on);
  const bool wub = o.weights_use_bias != 0;
  const float scale = aux_scale(a);
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp; t < num_tokens; t += warps_total) {
    const T* row = reinterpret_cast<const T*>(static_cast<const char*>(a.logits) +
                                              t * a.logits_stride * static_cast<int64_t>(sizeof(T)));
    T* grow = reinterpret_cast<T*>(static_cast<char*>(a.grad_logits) +
                                   t * a.grad_stride * static_cast<int64_t>(sizeof(T)));
    const bool m = a.token_mask == nullptr || __ldg(a.token_mask + t) != 0;
    const RowScore score = row_score(sf, full_softmax, E, [&](int e) { return Elem<T>::load1(row + e); });
    auto bias_at = [&](int e) -> float { return a.bias != nullptr ? __ldg(a.bias + e) : 0.0f; };

    __syncwarp();  // the previous token's readers of g_row are done
    for (int e = lane; e < E; e += 32) g_row[e] = 0.0f;

    // weights gradient: lane r < K owns rank r
    const bool has = lane < K;
    const int idx = has ? __ldg(a.indices + t * K + lane) : -1;
    const bool valid = has && idx >= 0 && idx < E;
    float u = 0.0f;
    if (valid) {
      const float z = Elem<T>::load1(row + idx);
      u = topk_softmax ? z : (wub ? score(z) + bias_at(idx) : score(z));
    }
    float gv = (valid && a.grad_weights != nullptr) ? o.route_scale * __ldg(a.grad_weights + t * K + lane) : 0.0f;
    if (topk_softmax) {
      const float zmax = warp_max(valid ? u : -INFINITY);
      u = valid ? __expf(u - zmax) : 0.0f;
      u = u / warp_sum(u);
    }
    if (o.normalize) {
      const float denom = warp_sum(u) + 1e-20f;
      const float dot = warp_sum(gv * (u / denom));
      gv = valid ? (gv - dot) / denom : 0.0f;
    }
    if (topk_softmax) {
      const float dot = warp_sum(gv * u);
      gv = u * (gv - dot);
    }
    __syncwarp();
    for (int r = 0; r < K; ++r) {
      if (lane == r && valid) g_row[idx] += gv;
      __syncwarp();
    }

    // aux term sums
    float inv_q = 1.0f, dq = 0.0f;
    if (aux_on && o.normalize) {
      float sq = 0.0f, saq = 0.0f;
      for (int e = lane; e < E; e += 32) {
        const float s = score(Elem<T>::load1(row + e));
        const float q = wub ? s + bias_at(e) : s;
        sq += q;
        saq += scale * static_cast<float>(__ldg(a.expert_load + e)) * q;
      }
      inv_q = 1.0f / (warp_sum(sq) + 1e-20f);
      dq = warp_sum(saq) * inv_q;
    }
    auto gq_at = [&](int e) -> float {
      if (!aux_on || !m) return 0.0f;
      const float ae = scale * static_cast<float>(__ldg(a.expert_load + e));
      return o.normalize ? (ae - dq) * inv_q : ae;
    };
    float dots = 0.0f;
    if (sf == MOEKIT_SCORE_SOFTMAX) {
      for (int e = lane; e < E; e += 32) {
        const float s = score(Elem<T>::load1(row + e));
        dots += ((topk_softmax ? 0.0f : g_row[e]) + gq_at(e)) * s;
      }
      dots = warp_sum(dots);
    }
    for (int e = lane; e < E; e += 32) {
      const float z = Elem<T>::load1(row + e);
      const float s = score(z);
      float gz;
      if (sf == MOEKIT_SCORE_SOFTMAX) {
        const float gs = (topk_softmax ? 0.0f : g_row[e]) + gq_at(e);
        gz = s * (gs - dots) + (topk_softmax ? g_row[e] : 0.0f);
      } else if (sf == MOEKIT_SCORE_SIGMOID) {
        gz = (g_row[e] + gq_at(e)) * (s * (1.0f - s));
      } else {
        gz = (g_row[e] + gq_at(e)) * sqrt_softplus_grad(z, s);
      }
      grow[e] = from_float<T>(gz);
    }
  }
}

template <class T>
cudaError_t launch_backward_generic(const BackwardArgs& a, cudaStream_t stream) {
  const size_t smem = a.shape.smem_bytes;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(router_backward_generic_kernel<T>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int32_t grid = resident_grid(router_backward_generic_kernel<T>, a.shape.threads, smem, a.shape.num_blocks);
  router_backward_generic_kernel<T><<<grid, a.shape.threads, smem, stream>>>(a);
  return cudaPeekAtLastError();
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
