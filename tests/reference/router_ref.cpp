#include "tests/reference/router_ref.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace moekit::ref {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kEps = 1e-20;

int resolved_group_score(const moekit_router_config_t& c, bool has_bias) {
  if (c.group_score != MOEKIT_GROUP_SCORE_AUTO) return c.group_score;
  return has_bias ? MOEKIT_GROUP_SCORE_TOP2_SUM : MOEKIT_GROUP_SCORE_MAX;
}

bool topk_then_softmax(const moekit_router_config_t& c) {
  return c.score_func == MOEKIT_SCORE_SOFTMAX && c.softmax_order == MOEKIT_TOPK_THEN_SOFTMAX;
}

bool normalizing(const moekit_router_config_t& c) { return c.normalize != 0 && c.top_k > 1; }

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

double softplus(double z) { return std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z))); }

// Softmax with the maximum taken over the non-NaN entries (a NaN entry makes every value NaN, an
// all -inf row gives NaN: the IEEE results of exp(z - max) / sum, as on the device).
std::vector<double> softmax(const std::vector<double>& z) {
  double m = -kInf;
  for (double v : z)
    if (!std::isnan(v)) m = std::max(m, v);
  std::vector<double> e(z.size());
  double sum = 0.0;
  for (size_t i = 0; i < z.size(); ++i) {
    e[i] = std::exp(z[i] - m);
    sum += e[i];
  }
  for (double& v : e) v /= sum;
  return e;
}

// The per-token values every router piece derives from the logits.
struct Scores {
  std::vector<double> s;       // score
  std::vector<double> sel;     // selection value before groups (unsanitised)
  std::vector<double> source;  // weight source: s, s + b (weights_use_bias) or z (top-k softmax)
  std::vector<double> q;       // aux source before normalisation
};

Scores scores_of(const moekit_router_config_t& c, const double* z, const float* bias) {
  const int E = c.num_experts;
  Scores r;
  std::vector<double> zz(z, z + E);
  const bool tks = topk_then_softmax(c);
  if (c.score_func == MOEKIT_SCORE_SOFTMAX) {
    r.s = softmax(zz);
  } else {
    r.s.resize(E);
    for (int e = 0; e < E; ++e)
      r.s[e] = c.score_func == MOEKIT_SCORE_SIGMOID ? sigmoid(zz[e]) : std::sqrt(softplus(zz[e]));
  }
  r.sel.resize(E);
  r.source.resize(E);
  r.q.resize(E);
  for (int e = 0; e < E; ++e) {
    const double b = bias ? static_cast<double>(bias[e]) : 0.0;
    r.sel[e] = (tks ? zz[e] : r.s[e]) + b;
    r.source[e] = tks ? zz[e] : (c.weights_use_bias ? r.s[e] + b : r.s[e]);
    r.q[e] = c.weights_use_bias ? r.s[e] + b : r.s[e];
  }
  return r;
}

double sanitize(double v) { return std::isnan(v) ? -kInf : v; }

// Indices of the k largest values, (value desc, index asc).
std::vector<int32_t> top_indices(const std::vector<double>& v, int k) {
  std::vector<int32_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  order.resize(k);
  return order;
}

// Group scores from the sanitised selection values, the kept groups, and the masked values.
void apply_groups(const moekit_router_config_t& c, bool has_bias, std::vector<double>& sel,
                  std::vector<double>* group_scores, std::vector<int32_t>* kept) {
  const int E = c.num_experts, G = c.num_groups;
  if (G <= 1) return;
  const int S = E / G;
  const int gs = resolved_group_score(c, has_bias);
  const int n = gs == MOEKIT_GROUP_SCORE_MAX ? 1 : gs == MOEKIT_GROUP_SCORE_TOP2_SUM ? 2 : c.group_score_topn;
  std::vector<double> score(G);
  for (int g = 0; g < G; ++g) {
    std::vector<double> members(sel.begin() + g * S, sel.begin() + (g + 1) * S);
    std::sort(members.begin(), members.end(), std::greater<double>());
    double sum = 0.0;
    for (int i = 0; i < std::min(n, S); ++i) sum += members[i];  // descending order
    score[g] = sanitize(sum);
  }
  std::vector<int32_t> k = top_indices(score, c.num_groups_kept);
  std::vector<bool> keep(G, false);
  for (int32_t g : k) keep[g] = true;
  const double mask = c.group_mask == MOEKIT_GROUP_MASK_NEG_INF ? -kInf : 0.0;
  for (int e = 0; e < E; ++e)
    if (!keep[e / S]) sel[e] = mask;
  if (group_scores) *group_scores = score;
  if (kept) *kept = k;
}

// Weights (before route scale and normalisation) of the picked experts.
std::vector<double> raw_weights(const moekit_router_config_t& c, const Scores& sc,
                                const std::vector<int32_t>& idx) {
  const int K = static_cast<int>(idx.size());
  const int E = c.num_experts;
  std::vector<double> u(K, 0.0);
  if (topk_then_softmax(c)) {
    std::vector<double> picked;
    for (int k = 0; k < K; ++k)
      if (idx[k] >= 0 && idx[k] < E) picked.push_back(sc.source[idx[k]]);
    const std::vector<double> p = softmax(picked);
    for (int k = 0, j = 0; k < K; ++k)
      if (idx[k] >= 0 && idx[k] < E) u[k] = p[j++];
  } else {
    for (int k = 0; k < K; ++k)
      if (idx[k] >= 0 && idx[k] < E) u[k] = sc.source[idx[k]];
  }
  return u;
}

std::vector<double> final_weights(const moekit_router_config_t& c, std::vector<double> u) {
  if (normalizing(c)) {
    double sum = 0.0;
    for (double v : u) sum += v;
    for (double& v : u) v /= sum + kEps;
  }
  for (double& v : u) v *= static_cast<double>(c.route_scale);
  return u;
}

std::vector<double> aux_scores(const moekit_router_config_t& c, const Scores& sc) {
  std::vector<double> p = sc.q;
  if (normalizing(c)) {
    double sum = 0.0;
    for (double v : p) sum += v;
    for (double& v : p) v /= sum + kEps;
  }
  return p;
}

std::vector<double> to_double(const float* z, int n) { return std::vector<double>(z, z + n); }

}  // namespace

RouterRow router_row(const moekit_router_config_t& c, const float* z, const float* bias) {
  const std::vector<double> zd = to_double(z, c.num_experts);
  const Scores sc = scores_of(c, zd.data(), bias);
  RouterRow row;
  row.scores = sc.s;
  row.selection = sc.sel;
  for (double& v : row.selection) v = sanitize(v);
  apply_groups(c, bias != nullptr, row.selection, &row.group_scores, &row.kept_groups);
  row.indices = top_indices(row.selection, c.top_k);
  row.weights = final_weights(c, raw_weights(c, sc, row.indices));
  row.aux_scores = aux_scores(c, sc);
  return row;
}

RouterForward router_forward(const moekit_router_config_t& c, int64_t T, const std::vector<float>& logits,
                             const std::vector<float>* bias, const std::vector<uint8_t>* mask) {
  const int E = c.num_experts, K = c.top_k;
  RouterForward out;
  out.weights.resize(static_cast<size_t>(T) * K);
  out.indices.resize(static_cast<size_t>(T) * K);
  out.load.assign(E, 0);
  out.score_sum.assign(E, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const RouterRow row = router_row(c, logits.data() + t * E, bias ? bias->data() : nullptr);
    for (int k = 0; k < K; ++k) {
      out.weights[t * K + k] = row.weights[k];
      out.indices[t * K + k] = row.indices[k];
    }
    if (mask == nullptr || (*mask)[t] != 0) {
      out.token_count++;
      for (int k = 0; k < K; ++k) out.load[row.indices[k]]++;
      for (int e = 0; e < E; ++e) out.score_sum[e] += row.aux_scores[e];
    }
  }
  return out;
}

double selection_margin(const moekit_router_config_t& c, const float* z, const float* bias) {
  const int E = c.num_experts, K = c.top_k;
  const std::vector<double> zd = to_double(z, E);
  const Scores sc = scores_of(c, zd.data(), bias);
  std::vector<double> sel = sc.sel;
  for (double& v : sel) v = sanitize(v);
  double margin = kInf;
  // Equal selection values come from equal inputs (the device ties them too); equal group scores
  // may be sums of different values, which fp32 need not tie: those count as no margin.
  auto gap = [&](double a, double b, bool exact_tie_ok) {
    if (std::isinf(a) || std::isinf(b)) return;
    if (a == b && exact_tie_ok) return;
    margin = std::min(margin, std::fabs(a - b) / (std::max(std::fabs(a), std::fabs(b)) + 1e-3));
  };
  std::vector<double> gscores;
  std::vector<int32_t> kept;
  apply_groups(c, bias != nullptr, sel, &gscores, &kept);
  if (c.num_groups > 1 && c.num_groups_kept < c.num_groups) {
    std::vector<double> g = gscores;
    std::sort(g.begin(), g.end(), std::greater<double>());
    gap(g[c.num_groups_kept - 1], g[c.num_groups_kept], false);
  }
  std::vector<double> v = sel;
  std::sort(v.begin(), v.end(), std::greater<double>());
  for (int r = 0; r < K && r + 1 < E; ++r) gap(v[r], v[r + 1], true);
  return margin;
}

double aux_loss(int32_t E, int32_t K, const std::vector<int64_t>& load, const std::vector<double>& score_sum,
                int64_t token_count) {
  const double n = static_cast<double>(std::max<int64_t>(token_count, 1));
  double aux = 0.0;
  for (int e = 0; e < E; ++e)
    aux += (static_cast<double>(load[e]) * E / (K * n)) * (score_sum[e] / n);
  return aux;
}

double router_objective(const moekit_router_config_t& c, int64_t T, const std::vector<double>& logits,
                        const std::vector<float>* bias, const std::vector<uint8_t>* mask,
                        const std::vector<int32_t>& indices, const std::vector<float>* grad_weights,
                        double coeff, const std::vector<int64_t>& load, int64_t token_count) {
  const int E = c.num_experts, K = c.top_k;
  const double n = static_cast<double>(std::max<int64_t>(token_count, 1));
  double j = 0.0;
  std::vector<double> S(E, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const Scores sc = scores_of(c, logits.data() + t * E, bias ? bias->data() : nullptr);
    const std::vector<int32_t> idx(indices.begin() + t * K, indices.begin() + (t + 1) * K);
    const std::vector<double> w = final_weights(c, raw_weights(c, sc, idx));
    if (grad_weights)
      for (int k = 0; k < K; ++k) j += static_cast<double>((*grad_weights)[t * K + k]) * w[k];
    if (mask == nullptr || (*mask)[t] != 0) {
      const std::vector<double> p = aux_scores(c, sc);
      for (int e = 0; e < E; ++e) S[e] += p[e];
    }
  }
  if (coeff != 0.0)
    for (int e = 0; e < E; ++e) j += coeff * (static_cast<double>(load[e]) * E / (K * n)) * (S[e] / n);
  return j;
}

std::vector<double> router_backward(const moekit_router_config_t& c, int64_t T, const std::vector<double>& logits,
                                    const std::vector<float>* bias, const std::vector<uint8_t>* mask,
                                    const std::vector<int32_t>& indices, const std::vector<float>* grad_weights,
                                    double coeff, const std::vector<int64_t>& load, int64_t token_count) {
  const int E = c.num_experts, K = c.top_k;
  const bool tks = topk_then_softmax(c);
  const double n = static_cast<double>(std::max<int64_t>(token_count, 1));
  std::vector<double> grad(static_cast<size_t>(T) * E, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const double* z = logits.data() + t * E;
    const Scores sc = scores_of(c, z, bias ? bias->data() : nullptr);
    std::vector<int32_t> idx(indices.begin() + t * K, indices.begin() + (t + 1) * K);
    std::vector<bool> valid(K);
    for (int k = 0; k < K; ++k) valid[k] = idx[k] >= 0 && idx[k] < E;
    const std::vector<double> u = raw_weights(c, sc, idx);
    // through route scale and normalisation
    std::vector<double> gu(K, 0.0);
    for (int k = 0; k < K; ++k)
      gu[k] = valid[k] && grad_weights ? static_cast<double>(c.route_scale) * (*grad_weights)[t * K + k] : 0.0;
    if (normalizing(c)) {
      double sum = 0.0;
      for (double v : u) sum += v;
      const double d = sum + kEps;
      double dot = 0.0;
      for (int k = 0; k < K; ++k) dot += gu[k] * u[k] / d;
      for (int k = 0; k < K; ++k) gu[k] = valid[k] ? (gu[k] - dot) / d : 0.0;
    }
    std::vector<double> gs(E, 0.0), direct(E, 0.0);
    if (tks) {  // u = softmax over the picked logits
      double dot = 0.0;
      for (int k = 0; k < K; ++k) dot += gu[k] * u[k];
      for (int k = 0; k < K; ++k)
        if (valid[k]) direct[idx[k]] += u[k] * (gu[k] - dot);
    } else {
      for (int k = 0; k < K; ++k)
        if (valid[k]) gs[idx[k]] += gu[k];  // d source / d s = 1 (also s + b)
    }
    // aux term through p
    if (coeff != 0.0 && (mask == nullptr || (*mask)[t] != 0)) {
      std::vector<double> a(E);
      for (int e = 0; e < E; ++e) a[e] = coeff * static_cast<double>(load[e]) * E / (K * n * n);
      if (normalizing(c)) {
        double sum = 0.0;
        for (double v : sc.q) sum += v;
        const double d = sum + kEps;
        double dot = 0.0;
        for (int e = 0; e < E; ++e) dot += a[e] * sc.q[e] / d;
        for (int e = 0; e < E; ++e) gs[e] += (a[e] - dot) / d;
      } else {
        for (int e = 0; e < E; ++e) gs[e] += a[e];
      }
    }
    // through the score function
    double* g = grad.data() + t * E;
    if (c.score_func == MOEKIT_SCORE_SOFTMAX) {
      double dot = 0.0;
      for (int e = 0; e < E; ++e) dot += gs[e] * sc.s[e];
      for (int e = 0; e < E; ++e) g[e] = sc.s[e] * (gs[e] - dot) + direct[e];
    } else if (c.score_func == MOEKIT_SCORE_SIGMOID) {
      for (int e = 0; e < E; ++e) g[e] = gs[e] * sc.s[e] * (1.0 - sc.s[e]);
    } else {
      for (int e = 0; e < E; ++e) {
        const double s = sc.s[e];
        const double ds = s > 0.0 ? sigmoid(z[e]) / (2.0 * s) : 0.5 * std::exp(0.5 * z[e]);
        g[e] = gs[e] * ds;
      }
    }
  }
  return grad;
}

// ---- the backward in the kernels' evaluation order ----------------------------------------------
namespace {

// A value (in double) and a bound on the error of evaluating it with unit roundoff 2^-kBits:
// kBits = 24 for the device's fp32 operations (reductions by the kernels' trees), 53 for this
// file's double evaluation of router_backward (sequential sums).
template <int kBits>
struct Bounded {
  static constexpr double kUnit = kBits == 24 ? 0x1p-24 : 0x1p-53;
  static constexpr double kFlushed = kBits == 24 ? 0x1p-126 : 0x1p-1022;  // flushed / denormal results
  double v = 0.0;
  double e = 0.0;
};
using Dev = Bounded<24>;
using Ref = Bounded<53>;

// One rounded result of magnitude about |v| that already carries error e.
template <int B>
Bounded<B> rounded(double v, double e) {
  const double r = e + Bounded<B>::kUnit * (std::fabs(v) + e);
  return {v, std::isnan(r) ? kInf : r};
}
// An fp32 operation on exact operands whose exact result is an fp32 number (a normal one, or
// zero) makes no error: route_scale 1 times a weight, or the difference of two gradients within a
// factor of two (Sterbenz). Without this the bound of a small difference of nearly equal
// gradients is dominated by errors that never happen. The double result must itself be exact
// (two-sum / fma residual 0) before its fp32 representability says anything.
template <int B>
bool exact_in_fp32(Bounded<B> a, Bounded<B> b, double v, double residual) {
  if (B != 24 || a.e != 0.0 || b.e != 0.0 || residual != 0.0 || static_cast<double>(static_cast<float>(v)) != v)
    return false;
  return v == 0.0 || std::fabs(v) >= Bounded<B>::kFlushed;
}
template <int B>
Bounded<B> operator+(Bounded<B> a, Bounded<B> b) {
  const double v = a.v + b.v, bv = v - a.v, residual = (a.v - (v - bv)) + (b.v - bv);
  if (exact_in_fp32(a, b, v, residual)) return {v, 0.0};
  return rounded<B>(v, a.e + b.e);
}
template <int B>
Bounded<B> operator-(Bounded<B> a, Bounded<B> b) { return a + Bounded<B>{-b.v, b.e}; }
template <int B>
Bounded<B> operator*(Bounded<B> a, Bounded<B> b) {
  const double v = a.v * b.v;
  if (exact_in_fp32(a, b, v, std::fma(a.v, b.v, -v))) return {v, 0.0};
  return rounded<B>(v, std::fabs(a.v) * b.e + std::fabs(b.v) * a.e + a.e * b.e + Bounded<B>::kFlushed);
}
// |a / b - (a + da) / (b + db)| <= (|da| + |a / b| |db|) / (|b| - |db|)
template <int B>
double quotient_error(Bounded<B> a, Bounded<B> b) {
  const double room = std::fabs(b.v) - b.e;
  if (!(room > 0.0)) return kInf;
  return (a.e + std::fabs(a.v / b.v) * b.e) / room;
}
template <int B>
Bounded<B> operator/(Bounded<B> a, Bounded<B> b) {
  return rounded<B>(a.v / b.v, quotient_error(a, b) + Bounded<B>::kFlushed);
}

// The operations the kernels use, for double (exact maths), float (fp32 with IEEE functions) and
// Bounded (value and error bound).
double to_double(double x) { return x; }
double to_double(float x) { return x; }
template <int B>
double to_double(Bounded<B> x) { return x.v; }

template <class N>
struct Num {
  static N constant(double x) { return static_cast<N>(x); }  // x is an fp32 value
};
template <int B>
struct Num<Bounded<B>> {
  static Bounded<B> constant(double x) { return {x, 0.0}; }
};
template <class N>
N constant(double x) { return Num<N>::constant(x); }

// __expf(x) = ex2.approx(x log2 e): within 2 + floor(1.173 |x|) ulp of e^x (CUDA C Programming
// Guide, intrinsic functions); an ulp is at most 2 u relative; flushed below 2^-126.
double dev_exp(double x) { return std::exp(x); }
float dev_exp(float x) { return std::exp(x); }
template <int B>
Bounded<B> dev_exp(Bounded<B> x) {
  if (std::isinf(x.v) && x.v < 0.0) return {0.0, 0.0};
  const double v = std::exp(x.v);
  const double grown = std::exp(x.v + x.e);  // the largest value the perturbed input can give
  const double ulps = 2.0 + std::floor(1.173 * (std::fabs(x.v) + x.e));
  const double e = (grown - v) + grown * ulps * 2.0 * Bounded<B>::kUnit + Bounded<B>::kFlushed;
  return {v, std::isnan(e) ? kInf : e};
}
// rcp.approx.ftz.f32: within 1 ulp.
double dev_rcp(double x) { return 1.0 / x; }
float dev_rcp(float x) { return 1.0f / x; }
template <int B>
Bounded<B> dev_rcp(Bounded<B> x) {
  const double v = 1.0 / x.v;
  const double q = quotient_error(Bounded<B>{1.0, 0.0}, x);
  const double e = q + 2.0 * Bounded<B>::kUnit * (std::fabs(v) + q) + Bounded<B>::kFlushed;
  return {v, std::isnan(e) ? kInf : e};
}
// log1pf: within 1 ulp; d log1p(t) = dt / (1 + t).
double dev_log1p(double x) { return std::log1p(x); }
float dev_log1p(float x) { return std::log1p(x); }
template <int B>
Bounded<B> dev_log1p(Bounded<B> x) {
  const double v = std::log1p(x.v);
  const double room = 1.0 + x.v - x.e;
  const double prop = room > 0.0 ? x.e / room : kInf;
  return {v, prop + 2.0 * Bounded<B>::kUnit * (std::fabs(v) + prop)};
}
// sqrtf (IEEE): sqrt(y + dy) - sqrt(y) <= min(dy / (2 sqrt y), sqrt(dy)).
double dev_sqrt(double x) { return std::sqrt(x); }
float dev_sqrt(float x) { return std::sqrt(x); }
template <int B>
Bounded<B> dev_sqrt(Bounded<B> x) {
  const double v = std::sqrt(std::max(x.v, 0.0));
  const double prop = v > 0.0 ? std::min(x.e / (2.0 * v), std::sqrt(x.e)) : std::sqrt(x.e);
  return rounded<B>(v, prop);
}
double dev_max(double a, double b) { return std::fmax(a, b); }
float dev_max(float a, float b) { return std::fmax(a, b); }
template <int B>
Bounded<B> dev_max(Bounded<B> a, Bounded<B> b) {
  if (std::isnan(a.v)) return b;
  if (std::isnan(b.v)) return a;
  return {std::max(a.v, b.v), std::max(a.e, b.e)};
}
double dev_abs(double x) { return std::fabs(x); }
float dev_abs(float x) { return std::fabs(x); }
template <int B>
Bounded<B> dev_abs(Bounded<B> x) { return {std::fabs(x.v), x.e}; }

// A reduction: pairwise in fp32 here; the bound holds for every summation of the n nonzero terms
// whose terms go through at most d roundings: gamma_d sum |x| (plus each term's own error). On the
// device d <= min(n - 1, ceil(n / 32) + 37): a fast-path lane adds at most 2 V = 32 of its own
// terms (the selection and aux parts of <ds, s>), then log2(TPT) <= 5 butterfly steps; a generic
// lane ceil(n / 32), then 5. The double reference sums in sequence: d = n - 1.
template <int B>
int sum_depth(size_t n) {
  if (n <= 1) return 0;
  if (B != 24) return static_cast<int>(n - 1);
  return static_cast<int>(std::min(n - 1, (n + 31) / 32 + 37));
}
double dev_sum(const std::vector<double>& x) {
  double s = 0.0;
  for (double v : x) s += v;
  return s;
}
float pairwise(const float* x, size_t n) {
  if (n == 0) return 0.0f;
  if (n == 1) return x[0];
  return pairwise(x, n / 2) + pairwise(x + n / 2, n - n / 2);
}
float dev_sum(const std::vector<float>& x) { return pairwise(x.data(), x.size()); }
template <int B>
Bounded<B> dev_sum(const std::vector<Bounded<B>>& x) {
  double v = 0.0, e = 0.0, mag = 0.0;
  size_t nonzero = 0;
  for (const Bounded<B>& b : x) {
    v += b.v;
    e += b.e;
    mag += std::fabs(b.v) + b.e;
    if (b.v != 0.0 || b.e != 0.0) ++nonzero;
  }
  const double d = sum_depth<B>(nonzero) * Bounded<B>::kUnit;
  const double r = e + (d < 1.0 ? d / (1.0 - d) : kInf) * mag;
  return {v, std::isnan(r) ? kInf : r};
}

// The scores of kernels/router/common.cuh (lane_scores / RowScore).
template <class N>
std::vector<N> device_scores(const moekit_router_config_t& c, const double* z, bool full_softmax) {
  const int E = c.num_experts;
  std::vector<N> s(E, constant<N>(0.0));
  if (c.score_func == MOEKIT_SCORE_SOFTMAX) {
    if (!full_softmax) return s;
    N mx = constant<N>(-kInf);
    for (int e = 0; e < E; ++e) mx = dev_max(mx, constant<N>(z[e]));
    std::vector<N> ex(E);
    for (int e = 0; e < E; ++e) ex[e] = dev_exp(constant<N>(z[e]) - mx);
    const N inv = constant<N>(1.0) / dev_sum(ex);
    for (int e = 0; e < E; ++e) s[e] = ex[e] * inv;
  } else if (c.score_func == MOEKIT_SCORE_SIGMOID) {
    for (int e = 0; e < E; ++e) s[e] = dev_rcp(constant<N>(1.0) + dev_exp(constant<N>(-z[e])));
  } else {
    for (int e = 0; e < E; ++e) {
      const N x = constant<N>(z[e]);
      s[e] = dev_sqrt(dev_max(x, constant<N>(0.0)) + dev_log1p(dev_exp(constant<N>(0.0) - dev_abs(x))));
    }
  }
  return s;
}

// d sqrt(softplus(z)) / dz as sqrt_softplus_grad computes it.
template <class N>
N sqrt_softplus_slope(double z, N s) {
  if (z < -20.0) return constant<N>(0.5) * dev_exp(constant<N>(0.5) * constant<N>(z));
  return dev_rcp(constant<N>(1.0) + dev_exp(constant<N>(-z))) * dev_rcp(constant<N>(2.0) * s);
}

// The rank whose gradient the kernels subtract first: the largest valid u, the lowest rank on ties
// (-1: none). Its own difference g - c is exactly 0 (c is a copy of g there), which the bound must
// know: the two operands' errors are the same error, not independent ones.
template <class N>
int shift_rank(const std::vector<N>& u, const std::vector<bool>& valid) {
  int best = -1;
  for (size_t k = 0; k < u.size(); ++k)
    if (valid[k] && (best < 0 || to_double(u[k]) > to_double(u[best]))) best = static_cast<int>(k);
  return best;
}

// kernels_order: the kernels' evaluation order; otherwise the textbook order of router_backward
// (no shifts, the softmax's <ds, s> over every term, the aux mean subtracted as it is), used to
// bound the double reference's own rounding.
template <class N>
void backward_in_order(const moekit_router_config_t& c, int64_t T, const std::vector<double>& logits,
                       const std::vector<float>* bias, const std::vector<uint8_t>* mask,
                       const std::vector<int32_t>& indices, const std::vector<float>* grad_weights, double coeff,
                       const std::vector<int64_t>& load, int64_t token_count, bool kernels_order, std::vector<N>& out) {
  const int E = c.num_experts, K = c.top_k;
  const bool tks = topk_then_softmax(c);
  const bool norm = normalizing(c);
  const bool softmax = c.score_func == MOEKIT_SCORE_SOFTMAX;
  const bool wub = c.weights_use_bias != 0;
  const bool aux_on = static_cast<float>(coeff) != 0.0f;
  const bool full_softmax = softmax && (!tks || aux_on);
  const N zero = constant<N>(0.0), eps20 = constant<N>(static_cast<double>(1e-20f));
  auto b_at = [&](int e) { return constant<N>(bias ? static_cast<double>((*bias)[e]) : 0.0); };
  // aux_scale (kernels/router/backward.cuh)
  N scale = zero, lref = zero, aref = zero;
  if (aux_on) {
    const N np = constant<N>(static_cast<double>(static_cast<float>(std::max<int64_t>(token_count, 1))));
    const N Ef = constant<N>(E), Kf = constant<N>(K);
    scale = constant<N>(static_cast<double>(static_cast<float>(coeff))) * Ef / (Kf * np * np);
    if (kernels_order) {
      lref = Kf * constant<N>(static_cast<double>(static_cast<float>(std::max<int64_t>(token_count, 0)))) / Ef;
      aref = scale * lref;
    }
  }
  out.assign(static_cast<size_t>(T) * E, zero);
  for (int64_t t = 0; t < T; ++t) {
    const double* z = logits.data() + t * E;
    const bool m = mask == nullptr || (*mask)[t] != 0;
    const std::vector<N> s = device_scores<N>(c, z, full_softmax);
    // weights gradient per rank
    std::vector<bool> valid(K);
    std::vector<int> idx(K);
    std::vector<N> u(K, zero), gv(K, zero);
    for (int k = 0; k < K; ++k) {
      idx[k] = indices[t * K + k];
      valid[k] = idx[k] >= 0 && idx[k] < E;
      if (!valid[k]) continue;
      u[k] = tks ? constant<N>(z[idx[k]]) : (wub ? s[idx[k]] + b_at(idx[k]) : s[idx[k]]);
      if (grad_weights)
        gv[k] = constant<N>(static_cast<double>(c.route_scale)) *
                constant<N>(static_cast<double>((*grad_weights)[t * K + k]));
    }
    if (tks) {
      N mx = constant<N>(-kInf);
      for (int k = 0; k < K; ++k)
        if (valid[k]) mx = dev_max(mx, u[k]);
      for (int k = 0; k < K; ++k) u[k] = valid[k] ? dev_exp(u[k] - mx) : zero;
      const N sum = dev_sum(u);
      for (int k = 0; k < K; ++k) u[k] = u[k] / sum;
    }
    // The gradients shifted by the one at the largest u (kernels' order; none in the textbook
    // order): delta_k = gv_k - cs, exactly 0 at that rank, and the terms delta_k u_k of <delta, u>.
    N cs = zero;
    std::vector<N> delta(K, zero), terms(K, zero);
    auto shift = [&] {
      const int best = kernels_order ? shift_rank(u, valid) : -1;
      cs = best < 0 ? zero : gv[best];
      for (int k = 0; k < K; ++k) {
        delta[k] = k == best ? zero : gv[k] - cs;
        terms[k] = valid[k] ? delta[k] * u[k] : zero;
      }
    };
    N sel_dot = zero;
    if (norm) {
      const N su = dev_sum(u);
      const N denom = su + eps20;
      shift();
      const N dotp = dev_sum(terms) / denom;
      const N corr = cs * (eps20 / denom);
      for (int k = 0; k < K; ++k) gv[k] = valid[k] ? ((delta[k] - dotp) + corr) / denom : zero;
      if (kernels_order && softmax && !tks) {
        sel_dot = (eps20 / denom) * (cs * (su / denom) + dotp);
        if (wub) {
          std::vector<N> gb(K, zero);
          for (int k = 0; k < K; ++k)
            if (valid[k]) gb[k] = gv[k] * b_at(idx[k]);
          sel_dot = sel_dot - dev_sum(gb);
        }
      }
    }
    if (tks) {
      shift();
      const N d = dev_sum(terms);
      for (int k = 0; k < K; ++k) gv[k] = valid[k] ? u[k] * (delta[k] - d) : zero;
    }
    std::vector<N> g(E, zero);
    for (int k = 0; k < K; ++k)
      if (valid[k]) g[idx[k]] = g[idx[k]] + gv[k];
    // aux part
    const bool drop_constants = kernels_order && softmax;  // the softmax's backward ignores them
    std::vector<N> gq(E, zero);
    if (aux_on) {
      std::vector<N> a(E), q(E);
      for (int e = 0; e < E; ++e) {
        a[e] = scale * (constant<N>(static_cast<double>(static_cast<float>(load[e]))) - lref);
        q[e] = wub ? s[e] + b_at(e) : s[e];
      }
      N inv_q = constant<N>(1.0), dq = zero, corr = zero;
      if (norm) {
        inv_q = constant<N>(1.0) / (dev_sum(q) + eps20);
        if (!drop_constants) {
          std::vector<N> aq(E);
          for (int e = 0; e < E; ++e) aq[e] = a[e] * q[e];
          dq = dev_sum(aq) * inv_q;
          corr = aref * (eps20 * inv_q);
        }
      }
      // softmax: also shifted by a at the largest score (lowest index among equals), whose own
      // difference is exactly 0
      int top = 0;
      for (int e = 1; e < E; ++e)
        if (to_double(s[e]) > to_double(s[top])) top = e;
      if (m)
        for (int e = 0; e < E; ++e)
          gq[e] = drop_constants ? (e == top ? zero : (a[e] - a[top]) * inv_q)
                                 : (norm ? ((a[e] - dq) + corr) * inv_q : a[e] + aref);
    }
    N* dz = out.data() + t * E;
    if (softmax) {
      const bool sel_in_dot = !tks && (!norm || !kernels_order);
      std::vector<N> terms(2 * static_cast<size_t>(E), zero);  // the selection and aux parts
      for (int e = 0; e < E; ++e) {
        if (sel_in_dot) terms[e] = g[e] * s[e];
        if (aux_on && m) terms[E + e] = gq[e] * s[e];
      }
      const N dot = dev_sum(terms) + sel_dot;
      for (int e = 0; e < E; ++e) {
        const N gs = tks ? gq[e] : (aux_on && m ? g[e] + gq[e] : g[e]);
        dz[e] = s[e] * (gs - dot);
        if (tks) dz[e] = dz[e] + g[e];
      }
    } else {
      for (int e = 0; e < E; ++e) {
        const N gs = aux_on && m ? g[e] + gq[e] : g[e];
        const N slope = c.score_func == MOEKIT_SCORE_SIGMOID ? s[e] * (constant<N>(1.0) - s[e])
                                                             : sqrt_softplus_slope(z[e], s[e]);
        dz[e] = gs * slope;
      }
    }
  }
}

}  // namespace

BackwardEvaluation router_backward_device_order(const moekit_router_config_t& c, int64_t T,
                                                const std::vector<double>& logits, const std::vector<float>* bias,
                                                const std::vector<uint8_t>* mask, const std::vector<int32_t>& indices,
                                                const std::vector<float>* grad_weights, double coeff,
                                                const std::vector<int64_t>& load, int64_t token_count,
                                                bool emulations) {
  BackwardEvaluation r;
  if (emulations) {
    backward_in_order<double>(c, T, logits, bias, mask, indices, grad_weights, coeff, load, token_count, true, r.value);
    backward_in_order<float>(c, T, logits, bias, mask, indices, grad_weights, coeff, load, token_count, true, r.fp32);
    backward_in_order<float>(c, T, logits, bias, mask, indices, grad_weights, coeff, load, token_count, false,
                             r.textbook_fp32);
  }
  std::vector<Dev> dev;
  backward_in_order<Dev>(c, T, logits, bias, mask, indices, grad_weights, coeff, load, token_count, true, dev);
  std::vector<Ref> ref;
  backward_in_order<Ref>(c, T, logits, bias, mask, indices, grad_weights, coeff, load, token_count, false, ref);
  r.bound.resize(dev.size());
  r.reference_bound.resize(ref.size());
  for (size_t i = 0; i < dev.size(); ++i) {
    r.bound[i] = dev[i].e;
    r.reference_bound[i] = ref[i].e;
  }
  return r;
}

void bias_update(int32_t E, float rate, bool recenter, std::vector<float>& bias, std::vector<int32_t>& load,
                 bool reset_load) {
  int64_t total = 0;
  for (int e = 0; e < E; ++e) total += load[e];
  for (int e = 0; e < E; ++e) {
    const int64_t d = total - static_cast<int64_t>(E) * load[e];
    if (d > 0) bias[e] = bias[e] + rate;
    if (d < 0) bias[e] = bias[e] - rate;
  }
  if (recenter) {
    double mean = 0.0;
    for (int e = 0; e < E; ++e) mean += bias[e];
    mean /= E;
    for (int e = 0; e < E; ++e) bias[e] = static_cast<float>(bias[e] - mean);
  }
  if (reset_load) std::fill(load.begin(), load.end(), 0);
}

// ---- fake gate: the device's generator and transforms, operation for operation --------------
// Each float operation is one rounded IEEE operation; fused multiply-adds are std::fma exactly
// where the device uses __fmaf_rn, and contraction of the others is switched off.
#if defined(__clang__)
#define MOEKIT_NO_CONTRACT
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#define MOEKIT_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define MOEKIT_NO_CONTRACT
#endif

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += 0x9E3779B9u;
      k[1] += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
  }
  return c;
}

std::array<uint32_t, 4> fake_gate_random(uint64_t seed, uint64_t offset, uint32_t purpose, uint64_t token,
                                         uint32_t block) {
  const uint32_t c3 = static_cast<uint32_t>((token >> 32) & 0xffffu) | ((block & 0x3fffu) << 16) | (purpose << 30);
  return philox4x32_10({static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                        static_cast<uint32_t>(token), c3},
                       {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
}

MOEKIT_NO_CONTRACT float rand_uniform24(uint32_t x) {
  return static_cast<float>(x >> 8) * 5.9604644775390625e-8f;
}

namespace {

MOEKIT_NO_CONTRACT float rand_log(float u) {
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  const uint32_t fb = (bits & 0x7fffffu) | 0x3f800000u;
  float f;
  std::memcpy(&f, &fb, 4);
  if (f > 1.41421354f) {
    f = f * 0.5f;
    e += 1;
  }
  const float s = (f - 1.0f) / (f + 1.0f);
  const float s2 = s * s;
  float p = std::fma(s2, 0.111111112f, 0.142857149f);
  p = std::fma(s2, p, 0.2f);
  p = std::fma(s2, p, 0.333333343f);
  p = std::fma(s2, p, 1.0f);
  const float two_s = 2.0f * s;
  const float ln_f = two_s * p;
  return std::fma(static_cast<float>(e), 0.693147182f, ln_f);
}

MOEKIT_NO_CONTRACT void rand_cos_sin(float u, float* c, float* s) {
  const float x = u * 4.0f;
  const int q = static_cast<int>(x);
  const float frac = x - static_cast<float>(q);
  const float phi = frac * 1.57079637f;
  const float p2 = phi * phi;
  float sp = std::fma(p2, -2.50521079e-8f, 2.75573188e-6f);
  sp = std::fma(p2, sp, -1.98412701e-4f);
  sp = std::fma(p2, sp, 8.33333377e-3f);
  sp = std::fma(p2, sp, -0.166666672f);
  sp = std::fma(p2, sp, 1.0f);
  const float sin_phi = phi * sp;
  float cp = std::fma(p2, 2.08767559e-9f, -2.75573188e-7f);
  cp = std::fma(p2, cp, 2.48015876e-5f);
  cp = std::fma(p2, cp, -1.38888892e-3f);
  cp = std::fma(p2, cp, 4.16666679e-2f);
  cp = std::fma(p2, cp, -0.5f);
  const float cos_phi = std::fma(p2, cp, 1.0f);
  switch (q & 3) {
    case 0: *c = cos_phi; *s = sin_phi; break;
    case 1: *c = -sin_phi; *s = cos_phi; break;
    case 2: *c = -cos_phi; *s = -sin_phi; break;
    default: *c = sin_phi; *s = -cos_phi; break;
  }
}

}  // namespace

MOEKIT_NO_CONTRACT void rand_normal2(uint32_t a, uint32_t b, float* n0, float* n1) {
  const float u1 = static_cast<float>((a >> 8) + 1u) * 5.9604644775390625e-8f;
  const float minus_two_log = -2.0f * rand_log(u1);
  const float r = std::sqrt(minus_two_log);
  float c, s;
  rand_cos_sin(rand_uniform24(b), &c, &s);
  *n0 = r * c;
  *n1 = r * s;
}

MOEKIT_NO_CONTRACT FakeGate fake_gate(int64_t T, int32_t E, int32_t K, int32_t skip, float noise, uint64_t seed,
                                      uint64_t offset, const std::vector<uint8_t>* mask) {
  const int32_t A = E - skip;
  FakeGate out;
  out.weights.resize(static_cast<size_t>(T) * K);
  out.indices.resize(static_cast<size_t>(T) * K);
  out.load.assign(E, 0);
  std::vector<float> beta(A, 0.0f);
  const float scale = noise * 0.1f;
  if (noise > 0.0f) {
    for (int b = 0; 4 * b < A; ++b) {
      const auto r = fake_gate_random(seed, offset, 1, 0, static_cast<uint32_t>(b));
      float n[4];
      rand_normal2(r[0], r[1], &n[0], &n[1]);
      rand_normal2(r[2], r[3], &n[2], &n[3]);
      for (int c = 0; c < 4; ++c)
        if (4 * b + c < A) beta[4 * b + c] = n[c] * scale;
    }
  }
  const float base = (1.0f - noise) / static_cast<float>(K);
  std::vector<double> keys(A);
  for (int64_t t = 0; t < T; ++t) {
    if (noise == 0.0f) {
      for (int k = 0; k < K; ++k) {
        out.indices[t * K + k] = static_cast<int32_t>((t * K + k) % A) + skip;
        out.weights[t * K + k] = 1.0f / static_cast<float>(K);
      }
    } else {
      for (int b = 0; 4 * b < A; ++b) {
        const auto r = fake_gate_random(seed, offset, 2, static_cast<uint64_t>(t), static_cast<uint32_t>(b));
        for (int c = 0; c < 4; ++c)
          if (4 * b + c < A) keys[4 * b + c] = static_cast<double>(rand_uniform24(r[c]) + beta[4 * b + c]);
      }
      const std::vector<int32_t> idx = top_indices(keys, K);
      std::vector<float> r(K);
      float rsum = 0.0f;
      for (int b = 0; 4 * b < K; ++b) {
        const auto x = fake_gate_random(seed, offset, 0, static_cast<uint64_t>(t), static_cast<uint32_t>(b));
        for (int c = 0; c < 4; ++c)
          if (4 * b + c < K) {
            r[4 * b + c] = rand_uniform24(x[c]);
            rsum = rsum + r[4 * b + c];
          }
      }
      for (int k = 0; k < K; ++k) {
        const float share = rsum > 0.0f ? r[k] / rsum : 1.0f / static_cast<float>(K);
        const float scaled = noise * share;
        out.weights[t * K + k] = base + scaled;
        out.indices[t * K + k] = idx[k] + skip;
      }
    }
    if (mask == nullptr || (*mask)[t] != 0)
      for (int k = 0; k < K; ++k) out.load[out.indices[t * K + k]]++;
  }
  return out;
}

}  // namespace moekit::ref
