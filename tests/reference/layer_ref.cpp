#include "tests/reference/layer_ref.hpp"

#include <cmath>

namespace moekit::ref {
namespace {

double apply(const Rounder& round, double x) { return round ? round(x) : x; }

void round_all(const Rounder& round, std::vector<double>& v) {
  if (round)
    for (double& x : v) x = round(x);
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

TokenPlanConfig plan_config(const LayerSpec& s) {
  TokenPlanConfig c;
  c.num_experts = s.num_experts();
  c.top_k = s.top_k();
  c.expert_begin = 0;
  c.num_local = s.num_experts();
  c.alignment = s.alignment;
  c.capacity = s.capacity;
  c.drop_by_weight = s.capacity > 0 && s.drop_by_weight;
  return c;
}

// z = x W_r^T + b_r in double.
std::vector<double> projection(const LayerProblem& p) {
  const int64_t T = p.num_tokens;
  const int E = p.spec.num_experts(), H = p.spec.hidden;
  std::vector<double> z(static_cast<size_t>(T) * E, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) {
      double acc = 0.0;
      for (int h = 0; h < H; ++h) acc += p.x[t * H + h] * p.router_weight[static_cast<size_t>(e) * H + h];
      if (!p.router_bias.empty()) acc += p.router_bias[e];
      z[t * E + e] = acc;
    }
  return z;
}

std::vector<float> to_floats(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

// The shared MLP as one expert over every token (p = 1), weights in the x @ W layout.
ExpertsProblem shared_problem(const LayerProblem& p) {
  const LayerSpec& s = p.spec;
  ExpertsProblem sp;
  sp.num_experts = 1;
  sp.hidden = s.hidden;
  sp.inter = s.shared_inter;
  sp.act = s.shared_act;
  sp.interleaved = s.shared_interleaved;
  sp.weight_after_down = false;
  sp.max_rows = p.num_tokens;
  sp.offsets = {0, static_cast<int32_t>(p.num_tokens)};
  sp.xp = p.x;
  sp.w_gate_up = s.shared_out_in ? transpose(p.shared_w_gate_up, s.shared_nu(), s.hidden) : p.shared_w_gate_up;
  sp.w_down = s.shared_out_in ? transpose(p.shared_w_down, s.hidden, s.shared_inter) : p.shared_w_down;
  sp.b_gate_up = p.shared_b_gate_up;
  sp.b_down = p.shared_b_down;
  return sp;
}

// Everything after the logits and the routing decision: weights, experts, combine, shared MLP, y.
void forward_routed(const LayerProblem& p, const LayerRounding& r, LayerForward& f) {
  const LayerSpec& s = p.spec;
  const int64_t T = p.num_tokens;
  const int E = s.num_experts(), K = s.top_k(), H = s.hidden;
  f.weights = router_weights_at(s.router, T, f.logits, p.correction_bias.empty() ? nullptr : &p.correction_bias,
                                f.router.indices);
  ExpertsProblem& ep = f.experts;
  ep.num_experts = E;
  ep.hidden = H;
  ep.inter = s.inter;
  ep.act = s.act;
  ep.interleaved = s.interleaved;
  ep.weight_after_down = s.weight_after_down;
  ep.max_rows = f.plan.total;
  ep.offsets = f.plan.expert_offsets;
  permute(f.plan, K, T, H, p.x, f.weights, &ep.xp, &ep.row_weights);
  ep.w_gate_up = p.w_gate_up;
  ep.b_gate_up = p.b_gate_up;
  ep.w_down = p.w_down;
  ep.b_down = p.b_down;
  f.expert_out = experts_forward(ep, r.act);
  f.routed = combine(f.plan, K, T, H, f.expert_out.out, {});
  round_all(r.act, f.routed);
  f.y = f.routed;
  if (!s.has_shared) return;
  f.shared = shared_problem(p);
  f.shared_out = experts_forward(f.shared, r.act);
  f.gate_logit.assign(static_cast<size_t>(T), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    double g = 1.0;
    if (s.shared_gate) {
      double acc = 0.0;
      for (int h = 0; h < H; ++h) acc += p.x[t * H + h] * p.shared_gate_weight[h];
      f.gate_logit[t] = acc;
      g = sigmoid(acc);
    }
    for (int h = 0; h < H; ++h)
      f.y[t * H + h] = apply(r.act, f.routed[t * H + h] + g * f.shared_out.out[t * H + h]);
  }
}

// dst = transpose of a gradient computed in the x @ W layout back into the stored layout.
std::vector<double> stored_layout(const std::vector<double>& in_out, bool out_in, int64_t rows, int64_t cols) {
  return out_in ? transpose(in_out, rows, cols) : in_out;
}

}  // namespace

std::vector<double> router_weights_at(const moekit_router_config_t& c, int64_t T, const std::vector<double>& logits,
                                      const std::vector<float>* bias, const std::vector<int32_t>& indices) {
  // w_tk is the derivative of sum_k gw_k w_k with a unit gw: router_ref's objective evaluates the
  // weights of given indices from double logits, without selecting anything.
  const int E = c.num_experts, K = c.top_k;
  std::vector<double> w(static_cast<size_t>(T) * K, 0.0);
  const std::vector<int64_t> no_load(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<double> row(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    const std::vector<int32_t> idx(indices.begin() + t * K, indices.begin() + (t + 1) * K);
    for (int k = 0; k < K; ++k) {
      std::vector<float> unit(K, 0.0f);
      unit[k] = 1.0f;
      w[t * K + k] = router_objective(c, 1, row, bias, nullptr, idx, &unit, 0.0, no_load, 1);
    }
  }
  return w;
}

std::vector<double> layer_logits(const LayerProblem& p, const Rounder& logits_rounding) {
  std::vector<double> z = projection(p);
  round_all(logits_rounding, z);
  return z;
}

LayerForward layer_forward(const LayerProblem& p, const LayerRounding& r, const std::vector<float>* logits_override) {
  const LayerSpec& s = p.spec;
  const int64_t T = p.num_tokens;
  LayerForward f;
  if (logits_override != nullptr) {
    f.logits.assign(logits_override->begin(), logits_override->end());
  } else {
    f.logits = projection(p);
    round_all(r.logits, f.logits);
  }
  const std::vector<float>* bias = p.correction_bias.empty() ? nullptr : &p.correction_bias;
  const std::vector<uint8_t>* mask = p.mask.empty() ? nullptr : &p.mask;
  f.router = router_forward(s.router, T, to_floats(f.logits), bias, mask);
  f.plan = build_plan(plan_config(s), T, f.router.indices, to_floats(f.router.weights), p.mask);
  forward_routed(p, r, f);
  f.aux_loss = aux_loss(s.num_experts(), s.top_k(), f.router.load, f.router.score_sum, f.router.token_count);
  return f;
}

LayerGrads layer_backward(const LayerProblem& p, const LayerRounding& r, const LayerForward& f,
                          const std::vector<double>& dy, double aux_coeff) {
  const LayerSpec& s = p.spec;
  const int64_t T = p.num_tokens;
  const int E = s.num_experts(), K = s.top_k(), H = s.hidden;
  LayerGrads g;

  // Shared expert: its gate, the MLP, the gate weight.
  std::vector<double> dx_shared, dgate;
  if (s.has_shared) {
    std::vector<double> ds = dy;
    dgate.assign(static_cast<size_t>(T), 0.0);
    if (s.shared_gate) {
      for (int64_t t = 0; t < T; ++t) {
        const double gv = sigmoid(f.gate_logit[t]);
        double dot = 0.0;
        for (int h = 0; h < H; ++h) {
          dot += dy[t * H + h] * f.shared_out.out[t * H + h];
          ds[t * H + h] = apply(r.act, gv * dy[t * H + h]);
        }
        dgate[t] = dot * gv * (1.0 - gv);
      }
      g.shared_gate_weight.assign(H, 0.0);
      for (int h = 0; h < H; ++h) {
        double acc = 0.0;
        for (int64_t t = 0; t < T; ++t) acc += dgate[t] * p.x[t * H + h];
        g.shared_gate_weight[h] = apply(r.act, acc);
      }
    }
    const ExpertsBackwardResult sb = experts_backward(f.shared, f.shared_out.u, ds, r.act);
    dx_shared = sb.grad_xp;
    round_all(r.act, dx_shared);
    const int NUs = s.shared_nu(), Is = s.shared_inter;
    g.shared_w_gate_up = stored_layout(sb.grad_w_gate_up, s.shared_out_in, H, NUs);
    g.shared_w_down = stored_layout(sb.grad_w_down, s.shared_out_in, Is, H);
    round_all(r.act, g.shared_w_gate_up);
    round_all(r.act, g.shared_w_down);
    if (s.shared_bias) {
      g.shared_b_gate_up = sb.grad_b_gate_up;
      g.shared_b_down = sb.grad_b_down;
      round_all(r.act, g.shared_b_gate_up);
      round_all(r.act, g.shared_b_down);
    }
  }

  // Routed experts: dyp[row(t, k)] = dy[t], the experts, back to tokens.
  std::vector<double> dyp;
  combine_backward(f.plan, K, T, H, dy, {}, {}, &dyp, nullptr, nullptr);
  const ExpertsBackwardResult eb = experts_backward(f.experts, f.expert_out.u, dyp, r.act);
  std::vector<double> grad_xp = eb.grad_xp;
  round_all(r.act, grad_xp);
  std::vector<double> dx_routed;
  permute_backward(f.plan, K, T, H, grad_xp, eb.grad_row_weights, &dx_routed, &g.grad_weights);
  round_all(r.act, dx_routed);
  g.w_gate_up = eb.grad_w_gate_up;
  g.w_down = eb.grad_w_down;
  round_all(r.act, g.w_gate_up);
  round_all(r.act, g.w_down);
  if (s.expert_bias) {
    g.b_gate_up = eb.grad_b_gate_up;
    g.b_down = eb.grad_b_down;
    round_all(r.act, g.b_gate_up);
    round_all(r.act, g.b_down);
  }

  // Router (dw as the device holds it: fp32), then the projection.
  const std::vector<float> gw = to_floats(g.grad_weights);
  g.grad_logits = router_backward(s.router, T, f.logits, p.correction_bias.empty() ? nullptr : &p.correction_bias,
                                  p.mask.empty() ? nullptr : &p.mask, f.router.indices, &gw, aux_coeff,
                                  f.router.load, f.router.token_count);
  round_all(r.logits, g.grad_logits);
  const std::vector<double>& dz = g.grad_logits;
  g.router_weight.assign(static_cast<size_t>(E) * H, 0.0);
  g.router_bias.assign(E, 0.0);
  for (int e = 0; e < E; ++e) {
    for (int64_t t = 0; t < T; ++t) g.router_bias[e] += dz[t * E + e];
    for (int h = 0; h < H; ++h) {
      double acc = 0.0;
      for (int64_t t = 0; t < T; ++t) acc += dz[t * E + e] * p.x[t * H + h];
      g.router_weight[static_cast<size_t>(e) * H + h] = acc;
    }
  }
  round_all(r.act, g.router_weight);
  round_all(r.act, g.router_bias);

  // dx = round(dx_r + dx_s + dgate w_g + dz W_r).
  g.x.assign(static_cast<size_t>(T) * H, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) {
      double acc = dx_routed[t * H + h];
      if (s.has_shared) acc += dx_shared[t * H + h];
      if (s.shared_gate) acc += dgate[t] * p.shared_gate_weight[h];
      double router = 0.0;
      for (int e = 0; e < E; ++e) router += dz[t * E + e] * p.router_weight[static_cast<size_t>(e) * H + h];
      g.x[t * H + h] = apply(r.act, acc + router);
    }
  return g;
}

double layer_objective(const LayerProblem& p, const LayerForward& base, const std::vector<double>& dy,
                       double aux_coeff) {
  LayerForward f;
  f.logits = projection(p);
  f.router.indices = base.router.indices;
  f.plan = base.plan;
  forward_routed(p, LayerRounding{}, f);
  double j = 0.0;
  for (size_t i = 0; i < f.y.size(); ++i) j += dy[i] * f.y[i];
  if (aux_coeff != 0.0)
    j += router_objective(p.spec.router, p.num_tokens, f.logits,
                          p.correction_bias.empty() ? nullptr : &p.correction_bias, p.mask.empty() ? nullptr : &p.mask,
                          base.router.indices, nullptr, aux_coeff, base.router.load, base.router.token_count);
  return j;
}

}  // namespace moekit::ref
