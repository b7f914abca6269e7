// Expert activations, forward and backward, in fp32: the one definition used by the grouped GEMM
// epilogues, the dense MLP's elementwise kernels and the benchmark's per-expert loop. Host- and
// device-callable, so the CPU tests check these very functions against the double reference; the
// one difference is the sigmoid (act_sigmoid), which the device evaluates with the hardware's
// approximate exp2 and reciprocal (see there), the host with expf and a division.
//
// Gated activations see a gate value g and an up value v (their column positions in u are the
// caller's business: concatenated or interleaved); relu2 sees one value u. L = limit, a = alpha:
//   SWIGLU       L > 0: g <- min(g, L), v <- clamp(v, -L, L);  act = silu(g) v
//   QUICK_GEGLU  g <- min(g, L), v <- clamp(v, -L, L) (always); act = g sigmoid(a g) (v + 1)
//   SWIGLU_OAI   as QUICK_GEGLU, clamped only when L > 0
//   GEGLU        act = gelu_tanh(g) v
//   RELU2        act = max(u, 0)^2
// The backward gives d act / d g and d act / d v (d act / d u for relu2). A clamp passes gradient
// where its input lies in the closed interval, as torch.clamp's backward does; NaN inputs propagate
// NaN through the forward (comparisons are written so NaN is never replaced by a bound).
#pragma once

#include <cuda_runtime.h>

#include <math.h>
#include <type_traits>

namespace moekit::kernels::experts {

// Values of moekit_activation_t.
enum ActKind : int {
  kActSwiglu = 0,
  kActRelu2 = 1,
  kActQuickGeglu = 2,
  kActGeglu = 3,
  kActSwigluOai = 4,
};

struct ActParams {
  int kind;     // ActKind
  float alpha;  // QUICK_GEGLU / SWIGLU_OAI
  float limit;  // L (0 = no clamp where the activation allows it)
};

__host__ __device__ inline bool act_is_gated(int kind) { return kind != kActRelu2; }

// sigmoid(x) = 1 / (1 + e^-x). On the device: __expf (ex2.approx of x log2 e; at most
// 2 + floor(1.173 |x|) ulp) and __fdividef (rcp.approx, 2 ulp; 0 once 1 + e^-x exceeds 2^126,
// where the sigmoid is below 1e-38): 4-6 instructions where expf and an IEEE division take about 20
// with a slow-path branch, and the activation epilogues of the grouped GEMMs issue 64 to 128 of
// them per thread and tile (issue-bound: measured in docs/experts.md). The relative error stays
// below 2e-6 for |x| <= 20 (beyond that the sigmoid is 1 or smaller than 3e-9, and the error
// shrinks with it), far under one bf16 / f16 rounding and inside the f32 tolerance of the GPU
// tests; +-inf give 0 and 1, NaN stays NaN.
__host__ __device__ inline float act_sigmoid(float x) {
#ifdef __CUDA_ARCH__
  return __fdividef(1.0f, 1.0f + __expf(-x));
#else
  return 1.0f / (1.0f + expf(-x));
#endif
}

// Whether this activation clamps with the given limit.
__host__ __device__ inline bool act_clamps(const ActParams& p) {
  return p.kind == kActQuickGeglu || ((p.kind == kActSwiglu || p.kind == kActSwigluOai) && p.limit > 0.0f);
}

// a + b rounded once, never fused with a product feeding it into an FMA. In act_gated_grad with a
// run-time kind a select stands between the product and the add, so the add is a plain FADD; a
// caller that makes the kind a compile-time constant (the sm_90a backward epilogue) folds the
// select away, and this keeps the add (and so the bits) what the run-time kind computes.
__host__ __device__ inline float add_uncontracted(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

struct GatedGrad {
  float act;     // the forward value
  float d_gate;  // d act / d g
  float d_up;    // d act / d v
};

// Forward and backward of a gated activation in one go (the backward needs the forward's pieces).
// 1 - sigmoid(x) is evaluated as sigmoid(-x) and gelu_tanh through 0.5 (1 + tanh z) = sigmoid(2z),
// so no derivative suffers cancellation where the sigmoid saturates. Per kind (a = alpha,
// k0 = sqrt(2/pi), k1 = 0.044715), with s = sigmoid(x), sm = sigmoid(-x), q = g s:
//   swiglu       x = g                        dq = s + g s sm                       c = 0
//   quick/oai    x = a g                      dq = s + a g s sm                     c = 1
//   geglu        x = 2 k0 (g + k1 g^3)        dq = s + 2 g s sm k0 (1 + 3 k1 g^2)   c = 0
//   act = q (v + c), d act / d g = dq (v + c), d act / d v = q.
// Straight-line code with selects (each kind's operations in the order written above, so the
// values are those of a per-kind switch bit for bit): the backward epilogue inlines this for 64
// column pairs per thread, and branches there cost ptxas minutes and registers.
__host__ __device__ inline GatedGrad act_gated_grad(const ActParams& p, float g, float v) {
  const bool clamp = act_clamps(p);
  const float L = p.limit;
  const float gate_mask = (clamp && !(g <= L)) ? 0.0f : 1.0f;
  const float up_mask = (clamp && !(v >= -L && v <= L)) ? 0.0f : 1.0f;
  g = (clamp && g > L) ? L : g;
  v = clamp ? (v > L ? L : (v < -L ? -L : v)) : v;
  const bool quick = p.kind == kActQuickGeglu || p.kind == kActSwigluOai;
  const bool geglu = p.kind == kActGeglu;
  const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
  const float k1 = 0.044715f;
  const float z2 = 2.0f * k0 * (g + k1 * g * g * g);
  const float x = geglu ? z2 : (quick ? p.alpha * g : g);
  const float s = act_sigmoid(x), sm = act_sigmoid(-x);
  const float q = g * s;
  const float d_geglu = 2.0f * g * s * sm * k0 * (1.0f + 3.0f * k1 * g * g);
  const float d_quick = p.alpha * g * s * sm;
  const float d_swiglu = g * s * sm;
  const float dq = add_uncontracted(s, geglu ? d_geglu : (quick ? d_quick : d_swiglu));
  const float vc = quick ? v + 1.0f : v;
  GatedGrad r;
  r.act = q * vc;
  r.d_gate = dq * vc * gate_mask;
  r.d_up = q * up_mask;
  return r;
}

// Written as one straight-line formula with selects, act = g sigmoid(z) (v + c), z = g (swiglu),
// alpha g (quick_geglu, swiglu_oai) or 2 sqrt(2/pi) (g + 0.044715 g^3) (geglu), c = 1 for
// quick_geglu / swiglu_oai: every operation and its order per kind is that of the textbook form
// (bitwise), but the grouped GEMM's gate-up epilogue, which inlines this for each of a thread's 64
// accumulator pairs, gets no per-call branches (ptxas time and code size of that kernel).
__host__ __device__ inline float act_gated(const ActParams& p, float g, float v) {
  const bool clamp = act_clamps(p);
  const float L = p.limit;
  g = (clamp && g > L) ? L : g;
  v = clamp ? (v > L ? L : (v < -L ? -L : v)) : v;
  const bool quick = p.kind == kActQuickGeglu || p.kind == kActSwigluOai;
  const float cubic = 2.0f * 0.7978845608028654f * (g + 0.044715f * g * g * g);
  const float z = p.kind == kActGeglu ? cubic : (quick ? p.alpha * g : g);
  return g * act_sigmoid(z) * (quick ? v + 1.0f : v);
}

// act_gated_as's kind for SwiGLU without a limit (p.limit not > 0: every SwiGLU model but
// DeepSeek-V4's swiglu_limit), not a moekit_activation_t value: the clamp's selects fold away too
// (about 10 instructions per element instead of 17), the values are SWIGLU's for that limit.
constexpr int kActSwigluNoLimit = 100;

// Whether p is the activation act_gated_as<kActSwigluNoLimit> computes.
__host__ __device__ inline bool act_is_swiglu_no_limit(const ActParams& p) {
  return p.kind == kActSwiglu && !(p.limit > 0.0f);
}

// p with the kind fixed at compile time (kKind >= 0, kActSwigluNoLimit: also the limit) or as
// given (kKind < 0). Passed to act_gated / act_gated_grad, the same operations in the same order
// for that kind (the selects fold away), so the same values; a kernel can run SwiGLU without the
// other kinds' instructions. The caller has checked that p is that kind (act_is_swiglu_no_limit).
template <int kKind>
__host__ __device__ inline ActParams act_params_as(const ActParams& p) {
  if constexpr (kKind < 0) {
    return p;
  } else if constexpr (kKind == kActSwigluNoLimit) {
    return ActParams{kActSwiglu, p.alpha, 0.0f};
  } else {
    return ActParams{kKind, p.alpha, p.limit};
  }
}

template <int kKind>
__host__ __device__ inline float act_gated_as(const ActParams& p, float g, float v) {
  return act_gated(act_params_as<kKind>(p), g, v);
}

// The one place that picks a kernel's copy for the gated activation p: calls
// f(std::integral_constant<int, kActSwigluNoLimit>{}) for SwiGLU without a limit, else
// f(std::integral_constant<int, -1>{}) (the kind read from p at run time); f's copy then passes
// the constant to act_params_as / act_gated_as.
template <class F>
__host__ __device__ inline void with_gated_kind(const ActParams& p, F&& f) {
  if (act_is_swiglu_no_limit(p))
    f(std::integral_constant<int, kActSwigluNoLimit>{});
  else
    f(std::integral_constant<int, -1>{});
}

// relu2 (single projection).
__host__ __device__ inline float act_relu2(float u) {
  const float r = u < 0.0f ? 0.0f : u;
  return r * r;
}
__host__ __device__ inline float act_relu2_grad(float u) { return u < 0.0f ? 0.0f : 2.0f * u; }

}  // namespace moekit::kernels::experts
