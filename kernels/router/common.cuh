// Device building blocks shared by the router kernels.
//
// Order-preserving keys: float_key maps an fp32 selection value to a uint32 whose unsigned order
// is the float order (-inf -> 0x007fffff, +inf -> 0xff800000). Values are sanitised first
// (sanitize: NaN -> -inf, and callers add +0.0f so that -0 becomes +0), so key equality is float
// equality and a NaN never beats anything. Key 0 is below every real value: it marks "no
// candidate" (a lane that has given away all its experts).
//
// Scores: fp32 with the MUFU exponential and reciprocal (a few ulp; docs/router.md), the same
// functions in the forward and the backward so that a recompute sees the forward's values. The
// exponential is ex2.approx.ftz of a separately rounded x log2(e) (results below 2^-126 flush to
// 0): one MUFU instruction and one multiply, without the subnormal range fix-up of the non-ftz
// intrinsic. Every multiply / add a score depends on is an explicitly rounded intrinsic, so no
// contraction can make two evaluations of the same score differ.
//
// Team reductions: xor butterflies inside aligned groups of TPT lanes (a power of two); every
// lane of the team ends with the bitwise-same result (fp32 addition is commutative), and the
// order of the additions is fixed, so sums are deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/dtype.cuh"
#include "kernels/router/layout.hpp"
#include "kernels/router/span.hpp"
#include "moekit/router.h"

namespace moekit::kernels::router {

constexpr unsigned kFullMask = 0xffffffffu;

// Score function of a kernel, fixed at compile time (each kernel holds only its own instructions).
enum class ScoreMode : int {
  kSoftmax = 0,      // softmax, then top-k
  kSigmoid = 1,
  kSqrtSoftplus = 2,
  kTopkSoftmax = 3,  // top-k of the logits, then a softmax over the K picked
};

inline ScoreMode score_mode(int32_t score_func, int32_t topk_then_softmax) {
  if (score_func == MOEKIT_SCORE_SOFTMAX) return topk_then_softmax ? ScoreMode::kTopkSoftmax : ScoreMode::kSoftmax;
  return score_func == MOEKIT_SCORE_SIGMOID ? ScoreMode::kSigmoid : ScoreMode::kSqrtSoftplus;
}

// The moekit_score_func_t of a mode.
constexpr int score_func_of(ScoreMode m) {
  return m == ScoreMode::kSigmoid ? MOEKIT_SCORE_SIGMOID
         : m == ScoreMode::kSqrtSoftplus ? MOEKIT_SCORE_SQRT_SOFTPLUS
                                         : MOEKIT_SCORE_SOFTMAX;
}

__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}

// NaN -> -inf (fmaxf returns the non-NaN operand).
__device__ __forceinline__ float sanitize(float x) { return fmaxf(x, -INFINITY); }

__device__ __forceinline__ float approx_rcp(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float approx_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// e^x = 2^(x log2 e): the product rounded once, then MUFU.EX2 (flushes results below 2^-126).
__device__ __forceinline__ float approx_exp(float x) { return approx_exp2(__fmul_rn(x, kLog2e)); }

// 1 / (1 + e^-x): 0 at -inf, 1 at +inf, NaN at NaN.
__device__ __forceinline__ float sigmoid_f(float x) { return approx_rcp(__fadd_rn(1.0f, approx_exp(-x))); }

// sqrt(softplus(x)) with softplus(x) = max(x, 0) + log1p(e^-|x|) (no overflow, exact tails).
__device__ __forceinline__ float sqrt_softplus_f(float x) {
  return __fsqrt_rn(__fadd_rn(fmaxf(x, 0.0f), log1pf(approx_exp(-fabsf(x)))));
}

// d sqrt(softplus(x)) / dx = sigmoid(x) / (2 s). Below x = -20 (s ~ e^(x/2)) it is computed as
// e^(x/2) / 2 (relative error < e^-20), which is also the safe value where s underflows to 0.
__device__ __forceinline__ float sqrt_softplus_grad(float x, float s) {
  return x < -20.0f ? 0.5f * approx_exp(0.5f * x) : sigmoid_f(x) * approx_rcp(2.0f * s);
}

// Softmax numerator e^(z - mx): the subtraction rounded once, then approx_exp.
__device__ __forceinline__ float softmax_num(float z, float mx) { return approx_exp(__fsub_rn(z, mx)); }

template <int TPT>
__device__ __forceinline__ float team_sum(float v) {
#pragma unroll
  for (int d = TPT / 2; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  return v;
}

template <int TPT>
__device__ __forceinline__ float team_max(float v) {
#pragma unroll
  for (int d = TPT / 2; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// Max of a uint32 over the lanes of each team (all lanes of the warp call it). TPT >= 16: one
// redux.sync per team of the warp, each over the full warp (the other team contributes 0, below
// every real key), so no partial-mask collective serialises the warp; below: a butterfly.
template <int TPT>
__device__ __forceinline__ uint32_t team_umax(uint32_t v, int team_in_warp) {
  if constexpr (TPT == 32) {
    return __reduce_max_sync(kFullMask, v);
  } else if constexpr (TPT == 16) {
    const uint32_t lo = __reduce_max_sync(kFullMask, team_in_warp == 0 ? v : 0u);
    const uint32_t hi = __reduce_max_sync(kFullMask, team_in_warp == 0 ? 0u : v);
    return team_in_warp == 0 ? lo : hi;
  } else {
#pragma unroll
    for (int d = TPT / 2; d > 0; d >>= 1) {
      const uint32_t o = __shfl_xor_sync(kFullMask, v, d);
      v = o > v ? o : v;
    }
    return v;
  }
}

// Min of a uint32 over the lanes of each team (as team_umax; the other team contributes ~0).
template <int TPT>
__device__ __forceinline__ uint32_t team_umin(uint32_t v, int team_in_warp) {
  if constexpr (TPT == 32) {
    return __reduce_min_sync(kFullMask, v);
  } else if constexpr (TPT == 16) {
    const uint32_t lo = __reduce_min_sync(kFullMask, team_in_warp == 0 ? v : 0xffffffffu);
    const uint32_t hi = __reduce_min_sync(kFullMask, team_in_warp == 0 ? 0xffffffffu : v);
    return team_in_warp == 0 ? lo : hi;
  } else {
#pragma unroll
    for (int d = TPT / 2; d > 0; d >>= 1) {
      const uint32_t o = __shfl_xor_sync(kFullMask, v, d);
      v = o < v ? o : v;
    }
    return v;
  }
}

__device__ __forceinline__ float warp_sum(float v) { return team_sum<32>(v); }
__device__ __forceinline__ float warp_max(float v) { return team_max<32>(v); }

// Scores of the V values a lane holds of its token (fast paths: forward and backward use this one
// function, so the backward's recompute is bitwise the forward's). Softmax over the team's lanes;
// without full_softmax (top-k-then-softmax that needs no aux scores) the softmax is skipped (0).
template <int V, int TPT>
__device__ __forceinline__ void lane_scores(int score_func, bool full_softmax, const float (&z)[V], float (&s)[V]) {
  if (score_func == MOEKIT_SCORE_SOFTMAX) {
    if (full_softmax) {
      float mx = z[0];
#pragma unroll
      for (int j = 1; j < V; ++j) mx = fmaxf(mx, z[j]);
      mx = team_max<TPT>(mx);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        s[j] = softmax_num(z[j], mx);
        sum += s[j];
      }
      const float inv = 1.0f / team_sum<TPT>(sum);
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = __fmul_rn(s[j], inv);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = 0.0f;
    }
  } else if (score_func == MOEKIT_SCORE_SIGMOID) {
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = sigmoid_f(z[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = sqrt_softplus_f(z[j]);
  }
}

// Top-k-then-softmax weights: softmax over the picked logits u, held as R ranks per lane of a
// team (has[i]: rank i is a real pick); other ranks get 0. Shared by the fast forward and backward.
template <int TPT, int R>
__device__ __forceinline__ void picked_softmax(float (&u)[R], const bool (&has)[R]) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < R; ++i)
    if (has[i]) mx = fmaxf(mx, u[i]);
  mx = team_max<TPT>(mx);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    u[i] = has[i] ? softmax_num(u[i], mx) : 0.0f;
    sum += u[i];
  }
  sum = team_sum<TPT>(sum);
#pragma unroll
  for (int i = 0; i < R; ++i) u[i] = u[i] / sum;
}

// Scores of a row spread lane-strided over a warp (generic paths): the softmax's row max and
// 1 / sum come first (row_score); then score(z) gives any expert's score, bitwise the same wherever
// it is recomputed.
struct RowScore {
  int score_func;
  bool full_softmax;
  float mx;
  float inv;
  __device__ __forceinline__ float operator()(float z) const {
    if (score_func == MOEKIT_SCORE_SOFTMAX) return full_softmax ? __fmul_rn(softmax_num(z, mx), inv) : 0.0f;
    if (score_func == MOEKIT_SCORE_SIGMOID) return sigmoid_f(z);
    return sqrt_softplus_f(z);
  }
};

template <class LoadZ>
__device__ __forceinline__ RowScore row_score(int score_func, bool full_softmax, int num_experts, LoadZ load_z) {
  RowScore r{score_func, full_softmax, 0.0f, 1.0f};
  if (score_func == MOEKIT_SCORE_SOFTMAX && full_softmax) {
    const int lane = threadIdx.x & 31;
    float mx = -INFINITY;
    for (int e = lane; e < num_experts; e += 32) mx = fmaxf(mx, load_z(e));
    r.mx = warp_max(mx);
    float sum = 0.0f;
    for (int e = lane; e < num_experts; e += 32) sum += softmax_num(load_z(e), r.mx);
    r.inv = 1.0f / warp_sum(sum);
  }
  return r;
}

// x + d through an asm statement the optimiser cannot see into: keeps a strided induction
// variable an addition per step (otherwise it may be rebuilt from the loop counter with 64-bit
// multiplies every iteration when registers are tight).
__device__ __forceinline__ int64_t opaque_add(int64_t x, int64_t d) {
  int64_t r;
  asm("add.s64 %0, %1, %2;" : "=l"(r) : "l"(x), "l"(d));
  return r;
}
__device__ __forceinline__ const char* opaque_add(const char* p, int64_t d) {
  return reinterpret_cast<const char*>(opaque_add(reinterpret_cast<int64_t>(p), d));
}

// The value itself, through a volatile asm: the compiler must keep it in a register instead of
// rebuilding it (rematerialising from the thread index) wherever it is used.
__device__ __forceinline__ uint32_t pinned(uint32_t x) {
  uint32_t r;
  asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

__device__ __forceinline__ int64_t pinned(int64_t x) {
  int64_t r;
  asm volatile("mov.b64 %0, %1;" : "=l"(r) : "l"(x));
  return r;
}

// Two words to a shared-memory address (32-bit, from __cvta_generic_to_shared).
__device__ __forceinline__ void st_shared_u32x2(uint32_t addr, uint32_t x, uint32_t y) {
  asm volatile("st.shared.v2.u32 [%0], {%1, %2};" ::"r"(addr), "r"(x), "r"(y) : "memory");
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// ---- element storage --------------------------------------------------------------------------
// Logits move as raw 32-bit words (two 16-bit elements or one fp32 per word) so that vector loads
// and stores are plain integer moves.
template <class T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr uint32_t kNegInfBits = 0xff800000u;
  static __device__ __forceinline__ float get(const uint32_t* w, int j) {
    return __uint_as_float(w[j]);
  }
  static __device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ uint32_t bits(float f) { return __float_as_uint(f); }
};
template <>
struct Elem<__half> {
  static constexpr uint32_t kNegInfBits = 0xfc00u;
  static __device__ __forceinline__ float get(const uint32_t* w, int j) {
    const uint32_t word = w[j >> 1];
    const unsigned short h = static_cast<unsigned short>((j & 1) ? (word >> 16) : (word & 0xffffu));
    return __half2float(__ushort_as_half(h));
  }
  static __device__ __forceinline__ float load1(const __half* p) { return __half2float(__ldg(p)); }
  static __device__ __forceinline__ uint32_t bits(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr uint32_t kNegInfBits = 0xff80u;
  // bf16 -> fp32 is exact: the bits go to the top half.
  static __device__ __forceinline__ float get(const uint32_t* w, int j) {
    const uint32_t word = w[j >> 1];
    return __uint_as_float((j & 1) ? (word & 0xffff0000u) : (word << 16));
  }
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) {
    return __bfloat162float(__ldg(p));
  }
  static __device__ __forceinline__ uint32_t bits(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// Number of 32-bit words holding V elements of T.
template <class T, int V>
struct Words {
  static constexpr int kCount = V * static_cast<int>(sizeof(T)) / 4;
  static_assert(V * sizeof(T) % 16 == 0, "a lane's span must be whole 16-byte vectors");
};

// Padding of a lane's words: -inf in every element (both halves of a word for 16-bit types).
template <class T>
constexpr uint32_t pad_word() {
  return sizeof(T) == 4 ? Elem<T>::kNegInfBits : (Elem<T>::kNegInfBits | (Elem<T>::kNegInfBits << 16));
}

// Loads a lane's V elements at p (row element base; p aligned to vec_bytes: 16, 8, 4 or 2) into
// w, given rem = E - base elements of the row from p on: the accesses of visit_span
// (kernels/router/span.hpp), all inside [p, p + rem); elements at and past rem read as -inf.
template <class T, int V>
__device__ __forceinline__ void load_span(const T* p, int vec_bytes, int rem, uint32_t (&w)[Words<T, V>::kCount]) {
  constexpr int kWords = Words<T, V>::kCount;
  constexpr int kSize = static_cast<int>(sizeof(T));
  if (rem < V || vec_bytes < 4) {  // padding past E; 2-byte accesses fill words half by half
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = pad_word<T>();
  }
  const char* base = reinterpret_cast<const char*>(p);
  visit_span<V, kSize>(rem, vec_bytes, [&](int j, auto width) {
    constexpr int kW = decltype(width)::value;
    const char* src = base + j * kSize;
    if constexpr (kW == 16) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
      const int i = j * kSize / 4;
      w[i] = v.x;
      w[i + 1] = v.y;
      w[i + 2] = v.z;
      w[i + 3] = v.w;
    } else if constexpr (kW == 8) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
      const int i = j * kSize / 4;
      w[i] = v.x;
      w[i + 1] = v.y;
    } else if constexpr (kW == 4) {
      w[j * kSize / 4] = __ldg(reinterpret_cast<const unsigned int*>(src));
    } else {  // one 16-bit element into its half of the word
      const uint32_t h = __ldg(reinterpret_cast<const unsigned short*>(src));
      const int i = j >> 1;
      w[i] = (j & 1) ? ((w[i] & 0x0000ffffu) | (h << 16)) : ((w[i] & 0xffff0000u) | h);
    }
  });
}

// Stores a lane's V values at p (aligned to vec_bytes), rounded to T: only the rem = E - base
// elements that exist, with the accesses of visit_span (never past E).
template <class T, int V>
__device__ __forceinline__ void store_span(T* p, int vec_bytes, int rem, const float (&v)[V]) {
  constexpr int kWords = Words<T, V>::kCount;
  constexpr int kSize = static_cast<int>(sizeof(T));
  uint32_t w[kWords];
  if constexpr (kSize == 4) {
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = __float_as_uint(v[j]);
  } else {
#pragma unroll
    for (int i = 0; i < kWords; ++i)
      w[i] = Elem<T>::bits(v[2 * i]) | (Elem<T>::bits(v[2 * i + 1]) << 16);
  }
  char* base = reinterpret_cast<char*>(p);
  visit_span<V, kSize>(rem, vec_bytes, [&](int j, auto width) {
    constexpr int kW = decltype(width)::value;
    char* dst = base + j * kSize;
    const int i = j * kSize / 4;
    if constexpr (kW == 16) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[i], w[i + 1], w[i + 2], w[i + 3]);
    } else if constexpr (kW == 8) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(w[i], w[i + 1]);
    } else if constexpr (kW == 4) {
      *reinterpret_cast<unsigned int*>(dst) = w[i];
    } else {
      const int h = j >> 1;
      *reinterpret_cast<unsigned short*>(dst) =
          static_cast<unsigned short>((j & 1) ? (w[h] >> 16) : (w[h] & 0xffffu));
    }
  });
}

// ---- asynchronous row staging ------------------------------------------------------------------
template <int W>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src) {
  static_assert(W == 4 || W == 8 || W == 16, "cp.async moves 4, 8 or 16 bytes");
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(src), "n"(W) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Copies the row [src, src + bytes) (aligned to vec_bytes) to shared memory at dst (16-byte
// aligned) with the accesses of visit_row (kernels/router/layout.hpp): 4-, 8- and 16-byte pieces
// by cp.async (complete once cp_async_wait says so), 2-byte elements by a plain load and store.
template <int kElemBytes>
__device__ __forceinline__ void stage_row(uint32_t dst, const char* src, int bytes, int vec_bytes, int lane) {
  visit_row<kElemBytes>(bytes, vec_bytes, lane, [&](int off, auto width) {
    constexpr int W = decltype(width)::value;
    if constexpr (W >= 4) {
      cp_async<W>(dst + off, src + off);
    } else {  // a 16-bit element at a 2-byte boundary
      const unsigned short v = __ldg(reinterpret_cast<const unsigned short*>(src + off));
      asm volatile("st.shared.u16 [%0], %1;" ::"r"(dst + off), "h"(v) : "memory");
    }
  });
}

template <class T>
__device__ __forceinline__ float smem_elem(const T* row, int e);
template <>
__device__ __forceinline__ float smem_elem<float>(const float* row, int e) { return row[e]; }
template <>
__device__ __forceinline__ float smem_elem<__half>(const __half* row, int e) { return __half2float(row[e]); }
template <>
__device__ __forceinline__ float smem_elem<__nv_bfloat16>(const __nv_bfloat16* row, int e) {
  return __bfloat162float(row[e]);
}

// ---- warp top-k over keys in shared memory (generic path, groups, fake gate) ------------------
// Items 0..n-1 with keys key_at(i); lane l owns the items i = l (mod 32). Picks the k (<= n)
// largest keys in (key descending, item ascending) order and calls on_pick(r, item, key) for
// r = 0..k-1 on every lane with the same arguments. Each lane keeps its Q best unpicked items in
// registers (LaneTop); the warp picks the best head with a max reduction (ties: the lowest item, a
// min reduction over the tied heads); a lane whose cache runs dry rescans its items below the last
// one it gave away. Deterministic; O(n/32 * Q) per lane plus k reductions plus rare rescans.

// A lane's Q best (key, item), descending; items offered in ascending order (a strict > keeps
// the earlier of equal keys first). Key 0 = empty.
template <int Q>
struct LaneTop {
  uint32_t ck[Q];
  int ci[Q];
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      ck[q] = 0u;
      ci[q] = 0;
    }
  }
  __device__ __forceinline__ void insert(uint32_t kk, int i) {
    bool p[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) p[q] = kk > ck[q];
#pragma unroll
    for (int q = Q - 1; q > 0; --q) {
      ck[q] = p[q - 1] ? ck[q - 1] : (p[q] ? kk : ck[q]);
      ci[q] = p[q - 1] ? ci[q - 1] : (p[q] ? i : ci[q]);
    }
    ck[0] = p[0] ? kk : ck[0];
    ci[0] = p[0] ? i : ci[0];
  }
};

// warp_select with the lane caches already filled with every item (LaneTop::insert over the
// lane's items in ascending order, e.g. while the keys were computed).
template <int Q, class KeyAt, class OnPick>
__device__ __forceinline__ void warp_select_cached(int n, int k, KeyAt key_at, OnPick on_pick, LaneTop<Q>& c) {
  const int lane = threadIdx.x & 31;
  const int own = lane < n ? (n - 1 - lane) / 32 + 1 : 0;
  int cached = own < Q ? own : Q;
  int popped = 0;
  uint32_t bound_key = 0xffffffffu;  // everything real is below (0xffffffff, -1)
  int bound_item = -1;
  auto refill = [&]() {
    c.clear();
    for (int i = lane; i < n; i += 32) {
      const uint32_t kk = key_at(i);
      if (kk < bound_key || (kk == bound_key && i > bound_item)) c.insert(kk, i);
    }
    const int left = own - popped;
    cached = left < Q ? left : Q;
  };
  for (int r = 0; r < k; ++r) {
    const uint32_t head = cached > 0 ? c.ck[0] : 0u;
    const uint32_t best = __reduce_max_sync(kFullMask, head);
    const bool tied = cached > 0 && head == best;
    const uint32_t item = __reduce_min_sync(kFullMask, tied ? static_cast<uint32_t>(c.ci[0]) : 0xffffffffu);
    on_pick(r, static_cast<int>(item), best);
    if (tied && static_cast<uint32_t>(c.ci[0]) == item) {
      bound_key = c.ck[0];
      bound_item = c.ci[0];
#pragma unroll
      for (int q = 0; q + 1 < Q; ++q) {
        c.ck[q] = c.ck[q + 1];
        c.ci[q] = c.ci[q + 1];
      }
      --cached;
      ++popped;
    }
    const bool stale = cached == 0 && popped < own;
    if (__any_sync(kFullMask, stale)) {
      if (stale) refill();
    }
  }
}

template <int Q, class KeyAt, class OnPick>
__device__ __forceinline__ void warp_select(int n, int k, KeyAt key_at, OnPick on_pick) {
  const int lane = threadIdx.x & 31;
  LaneTop<Q> c;
  c.clear();
  for (int i = lane; i < n; i += 32) c.insert(key_at(i), i);
  warp_select_cached<Q>(n, k, key_at, on_pick, c);
}

}  // namespace moekit::kernels::router
