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
