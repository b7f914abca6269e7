// Router forward, generic path: any E <= 4096, any K <= 32, any groups (the maths is the one of
// kernels/router/forward_fast.cuh and include/moekit/router.h).
//
// One warp per token. The token's logits row is staged in shared memory by asynchronous copies
// (cp.async, 16 / 8 / 4 bytes as the row alignment allows; a tail shorter than that, and rows of
// 16-bit elements at odd addresses, element by element; nothing past E is read), double-buffered
// per warp: the next token's row is in flight while the current one is computed, and every pass
// over the row (softmax max and sum, keys, weights, aux scores) reads shared memory, recomputing a
// score with the same instructions wherever it is needed again (bitwise the values the keys came
// from). The row's selection keys (float_key of the sanitised selection values) live in shared
// memory, padded by one word per 32 so that lane-strided scans (expert e = lane + 32 j) and
// group-strided scans (lane g scans experts [g S, g S + S)) are free of bank conflicts.
//   groups: group keys by a lane-per-group scan (max / top-2 sum), or, for top-n sums with n > 2,
//           by a warp selection of each group's n best (summed in selection order); the G' best
//           groups by shuffle ranks (G <= 32) or a warp selection; dropped groups' keys become the
//           mask value.
//   top-K:  warp_select (kernels/router/common.cuh) over the row's keys; without groups each
//           lane's cache is filled while the keys are computed.
//   aux:    the warps of a block work in rounds of one token each; after a round each warp's aux
//           scores p (written over its keys) are added to the block accumulator by expert, warps
//           in order (fixed order, no atomics).
// Shapes and outputs as in the fast path; per-block partial rows [num_blocks, E].
#pragma once

#include "kernels/router/common.cuh"
#include "kernels/common/grid.hpp"
#include "kernels/common/pdl.cuh"
#include "kernels/router/launch.hpp"
#include "kernels/router/layout.hpp"
#include "kernels/router/tuning.hpp"
#include "moekit/router.h"

namespace moekit::kernels::router {

__device__ __forceinline__ int pad_index(int e) { return e + (e >> 5); }

template <class T>
__global__ void __launch_bounds__(kGenericMaxWarps * 32)
    router_forward_generic_kernel(const ForwardArgs a) {
  extern __shared__ __align__(16) uint32_t smem[];
  if (a.finalize_follows) pdl_launch_dependents();  // as the fast forward
  pdl_wait();  // this grid's predecessor, before any global access (kernels/common/pdl.cuh)
  constexpr int Q = kGenericCacheDepth;
  const RouterOptions& o = a.opt;
  const int E = o.num_experts;
  const int K = o.top_k;
  const int G = o.num_groups;
  const int64_t num_tokens = a.num_tokens;
  const bool need_score = a.score_partial != nullptr;
  // Keys kept in shared memory only where they are read again (kernels/router/tuning.hpp; the
  // host carved the same layout): groups scan them, the aux sums are written over them.
  const bool keys_kept = G > 1 || need_score;
  const GenericLayout layout = generic_layout(E, G, static_cast<int>(sizeof(T)), keys_kept);
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  uint32_t* keyrow = smem + static_cast<size_t>(warp) * layout.warp_words;
  uint32_t* gkey = keyrow + layout.key_words;
  uint32_t* gbits = gkey + layout.gkey_words;
  int* sel = reinterpret_cast<int*>(gbits + layout.gbit_words);
  uint32_t* zbuf = reinterpret_cast<uint32_t*>(sel + 32);  // [2][row_words], 16-byte aligned
  float* acc = reinterpret_cast<float*>(smem + static_cast<size_t>(warps) * layout.warp_words);
  int* hist = reinterpret_cast<int*>(acc + E);
  int* flags = hist + E;  // [kGenericMaxWarps]: this round's token of warp w counts for aux
  int* block_count = flags + kGenericMaxWarps;

  const bool need_load = a.load_mode != LoadMode::kNone;
  const bool need_count = a.count_partial != nullptr;
  const int sf = o.score_func;
  const bool topk_softmax = o.topk_then_softmax != 0;
  const bool full_softmax = sf == MOEKIT_SCORE_SOFTMAX && (!topk_softmax || need_score);
  const bool wub = o.weights_use_bias != 0;
  const uint32_t mask_key = float_key(o.group_mask_value + 0.0f);

  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    acc[e] = 0.0f;
    hist[e] = 0;
  }
  if (threadIdx.x == 0) *block_count = 0;
  int my_count = 0;

  const int row_bytes = E * static_cast<int>(sizeof(T));
  const int64_t stride_bytes = a.logits_stride * static_cast<int64_t>(sizeof(T));
  const char* logits = static_cast<const char*>(a.logits);
  const uint32_t zbuf_addr = static_cast<uint32_t>(__cvta_generic_to_shared(zbuf));
  auto stage = [&](int64_t tok, int buf) {  // the row of token tok into buffer buf (if it exists)
    if (tok < num_tokens)
      stage_row<sizeof(T)>(zbuf_addr + 4u * static_cast<uint32_t>(buf * layout.row_words), logits + tok * stride_bytes,
                           row_bytes, a.logits_vec_bytes, lane);
    cp_async_commit();
  };
  const int64_t round_step = static_cast<int64_t>(gridDim.x) * warps;
  __syncthreads();
  stage(static_cast<int64_t>(blockIdx.x) * warps + warp, 0);

  int buf = 0;
  for (int64_t round = blockIdx.x; round * warps < num_tokens; round += gridDim.x, buf ^= 1) {
    const int64_t t = round * warps + warp;
    const bool active = t < num_tokens;
    const bool m = active && (a.token_mask == nullptr || __ldg(a.token_mask + t) != 0);
    __syncwarp();  // every lane is done with the other buffer (the token before last)
    stage(t + round_step, buf ^ 1);
    cp_async_wait<1>();  // this token's copies (all but the newest group) are complete
    __syncwarp();        // ... and visible to the whole warp
    const T* zrow = reinterpret_cast<const T*>(zbuf + buf * layout.row_words);
    auto load_z = [&](int e) { return smem_elem<T>(zrow, e); };
    RowScore score{sf, full_softmax, 0.0f, 1.0f};  // set for the active token below
    auto bias_at = [&](int e) -> float { return a.bias != nullptr ? __ldg(a.bias + e) : 0.0f; };

    if (active) {
      // ---- scores and keys (without groups, each lane's top-K cache fills as they come) -------
      score = row_score(sf, full_softmax, E, load_z);
      LaneTop<Q> cache;
      cache.clear();
      // The key of expert e, from the staged row (the same instructions wherever it is needed).
      // + 0.0f turns -0 into +0 (as the fast path's keys): z + b is -0 where a -0 logit meets a
      // -0 bias (top-k-then-softmax), and float_key orders -0 below +0, which would break the
      // tie to the lower index.
      auto key_of = [&](int e) -> uint32_t {
        const float z = load_z(e);
        return float_key(sanitize((topk_softmax ? z : score(z)) + bias_at(e)) + 0.0f);
      };
      for (int e = lane; e < E; e += 32) {
        const uint32_t kk = key_of(e);
        if (keys_kept) keyrow[pad_index(e)] = kk;
        if (G == 1) cache.insert(kk, e);
      }
      __syncwarp();

      // ---- groups ----------------------------------------------------------------------------
      if (G > 1) {
        const int S = E / G;
        const int gs = o.group_score;
        const int n = gs == MOEKIT_GROUP_SCORE_MAX ? 1 : gs == MOEKIT_GROUP_SCORE_TOP2_SUM ? 2 : o.group_topn;
        if (n <= 2) {
          for (int g = lane; g < G; g += 32) {
            uint32_t a1 = 0u, a2 = 0u;
            for (int i = 0; i < S; ++i) {
              const uint32_t kk = keyrow[pad_index(g * S + i)];
              const bool gt1 = kk > a1;
              a2 = gt1 ? a1 : (kk > a2 ? kk : a2);
              a1 = gt1 ? kk : a1;
            }
            uint32_t gk = a1;
            if (n == 2 && S > 1) gk = float_key(sanitize(key_float(a1) + key_float(a2)) + 0.0f);
            gkey[pad_index(g)] = gk;
          }
        } else {
          for (int g = 0; g < G; ++g) {
            float gsum = 0.0f;
            warp_select<Q>(
                S, n, [&](int i) { return keyrow[pad_index(g * S + i)]; },
                [&](int, int, uint32_t k) { gsum += key_float(k); });
            if (lane == 0) gkey[pad_index(g)] = float_key(sanitize(gsum) + 0.0f);
          }
        }
        __syncwarp();
        uint32_t keep32 = 0u;
        if (G <= 32) {
          const uint32_t mine = lane < G ? gkey[pad_index(lane)] : 0u;
          int rank = 0;
          for (int g = 0; g < G; ++g) {
            const uint32_t other = __shfl_sync(kFullMask, mine, g);
            rank += (other > mine || (other == mine && g < lane)) ? 1 : 0;
          }
          keep32 = __ballot_sync(kFullMask, lane < G && rank < o.groups_kept);
        } else {
          for (int w = lane; w < (G + 31) / 32; w += 32) gbits[w] = 0u;
          __syncwarp();
          warp_select<Q>(
              G, o.groups_kept, [&](int i) { return gkey[pad_index(i)]; },
              [&](int, int item, uint32_t) {
                if (lane == 0) gbits[item >> 5] |= 1u << (item & 31);
              });
          __syncwarp();
        }
        for (int e = lane; e < E; e += 32) {
          const int g = e / S;
          const bool kept = G <= 32 ? ((keep32 >> g) & 1u) != 0 : ((gbits[g >> 5] >> (g & 31)) & 1u) != 0;
          if (!kept) keyrow[pad_index(e)] = mask_key;
        }
        __syncwarp();
        for (int e = lane; e < E; e += 32) cache.insert(keyrow[pad_index(e)], e);
      }

      // ---- top-K -----------------------------------------------------------------------------
      warp_select_cached<Q>(
          E, K, [&](int i) { return keys_kept ? keyrow[pad_index(i)] : key_of(i); },
          [&](int r, int item, uint32_t) {
            if (lane == 0) sel[r] = item;
          },
          cache);
      __syncwarp();

      // ---- weights, indices, loads ---------------------------------------------------------------
      const bool has = lane < K;
      const int idx = has ? sel[lane] : 0;
      float u = 0.0f;
      if (has) {
        const float z = load_z(idx);
        u = topk_softmax ? z : (wub ? score(z) + bias_at(idx) : score(z));
      }
      if (topk_softmax) {
        const float zmax = warp_max(has ? u : -INFINITY);
        u = has ? softmax_num(u, zmax) : 0.0f;
        u = u / warp_sum(u);
      }
      if (o.normalize) u = u / (warp_sum(has ? u : 0.0f) + 1e-20f);
      if (has) {
        a.weights[t * K + lane] = o.route_scale * u;
        a.indices[t * K + lane] = idx;
        if (need_load && m) atomicAdd(&hist[idx], 1);
      }
      if (m) ++my_count;
    }

    // ---- aux statistics: p over the keys (no longer needed), then the block sum in warp order
    if (need_score) {
      if (active) {
        float qsum = 0.0f;
        if (o.normalize) {
          for (int e = lane; e < E; e += 32) {
            const float s = score(load_z(e));
            qsum += wub ? s + bias_at(e) : s;
          }
        }
        const float f = o.normalize ? 1.0f / (warp_sum(qsum) + 1e-20f) : 1.0f;
        __syncwarp();
        for (int e = lane; e < E; e += 32) {
          const float s = score(load_z(e));
          keyrow[pad_index(e)] = __float_as_uint((wub ? s + bias_at(e) : s) * f);
        }
      }
      if (lane == 0) flags[warp] = m ? 1 : 0;
      __syncthreads();
      for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float v = acc[e];
        for (int w = 0; w < warps; ++w)
          if (flags[w]) v += __uint_as_float(smem[static_cast<size_t>(w) * layout.warp_words + pad_index(e)]);
        acc[e] = v;
      }
      __syncthreads();
    }
  }
  cp_async_wait<0>();  // nothing in flight when the block exits

  // ---- block epilogue ---------------------------------------------------------------------------
  if (!a.finalize_follows) pdl_launch_dependents();
  if (need_count && lane == 0 && my_count > 0) atomicAdd(block_count, my_count);
  __syncthreads();
  if (need_count && threadIdx.x == 0) a.count_partial[blockIdx.x] = *block_count;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    if (need_score) a.score_partial[static_cast<int64_t>(blockIdx.x) * E + e] = acc[e];
    if (need_load) {
      const int v = hist[e];
      if (a.load_mode == LoadMode::kPartial)
        a.load_partial[static_cast<int64_t>(blockIdx.x) * E + e] = v;
      else if (v != 0)
        atomicAdd(a.expert_load + e, v);
    }
  }
}

template <class T>
cudaError_t launch_forward_generic(const ForwardArgs& a, cudaStream_t stream, int32_t* blocks) {
  const size_t smem = a.shape.smem_bytes;
  const cudaError_t e = ensure_dynamic_smem(router_forward_generic_kernel<T>, smem);
  if (e != cudaSuccess) return e;
  const int32_t grid = resident_grid(router_forward_generic_kernel<T>, a.shape.threads, smem, a.shape.num_blocks);
  *blocks = grid;
  // Launched plainly, not as a programmatic dependent: back to back at T = 4096 (E = 2048) it ran
  // 9.5 % slower that way (H200, 2b2f8cb; docs/router.md, seventh measurement), its blocks starting
  // staggered beside the previous call's tail while each owns a fixed share of the tokens. Its
  // launch is a small part of a 100-500 us call anyway; its pdl_wait is then a no-op.
  return launch_programmatic(router_forward_generic_kernel<T>, dim3(grid), dim3(a.shape.threads), smem, stream,
                             false, a);
}

}  // namespace moekit::kernels::router
