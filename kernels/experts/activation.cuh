// Expert activations, forward and backward, in fp32: the one definition used by the grouped GEMM
// epilogues, the dense MLP's elementwise kernels and the benchmark's per-expert loop. Host- and
// device-callable (plain expf, no intrinsics), so the CPU tests check these very functions
// against the double reference.
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

__host__ __device__ inline float act_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Whether this activation clamps with the given limit.
__host__ __device__ inline bool act_clamps(const ActParams& p) {
  return p.kind == kActQuickGeglu || ((p.kind == kActSwiglu || p.kind == kActSwigluOai) && p.limit > 0.0f);
}

struct GatedGrad {
  float act;     // the forward value
  float d_gate;  // d act / d g
  float d_up;    // d act / d v
};

// Forward and backward of a gated activation in one go (the backward needs the forward's pieces).
// 1 - sigmoid(x) is evaluated as sigmoid(-x) and gelu_tanh through 0.5 (1 + tanh z) = sigmoid(2z),
// so no derivative suffers cancellation where the sigmoid saturates.
__host__ __device__ inline GatedGrad act_gated_grad(const ActParams& p, float g, float v) {
  float gate_mask = 1.0f, up_mask = 1.0f;
  if (act_clamps(p)) {
    const float L = p.limit;
    gate_mask = g <= L ? 1.0f : 0.0f;
    up_mask = (v >= -L && v <= L) ? 1.0f : 0.0f;
    g = g > L ? L : g;
    v = v > L ? L : (v < -L ? -L : v);
  }
  GatedGrad r;
  switch (p.kind) {
    case kActQuickGeglu:
    case kActSwigluOai: {
      const float x = p.alpha * g;
      const float s = act_sigmoid(x), sm = act_sigmoid(-x);
      const float q = g * s;                     // quick_gelu(g)
      const float dq = s + p.alpha * g * s * sm;  // d quick_gelu / d g
      r.act = q * (v + 1.0f);
      r.d_gate = dq * (v + 1.0f) * gate_mask;
      r.d_up = q * up_mask;
      break;
    }
    case kActGeglu: {
      const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
      const float k1 = 0.044715f;
      const float z2 = 2.0f * k0 * (g + k1 * g * g * g);
      const float s = act_sigmoid(z2), sm = act_sigmoid(-z2);
      const float gelu = g * s;
      const float dgelu = s + 2.0f * g * s * sm * k0 * (1.0f + 3.0f * k1 * g * g);
      r.act = gelu * v;
      r.d_gate = dgelu * v * gate_mask;
      r.d_up = gelu * up_mask;
      break;
    }
    default: {  // kActSwiglu
      const float s = act_sigmoid(g), sm = act_sigmoid(-g);
      const float silu = g * s;
      const float dsilu = s + g * s * sm;
      r.act = silu * v;
      r.d_gate = dsilu * v * gate_mask;
      r.d_up = silu * up_mask;
      break;
    }
  }
  return r;
}

__host__ __device__ inline float act_gated(const ActParams& p, float g, float v) {
  if (act_clamps(p)) {
    const float L = p.limit;
    g = g > L ? L : g;
    v = v > L ? L : (v < -L ? -L : v);
  }
  switch (p.kind) {
    case kActQuickGeglu:
    case kActSwigluOai: return g * act_sigmoid(p.alpha * g) * (v + 1.0f);
    case kActGeglu: return g * act_sigmoid(2.0f * 0.7978845608028654f * (g + 0.044715f * g * g * g)) * v;
    default: return g * act_sigmoid(g) * v;
  }
}

// relu2 (single projection).
__host__ __device__ inline float act_relu2(float u) {
  const float r = u < 0.0f ? 0.0f : u;
  return r * r;
}
__host__ __device__ inline float act_relu2_grad(float u) { return u < 0.0f ? 0.0f : 2.0f * u; }

}  // namespace moekit::kernels::experts
