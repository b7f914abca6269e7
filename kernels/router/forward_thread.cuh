// Router forward, one thread per token (an alternative to kernels/router/forward_fast.cuh for the
// same configurations: fast path, K <= kThreadMaxK, no aux statistics; selected on the host,
// src/router/router.cpp; docs/router.md "Thread forward" has the instruction count).
//
// Maths: as forward_fast.cuh (include/moekit/router.h has the contract), bit for bit: the same
// score / selection / weight instructions, keys, tie rules, and the fast path's team sums
// replayed in one thread (kernels/router/thread_select.hpp, TreeSum, from the fast shape's
// TPT and V in a.shape).
//
// Layout: a block of kThreadTokens threads; per step the block stages the rows of its next
// kThreadTokens tokens in shared memory (coalesced 16-byte loads when the pointer and stride
// allow, else element by element; nothing past E of a row is read), then thread i computes token
// first + i from its row:
//   softmax first: the row max, then the fast path's denominator (lane partials in bit-reversed
//     lane order into a pairwise tree);
//   groups: per group the top-2 of the sanitised selection values -> group keys and ranks; the
//     threshold th0 = the smallest second-best key of the kept groups (a lower bound of the K-th
//     best key when K <= 2 G': those 2 G' experts all have keys >= th0);
//   no groups: th0 = the smallest second-best key of ceil(K / 2) disjoint sets of chunks (K
//     experts >= th0);
//   a selection pass offers every expert with key >= th0 (kept groups; of a dropped group only its
//     first min(K, S) experts, all at the mask key, can be picked) to a per-thread candidate list
//     in shared memory (a predicated store: no divergent insertion per expert), in ascending
//     expert order; the list (n_cand at a time: more take further rounds over the experts
//     after the last one taken) then goes through a register top-KMAX insertion with strict
//     compares: ties to the lower index;
//   weights: the picked key's value or a recompute from the staged z[idx] (as the fast path),
//     picked softmax / normalisation with the fast path's trees, route scale, stores; loads into
//     the block's shared histogram (integer atomics), flushed as the fast path does.
#pragma once

#include "kernels/router/common.cuh"
#include "kernels/common/grid.hpp"
#include "kernels/router/launch.hpp"
#include "kernels/router/thread_select.hpp"
#include "kernels/router/tuning.hpp"
#include "moekit/router.h"

namespace moekit::kernels::router {

// Element e of a staged row, as fp32.
template <class T>
__device__ __forceinline__ float thread_elem(const unsigned char* row, int e) {
  uint32_t w[1];
  if constexpr (sizeof(T) == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(row + 4 * e);
  } else {
    w[0] = *reinterpret_cast<const unsigned short*>(row + 2 * e);
  }
  return Elem<T>::get(w, 0);
}

// Calls f(e, z) for e = lo, lo + 1, ..., hi - 1 of a staged row (lo a multiple of 16 / sizeof(T)):
// whole 16-byte chunks as one shared-memory vector read, the rest element by element.
template <class T, class F>
__device__ __forceinline__ void thread_visit(const unsigned char* row, int lo, int hi, F&& f) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  int e = lo;
  for (; e + kPer <= hi; e += kPer) {
    const uint4 v = *reinterpret_cast<const uint4*>(row + e * static_cast<int>(sizeof(T)));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < kPer; ++j) f(e + j, Elem<T>::get(w, j));
  }
  for (; e < hi; ++e) f(e, thread_elem<T>(row, e));
}

template <class T, ScoreMode MODE, bool kGroups, int KMAX>
__global__ void __launch_bounds__(kThreadTokens) router_forward_thread_kernel(const ForwardArgs a) {
  extern __shared__ __align__(16) float thread_smem_words[];  // (one declaration per type: the generic forward declares its own)
  unsigned char* const smem = reinterpret_cast<unsigned char*>(thread_smem_words);
  __shared__ int s_count;
  constexpr bool kSoftmaxFirst = MODE == ScoreMode::kSoftmax;
  constexpr bool kTopk = MODE == ScoreMode::kTopkSoftmax;
  constexpr int kSize = static_cast<int>(sizeof(T));
  constexpr int kPer = 16 / kSize;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif

  const RouterOptions& o = a.opt;
  const int E = o.num_experts;
  const int K = o.top_k;
  const int tid = threadIdx.x;
  const int64_t num_tokens = a.num_tokens;
  const ThreadLayout L = thread_layout(E, kSize, o.num_groups, K);
  unsigned char* rows = smem + L.rows_off;
  float* s_bias = reinterpret_cast<float*>(smem + L.bias_off);
  int* s_load = reinterpret_cast<int*>(smem + L.load_off);
  uint2* s_cand = reinterpret_cast<uint2*>(smem + L.cand_off);  // [candidate][thread]
  float* s_u = reinterpret_cast<float*>(smem + L.u_off);        // [rank][thread]
  uint2* s_aux = reinterpret_cast<uint2*>(smem + L.aux_off);    // [group or block][thread]

  const bool need_load = a.load_mode != LoadMode::kNone;
  const bool need_count = a.count_partial != nullptr;
  const bool has_bias = a.bias != nullptr;
  const bool wub = o.weights_use_bias != 0;
  const bool recompute_weight = kGroups || (has_bias && !wub);
  const uint32_t neg_inf_key = float_key(-INFINITY);
  const uint32_t mask_key = float_key(o.group_mask_value + 0.0f);
  // The fast path's team geometry, for its sums.
  const int tpt = a.shape.lanes_per_token;
  const int V = a.shape.values_per_lane;
  const int log_tpt = log2_pow2(tpt);
  const int rank_tpt = rank_lanes(tpt, K);
  const int rank_log = log2_pow2(rank_tpt);

  for (int e = tid; e < E; e += kThreadTokens) {
    s_bias[e] = has_bias ? __ldg(a.bias + e) : 0.0f;
    s_load[e] = 0;
  }
  if (tid == 0) s_count = 0;
  int my_count = 0;

  // Staging geometry: n16 whole 16-byte vectors per row, then n_tail elements one by one. A flat
  // index over (row, item) advances by kThreadTokens per iteration: q rows and rm items, with one
  // carry (no division in the loop).
  const int64_t row_bytes_g = a.logits_stride * kSize;
  const int n16 = a.logits_vec_bytes >= 16 ? (E * kSize) / 16 : 0;
  const int tail_lo = n16 * kPer;
  const int n_tail = E - tail_lo;
  const int q16 = n16 > 0 ? kThreadTokens / n16 : 0, rm16 = n16 > 0 ? kThreadTokens % n16 : 0;
  const int r16 = n16 > 0 ? tid / n16 : 0, c16 = n16 > 0 ? tid % n16 : 0;
  const int qt = n_tail > 0 ? kThreadTokens / n_tail : 0, rmt = n_tail > 0 ? kThreadTokens % n_tail : 0;
  const int rt = n_tail > 0 ? tid / n_tail : 0, ct = n_tail > 0 ? tid % n_tail : 0;
  const size_t pitch = L.pitch;
  const int n_cand = L.cand;

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kThreadTokens; first < num_tokens;
       first += static_cast<int64_t>(gridDim.x) * kThreadTokens) {
    const int64_t left = num_tokens - first;
    const int nrows = left < kThreadTokens ? static_cast<int>(left) : kThreadTokens;
    const char* g0 = static_cast<const char*>(a.logits) + first * row_bytes_g;
    __syncthreads();  // the previous step's rows are no longer read (first step: bias, histogram)
    if (n16 > 0) {
      int r = r16, c = c16;
      while (r < nrows) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(g0 + r * row_bytes_g + 16 * c));
        *reinterpret_cast<uint4*>(rows + r * pitch + 16 * c) = v;
        flat_advance(r, c, q16, rm16, n16);
      }
    }
    if (n_tail > 0) {
      int r = rt, c = ct;
      while (r < nrows) {
        const int e = tail_lo + c;
        if constexpr (kSize == 4) {
          *reinterpret_cast<uint32_t*>(rows + r * pitch + 4 * e) =
              __ldg(reinterpret_cast<const unsigned int*>(g0 + r * row_bytes_g + 4 * e));
        } else {
          *reinterpret_cast<unsigned short*>(rows + r * pitch + 2 * e) =
              __ldg(reinterpret_cast<const unsigned short*>(g0 + r * row_bytes_g + 2 * e));
        }
        flat_advance(r, c, qt, rmt, n_tail);
      }
    }
    __syncthreads();
    if (tid >= nrows) continue;  // no token for this thread (the last step of the last blocks)

    const int64_t t = first + tid;
    const unsigned char* row = rows + tid * pitch;
    const bool m = a.token_mask == nullptr || __ldg(a.token_mask + t) != 0;
    if (m) ++my_count;

    // ---- softmax: row max and the fast path's 1 / sum ----------------------------------------
    float mx = 0.0f, inv = 1.0f;
    if constexpr (kSoftmaxFirst) {
      float zmax = -INFINITY;  // NaN only where every logit is NaN: then every score is NaN either way
      thread_visit<T>(row, 0, E, [&](int, float z) { zmax = fmaxf(zmax, z); });
      mx = zmax;
      TreeSum ts{};
      for (int mm = 0; mm < tpt; ++mm) {
        const int lo = bitrev_lane(mm, log_tpt) * V;
        float p = 0.0f;
        if (lo < E) thread_visit<T>(row, lo, lo + V < E ? lo + V : E, [&](int, float z) { p += softmax_num(z, mx); });
        tree_push(ts, mm, p);
      }
      inv = 1.0f / tree_result(ts, log_tpt);
    }
    auto score = [&](float z) -> float {
      if constexpr (MODE == ScoreMode::kSigmoid) return sigmoid_f(z);
      else if constexpr (MODE == ScoreMode::kSqrtSoftplus) return sqrt_softplus_f(z);
      else if constexpr (kSoftmaxFirst) return __fmul_rn(softmax_num(z, mx), inv);
      else return z;
    };
    // Selection value c = (top-k softmax ? z : s) + b, sanitised (NaN -> -inf). The bias is added
    // unconditionally (0 without one: s_bias holds zeros): + 0 changes at most the sign of a zero,
    // and no output depends on that sign (keys take c + 0; group values and th0 are made keys the
    // same way; a weight taken from a key is the key's value), so no branch per value.
    auto sel_value = [&](int e, float z) -> float { return sanitize((kTopk ? z : score(z)) + s_bias[e]); };
    auto sel_key = [&](int e, float z) -> uint32_t { return float_key(sel_value(e, z) + 0.0f); };

    // ---- groups and the threshold --------------------------------------------------------------
    uint32_t th0 = 0u;
    uint32_t kept_bits = 0u;
    if constexpr (kGroups) {
      const int G = o.num_groups;
      const int S = E / G;
      const bool gmax = o.group_score == MOEKIT_GROUP_SCORE_MAX ||
                        (o.group_score == MOEKIT_GROUP_SCORE_TOPN_SUM && o.group_topn == 1);
      for (int g = 0; g < G; ++g) {
        float m1 = -INFINITY, m2 = -INFINITY;  // the group's two largest values (S >= 2)
        thread_visit<T>(row, g * S, g * S + S, [&](int e, float z) {
          const float x = sel_value(e, z);
          const bool g1 = x > m1;
          const bool g2 = x > m2;
          m2 = g1 ? m1 : (g2 ? x : m2);
          m1 = g1 ? x : m1;
        });
        const float gv = gmax ? m1 : sanitize(m1 + m2);
        s_aux[g * kThreadTokens + tid] = make_uint2(float_key(gv + 0.0f), float_key(m2 + 0.0f));
      }
      th0 = 0xffffffffu;
      for (int g = 0; g < G; ++g) {
        const int rank = group_rank(g, G, [&](int h) { return s_aux[h * kThreadTokens + tid].x; });
        if (rank < o.groups_kept) {
          kept_bits |= 1u << g;
          const uint32_t k2 = s_aux[g * kThreadTokens + tid].y;
          th0 = k2 < th0 ? k2 : th0;
        }
      }
      if (K > 2 * o.groups_kept) th0 = 0u;
    } else {
      // ceil(K / 2) blocks of chunks (block b = chunks b, b + nb, ...), each keeping its two best
      // keys: 2 nb >= K experts have keys >= the smallest second-best (a block with fewer than two
      // experts has second-best 0: then th0 = 0 and nothing is filtered).
      const int chunks = (E + kPer - 1) / kPer;
      const int nb = (K + 1) / 2;
      if (chunks >= nb) {
        for (int b = 0; b < nb; ++b) s_aux[b * kThreadTokens + tid] = make_uint2(0u, 0u);
        int b = 0;
        for (int ch = 0; ch < chunks; ++ch) {
          const int lo = ch * kPer;
          const uint2 st = s_aux[b * kThreadTokens + tid];
          uint32_t k1 = st.x, k2 = st.y;
          thread_visit<T>(row, lo, lo + kPer < E ? lo + kPer : E, [&](int e, float z) {
            const uint32_t k = sel_key(e, z);
            const bool g1 = k > k1;
            const bool g2 = k > k2;
            k2 = g1 ? k1 : (g2 ? k : k2);
            k1 = g1 ? k : k1;
          });
          s_aux[b * kThreadTokens + tid] = make_uint2(k1, k2);
          b = b + 1 == nb ? 0 : b + 1;
        }
        th0 = 0xffffffffu;
        for (int bb = 0; bb < nb; ++bb) {
          const uint32_t v = s_aux[bb * kThreadTokens + tid].y;
          th0 = v < th0 ? v : th0;
        }
      }
    }

    // ---- selection: candidates >= th0 in ascending expert order, then the register list --------
    // visit(offer) calls offer(e, key) for every expert that can be picked, in ascending order.
    auto visit_candidates = [&](auto&& offer) {
      if constexpr (kGroups) {
        const int G = o.num_groups;
        const int S = E / G;
        const int first_k = K < S ? K : S;
        for (int g = 0; g < G; ++g) {
          if ((kept_bits >> g) & 1u) {
            thread_visit<T>(row, g * S, g * S + S, [&](int e, float z) { offer(e, sel_key(e, z)); });
          } else if (mask_key >= th0) {  // a dropped group: only its first K experts can be picked
            for (int e = g * S; e < g * S + first_k; ++e) offer(e, mask_key);
          }
        }
      } else {
        thread_visit<T>(row, 0, E, [&](int e, float z) { offer(e, sel_key(e, z)); });
      }
    };
    // Rounds of at most n_cand candidates each, in ascending expert order (one round unless a
    // row has more than n_cand keys >= th0, e.g. equal values): the list stays in registers
    // (no lambda captures it).
    TopList<KMAX> top;
    toplist_init(top);
    int e_done = -1;  // experts up to here are in the list
    for (;;) {
      int ncand = 0;
      // Branch-free (a branch taken by one lane of 32 is taken by the warp for most experts): the
      // store goes to the next free slot whether or not the expert qualifies (an unqualified
      // entry is overwritten by the next qualified one, or lies past the count), and to the spare
      // row n_cand once the list is full; only qualified experts advance the count.
      visit_candidates([&](int e, uint32_t k) {
        const bool ok = (k >= th0) & (e > e_done);
        const int slot = ncand < n_cand ? ncand : n_cand;
        s_cand[slot * kThreadTokens + tid] = make_uint2(k, static_cast<uint32_t>(e));
        ncand += ok ? 1 : 0;
      });
      const int take = ncand < n_cand ? ncand : n_cand;
      for (int i = 0; i < take; ++i) {
        const uint2 cnd = s_cand[i * kThreadTokens + tid];
        toplist_insert(top, cnd.x, static_cast<int32_t>(cnd.y));
      }
      if (ncand <= n_cand) break;
      e_done = static_cast<int>(s_cand[(n_cand - 1) * kThreadTokens + tid].y);
    }

    // ---- weights ---------------------------------------------------------------------------------
    // The fast path's team_sum over its lanes' rank sums, on the lanes that hold ranks
    // (thread_select.hpp, rank_lanes: bitwise the same sum).
    auto rank_sum = [&]() -> float {
      TreeSum ts{};
      for (int mm = 0; mm < rank_tpt; ++mm) {
        float p = 0.0f;
        for (int r = bitrev_lane(mm, rank_log); r < K; r += tpt) p += s_u[r * kThreadTokens + tid];
        tree_push(ts, mm, p);
      }
      return tree_result(ts, rank_log);
    };
    float pmx = -INFINITY;
#pragma unroll
    for (int r = 0; r < KMAX; ++r) {
      if (r < K) {
        const uint32_t key = top.key[r];
        const int idx = top.idx[r];
        float w;
        if (!recompute_weight && key != neg_inf_key) {
          w = key_float(key);
        } else {
          const float z = thread_elem<T>(row, idx);
          if constexpr (kTopk) {
            w = z;
          } else {
            w = score(z);
            if (wub && has_bias) w += s_bias[idx];
          }
        }
        if constexpr (kTopk) pmx = fmaxf(pmx, w);
        s_u[r * kThreadTokens + tid] = w;
      }
    }
    if constexpr (kTopk) {
      for (int r = 0; r < K; ++r) s_u[r * kThreadTokens + tid] = softmax_num(s_u[r * kThreadTokens + tid], pmx);
      const float sum = rank_sum();
      for (int r = 0; r < K; ++r) s_u[r * kThreadTokens + tid] = s_u[r * kThreadTokens + tid] / sum;
    }
    if (o.normalize) {
      const float denom = rank_sum() + 1e-20f;
      for (int r = 0; r < K; ++r) s_u[r * kThreadTokens + tid] = s_u[r * kThreadTokens + tid] / denom;
    }
    const int64_t out = t * K;
#pragma unroll
    for (int r = 0; r < KMAX; ++r) {
      if (r < K) {
        a.weights[out + r] = o.route_scale * s_u[r * kThreadTokens + tid];
        a.indices[out + r] = top.idx[r];
        if (need_load && m) atomicAdd(&s_load[top.idx[r]], 1);
      }
    }
  }

  // ---- block epilogue: loads and the token count (as the fast path) ---------------------------
  if (need_count && my_count > 0) atomicAdd(&s_count, my_count);
  __syncthreads();
  if (need_load) {
    for (int e = tid; e < E; e += kThreadTokens) {
      const int v = s_load[e];
      if (a.load_mode == LoadMode::kPartial)
        a.load_partial[static_cast<int64_t>(blockIdx.x) * E + e] = v;
      else if (v != 0)
        atomicAdd(a.expert_load + e, v);
    }
  }
  if (need_count && tid == 0) a.count_partial[blockIdx.x] = s_count;
}

template <class T, ScoreMode MODE, bool kGroups, int KMAX>
cudaError_t launch_forward_thread(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  auto kernel = router_forward_thread_kernel<T, MODE, kGroups, KMAX>;
  const ThreadLayout l = thread_layout(a.opt.num_experts, static_cast<int>(sizeof(T)), a.opt.num_groups, a.opt.top_k);
  const cudaError_t err = ensure_dynamic_smem(kernel, l.bytes);
  if (err != cudaSuccess) return err;
  // Partial rows (per block) must fit the workspace: then at most shape.num_blocks blocks.
  const bool partial_rows = a.load_mode == LoadMode::kPartial || a.count_partial != nullptr;
  int64_t want = (a.num_tokens + kThreadTokens - 1) / kThreadTokens;
  const int64_t cap = partial_rows ? a.shape.num_blocks : kMaxForwardBlocks;
  if (want > cap) want = cap;
  const int32_t grid = resident_grid(kernel, kThreadTokens, l.bytes, static_cast<int32_t>(want));
  *blocks = grid;
  kernel<<<grid, kThreadTokens, l.bytes, stream>>>(a);
  return cudaPeekAtLastError();
}

template <class T, ScoreMode MODE, bool kGroups>
cudaError_t launch_forward_thread_k(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  switch (thread_kmax(a.opt.top_k)) {
    case 2: return launch_forward_thread<T, MODE, kGroups, 2>(a, stream, blocks);
    case 4: return launch_forward_thread<T, MODE, kGroups, 4>(a, stream, blocks);
    case 8: return launch_forward_thread<T, MODE, kGroups, 8>(a, stream, blocks);
    default: return launch_forward_thread<T, MODE, kGroups, 10>(a, stream, blocks);
  }
}

template <class T, ScoreMode MODE>
cudaError_t launch_forward_thread_groups(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  if (a.opt.num_groups > 1) return launch_forward_thread_k<T, MODE, true>(a, stream, blocks);
  return launch_forward_thread_k<T, MODE, false>(a, stream, blocks);
}

// The thread forward for the fast shapes (the host checked K <= kThreadMaxK and no aux scores).
template <class T>
cudaError_t launch_forward_thread_dtype(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  if (a.opt.top_k > kThreadMaxK || a.score_partial != nullptr || !a.shape.fast) return cudaErrorInvalidValue;
  switch (score_mode(a.opt.score_func, a.opt.topk_then_softmax)) {
    case ScoreMode::kSoftmax: return launch_forward_thread_groups<T, ScoreMode::kSoftmax>(a, stream, blocks);
    case ScoreMode::kSigmoid: return launch_forward_thread_groups<T, ScoreMode::kSigmoid>(a, stream, blocks);
    case ScoreMode::kSqrtSoftplus: return launch_forward_thread_groups<T, ScoreMode::kSqrtSoftplus>(a, stream, blocks);
    case ScoreMode::kTopkSoftmax: return launch_forward_thread_groups<T, ScoreMode::kTopkSoftmax>(a, stream, blocks);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moekit::kernels::router
