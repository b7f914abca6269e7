#include "tests/reference/experts_ref.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace moekit::ref {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

double apply(const Rounder& round, double x) { return round ? round(x) : x; }

bool clamps(const ActSpec& s) {
  return s.kind == kQuickGeglu || ((s.kind == kSwiglu || s.kind == kSwigluOai) && s.limit > 0.0);
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Segment [begin, end) of expert e with the library's clamping of out-of-range offsets.
void segment(const ExpertsProblem& p, int e, int64_t* begin, int64_t* end) {
  const int64_t R = p.max_rows;
  *begin = std::min<int64_t>(std::max<int64_t>(p.offsets[e], 0), R);
  *end = std::min<int64_t>(std::max<int64_t>(p.offsets[e + 1], *begin), R);
}

double weight_of(const ExpertsProblem& p, int64_t r) {
  return p.row_weights.empty() ? 1.0 : p.row_weights[r];
}

// Unrounded u of row r (expert e), all NU columns.
std::vector<double> pre_activation(const ExpertsProblem& p, int e, int64_t r) {
  const int H = p.hidden, NU = p.nu();
  std::vector<double> u(NU, 0.0);
  const double* w = &p.w_gate_up[static_cast<size_t>(e) * H * NU];
  for (int k = 0; k < H; ++k) {
    const double x = p.xp[static_cast<size_t>(r) * H + k];
    if (x == 0.0) continue;
    for (int j = 0; j < NU; ++j) u[j] += x * w[static_cast<size_t>(k) * NU + j];
  }
  if (!p.b_gate_up.empty())
    for (int j = 0; j < NU; ++j) u[j] += p.b_gate_up[static_cast<size_t>(e) * NU + j];
  return u;
}

double activation_at(const ExpertsProblem& p, const double* u, int i) {
  return is_gated(p.act.kind) ? act_gated(p.act, u[p.gate_col(i)], u[p.up_col(i)]) : act_relu2(u[i]);
}

}  // namespace

bool is_gated(int kind) { return kind != kRelu2; }

double act_gated(const ActSpec& s, double g, double v) {
  if (clamps(s)) {
    g = std::min(g, s.limit);
    v = std::max(-s.limit, std::min(v, s.limit));
  }
  switch (s.kind) {
    case kQuickGeglu:
    case kSwigluOai: return g * sigmoid(s.alpha * g) * (v + 1.0);
    case kGeglu: {
      const double c = std::sqrt(2.0 / M_PI);
      return 0.5 * g * (1.0 + std::tanh(c * (g + 0.044715 * g * g * g))) * v;
    }
    default: return g * sigmoid(g) * v;
  }
}

void act_gated_grad(const ActSpec& s, double g, double v, double* d_gate, double* d_up) {
  double gm = 1.0, vm = 1.0;
  if (clamps(s)) {
    gm = g <= s.limit ? 1.0 : 0.0;
    vm = (v >= -s.limit && v <= s.limit) ? 1.0 : 0.0;
    g = std::min(g, s.limit);
    v = std::max(-s.limit, std::min(v, s.limit));
  }
  switch (s.kind) {
    case kQuickGeglu:
    case kSwigluOai: {
      const double sg = sigmoid(s.alpha * g);
      *d_gate = (sg + s.alpha * g * sg * (1.0 - sg)) * (v + 1.0) * gm;
      *d_up = g * sg * vm;
      return;
    }
    case kGeglu: {
      const double c = std::sqrt(2.0 / M_PI);
      const double t = std::tanh(c * (g + 0.044715 * g * g * g));
      const double dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g);
      *d_gate = dgelu * v * gm;
      *d_up = 0.5 * g * (1.0 + t) * vm;
      return;
    }
    default: {
      const double sg = sigmoid(g);
      *d_gate = (sg + g * sg * (1.0 - sg)) * v * gm;
      *d_up = g * sg * vm;
      return;
    }
  }
}

double act_relu2(double u) { return u > 0.0 ? u * u : 0.0; }
double act_relu2_grad(double u) { return u > 0.0 ? 2.0 * u : 0.0; }

ExpertsForwardResult experts_forward(const ExpertsProblem& p, const Rounder& round) {
  const int E = p.num_experts, H = p.hidden, I = p.inter, NU = p.nu();
  const int64_t R = p.max_rows;
  ExpertsForwardResult res;
  res.u.assign(static_cast<size_t>(R) * NU, kNaN);
  res.h.assign(static_cast<size_t>(R) * I, kNaN);
  res.out.assign(static_cast<size_t>(R) * H, kNaN);
  for (int e = 0; e < E; ++e) {
    int64_t begin, end;
    segment(p, e, &begin, &end);
    const double* wd = &p.w_down[static_cast<size_t>(e) * I * H];
    for (int64_t r = begin; r < end; ++r) {
      const double pr = weight_of(p, r);
      const std::vector<double> u = pre_activation(p, e, r);
      for (int j = 0; j < NU; ++j) res.u[static_cast<size_t>(r) * NU + j] = apply(round, u[j]);
      // The activation reads the unrounded accumulator (the GEMM epilogue never rounds u).
      std::vector<double> h(I);
      for (int i = 0; i < I; ++i) {
        const double a = activation_at(p, u.data(), i);
        h[i] = apply(round, p.weight_after_down ? a : a * pr);
        res.h[static_cast<size_t>(r) * I + i] = h[i];
      }
      for (int c = 0; c < H; ++c) {
        double acc = 0.0;
        for (int i = 0; i < I; ++i) acc += h[i] * wd[static_cast<size_t>(i) * H + c];
        const double b = p.b_down.empty() ? 0.0 : p.b_down[static_cast<size_t>(e) * H + c];
        const double o = p.weight_after_down ? pr * (acc + b) : acc + pr * b;
        res.out[static_cast<size_t>(r) * H + c] = apply(round, o);
      }
    }
  }
  return res;
}

ExpertsBackwardResult experts_backward(const ExpertsProblem& p, const std::vector<double>& u,
                                       const std::vector<double>& grad_out, const Rounder& round) {
  const int E = p.num_experts, H = p.hidden, I = p.inter, NU = p.nu();
  const int64_t R = p.max_rows;
  const bool gated = is_gated(p.act.kind);
  ExpertsBackwardResult res;
  res.grad_xp.assign(static_cast<size_t>(R) * H, kNaN);
  res.grad_row_weights.assign(static_cast<size_t>(R), kNaN);
  res.du.assign(static_cast<size_t>(R) * NU, kNaN);
  res.grad_w_gate_up.assign(static_cast<size_t>(E) * H * NU, 0.0);
  res.grad_b_gate_up.assign(static_cast<size_t>(E) * NU, 0.0);
  res.grad_w_down.assign(static_cast<size_t>(E) * I * H, 0.0);
  res.grad_b_down.assign(static_cast<size_t>(E) * H, 0.0);
  for (int e = 0; e < E; ++e) {
    int64_t begin, end;
    segment(p, e, &begin, &end);
    const double* wgu = &p.w_gate_up[static_cast<size_t>(e) * H * NU];
    const double* wd = &p.w_down[static_cast<size_t>(e) * I * H];
    for (int64_t r = begin; r < end; ++r) {
      const double pr = weight_of(p, r);
      const double* ur = &u[static_cast<size_t>(r) * NU];
      const double* dy = &grad_out[static_cast<size_t>(r) * H];
      // G = dy W_down^T
      std::vector<double> G(I, 0.0);
      for (int i = 0; i < I; ++i) {
        double acc = 0.0;
        for (int c = 0; c < H; ++c) acc += dy[c] * wd[static_cast<size_t>(i) * H + c];
        G[i] = acc;
      }
      double dp = 0.0;
      std::vector<double> du(NU, 0.0), hprime(I);
      for (int i = 0; i < I; ++i) {
        double a;
        if (gated) {
          const double g = ur[p.gate_col(i)], v = ur[p.up_col(i)];
          a = act_gated(p.act, g, v);
          double dg, dv;
          act_gated_grad(p.act, g, v, &dg, &dv);
          du[p.gate_col(i)] = apply(round, dg * pr * G[i]);
          du[p.up_col(i)] = apply(round, dv * pr * G[i]);
        } else {
          a = act_relu2(ur[i]);
          du[i] = apply(round, act_relu2_grad(ur[i]) * pr * G[i]);
        }
        dp += G[i] * a;
        hprime[i] = apply(round, a * pr);
      }
      if (!p.b_down.empty())
        for (int c = 0; c < H; ++c) dp += dy[c] * p.b_down[static_cast<size_t>(e) * H + c];
      res.grad_row_weights[r] = dp;
      for (int j = 0; j < NU; ++j) res.du[static_cast<size_t>(r) * NU + j] = du[j];
      // dxp = du W_gu^T
      for (int k = 0; k < H; ++k) {
        double acc = 0.0;
        for (int j = 0; j < NU; ++j) acc += du[j] * wgu[static_cast<size_t>(k) * NU + j];
        res.grad_xp[static_cast<size_t>(r) * H + k] = acc;
      }
      // weight and bias gradients
      const double* x = &p.xp[static_cast<size_t>(r) * H];
      for (int k = 0; k < H; ++k) {
        if (x[k] == 0.0) continue;
        double* dw = &res.grad_w_gate_up[(static_cast<size_t>(e) * H + k) * NU];
        for (int j = 0; j < NU; ++j) dw[j] += x[k] * du[j];
      }
      for (int j = 0; j < NU; ++j) res.grad_b_gate_up[static_cast<size_t>(e) * NU + j] += du[j];
      for (int i = 0; i < I; ++i) {
        if (hprime[i] == 0.0) continue;
        double* dw = &res.grad_w_down[(static_cast<size_t>(e) * I + i) * H];
        for (int c = 0; c < H; ++c) dw[c] += hprime[i] * dy[c];
      }
      for (int c = 0; c < H; ++c) res.grad_b_down[static_cast<size_t>(e) * H + c] += pr * dy[c];
    }
  }
  return res;
}

double experts_loss(const ExpertsProblem& p, const std::vector<double>& grad_out) {
  const ExpertsForwardResult f = experts_forward(p, nullptr);
  double loss = 0.0;
  for (size_t i = 0; i < f.out.size(); ++i)
    if (!std::isnan(f.out[i])) loss += f.out[i] * grad_out[i];
  return loss;
}

std::vector<double> transpose(const std::vector<double>& m, int64_t rows, int64_t cols) {
  std::vector<double> t(m.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[static_cast<size_t>(c) * rows + r] = m[static_cast<size_t>(r) * cols + c];
  return t;
}

}  // namespace moekit::ref
