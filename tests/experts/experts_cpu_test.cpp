// Experts family, CPU suite: the double reference (every activation forward and backward against
// finite differences; the whole FFN backward against finite differences of its loss, in both
// layouts, with biases, routing weights and the weight-after-down variant), the device activation
// functions against the reference, the grouped-GEMM tile schedule and column pairing, the
// mma.sync fragment addressing replayed on the host, and the C API's validation.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/experts/activation.cuh"
#include "kernels/experts/grouped_gemm.hpp"
#include "kernels/experts/grouped_gemm_sm90.hpp"
#include "kernels/experts/grouped_problem.cuh"
#include "kernels/experts/mma_layout.cuh"
#include "moekit/moekit.h"
#include "tests/experts/experts_cases.hpp"
#include "tests/reference/experts_ref.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

namespace kx = moekit::kernels::experts;
namespace ref = moekit::ref;
using moekit::test::experts::Spec;

namespace {

struct ActCase {
  const char* name;
  int kind;
  double alpha;
  double limit;
};

// Every activation, with and without clamping where it has one; limits small enough that the
// random inputs below cross them.
const ActCase kActCases[] = {
    {"swiglu", ref::kSwiglu, 1.702, 0.0},       {"swiglu limit", ref::kSwiglu, 1.702, 1.25},
    {"relu2", ref::kRelu2, 1.702, 0.0},         {"quick_geglu", ref::kQuickGeglu, 1.702, 1.5},
    {"quick_geglu L7", ref::kQuickGeglu, 1.702, 7.0}, {"geglu", ref::kGeglu, 1.702, 0.0},
    {"swiglu_oai", ref::kSwigluOai, 1.3, 0.0},  {"swiglu_oai limit", ref::kSwigluOai, 1.702, 0.9},
};

bool near_kink(const ActCase& a, double g, double v) {
  const double eps = 1e-3;
  if (a.kind == ref::kRelu2) return std::fabs(g) < eps;
  if (a.limit > 0.0 || a.kind == ref::kQuickGeglu)
    return std::fabs(g - a.limit) < eps || std::fabs(std::fabs(v) - a.limit) < eps;
  return false;
}

std::string last_error() { return moekit_get_last_error(); }

}  // namespace

TEST_CASE("reference activation derivatives match finite differences", "[experts][reference]") {
  auto rng = moekit::test::make_rng(0xe1);
  std::normal_distribution<double> d(0.0, 2.0);
  for (const ActCase& a : kActCases) {
    INFO(a.name);
    ref::ActSpec spec{a.kind, a.alpha, a.limit};
    int checked = 0;
    for (int it = 0; it < 400; ++it) {
      const double g = d(rng), v = d(rng);
      if (near_kink(a, g, v)) continue;
      const double h = 1e-6;
      double an_g, an_v, fd_g, fd_v;
      if (a.kind == ref::kRelu2) {
        an_g = ref::act_relu2_grad(g);
        fd_g = (ref::act_relu2(g + h) - ref::act_relu2(g - h)) / (2 * h);
        an_v = fd_v = 0.0;
      } else {
        ref::act_gated_grad(spec, g, v, &an_g, &an_v);
        fd_g = (ref::act_gated(spec, g + h, v) - ref::act_gated(spec, g - h, v)) / (2 * h);
        fd_v = (ref::act_gated(spec, g, v + h) - ref::act_gated(spec, g, v - h)) / (2 * h);
      }
      INFO("g = " << g << ", v = " << v);
      REQUIRE(std::fabs(an_g - fd_g) <= 1e-6 * (1.0 + std::fabs(fd_g)));
      REQUIRE(std::fabs(an_v - fd_v) <= 1e-6 * (1.0 + std::fabs(fd_v)));
      ++checked;
    }
    REQUIRE(checked > 300);
  }
}

TEST_CASE("reference activations follow the NeMo formulas at chosen points", "[experts][reference]") {
  // Values derived by hand from the formulas in moekit/experts.h (sigmoid(0) = 1/2, tanh(0) = 0).
  const ref::ActSpec swiglu{ref::kSwiglu, 1.702, 0.0};
  REQUIRE(ref::act_gated(swiglu, 0.0, 5.0) == 0.0);
  REQUIRE(std::fabs(ref::act_gated(swiglu, 2.0, 3.0) - 3.0 * 2.0 / (1.0 + std::exp(-2.0))) < 1e-15);
  // Clamped swiglu: g clamps at L from above only, v on both sides.
  const ref::ActSpec swiglu_l{ref::kSwiglu, 1.702, 1.0};
  REQUIRE(ref::act_gated(swiglu_l, 5.0, 5.0) == ref::act_gated(swiglu, 1.0, 1.0));
  REQUIRE(ref::act_gated(swiglu_l, -5.0, -5.0) == ref::act_gated(swiglu, -5.0, -1.0));
  // quick_geglu: gate 0 gives 0 whatever the up value; the "+1" makes up = -1 give 0.
  const ref::ActSpec qg{ref::kQuickGeglu, 1.702, 7.0};
  REQUIRE(ref::act_gated(qg, 0.0, 3.0) == 0.0);
  REQUIRE(ref::act_gated(qg, 2.0, -1.0) == 0.0);
  REQUIRE(std::fabs(ref::act_gated(qg, 9.0, 9.0) - 7.0 / (1.0 + std::exp(-1.702 * 7.0)) * 8.0) < 1e-12);
  // swiglu_oai without a limit does not clamp.
  const ref::ActSpec oai{ref::kSwigluOai, 1.702, 0.0};
  REQUIRE(std::fabs(ref::act_gated(oai, 9.0, 9.0) - 9.0 / (1.0 + std::exp(-1.702 * 9.0)) * 10.0) < 1e-12);
  // geglu: gelu_tanh(0) = 0, gelu_tanh(x) -> x for large x.
  const ref::ActSpec geglu{ref::kGeglu, 1.702, 0.0};
  REQUIRE(ref::act_gated(geglu, 0.0, 4.0) == 0.0);
  REQUIRE(std::fabs(ref::act_gated(geglu, 10.0, 2.0) - 20.0) < 1e-9);
  REQUIRE(ref::act_relu2(-3.0) == 0.0);
  REQUIRE(ref::act_relu2(3.0) == 9.0);
  // Clamp gradients pass on the closed interval: at g == L the gate gradient is not masked.
  double dg, dv;
  ref::act_gated_grad(swiglu_l, 1.0, 1.0, &dg, &dv);
  REQUIRE(dg != 0.0);
  REQUIRE(dv != 0.0);
  ref::act_gated_grad(swiglu_l, 1.5, 1.5, &dg, &dv);
  REQUIRE(dg == 0.0);
  REQUIRE(dv == 0.0);
}

TEST_CASE("device activation functions match the double reference", "[experts][activation]") {
  auto rng = moekit::test::make_rng(0xe2);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (const ActCase& a : kActCases) {
    INFO(a.name);
    const kx::ActParams dev{a.kind, static_cast<float>(a.alpha), static_cast<float>(a.limit)};
    const ref::ActSpec spec{a.kind, static_cast<double>(static_cast<float>(a.alpha)),
                            static_cast<double>(static_cast<float>(a.limit))};
    for (int it = 0; it < 2000; ++it) {
      const float g = d(rng), v = d(rng);
      INFO("g = " << g << ", v = " << v);
      auto close = [](double got, double want) { return std::fabs(got - want) <= 2e-6 * (1.0 + std::fabs(want)); };
      if (a.kind == ref::kRelu2) {
        REQUIRE(close(kx::act_relu2(g), ref::act_relu2(g)));
        REQUIRE(close(kx::act_relu2_grad(g), ref::act_relu2_grad(g)));
        continue;
      }
      double dg, dv;
      ref::act_gated_grad(spec, g, v, &dg, &dv);
      const double want = ref::act_gated(spec, g, v);
      const kx::GatedGrad got = kx::act_gated_grad(dev, g, v);
      REQUIRE(close(kx::act_gated(dev, g, v), want));
      REQUIRE(close(got.act, want));
      REQUIRE(close(got.d_gate, dg));
      REQUIRE(close(got.d_up, dv));
    }
    // NaN inputs propagate (a clamp never replaces NaN by its bound).
    const float nan = std::numeric_limits<float>::quiet_NaN();
    if (a.kind == ref::kRelu2) {
      REQUIRE(std::isnan(kx::act_relu2(nan)));
    } else {
      REQUIRE(std::isnan(kx::act_gated(dev, nan, 1.0f)));
      REQUIRE(std::isnan(kx::act_gated(dev, 0.5f, nan)));
    }
  }
}

namespace {

// The per-kind (switch) form of the gated activations, in float, operation by operation as the
// formulas read: what activation.cuh's straight-line versions must equal bit for bit.
float sig(float x) { return 1.0f / (1.0f + std::exp(-x)); }

void gated_textbook(const kx::ActParams& p, float g, float v, float* act, float* dg, float* dv) {
  float gm = 1.0f, um = 1.0f;
  if (kx::act_clamps(p)) {
    const float L = p.limit;
    gm = g <= L ? 1.0f : 0.0f;
    um = (v >= -L && v <= L) ? 1.0f : 0.0f;
    g = g > L ? L : g;
    v = v > L ? L : (v < -L ? -L : v);
  }
  switch (p.kind) {
    case kx::kActQuickGeglu:
    case kx::kActSwigluOai: {
      const float x = p.alpha * g;
      const float s = sig(x), sm = sig(-x);
      const float q = g * s;
      const float dq = s + p.alpha * g * s * sm;
      *act = q * (v + 1.0f);
      *dg = dq * (v + 1.0f) * gm;
      *dv = q * um;
      return;
    }
    case kx::kActGeglu: {
      const float k0 = 0.7978845608028654f, k1 = 0.044715f;
      const float z2 = 2.0f * k0 * (g + k1 * g * g * g);
      const float s = sig(z2), sm = sig(-z2);
      const float gelu = g * s;
      const float dgelu = s + 2.0f * g * s * sm * k0 * (1.0f + 3.0f * k1 * g * g);
      *act = gelu * v;
      *dg = dgelu * v * gm;
      *dv = gelu * um;
      return;
    }
    default: {
      const float s = sig(g), sm = sig(-g);
      const float silu = g * s;
      const float dsilu = s + g * s * sm;
      *act = silu * v;
      *dg = dsilu * v * gm;
      *dv = silu * um;
      return;
    }
  }
}

bool same_bits(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

}  // namespace

TEST_CASE("straight-line gated activations equal the per-kind formulas bit for bit", "[experts][activation]") {
  // activation.cuh computes every kind through one select-based formula (no branches in the
  // GEMM epilogues); the values must be exactly those of the textbook per-kind code, also where
  // the unused kinds' terms overflow (huge g) and for signed zeros, infinities and NaN.
  auto rng = moekit::test::make_rng(0xe7);
  std::normal_distribution<float> d(0.0f, 4.0f);
  std::uniform_real_distribution<float> wide(-60.0f, 60.0f);
  const float specials[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 3e12f, -3e12f, 1e38f, -1e38f,
                            std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), 7.0f, -7.0f, 1.25f, -1.25f};
  for (const ActCase& a : kActCases) {
    if (a.kind == ref::kRelu2) continue;
    INFO(a.name);
    const kx::ActParams p{a.kind, static_cast<float>(a.alpha), static_cast<float>(a.limit)};
    auto check = [&](float g, float v) {
      INFO("g = " << g << ", v = " << v);
      float act, dg, dv;
      gated_textbook(p, g, v, &act, &dg, &dv);
      const kx::GatedGrad got = kx::act_gated_grad(p, g, v);
      REQUIRE(same_bits(kx::act_gated(p, g, v), act));
      REQUIRE(same_bits(got.act, act));
      REQUIRE(same_bits(got.d_gate, dg));
      REQUIRE(same_bits(got.d_up, dv));
    };
    for (int it = 0; it < 20000; ++it) check(d(rng), d(rng));
    for (int it = 0; it < 5000; ++it) check(wide(rng), wide(rng));
    for (float g : specials)
      for (float v : specials) check(g, v);
  }
  // The kernels' kind-fixed forms (act_params_as, what the SwiGLU epilogues of the sm_90a path
  // run) equal the run-time kind bit for bit where the caller picks them.
  for (const float limit : {0.0f, -1.0f, 7.0f}) {
    const kx::ActParams p{kx::kActSwiglu, 1.0f, limit};
    INFO("swiglu limit " << limit);
    REQUIRE(kx::act_is_swiglu_no_limit(p) == !(limit > 0.0f));
    auto same = [&](auto kind, float g, float v) {
      constexpr int kKind = decltype(kind)::value;
      INFO("g = " << g << ", v = " << v);
      const kx::GatedGrad want = kx::act_gated_grad(p, g, v), got = kx::act_gated_grad(kx::act_params_as<kKind>(p), g, v);
      REQUIRE(same_bits(kx::act_gated_as<kKind>(p, g, v), kx::act_gated(p, g, v)));
      REQUIRE(same_bits(got.act, want.act));
      REQUIRE(same_bits(got.d_gate, want.d_gate));
      REQUIRE(same_bits(got.d_up, want.d_up));
    };
    for (int it = 0; it < 5000; ++it) {
      const float g = wide(rng), v = wide(rng);
      same(std::integral_constant<int, kx::kActSwiglu>{}, g, v);
      if (kx::act_is_swiglu_no_limit(p)) same(std::integral_constant<int, kx::kActSwigluNoLimit>{}, g, v);
    }
    for (float g : specials)
      for (float v : specials) {
        same(std::integral_constant<int, kx::kActSwiglu>{}, g, v);
        if (kx::act_is_swiglu_no_limit(p)) same(std::integral_constant<int, kx::kActSwigluNoLimit>{}, g, v);
      }
  }
}

namespace {

// Central finite differences of the reference loss sum_r <dout_r, out_r> against the reference
// backward, for a sample of every parameter.
void check_backward_fd(const Spec& s, uint64_t salt) {
  INFO(s.describe());
  auto rng = moekit::test::make_rng(salt);
  ref::ExpertsProblem p = moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_F32);
  const size_t R = p.max_rows;
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> dout(R * s.hidden);
  for (auto& x : dout) x = d(rng);
  const ref::ExpertsForwardResult f = ref::experts_forward(p, nullptr);
  const ref::ExpertsBackwardResult b = ref::experts_backward(p, f.u, dout, nullptr);
  const int64_t total = p.offsets.back();

  auto check = [&](const char* name, std::vector<double>& param, const std::vector<double>& grad,
                   int64_t limit) {
    INFO(name);
    REQUIRE(param.size() == grad.size());
    std::uniform_int_distribution<int64_t> pick(0, limit - 1);
    for (int it = 0; it < 12; ++it) {
      const int64_t i = pick(rng);
      const double x0 = param[i], h = 1e-6 * std::max(1.0, std::fabs(x0));
      param[i] = x0 + h;
      const double lp = ref::experts_loss(p, dout);
      param[i] = x0 - h;
      const double lm = ref::experts_loss(p, dout);
      param[i] = x0;
      const double fd = (lp - lm) / (2 * h);
      INFO("index " << i << ": analytic " << grad[i] << ", finite difference " << fd);
      REQUIRE(std::fabs(grad[i] - fd) <= 1e-5 * (1.0 + std::fabs(fd)));
    }
  };
  // Only rows inside a segment carry gradients (rows past the total are never read).
  check("xp", p.xp, b.grad_xp, total * s.hidden);
  check("w_gate_up", p.w_gate_up, b.grad_w_gate_up, static_cast<int64_t>(p.w_gate_up.size()));
  check("w_down", p.w_down, b.grad_w_down, static_cast<int64_t>(p.w_down.size()));
  if (s.bias_gate_up) check("b_gate_up", p.b_gate_up, b.grad_b_gate_up, static_cast<int64_t>(p.b_gate_up.size()));
  if (s.bias_down) check("b_down", p.b_down, b.grad_b_down, static_cast<int64_t>(p.b_down.size()));
  if (s.row_weights) check("row_weights", p.row_weights, b.grad_row_weights, total);
  // Rows past the total stay untouched (NaN) in every row-indexed output.
  for (int64_t r = total; r < p.max_rows; ++r) {
    REQUIRE(std::isnan(f.out[r * s.hidden]));
    REQUIRE(std::isnan(b.grad_xp[r * s.hidden]));
    REQUIRE(std::isnan(b.grad_row_weights[r]));
  }
  // The empty expert's weight gradients are exactly zero.
  for (int e = 0; e < s.num_experts(); ++e) {
    if (s.counts[e] != 0) continue;
    for (int64_t i = 0; i < int64_t(s.hidden) * s.nu(); ++i)
      REQUIRE(b.grad_w_gate_up[e * int64_t(s.hidden) * s.nu() + i] == 0.0);
    for (int64_t i = 0; i < int64_t(s.inter) * s.hidden; ++i)
      REQUIRE(b.grad_w_down[e * int64_t(s.inter) * s.hidden + i] == 0.0);
  }
}

}  // namespace

TEST_CASE("reference FFN backward matches finite differences", "[experts][reference]") {
  uint64_t salt = 0x100;
  for (const ActCase& a : kActCases) {
    for (int variant = 0; variant < 3; ++variant) {
      Spec s;
      s.activation = a.kind;
      s.alpha = a.alpha;
      s.limit = a.limit;
      s.interleaved = variant == 1 && a.kind != ref::kRelu2;
      s.weight_after_down = variant == 2;
      s.bias_gate_up = variant != 0;
      s.bias_down = variant != 0;
      s.row_weights = variant != 1 || a.kind == ref::kRelu2;
      check_backward_fd(s, ++salt);
    }
  }
}

TEST_CASE("reference: interleaved and concatenated layouts agree; weight placement is linear",
          "[experts][reference]") {
  auto rng = moekit::test::make_rng(0xe3);
  Spec s;
  s.activation = ref::kQuickGeglu;
  s.limit = 1.5;
  s.bias_gate_up = s.bias_down = true;
  s.counts = {4, 0, 5, 1};
  ref::ExpertsProblem concat = moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_F32);
  ref::ExpertsProblem inter = concat;
  inter.interleaved = true;
  const int E = s.num_experts(), H = s.hidden, I = s.inter, NU = 2 * I;
  for (int e = 0; e < E; ++e) {
    for (int i = 0; i < I; ++i) {
      for (int k = 0; k < H; ++k) {
        const size_t base = (size_t(e) * H + k) * NU;
        inter.w_gate_up[base + 2 * i] = concat.w_gate_up[base + i];
        inter.w_gate_up[base + 2 * i + 1] = concat.w_gate_up[base + I + i];
      }
      inter.b_gate_up[size_t(e) * NU + 2 * i] = concat.b_gate_up[size_t(e) * NU + i];
      inter.b_gate_up[size_t(e) * NU + 2 * i + 1] = concat.b_gate_up[size_t(e) * NU + I + i];
    }
  }
  const auto a = ref::experts_forward(concat, nullptr), b = ref::experts_forward(inter, nullptr);
  ref::ExpertsProblem wad = concat;
  wad.weight_after_down = true;
  const auto c = ref::experts_forward(wad, nullptr);
  const int64_t total = concat.offsets.back();
  for (int64_t i = 0; i < total * H; ++i) {
    REQUIRE(std::fabs(a.out[i] - b.out[i]) <= 1e-12 * (1 + std::fabs(a.out[i])));
    REQUIRE(std::fabs(a.out[i] - c.out[i]) <= 1e-12 * (1 + std::fabs(a.out[i])));
  }
  for (int64_t i = 0; i < total * I; ++i) REQUIRE(a.h[i] == b.h[i]);
}

TEST_CASE("tile schedule covers every row tile of every group exactly once", "[experts][schedule]") {
  auto rng = moekit::test::make_rng(0xe4);
  for (int trial = 0; trial < 200; ++trial) {
    std::uniform_int_distribution<int> ge(1, 40), gc(0, 700), gm(1, 9), gn(1, 7), kind(0, 9);
    const int G = ge(rng), block_m = trial % 2 ? 128 : 64, tiles_n = gn(rng), group_m = gm(rng);
    std::vector<int32_t> offsets(G + 1, 0);
    for (int g = 0; g < G; ++g) offsets[g + 1] = offsets[g] + (kind(rng) < 2 ? 0 : gc(rng));
    int64_t R = offsets[G] + gc(rng) % 5;
    if (trial % 7 == 0) {  // garbage offsets: negative, beyond R, decreasing
      offsets[G / 2] = -5;
      offsets[G] = static_cast<int32_t>(R + 1000);
      if (G > 2) offsets[1] = offsets[2] + 3;
    }
    INFO("trial " << trial << " G " << G << " BM " << block_m << " tiles_n " << tiles_n);
    std::vector<int32_t> prefix(G + 1, 0);
    for (int g = 0; g < G; ++g) {
      int64_t b, e;
      kx::group_rows(offsets.data(), g, R, &b, &e);
      REQUIRE(0 <= b);
      REQUIRE(b <= e);
      REQUIRE(e <= R);
      prefix[g + 1] = prefix[g] + kx::row_tiles_of(e - b, block_m);
    }
    const kx::RowTileSchedule sched{prefix.data(), G, tiles_n, group_m};
    // The launch bound holds for well-formed offsets; garbage ones only lose the bound (a
    // persistent grid still walks every tile) but never leave [0, R).
    if (trial % 7 != 0) REQUIRE(sched.total_tiles() <= kx::max_row_tiles(R, G, block_m) * tiles_n);
    std::set<std::tuple<int, int, int>> seen;
    for (int64_t t = 0; t < sched.total_tiles(); ++t) {
      const kx::RowTile rt = sched.decode(t);
      const kx::RowTile rt32 = sched.decode32(static_cast<uint32_t>(t));  // the sm_90a kernel's form
      REQUIRE(rt32.group == rt.group);
      REQUIRE(rt32.row_tile == rt.row_tile);
      REQUIRE(rt32.n_tile == rt.n_tile);
      REQUIRE(rt.group >= 0);
      REQUIRE(rt.group < G);
      REQUIRE(rt.row_tile >= 0);
      REQUIRE(rt.row_tile < prefix[rt.group + 1] - prefix[rt.group]);
      REQUIRE(rt.n_tile >= 0);
      REQUIRE(rt.n_tile < tiles_n);
      REQUIRE(seen.insert({rt.group, rt.row_tile, rt.n_tile}).second);
    }
    REQUIRE(static_cast<int64_t>(seen.size()) == int64_t(prefix[G]) * tiles_n);
  }
}

// The stream-K tail (grouped_problem.cuh, StreamKTail): the whole tiles of the round robin and
// the tail units of every CTA cover every k tile of every tile exactly once; a tile is cut at most
// once, between CTAs c (the first part, its last unit: the fixup) and c + 1 (the rest, its first
// unit: the partial), which is what the kernels' flags assume; every CTA gets T / C - 1 whole tiles
// and a tail range of S / C (+1) k tiles, at least one tile long; the tail is on exactly where it
// was measured to pay (T > C, a last wave of 1 .. C / 8 tiles, at least 40 k tiles, enough slots).
TEST_CASE("stream-K tail: every k tile once, one cut per tile between neighbours, partials first",
          "[experts][schedule]") {
  auto rng = moekit::test::make_rng(0x5c);
  std::uniform_int_distribution<int> gc(1, 140), gt(0, 2000), gk(1, 120), gw(1, 12);
  int engaged = 0, cut_tiles = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int C = trial < 8 ? 132 : gc(rng);
    // Half the trials a tile count just past whole waves (where the tail is on), half any count.
    const uint32_t T = trial < 8        ? uint32_t(4096 + trial * 3)
                       : trial % 2 == 0 ? static_cast<uint32_t>(gw(rng) * C + gt(rng) % (C / 8 + 1))
                                        : static_cast<uint32_t>(gt(rng));
    const int KT = trial < 8 ? 112 : gk(rng);
    const int slots = trial % 11 == 0 ? C - 1 : 132;
    INFO("trial " << trial << " T " << T << " C " << C << " KT " << KT << " slots " << slots);
    const kx::StreamKTail t = kx::make_stream_k_tail(T, C, KT, slots);
    const uint32_t rest = C > 0 ? T % C : 0;
    const bool pays = C >= 2 && slots >= C && KT >= kx::kStreamKMinKTiles && T > uint32_t(C) && rest != 0 &&
                      rest <= uint32_t(C / kx::kStreamKMaxRestDiv);
    REQUIRE((t.sk_iters > 0) == pays);
    if (!pays) {
      REQUIRE(t.dp_tiles == T);
      kx::WorkUnit u;
      for (int c = 0; c < C; ++c) REQUIRE_FALSE(kx::tail_unit(t, c, 0, &u));
      continue;
    }
    ++engaged;
    REQUIRE(t.dp_tiles == (T / C - 1) * C);
    REQUIRE(t.sk_iters == (uint32_t(C) + rest) * KT);
    // Whole tiles: CTA c takes c, c + C, ... below dp_tiles, T / C - 1 of them.
    std::vector<std::vector<int>> cover(T, std::vector<int>(KT, 0));
    for (int c = 0; c < C; ++c) {
      int n = 0;
      for (uint32_t tile = c; tile < t.dp_tiles; tile += C, ++n)
        for (int k = 0; k < KT; ++k) ++cover[tile][k];
      REQUIRE(n == int(T / C) - 1);
    }
    // Tail units in the order each CTA runs them.
    std::vector<std::vector<kx::WorkUnit>> units(C);
    for (int c = 0; c < C; ++c) {
      uint32_t done = 0;
      kx::WorkUnit u;
      while (kx::tail_unit(t, c, done, &u)) {
        REQUIRE(units[c].size() < 3);
        REQUIRE(u.tile >= t.dp_tiles);
        REQUIRE(u.tile < T);
        REQUIRE(0 <= u.k_begin);
        REQUIRE(u.k_begin < u.k_end);
        REQUIRE(u.k_end <= KT);
        const int role = u.k_begin > 0 ? kx::kUnitPartial : u.k_end < KT ? kx::kUnitFixup : kx::kUnitWhole;
        REQUIRE(u.role == role);
        if (u.role == kx::kUnitPartial) REQUIRE(units[c].empty());  // first, waits on nothing
        for (int k = u.k_begin; k < u.k_end; ++k) ++cover[u.tile][k];
        units[c].push_back(u);
        done += u.k_end - u.k_begin;
      }
      REQUIRE(done >= uint32_t(KT));  // a range is at least one tile
      REQUIRE(done >= t.sk_iters / C);
      REQUIRE(done <= t.sk_iters / C + 1);
      for (size_t i = 0; i + 1 < units[c].size(); ++i) REQUIRE(units[c][i].role != kx::kUnitFixup);  // last
    }
    for (uint32_t tile = 0; tile < T; ++tile)
      for (int k = 0; k < KT; ++k) REQUIRE(cover[tile][k] == 1);
    // Every fixup of CTA c is completed by the partial that CTA c + 1 runs first, and only by it.
    for (int c = 0; c < C; ++c) {
      const kx::WorkUnit& last = units[c].back();
      if (last.role != kx::kUnitFixup) {
        if (c + 1 < C) REQUIRE(units[c + 1].front().role != kx::kUnitPartial);
        continue;
      }
      ++cut_tiles;
      REQUIRE(c + 1 < C);
      const kx::WorkUnit& first = units[c + 1].front();
      REQUIRE(first.role == kx::kUnitPartial);
      REQUIRE(first.tile == last.tile);
      REQUIRE(first.k_begin == last.k_end);
      REQUIRE(first.k_end == KT);
    }
    REQUIRE(units[0].front().role != kx::kUnitPartial);
  }
  REQUIRE(engaged > 500);
  REQUIRE(cut_tiles > 1000);
  // DeepSeek-V3's gate-up on 132 SMs (the case it is for): 4096 tiles of 112 k tiles.
  const kx::StreamKTail dsv3 = kx::make_stream_k_tail(4096, 132, 112, kx::kStreamKSlots);
  REQUIRE(dsv3.dp_tiles == 30 * 132);
  REQUIRE(dsv3.sk_iters == 136 * 112);
  // Past 32 bits of k tiles the tail stays off rather than overflow.
  REQUIRE(kx::make_stream_k_tail(300, 132, 1 << 24, 132).sk_iters == 0);
  // Slots: no more than a GEMM can have tiles (64-row ones), at most one per CTA of 132 SMs.
  // Slots: none where K is under 40 k tiles; else no more than a GEMM can have tiles (64-row
  // ones), at most one per CTA of 132 SMs.
  REQUIRE(kx::stream_k_slots(0, 8, 4096, 7168) == 0);
  REQUIRE(kx::stream_k_slots(10, 1, 256, 2560) == 1);
  REQUIRE(kx::stream_k_slots(10, 1, 257, 2560) == 2);
  REQUIRE(kx::stream_k_slots(10, 1, 257, 2496) == 0);
  REQUIRE(kx::stream_k_slots(32768, 32, 7168, 2048) == 0);                   // DeepSeek-V3's down
  REQUIRE(kx::stream_k_slots(32768, 32, 4096, 7168) == kx::kStreamKSlots);   // and gate-up
}

TEST_CASE("weight-gradient schedule and row splits are a partition", "[experts][schedule]") {
  auto rng = moekit::test::make_rng(0xe5);
  for (int trial = 0; trial < 100; ++trial) {
    std::uniform_int_distribution<int> d(1, 9);
    const kx::WgradSchedule s{d(rng), d(rng), d(rng), d(rng), d(rng)};
    std::set<std::tuple<int, int, int, int>> seen;
    for (int64_t t = 0; t < s.total_tiles(); ++t) {
      const kx::WgradTile w = s.decode(t);
      REQUIRE(w.group < s.num_groups);
      REQUIRE(w.split < s.splits);
      REQUIRE(w.m_tile < s.tiles_m);
      REQUIRE(w.n_tile < s.tiles_n);
      REQUIRE(seen.insert({w.group, w.split, w.m_tile, w.n_tile}).second);
    }
    REQUIRE(static_cast<int64_t>(seen.size()) == s.total_tiles());
  }
  for (int64_t len : {0, 1, 7, 64, 1000, 4097}) {
    for (int splits = 1; splits <= 17; ++splits) {
      int64_t next = 100;
      for (int sp = 0; sp < splits; ++sp) {
        int64_t b, e;
        kx::split_rows(100, 100 + len, sp, splits, &b, &e);
        REQUIRE(b == next);
        REQUIRE(e >= b);
        next = e;
      }
      REQUIRE(next == 100 + len);
    }
  }
}

TEST_CASE("gate/up column pairing is a bijection onto [0, 2I)", "[experts][schedule]") {
  for (int I : {8, 16, 24, 40, 200, 768}) {
    std::vector<int> hits(2 * I, 0);
    for (int v = 0; v < 2 * I; ++v) {
      const int c = kx::b_column(v, I);
      REQUIRE(c >= 0);
      REQUIRE(c < 2 * I);
      ++hits[c];
      if (((v >> 3) & 1) == 0) {  // gate block: its up partner is 8 virtual columns further
        const int i = kx::paired_gate_index(v);
        REQUIRE(c == i);
        REQUIRE(kx::b_column(v + 8, I) == I + i);
      }
    }
    for (int h : hits) REQUIRE(h == 1);
    REQUIRE(kx::b_column(13, 0) == 13);
  }
}

namespace {

// Host replay of ldmatrix.x4 (optionally .trans) from a shared-memory image: register i of lane t.
void replay_ldmatrix(const std::vector<float>& smem, const int (&offset)[32], bool trans, float (&out)[32][4][2]) {
  for (int t = 0; t < 32; ++t)
    for (int i = 0; i < 4; ++i)
      for (int e = 0; e < 2; ++e) {
        if (!trans)
          out[t][i][e] = smem[offset[8 * i + t / 4] + 2 * (t % 4) + e];
        else
          out[t][i][e] = smem[offset[8 * i + 2 * (t % 4) + e] + t / 4];
      }
}

// One m16n8k16 per n8 block from replayed fragments: D[16][16] for two n8 blocks.
void replay_mma(const float (&a)[32][4][2], const float (&b)[32][4][2], double (&d)[16][16]) {
  double A[16][16] = {}, B[16][16] = {};
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * q + e] = a[t][0][e];
      A[g + 8][2 * q + e] = a[t][1][e];
      A[g][2 * q + 8 + e] = a[t][2][e];
      A[g + 8][2 * q + 8 + e] = a[t][3][e];
      // registers 0, 1: b0, b1 of n block 0; registers 2, 3: of n block 1
      for (int blk = 0; blk < 2; ++blk) {
        B[2 * q + e][8 * blk + g] = b[t][2 * blk][e];
        B[2 * q + 8 + e][8 * blk + g] = b[t][2 * blk + 1][e];
      }
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][c];
      d[r][c] = s;
    }
}

}  // namespace

TEST_CASE("ldmatrix addressing of every operand layout yields the matrix product", "[experts][mma]") {
  // Logical A [16 x 16] at (m_base, k_base) and B [16 x 16] (two n8 blocks) at (k_base, n_base)
  // inside padded stage buffers; each layout is replayed and its product compared with A B.
  auto rng = moekit::test::make_rng(0xe6);
  std::uniform_int_distribution<int> d(-4, 4);
  const int m_base = 48, n_base = 32, k_base = 16;
  float A[16][16], B[16][16];
  for (auto& row : A) for (auto& x : row) x = static_cast<float>(d(rng));
  for (auto& row : B) for (auto& x : row) x = static_cast<float>(d(rng));
  double want[16][16];
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      double s = 0;
      for (int k = 0; k < 16; ++k) s += double(A[r][k]) * B[k][c];
      want[r][c] = s;
    }
  const int pitch_mk = 32 + 8, pitch_km = 128 + 8, pitch_nk = 32 + 8, pitch_kn = 256 + 8;
  for (int a_layout = 0; a_layout < 2; ++a_layout)
    for (int b_layout = 0; b_layout < 2; ++b_layout) {
      INFO("A " << (a_layout ? "[k][m]" : "[m][k]") << ", B " << (b_layout ? "[k][n]" : "[n][k]"));
      std::vector<float> sa(256 * 272, -99.0f), sb(256 * 272, -99.0f);
      int oa[32], ob[32];
      for (int r = 0; r < 16; ++r)
        for (int k = 0; k < 16; ++k) {
          if (a_layout == 0) sa[(m_base + r) * pitch_mk + k_base + k] = A[r][k];
          else sa[(k_base + k) * pitch_km + m_base + r] = A[r][k];
        }
      for (int k = 0; k < 16; ++k)
        for (int c = 0; c < 16; ++c) {
          if (b_layout == 0) sb[(n_base + c) * pitch_nk + k_base + k] = B[k][c];
          else sb[(k_base + k) * pitch_kn + n_base + c] = B[k][c];
        }
      for (int lane = 0; lane < 32; ++lane) {
        oa[lane] = a_layout == 0 ? kx::ldsm_offset_a_mk(lane, m_base, k_base, pitch_mk)
                                 : kx::ldsm_offset_a_km(lane, m_base, k_base, pitch_km);
        ob[lane] = b_layout == 0 ? kx::ldsm_offset_b_nk(lane, n_base, k_base, pitch_nk)
                                 : kx::ldsm_offset_b_kn(lane, n_base, k_base, pitch_kn);
        // ldmatrix needs 16-byte aligned row addresses (8 elements of 16 bits).
        REQUIRE(oa[lane] % 8 == 0);
        REQUIRE(ob[lane] % 8 == 0);
      }
      float fa[32][4][2], fb[32][4][2];
      replay_ldmatrix(sa, oa, a_layout == 1, fa);
      replay_ldmatrix(sb, ob, b_layout == 1, fb);
      double got[16][16];
      replay_mma(fa, fb, got);
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) REQUIRE(got[r][c] == want[r][c]);
      // The epilogue's view of the accumulators: element e of lane t is (acc_row, acc_col).
      for (int t = 0; t < 32; ++t)
        for (int e = 0; e < 4; ++e) {
          const int r = kx::acc_row(t, e), c = kx::acc_col(t, e);
          REQUIRE(r == t / 4 + 8 * (e / 2));
          REQUIRE(c == 2 * (t % 4) + e % 2);
        }
    }
}

TEST_CASE("ldmatrix phases are free of shared-memory bank conflicts", "[experts][mma]") {
  // Each 8-lane phase of an ldmatrix reads 8 rows of 16 bytes; with the padded pitches the rows
  // must cover 8 distinct 16-byte bank groups (32 banks of 4 bytes, 2-byte elements).
  struct L { const char* name; int pitch; int (*fn)(int, int, int, int); };
  const L layouts[] = {{"A [m][k]", 40, kx::ldsm_offset_a_mk}, {"A [k][m]", 136, kx::ldsm_offset_a_km},
                       {"B [n][k]", 40, kx::ldsm_offset_b_nk}, {"B [k][n]", 264, kx::ldsm_offset_b_kn}};
  for (const L& l : layouts) {
    INFO(l.name);
    for (int base = 0; base < 64; base += 16)
      for (int phase = 0; phase < 4; ++phase) {
        std::set<int> groups;
        for (int lane = 8 * phase; lane < 8 * phase + 8; ++lane)
          groups.insert((l.fn(lane, base, 16, l.pitch) * 2 / 16) % 8);
        REQUIRE(groups.size() == 8);
      }
  }
}

TEST_CASE("ldmatrix offsets of other blocks and k steps are the constants the kernel adds", "[experts][mma]") {
  // load_frags computes each lane's address once (block 0, k step 0) and adds compile-time
  // offsets for m block mi / n block pair np and k step kk; that must equal the full formula.
  for (int lane = 0; lane < 32; ++lane)
    for (int base = 0; base < 128; base += 64)
      for (int blk = 0; blk < 4; ++blk)
        for (int kk = 0; kk < 2; ++kk) {
          INFO("lane " << lane << ", base " << base << ", block " << blk << ", k step " << kk);
          REQUIRE(kx::ldsm_offset_a_mk(lane, base + 16 * blk, 16 * kk, 40) ==
                  kx::ldsm_offset_a_mk(lane, base, 0, 40) + blk * 16 * 40 + kk * 16);
          REQUIRE(kx::ldsm_offset_a_km(lane, base + 16 * blk, 16 * kk, 136) ==
                  kx::ldsm_offset_a_km(lane, base, 0, 136) + kk * 16 * 136 + blk * 16);
          REQUIRE(kx::ldsm_offset_b_nk(lane, base + 16 * blk, 16 * kk, 40) ==
                  kx::ldsm_offset_b_nk(lane, base, 0, 40) + blk * 16 * 40 + kk * 16);
          REQUIRE(kx::ldsm_offset_b_kn(lane, base + 16 * blk, 16 * kk, 264) ==
                  kx::ldsm_offset_b_kn(lane, base, 0, 264) + kk * 16 * 264 + blk * 16);
        }
}

TEST_CASE("cp.async partition: every chunk once, conflict-free writes, whole sectors", "[experts][mma]") {
  // The four stored tiles of the tensor-core kernel (BM = 128, BN = 256, BK = 32, 256 threads,
  // rows padded by 8 elements): [m][k], [k][m], [n][k], [k][n].
  struct Tile { const char* name; int rows, cols; };
  const Tile tiles[] = {{"A [m][k]", 128, 32}, {"A [k][m]", 32, 128}, {"B [n][k]", 256, 32}, {"B [k][n]", 32, 256}};
  const int threads = 256;
  for (const Tile& t : tiles) {
    INFO(t.name);
    const int cpr = t.cols / 8, pitch = t.cols + 8;
    const int chunks = t.rows * cpr / threads;
    REQUIRE(chunks * threads == t.rows * cpr);
    std::vector<int> hits(t.rows * cpr, 0);
    for (int tid = 0; tid < threads; ++tid) {
      const int col = kx::copy_col(tid, cpr);
      REQUIRE(col % 8 == 0);
      REQUIRE(col < t.cols);
      for (int i = 0; i < chunks; ++i) {
        const int row = kx::copy_row(tid, i, cpr, threads);
        // The kernel's strides: chunk i is i * threads / cpr rows below chunk 0, same column.
        REQUIRE(row == kx::copy_row(tid, 0, cpr, threads) + i * (threads / cpr));
        REQUIRE(row >= 0);
        REQUIRE(row < t.rows);
        ++hits[row * cpr + col / 8];
      }
    }
    for (int h : hits) REQUIRE(h == 1);
    for (int warp = 0; warp < threads / 32; ++warp)
      for (int i = 0; i < chunks; ++i) {
        // Each 8-thread phase of the 16-byte shared-memory writes covers 8 distinct bank groups.
        for (int phase = 0; phase < 4; ++phase) {
          std::set<int> groups;
          for (int lane = 8 * phase; lane < 8 * phase + 8; ++lane) {
            const int tid = 32 * warp + lane;
            const int off = kx::copy_row(tid, i, cpr, threads) * pitch + kx::copy_col(tid, cpr);
            groups.insert((off * 2 / 16) % 8);
          }
          REQUIRE(groups.size() == 8);
        }
        // The warp's global reads are whole 32-byte sectors: each chunk's partner half is read
        // by the same instruction.
        std::set<std::pair<int, int>> mine;
        for (int lane = 0; lane < 32; ++lane) {
          const int tid = 32 * warp + lane;
          mine.insert({kx::copy_row(tid, i, cpr, threads), kx::copy_col(tid, cpr)});
        }
        for (const auto& rc : mine) REQUIRE(mine.count({rc.first, rc.second ^ 8}) == 1);
      }
  }
  // The row-major order the k-contiguous tiles avoid: chunk (0, 0) and (1, 3) share a bank group.
  REQUIRE((0 * 40 * 2 / 16) % 8 == (1 * 40 + 24) * 2 / 16 % 8);
}

// ---------------------------------------------------------------------------------------------
// C API validation (no call here reaches the device: each fails before anything is enqueued).

namespace {

moekit_experts_config_t valid_config() {
  moekit_experts_config_t c;
  REQUIRE(moekit_experts_config_init(&c, sizeof(c)) == MOEKIT_STATUS_SUCCESS);
  c.num_experts = 4;
  c.hidden = 64;
  c.inter = 40;
  return c;
}

void require_fail(moekit_status_t got, moekit_status_t want, const std::vector<std::string>& words) {
  INFO("message: " << last_error());
  REQUIRE(got == want);
  for (const auto& w : words) REQUIRE(last_error().find(w) != std::string::npos);
}

}  // namespace

TEST_CASE("experts config: defaults, every bad field named with its value", "[experts][api]") {
  moekit_experts_config_t c;
  REQUIRE(moekit_experts_config_init(&c, sizeof(c)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(c.struct_size == sizeof(c));
  REQUIRE(c.dtype == MOEKIT_DTYPE_BF16);
  REQUIRE(c.activation == MOEKIT_ACTIVATION_SWIGLU);
  REQUIRE(c.gate_up_layout == MOEKIT_GATE_UP_AUTO);
  REQUIRE(c.weight_after_down == 0);
  REQUIRE(c.act_alpha == 1.702f);
  REQUIRE(c.act_limit == 0.0f);
  require_fail(moekit_experts_config_check(&c), MOEKIT_STATUS_INVALID_ARGUMENT,
               {"moekit_experts_config_check", "config->num_experts = 0"});
  require_fail(moekit_experts_config_init(nullptr, sizeof(c)), MOEKIT_STATUS_INVALID_ARGUMENT, {"config is NULL"});
  require_fail(moekit_experts_config_init(&c, 8), MOEKIT_STATUS_INVALID_ARGUMENT, {"struct_size = 8"});
  REQUIRE(moekit_experts_config_check(nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);

  struct Bad {
    void (*edit)(moekit_experts_config_t&);
    const char* words;
  };
  const Bad bad[] = {
      {[](moekit_experts_config_t& x) { x.num_experts = MOEKIT_EXPERTS_MAX_EXPERTS + 1; }, "config->num_experts = 8193"},
      {[](moekit_experts_config_t& x) { x.hidden = 12; }, "config->hidden = 12 is not a multiple of 8"},
      {[](moekit_experts_config_t& x) { x.hidden = -8; }, "config->hidden = -8"},
      {[](moekit_experts_config_t& x) { x.inter = 20; }, "config->inter = 20 is not a multiple of 8"},
      {[](moekit_experts_config_t& x) { x.inter = 0; }, "config->inter = 0"},
      {[](moekit_experts_config_t& x) { x.dtype = 7; }, "config->dtype = 7"},
      {[](moekit_experts_config_t& x) { x.activation = 5; }, "config->activation = 5"},
      {[](moekit_experts_config_t& x) { x.gate_up_layout = 3; }, "config->gate_up_layout = 3"},
      {[](moekit_experts_config_t& x) { x.act_alpha = std::numeric_limits<float>::infinity(); }, "config->act_alpha = inf"},
      {[](moekit_experts_config_t& x) { x.act_limit = -1.0f; }, "config->act_limit = -1"},
      {[](moekit_experts_config_t& x) { x.activation = MOEKIT_ACTIVATION_QUICK_GEGLU; }, "QUICK_GEGLU"},
      {[](moekit_experts_config_t& x) { x.activation = MOEKIT_ACTIVATION_GEGLU; x.act_limit = 3.0f; },
       "config->act_limit = 3 only applies"},
      {[](moekit_experts_config_t& x) { x.activation = MOEKIT_ACTIVATION_RELU2; x.act_limit = 3.0f; },
       "config->act_limit = 3 only applies"},
  };
  for (const Bad& b : bad) {
    moekit_experts_config_t x = valid_config();
    REQUIRE(moekit_experts_config_check(&x) == MOEKIT_STATUS_SUCCESS);
    b.edit(x);
    require_fail(moekit_experts_config_check(&x), MOEKIT_STATUS_INVALID_ARGUMENT, {b.words});
    size_t bytes = 123;
    require_fail(moekit_experts_forward_workspace_size(&x, 10, &bytes), MOEKIT_STATUS_INVALID_ARGUMENT, {b.words});
    REQUIRE(bytes == 123);
  }
  // Valid corner values.
  moekit_experts_config_t x = valid_config();
  x.activation = MOEKIT_ACTIVATION_QUICK_GEGLU;
  x.act_limit = 7.0f;
  REQUIRE(moekit_experts_config_check(&x) == MOEKIT_STATUS_SUCCESS);
  x.activation = MOEKIT_ACTIVATION_SWIGLU_OAI;
  x.act_limit = 0.0f;
  REQUIRE(moekit_experts_config_check(&x) == MOEKIT_STATUS_SUCCESS);
  x.num_experts = MOEKIT_EXPERTS_MAX_EXPERTS;
  x.hidden = x.inter = 8;
  REQUIRE(moekit_experts_config_check(&x) == MOEKIT_STATUS_SUCCESS);
  // A caller built against a larger (future) struct is read up to our size.
  struct Future {
    moekit_experts_config_t base;
    int32_t extra;
  } future;
  future.base = valid_config();
  future.base.struct_size = sizeof(Future);
  future.extra = 99;
  REQUIRE(moekit_experts_config_check(&future.base) == MOEKIT_STATUS_SUCCESS);
}

TEST_CASE("experts workspace sizes follow the layout", "[experts][api]") {
  for (int dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F16, MOEKIT_DTYPE_F32}) {
    for (int act : {MOEKIT_ACTIVATION_SWIGLU, MOEKIT_ACTIVATION_RELU2}) {
      moekit_experts_config_t c = valid_config();
      c.dtype = dtype;
      c.activation = act;
      const size_t es = dtype == MOEKIT_DTYPE_F32 ? 4 : 2;
      const size_t nu = act == MOEKIT_ACTIVATION_RELU2 ? c.inter : 2 * c.inter;
      size_t f0 = 1, f = 0, bsaved = 0, brecompute = 0, b0 = 0;
      REQUIRE(moekit_experts_forward_workspace_size(&c, 0, &f0) == MOEKIT_STATUS_SUCCESS);
      REQUIRE(f0 == 0);
      const int64_t R = 1000;
      // h [R, I] (H = 64, I = 40: no GEMM deep enough for the stream-K tail) ...
      REQUIRE(moekit_experts_forward_workspace_size(&c, R, &f) == MOEKIT_STATUS_SUCCESS);
      REQUIRE(f >= R * c.inter * es);
      REQUIRE(f < R * c.inter * es + 512);
      REQUIRE(f % MOEKIT_WORKSPACE_ALIGNMENT == 0);
      // ... and with a GEMM of at least 40 k tiles (here the gate-up, K = H = 2560), for bf16 /
      // f16 the tail's slots: one 128 x 256 fp32 tile and 8 flags each, as many as that GEMM can
      // have 64-row tiles (at most 132).
      moekit_experts_config_t deep = c;
      deep.hidden = 2560;
      size_t fd = 0;
      REQUIRE(moekit_experts_forward_workspace_size(&deep, R, &fd) == MOEKIT_STATUS_SUCCESS);
      const size_t tiles = (R / 64 + c.num_experts) * ((nu + 255) / 256);
      const size_t slots = dtype == MOEKIT_DTYPE_F32 ? 0 : std::min<size_t>(tiles, 132);
      const size_t sk = slots * (128 * 256 * 4 + 8 * 4);
      REQUIRE(fd >= R * c.inter * es + sk);
      REQUIRE(fd < R * c.inter * es + sk + 3 * 256);
      REQUIRE(fd % MOEKIT_WORKSPACE_ALIGNMENT == 0);
      REQUIRE(moekit_experts_backward_workspace_size(&c, R, 1, &bsaved) == MOEKIT_STATUS_SUCCESS);
      REQUIRE(moekit_experts_backward_workspace_size(&c, R, 0, &brecompute) == MOEKIT_STATUS_SUCCESS);
      REQUIRE(moekit_experts_backward_workspace_size(&c, 0, 1, &b0) == MOEKIT_STATUS_SUCCESS);
      // du [R, NU] and h' [R, I] at least; recomputing u adds [R, NU].
      REQUIRE(bsaved >= R * (nu + c.inter) * es);
      REQUIRE(brecompute >= bsaved + R * nu * es);
      REQUIRE(b0 < bsaved);
      size_t again = 0;
      REQUIRE(moekit_experts_backward_workspace_size(&c, R, 1, &again) == MOEKIT_STATUS_SUCCESS);
      REQUIRE(again == bsaved);
    }
  }
  moekit_experts_config_t c = valid_config();
  size_t bytes = 0;
  require_fail(moekit_experts_forward_workspace_size(&c, -1, &bytes), MOEKIT_STATUS_INVALID_ARGUMENT,
               {"max_rows = -1"});
  require_fail(moekit_experts_forward_workspace_size(&c, int64_t(1) << 40, &bytes), MOEKIT_STATUS_INVALID_ARGUMENT,
               {"max_rows = 1099511627776"});
  require_fail(moekit_experts_backward_workspace_size(&c, 5, 1, nullptr), MOEKIT_STATUS_INVALID_ARGUMENT,
               {"workspace_bytes is NULL"});
}

TEST_CASE("experts forward and backward reject bad arguments before any work", "[experts][api]") {
  const moekit_experts_config_t c = valid_config();
  // Host buffers stand in for device memory: every call below fails validation and never
  // touches them.
  alignas(256) static unsigned char buf[8][4096];
  alignas(256) static unsigned char ws[1 << 16];
  const int32_t* offsets = reinterpret_cast<const int32_t*>(buf[0]);
  const void* xp = buf[1];
  const float* p = reinterpret_cast<const float*>(buf[2]);
  const void* wgu = buf[3];
  const void* wd = buf[4];
  void* out = buf[5];
  constexpr int64_t R = 8;
  size_t need = 0;
  REQUIRE(moekit_experts_forward_workspace_size(&c, R, &need) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(need <= sizeof(ws));
  auto fwd = [&](const int32_t* o, const void* x, const float* pw, const void* w1, const void* w2, void* y,
                 void* w, size_t wb, int64_t rows = 8, const void* b1 = nullptr) {
    return moekit_experts_forward(&c, rows, o, x, pw, w1, b1, w2, nullptr, nullptr, y, w, wb, nullptr);
  };
  require_fail(fwd(nullptr, xp, p, wgu, wd, out, ws, need), MOEKIT_STATUS_INVALID_ARGUMENT,
               {"moekit_experts_forward", "expert_offsets is NULL"});
  require_fail(fwd(offsets, nullptr, p, wgu, wd, out, ws, need), MOEKIT_STATUS_INVALID_ARGUMENT, {"xp is NULL"});
  require_fail(fwd(offsets, xp, p, nullptr, wd, out, ws, need), MOEKIT_STATUS_INVALID_ARGUMENT, {"w_gate_up is NULL"});
  require_fail(fwd(offsets, xp, p, wgu, nullptr, out, ws, need), MOEKIT_STATUS_INVALID_ARGUMENT, {"w_down is NULL"});
  require_fail(fwd(offsets, xp, p, wgu, wd, nullptr, ws, need), MOEKIT_STATUS_INVALID_ARGUMENT, {"out is NULL"});
  require_fail(fwd(offsets, xp, p, wgu, wd, out, ws, need, -3), MOEKIT_STATUS_INVALID_ARGUMENT, {"max_rows = -3"});
  require_fail(fwd(offsets, static_cast<const unsigned char*>(xp) + 2, p, wgu, wd, out, ws, need),
               MOEKIT_STATUS_MISALIGNED, {"xp = "});
  require_fail(fwd(offsets, xp, p, wgu, wd, out, ws, need, R, buf[6] + 4), MOEKIT_STATUS_MISALIGNED, {"b_gate_up = "});
  require_fail(fwd(offsets, xp, p + 0, wgu, wd, static_cast<unsigned char*>(out) + 8, ws, need),
               MOEKIT_STATUS_MISALIGNED, {"out = "});
  require_fail(fwd(offsets, xp, reinterpret_cast<const float*>(buf[2] + 2), wgu, wd, out, ws, need),
               MOEKIT_STATUS_MISALIGNED, {"row_weights = "});
  require_fail(fwd(offsets, xp, p, wgu, wd, out, ws, need - 1), MOEKIT_STATUS_WORKSPACE_TOO_SMALL,
               {"workspace_bytes = "});
  require_fail(fwd(offsets, xp, p, wgu, wd, out, ws + 1, need), MOEKIT_STATUS_MISALIGNED, {"workspace = "});
  require_fail(fwd(offsets, xp, p, wgu, wd, out, nullptr, need), MOEKIT_STATUS_INVALID_ARGUMENT, {"workspace is NULL"});
  moekit_experts_config_t bad = c;
  bad.hidden = 3;
  REQUIRE(moekit_experts_forward(&bad, R, offsets, xp, p, wgu, nullptr, wd, nullptr, nullptr, out, ws, need,
                                 nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);

  size_t bneed = 0;
  REQUIRE(moekit_experts_backward_workspace_size(&c, R, 1, &bneed) == MOEKIT_STATUS_SUCCESS);
  const void* u = buf[6];
  const void* dout = buf[7];
  void* dxp = out;
  float* dp = reinterpret_cast<float*>(buf[5] + 1024);
  auto bwd = [&](const void* bgu, const void* bd, const float* pw, void* dbgu, void* dbd, float* dpw, const void* uu,
                 size_t wb, const void* dy = nullptr) {
    return moekit_experts_backward(&c, R, offsets, xp, pw, wgu, bgu, wd, bd, uu, dy ? dy : dout, dxp, nullptr, dbgu,
                                   nullptr, dbd, dpw, ws, wb, nullptr);
  };
  require_fail(bwd(nullptr, nullptr, p, buf[5] + 512, nullptr, nullptr, u, bneed), MOEKIT_STATUS_INVALID_ARGUMENT,
               {"moekit_experts_backward", "grad_b_gate_up is given but b_gate_up is NULL"});
  require_fail(bwd(nullptr, nullptr, p, nullptr, buf[5] + 512, nullptr, u, bneed), MOEKIT_STATUS_INVALID_ARGUMENT,
               {"grad_b_down is given but b_down is NULL"});
  require_fail(bwd(nullptr, nullptr, nullptr, nullptr, nullptr, dp, u, bneed), MOEKIT_STATUS_INVALID_ARGUMENT,
               {"grad_row_weights is given but row_weights is NULL"});
  require_fail(moekit_experts_backward(&c, R, offsets, xp, p, wgu, nullptr, wd, nullptr, u, nullptr, dxp, nullptr,
                                       nullptr, nullptr, nullptr, nullptr, ws, bneed, nullptr),
               MOEKIT_STATUS_INVALID_ARGUMENT, {"grad_out is NULL"});
  require_fail(bwd(nullptr, nullptr, p, nullptr, nullptr, nullptr, static_cast<const unsigned char*>(u) + 6, bneed),
               MOEKIT_STATUS_MISALIGNED, {"u = "});
  // Recomputing u needs the larger workspace.
  size_t brecompute = 0;
  REQUIRE(moekit_experts_backward_workspace_size(&c, R, 0, &brecompute) == MOEKIT_STATUS_SUCCESS);
  require_fail(bwd(nullptr, nullptr, p, nullptr, nullptr, nullptr, nullptr, brecompute - 1),
               MOEKIT_STATUS_WORKSPACE_TOO_SMALL, {"workspace_bytes = "});
}

TEST_CASE("mlp config and argument validation", "[experts][api][mlp]") {
  moekit_mlp_config_t c;
  REQUIRE(moekit_mlp_config_init(&c, sizeof(c)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(c.weight_layout == MOEKIT_WEIGHT_IN_OUT);
  REQUIRE(c.dtype == MOEKIT_DTYPE_BF16);
  require_fail(moekit_mlp_config_check(&c), MOEKIT_STATUS_INVALID_ARGUMENT, {"moekit_mlp_config_check", "config->hidden = 0"});
  c.hidden = 64;
  c.inter = 24;
  REQUIRE(moekit_mlp_config_check(&c) == MOEKIT_STATUS_SUCCESS);
  c.weight_layout = 2;
  require_fail(moekit_mlp_config_check(&c), MOEKIT_STATUS_INVALID_ARGUMENT, {"config->weight_layout = 2"});
  c.weight_layout = MOEKIT_WEIGHT_OUT_IN;
  c.activation = MOEKIT_ACTIVATION_QUICK_GEGLU;
  require_fail(moekit_mlp_config_check(&c), MOEKIT_STATUS_INVALID_ARGUMENT, {"QUICK_GEGLU"});
  c.activation = MOEKIT_ACTIVATION_SWIGLU;

  size_t f = 1, b = 1;
  REQUIRE(moekit_mlp_forward_workspace_size(&c, 0, &f) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(f == 0);
  REQUIRE(moekit_mlp_forward_workspace_size(&c, 100, &f) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(f >= 100 * 48 * 4 + 100 * 24 * 2);
  REQUIRE(moekit_mlp_backward_workspace_size(&c, 100, 0, &b) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(b > f);
  require_fail(moekit_mlp_forward_workspace_size(&c, -2, &f), MOEKIT_STATUS_INVALID_ARGUMENT, {"num_tokens = -2"});

  alignas(256) static unsigned char buf[4][1024];
  require_fail(moekit_mlp_forward(nullptr, &c, 4, buf[0], buf[1], nullptr, buf[2], nullptr, nullptr, buf[3], nullptr,
                                  0, nullptr),
               MOEKIT_STATUS_INVALID_ARGUMENT, {"moekit_mlp_forward", "handle is NULL"});
  require_fail(moekit_mlp_backward(nullptr, &c, 4, buf[0], buf[1], nullptr, buf[2], nullptr, nullptr, buf[3], nullptr,
                                   nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr),
               MOEKIT_STATUS_INVALID_ARGUMENT, {"moekit_mlp_backward", "handle is NULL"});
  REQUIRE(moekit_mlp_handle_create(nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(moekit_mlp_handle_destroy(nullptr) == MOEKIT_STATUS_SUCCESS);
}

// ---------------------------------------------------------------------------------------------
// config->gemm_path and the host-side maths of the Hopper (sm_90a) grouped GEMM: tensor-map
// specs, which problems it takes, the shared-memory layout, and the wgmma descriptors replayed
// against the placement of TMA's 128-byte swizzle.

TEST_CASE("experts config: gemm_path default, bad values, older struct sizes", "[experts][api][sm90]") {
  moekit_experts_config_t c;
  REQUIRE(moekit_experts_config_init(&c, sizeof(c)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(c.gemm_path == MOEKIT_GEMM_PATH_AUTO);
  for (int32_t bad : {3, -1, 1000}) {
    moekit_experts_config_t x = valid_config();
    x.gemm_path = bad;
    const std::string words = "config->gemm_path = " + std::to_string(bad);
    require_fail(moekit_experts_config_check(&x), MOEKIT_STATUS_INVALID_ARGUMENT,
                 {"moekit_experts_config_check", words, "moekit_gemm_path_t"});
    size_t bytes = 77;
    require_fail(moekit_experts_forward_workspace_size(&x, 10, &bytes), MOEKIT_STATUS_INVALID_ARGUMENT, {words});
    REQUIRE(bytes == 77);
    require_fail(moekit_experts_backward_workspace_size(&x, 10, 1, &bytes), MOEKIT_STATUS_INVALID_ARGUMENT, {words});
  }
  for (int32_t good : {MOEKIT_GEMM_PATH_AUTO, MOEKIT_GEMM_PATH_SM80, MOEKIT_GEMM_PATH_SM90}) {
    moekit_experts_config_t x = valid_config();
    x.gemm_path = good;
    REQUIRE(moekit_experts_config_check(&x) == MOEKIT_STATUS_SUCCESS);
  }
  // A caller compiled before gemm_path existed: the field is not read (AUTO), whatever follows.
  const size_t old_size = offsetof(moekit_experts_config_t, gemm_path);
  moekit_experts_config_t old = valid_config();
  old.struct_size = old_size;
  old.gemm_path = 12345;
  REQUIRE(moekit_experts_config_check(&old) == MOEKIT_STATUS_SUCCESS);
  // ... and its init writes nothing past its struct.
  moekit_experts_config_t fresh;
  std::memset(&fresh, 0x5a, sizeof(fresh));
  REQUIRE(moekit_experts_config_init(&fresh, old_size) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(fresh.struct_size == old_size);
  int32_t untouched;
  std::memset(&untouched, 0x5a, sizeof(untouched));
  REQUIRE(fresh.gemm_path == untouched);
  // The same workspace whatever the path (the paths share the workspace layout).
  moekit_experts_config_t a = valid_config(), b = valid_config();
  b.gemm_path = MOEKIT_GEMM_PATH_SM90;
  size_t fa = 0, fb = 1, ba = 0, bb = 1;
  REQUIRE(moekit_experts_forward_workspace_size(&a, 1000, &fa) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(moekit_experts_forward_workspace_size(&b, 1000, &fb) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(moekit_experts_backward_workspace_size(&a, 1000, 0, &ba) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(moekit_experts_backward_workspace_size(&b, 1000, 0, &bb) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(fa == fb);
  REQUIRE(ba == bb);
}

namespace {

namespace s90 = moekit::kernels::experts::sm90;

kx::GroupedGemmProblem sm90_problem(int G, int64_t R, int k, int n, int64_t lda, int64_t ldb, int64_t group_stride,
                                    bool nk, int gate_up_half) {
  alignas(256) static unsigned char dummy[256];
  kx::GroupedGemmProblem p{};
  p.axis = kx::kAxisM;
  p.num_groups = G;
  p.offsets = nullptr;
  p.max_rows = R;
  p.n = n;
  p.k = k;
  p.a = dummy;
  p.lda = lda;
  p.b = dummy;
  p.ldb = ldb;
  p.b_group_stride = group_stride;
  p.b_nk = nk ? 1 : 0;
  p.gate_up_half = gate_up_half;
  p.splits = 1;
  return p;
}

}  // namespace

TEST_CASE("sm90 tensor-map specs: dims, strides and boxes of every operand", "[experts][sm90]") {
  // A = xp [R, H]: {H, R}, row stride 2H bytes, box [128 rows][64 k].
  const s90::TmaSpec a = s90::tma_spec_a(32768, 7168, 7168);
  REQUIRE(a.rank == 2);
  REQUIRE(a.dims[0] == 7168);
  REQUIRE(a.dims[1] == 32768);
  REQUIRE(a.strides[0] == 7168 * 2);
  REQUIRE(a.box[0] == 64);
  REQUIRE(a.box[1] == 128);
  REQUIRE(s90::tma_spec_valid(a));
  // W_gu [E, H, 2I], concatenated: {I, 2, H, E}, the up half I columns on.
  const int E = 32, H = 7168, I = 2048;
  const s90::TmaSpec gu = s90::tma_spec_b_kn(E, H, 2 * I, 2 * I, int64_t(H) * 2 * I, I);
  REQUIRE(gu.rank == 4);
  REQUIRE(gu.dims[0] == uint64_t(I));
  REQUIRE(gu.dims[1] == 2);
  REQUIRE(gu.dims[2] == uint64_t(H));
  REQUIRE(gu.dims[3] == uint64_t(E));
  REQUIRE(gu.strides[0] == uint64_t(I) * 2);
  REQUIRE(gu.strides[1] == uint64_t(2 * I) * 2);
  REQUIRE(gu.strides[2] == uint64_t(H) * 2 * I * 2);
  REQUIRE(gu.box[0] == 64);
  REQUIRE(gu.box[1] == 1);
  REQUIRE(gu.box[2] == 64);
  REQUIRE(gu.box[3] == 1);
  REQUIRE(s90::tma_spec_valid(gu));
  // W_down [E, I, H], plain: {H, 1, I, E}.
  const s90::TmaSpec down = s90::tma_spec_b_kn(E, I, H, H, int64_t(I) * H, 0);
  REQUIRE(down.dims[0] == uint64_t(H));
  REQUIRE(down.dims[1] == 1);
  REQUIRE(down.dims[2] == uint64_t(I));
  REQUIRE(down.strides[1] == uint64_t(H) * 2);
  REQUIRE(s90::tma_spec_valid(down));
  // dgrad: W_down read as [N = I][K = H] per group: {H, I, E}, box [256 n][64 k].
  const s90::TmaSpec nk = s90::tma_spec_b_nk(E, H, I, H, int64_t(I) * H);
  REQUIRE(nk.rank == 3);
  REQUIRE(nk.dims[0] == uint64_t(H));
  REQUIRE(nk.dims[1] == uint64_t(I));
  REQUIRE(nk.dims[2] == uint64_t(E));
  REQUIRE(nk.strides[0] == uint64_t(H) * 2);
  REQUIRE(nk.strides[1] == uint64_t(I) * H * 2);
  REQUIRE(nk.box[0] == 64);
  REQUIRE(nk.box[1] == 256);
  REQUIRE(s90::tma_spec_valid(nk));
  // The rules: 16-byte strides, strides covering the dimension below, boxes of at most 256.
  s90::TmaSpec bad = s90::tma_spec_a(100, 12, 12);  // 24-byte rows
  REQUIRE_FALSE(s90::tma_spec_valid(bad));
  bad = s90::tma_spec_a(100, 64, 56);  // rows overlap
  REQUIRE_FALSE(s90::tma_spec_valid(bad));
  bad = a;
  bad.box[1] = 257;
  REQUIRE_FALSE(s90::tma_spec_valid(bad));
  bad = a;
  bad.box[0] = 72;  // 144 bytes: wider than the 128-byte swizzle
  REQUIRE_FALSE(s90::tma_spec_valid(bad));
  bad = a;
  bad.dims[1] = 0;
  REQUIRE_FALSE(s90::tma_spec_valid(bad));
  bad = a;
  bad.strides[0] = uint64_t(1) << 40;
  REQUIRE_FALSE(s90::tma_spec_valid(bad));
  // Weight gradients: X [R, M] and Y [R, N] by rows, box [64 rows][64 columns].
  const s90::TmaSpec x = s90::tma_spec_rows(32768, 7168, 7168);
  REQUIRE(x.rank == 2);
  REQUIRE(x.dims[0] == 7168);
  REQUIRE(x.dims[1] == 32768);
  REQUIRE(x.strides[0] == 7168 * 2);
  REQUIRE(x.box[0] == 64);
  REQUIRE(x.box[1] == 64);
  REQUIRE(s90::tma_spec_valid(x));
  REQUIRE_FALSE(s90::tma_spec_valid(s90::tma_spec_rows(100, 20, 20)));
  // Small operands are fine: boxes larger than the tensor are zero-filled.
  REQUIRE(s90::tma_spec_valid(s90::tma_spec_a(1, 8, 8)));
  REQUIRE(s90::tma_spec_valid(s90::tma_spec_b_kn(1, 8, 16, 16, 128, 8)));
}

TEST_CASE("sm90 path takes the axis-M problems TMA can read, nothing else", "[experts][sm90]") {
  using kx::kEpiBwdAct;
  using kx::kEpiGateUp;
  using kx::kEpiRelu2;
  using kx::kEpiStore;
  using kx::kEpiWgrad;
  const int G = 8, H = 256, I = 136;
  const auto gate_up = sm90_problem(G, 1000, H, 2 * I, H, 2 * I, int64_t(H) * 2 * I, false, I);
  REQUIRE(s90::takes(gate_up, kEpiGateUp));
  REQUIRE_FALSE(s90::takes(gate_up, kEpiRelu2));  // pairing belongs to kEpiGateUp
  REQUIRE_FALSE(s90::takes(gate_up, kEpiBwdAct));
  const auto relu2 = sm90_problem(G, 1000, H, I, H, I, int64_t(H) * I, false, 0);
  REQUIRE(s90::takes(relu2, kEpiRelu2));
  REQUIRE(s90::takes(relu2, kEpiStore));
  REQUIRE(s90::takes(relu2, kEpiGateUp));  // interleaved gate/up: plain columns
  const auto dgrad = sm90_problem(G, 1000, H, I, H, H, int64_t(I) * H, true, 0);
  REQUIRE(s90::takes(dgrad, kEpiBwdAct));
  REQUIRE(s90::takes(dgrad, kEpiStore));
  REQUIRE_FALSE(s90::takes(dgrad, kEpiGateUp));
  REQUIRE_FALSE(s90::takes(dgrad, kEpiRelu2));
  auto odd = relu2;
  odd.lda = 260;  // 520-byte rows: not a multiple of 16 bytes
  REQUIRE_FALSE(s90::takes(odd, kEpiStore));
  odd = relu2;
  odd.ldb = 140;
  odd.n = 140;
  odd.b_group_stride = int64_t(H) * 140;
  REQUIRE_FALSE(s90::takes(odd, kEpiStore));
  odd = relu2;
  odd.a = static_cast<const char*>(relu2.a) + 2;
  REQUIRE_FALSE(s90::takes(odd, kEpiStore));
  odd = gate_up;
  odd.n = 2 * I - 8;  // pairing needs N = 2I
  REQUIRE_FALSE(s90::takes(odd, kEpiGateUp));
  odd = relu2;
  odd.max_rows = 0;
  REQUIRE_FALSE(s90::takes(odd, kEpiStore));
  odd.max_rows = int64_t(INT32_MAX) + 1;
  REQUIRE_FALSE(s90::takes(odd, kEpiStore));
  // Weight gradient dW_gu = xp^T du: X [R, H], Y [R, 2I].
  kx::GroupedGemmProblem wgrad = relu2;
  wgrad.axis = kx::kAxisK;
  wgrad.m = H;
  wgrad.n = 2 * I;
  wgrad.k = 0;
  wgrad.lda = H;
  wgrad.ldb = 2 * I;
  wgrad.b_group_stride = 0;
  wgrad.splits = 3;
  REQUIRE(s90::takes(wgrad, kEpiWgrad) == s90::kWgrad);
  REQUIRE_FALSE(s90::takes(wgrad, kEpiStore));
  odd = wgrad;
  odd.max_rows = 0;  // the sm_80 kernels write the zero gradients
  REQUIRE_FALSE(s90::takes(odd, kEpiWgrad));
  odd = wgrad;
  odd.ldb = 2 * I + 4;  // 552-byte rows
  REQUIRE_FALSE(s90::takes(odd, kEpiWgrad));
  // The smallest shapes the API allows (H = I = 8) are taken.
  REQUIRE(s90::takes(sm90_problem(1, 1, 8, 16, 8, 16, 128, false, 8), kEpiGateUp));
  REQUIRE(s90::takes(sm90_problem(1, 1, 8, 8, 8, 8, 64, true, 0), kEpiBwdAct));
}

TEST_CASE("sm90 shared-memory layout: aligned tiles, barriers, the prefix, within the H100 limit",
          "[experts][sm90]") {
  using L = s90::SmemLayout;
  using C = s90::TileConfig;
  REQUIRE(C::kThreads == 384);
  REQUIRE(L::kABytes == 128 * 64 * 2);
  REQUIRE(L::kBBytes == 256 * 64 * 2);
  REQUIRE(L::kBBoxBytes * 4 == L::kBBytes);
  for (int s = 0; s < C::kStages; ++s) {
    REQUIRE(L::a_offset(s) % 1024 == 0);
    REQUIRE(L::b_offset(s) % 1024 == 0);
    REQUIRE(L::b_offset(s) + L::kBBytes <= L::a_offset(s) + L::kStageBytes);
  }
  REQUIRE(L::kFullBarrier >= L::a_offset(C::kStages - 1) + L::kStageBytes);
  REQUIRE(L::kFullBarrier % 8 == 0);
  REQUIRE(L::kEmptyBarrier == L::kFullBarrier + 8 * C::kStages);
  REQUIRE(L::kPrefix == L::kEmptyBarrier + 8 * C::kStages);
  // The largest E must fit the opt-in limit of an H100/H200 block (227 KB = 232448 bytes).
  REQUIRE(L::bytes(MOEKIT_EXPERTS_MAX_EXPERTS) <= 232448);
  REQUIRE(L::bytes(1) == 1024 + L::kPrefix + (1 + 1 + 12) * 4);
  // Register budget of setmaxnreg: 128 producer threads + 256 consumer threads within 64K.
  REQUIRE(C::kProducerRegs * 128 + C::kConsumerRegs * 128 * C::kConsumers <= 65536);
  REQUIRE(C::kProducerRegs % 8 == 0);
  REQUIRE(C::kConsumerRegs % 8 == 0);
  // Every stage's loads announce exactly the stage's bytes when every box is issued.
  REQUIRE(s90::stage_tx_bytes() == L::kABytes + 4 * L::kBBoxBytes);
  // BN = 256 on both tensor-core paths (static_assert in grouped_gemm.cu): the dgrad's dp partials
  // have one column per 256 columns whichever path wrote them.
  REQUIRE(C::kBN == 256);
}

TEST_CASE("sm90 64-row tile: layout, ring depths, register budget, 32-bit tile counts", "[experts][sm90]") {
  using C = s90::TileConfig64;
  using L = s90::SmemLayoutOf<C>;
  REQUIRE(C::kBM == 64);
  REQUIRE(C::kConsumers == 1);
  REQUIRE(C::kThreads == 256);
  REQUIRE(C::kBN == s90::TileConfig::kBN);
  REQUIRE(L::kABytes == 64 * 64 * 2);
  REQUIRE(L::kStageBytes == L::kABytes + L::kBBytes);
  for (int s = 0; s < C::kStages; ++s) {
    REQUIRE(L::a_offset(s) % 1024 == 0);
    REQUIRE(L::b_offset(s) % 1024 == 0);
  }
  // One consumer warpgroup's staging region in either epilogue.
  REQUIRE(s90::tma_store_staging_bytes<C>() == s90::kTmaStoreRegionBytes);
  REQUIRE(s90::bwd_staging_bytes<C>() == s90::kBwdStageRegionBytes);
  REQUIRE(s90::SmemLayoutTmaStore<4, C>::kStaging % 1024 == 0);
  REQUIRE(s90::SmemLayoutTmaStore<3, C>::kStaging % 1024 == 0);
  // Smaller than the 128-row layouts at every E: wherever those fit, so does this, as deep or deeper.
  const size_t optin = 232448;
  for (int E : {0, 1, 32, 128, 256, 483, 484, 600, 2048, 4067, 4068, MOEKIT_EXPERTS_MAX_EXPERTS}) {
    INFO("E = " << E);
    REQUIRE(s90::SmemLayoutTmaStore<4, C>::bytes(E) < s90::SmemLayoutTmaStore<4>::bytes(E));
    REQUIRE(s90::SmemLayoutBwdAct<4, C>::bytes(E) < s90::SmemLayoutBwdAct<4>::bytes(E));
    REQUIRE(s90::tma_store_stages<C>(E, optin) >= s90::tma_store_stages(E, optin));
    REQUIRE(s90::bwd_act_staged_stages<C>(E, optin) >= s90::bwd_act_staged_stages(E, optin));
    const int st = s90::tma_store_stages<C>(E, optin);
    REQUIRE((st == 3 || st == 4));
    REQUIRE((st == 4 ? s90::SmemLayoutTmaStore<4, C>::bytes(E) : s90::SmemLayoutTmaStore<3, C>::bytes(E)) <= optin);
  }
  REQUIRE(s90::tma_store_stages<C>(1, 100000) == 0);
  // Compiled under the 384-thread bound (168 registers at entry): 256 threads hold the producer's
  // 40 and one consumer warpgroup's 232.
  REQUIRE(C::kMaxThreads == s90::TileConfig::kThreads);
  REQUIRE(C::kProducerRegs * 128 + C::kConsumerRegs * 128 * C::kConsumers <= 168 * C::kThreads);
  // The kernel decodes tiles in 32 bits: 64-row tiles double the worst-case row tiles.
  kx::GroupedGemmProblem p{};
  p.num_groups = 2048;
  p.max_rows = int64_t(1) << 30;
  p.n = 256 * 150;
  REQUIRE(s90::tile_count_fits(p, 128));       // (2^23 + 2048) row tiles x 150 < 2^31
  REQUIRE_FALSE(s90::tile_count_fits(p, 64));  // (2^24 + 2048) x 150 > 2^31 - 1
  p.n = 256;
  REQUIRE(s90::tile_count_fits(p, 64));
}

TEST_CASE("sm90 tile per shape class: 64 rows where groups average at most 32 rows", "[experts][sm90]") {
  kx::GroupedGemmProblem p{};
  p.axis = kx::kAxisM;
  p.num_groups = 32;
  p.n = 4096;
  p.k = 7168;
  for (kx::EpiKind kind : {kx::kEpiGateUp, kx::kEpiRelu2, kx::kEpiStore, kx::kEpiBwdAct}) {
    INFO("kind " << static_cast<int>(kind));
    p.max_rows = 32 * s90::kSmallGroupRows;
    REQUIRE(s90::choose_tile(p, kind) == s90::Tile::k64);
    p.max_rows = 1;  // one row in all
    REQUIRE(s90::choose_tile(p, kind) == s90::Tile::k64);
    p.max_rows = 32 * s90::kSmallGroupRows + 1;
    REQUIRE(s90::choose_tile(p, kind) == s90::Tile::k128);
    p.max_rows = 32768;  // the benchmark's dsv3-ep8 forward: 1024 rows per expert
    REQUIRE(s90::choose_tile(p, kind) == s90::Tile::k128);
  }
  // The weight gradients have one tile; a 64-row tile count past the 32-bit decode falls back.
  p.max_rows = 32 * 64;  // 64 rows per group: the 128-row tile
  REQUIRE(s90::choose_tile(p, kx::kEpiStore) == s90::Tile::k128);
  p.max_rows = 64;
  REQUIRE(s90::choose_tile(p, kx::kEpiWgrad) == s90::Tile::k128);
  p.axis = kx::kAxisK;
  REQUIRE(s90::choose_tile(p, kx::kEpiStore) == s90::Tile::k128);
  p.axis = kx::kAxisM;
  p.num_groups = 1 << 16;
  p.max_rows = int64_t(1) << 21;  // 32 rows per group
  p.n = 256 * 32768;
  REQUIRE_FALSE(s90::tile_count_fits(p, 64));
  REQUIRE(s90::choose_tile(p, kx::kEpiStore) == s90::Tile::k128);
}

TEST_CASE("sm90 staged activation-backward epilogue: layout, smem budget, fragment and item coverage",
          "[experts][sm90]") {
  using C = s90::TileConfig;
  const size_t optin = 232448;  // H100 / H200 opt-in shared memory per block (227 KB)
  if (!s90::kBwdActStaged) {
    REQUIRE(s90::bwd_act_staged_stages(1, optin) >= 0);
    return;
  }
  // Both ring depths: the staging regions after the ring, the barriers after them.
  auto check_layout = [](auto layout, int stages) {
    using L = decltype(layout);
    REQUIRE(L::kStages == stages);
    REQUIRE(L::kStaging == L::kStages * L::kStageBytes);
    REQUIRE(L::kStaging % 16 == 0);
    REQUIRE(L::kStagingBytes == s90::kBwdStagingBytes);
    REQUIRE(L::kFullBarrier == L::kStaging + L::kStagingBytes);
    REQUIRE(L::kFullBarrier % 8 == 0);
    REQUIRE(L::kEmptyBarrier == L::kFullBarrier + 8 * L::kStages);
    REQUIRE(L::kPrefix == L::kEmptyBarrier + 8 * L::kStages);
    for (int s = 0; s < L::kStages; ++s) {
      REQUIRE(L::a_offset(s) % 1024 == 0);
      REQUIRE(L::b_offset(s) % 1024 == 0);
    }
  };
  check_layout(s90::SmemLayoutBwdAct<4>{}, 4);
  check_layout(s90::SmemLayoutBwdAct<3>{}, 3);
  REQUIRE(s90::kBwdStageRegionBytes == s90::kBwdStagePassRows * s90::kBwdStageStride * 4);
  REQUIRE(s90::kBwdStageRegionBytes % 16 == 0);
  REQUIRE(s90::kBwdStagingBytes == C::kConsumers * s90::kBwdStageRegionBytes);
  // Ring depth per E: 4 stages wherever they fit (every benchmark shape, up to E = 4067), 3 up to
  // the largest E; the choice always fits, and 4 is never refused where it would have fit.
  for (int E : {1, 8, 32, 128, 256, 1024, 2048, 4000, 4067, 4068, 4096, 8000, MOEKIT_EXPERTS_MAX_EXPERTS}) {
    INFO("E = " << E);
    const int st = s90::bwd_act_staged_stages(E, optin);
    REQUIRE((st == 3 || st == 4));
    REQUIRE(st == (s90::SmemLayoutBwdAct<4>::bytes(E) <= optin ? 4 : 3));
    REQUIRE((st == 4 ? s90::SmemLayoutBwdAct<4>::bytes(E) : s90::SmemLayoutBwdAct<3>::bytes(E)) <= optin);
  }
  REQUIRE(s90::bwd_act_staged_stages(256, optin) == 4);
  REQUIRE(s90::bwd_act_staged_stages(MOEKIT_EXPERTS_MAX_EXPERTS, optin) == 3);
  REQUIRE(s90::bwd_act_staged_stages(1, 100000) == 0);
  // What the host's shared-memory need (grouped_sm90_smem_bytes: the largest of the 4-stage
  // layout and the staged 3-stage one) promises: wherever it fits a device, the staged kernel
  // finds a ring depth that fits too.
  for (int E : {1, 4067, 4068, MOEKIT_EXPERTS_MAX_EXPERTS})
    for (size_t limit : {optin, size_t(200000), size_t(216184), size_t(163840)}) {
      const size_t need = std::max(s90::SmemLayoutBwdAct<3>::bytes(E), s90::SmemLayout::bytes(E));
      if (need <= limit) REQUIRE(s90::bwd_act_staged_stages(E, limit) >= 3);
    }

  // Fragment stores of one pass (sub-tile s, pass P): the writer warps' (h, jj, e) land in
  // distinct floats inside the region and hold warpgroup row 16 warp + lane / 4 + 8 h, sub-tile
  // column 8 jj + 2 q + e; each half-warp's 8-byte stores hit 32 distinct banks.
  const int stride = s90::kBwdStageStride;
  const int region = s90::kBwdStagePassRows * stride;
  for (int pass = 0; pass < 2; ++pass) {
    INFO("pass " << pass);
    std::vector<int> row_of(region, -1), col_of(region, -1);
    for (int warp = 0; warp < 4; ++warp) {
      if (s90::bwd_stage_writer_pass(warp) != pass) continue;
      for (int lane = 0; lane < 32; ++lane)
        for (int h = 0; h < 2; ++h)
          for (int jj = 0; jj < 8; ++jj)
            for (int e = 0; e < 2; ++e) {
              const int idx = s90::bwd_stage_store_index(warp, lane, h, jj) + e;
              REQUIRE(idx >= 0);
              REQUIRE(idx < region);
              REQUIRE(row_of[idx] == -1);
              REQUIRE(s90::bwd_stage_store_index(warp, lane, h, jj) ==
                      s90::bwd_stage_store_index(warp, lane, 0, 0) + s90::bwd_stage_store_index(0, 0, h, jj));
              row_of[idx] = 16 * warp + lane / 4 + 8 * h;
              col_of[idx] = 8 * jj + 2 * (lane % 4) + e;
            }
      for (int h = 0; h < 2; ++h)
        for (int jj = 0; jj < 8; ++jj)
          for (int half = 0; half < 2; ++half) {
            std::set<int> banks;
            for (int lane = 16 * half; lane < 16 * half + 16; ++lane)
              for (int e = 0; e < 2; ++e) banks.insert((s90::bwd_stage_store_index(warp, lane, h, jj) + e) % 32);
            REQUIRE(banks.size() == 32);
          }
    }
    // Items of this pass (any sub-tile: the pass layout is the same): 16-byte aligned reads of 8
    // staged floats that are exactly the item's row and columns.
    for (int ctid = 0; ctid < C::kWarpgroupThreads; ++ctid)
      for (int k = 0; k < 16; ++k) {
        if (s90::bwd_stage_item_pass(k) != pass) continue;
        const int r = s90::bwd_stage_item_row(ctid, k), col = s90::bwd_stage_item_column(ctid, k);
        const int sub = k / 4;
        const int li = s90::bwd_stage_load_index(ctid, k);
        REQUIRE(li % 4 == 0);  // 16-byte loads
        REQUIRE(li >= 0);
        REQUIRE(li + 8 <= region);
        for (int m = 0; m < 8; ++m) {
          REQUIRE(row_of[li + m] == r);
          REQUIRE(col_of[li + m] + sub * s90::kBwdStageCols == col + m);
        }
      }
  }
  // Items over the 4 sub-tiles: every (row, column) of the warpgroup's 64 x 256 tile exactly once;
  // items are staged in order (a pass's items follow its staging, k even starts a pass).
  std::vector<int> seen(s90::kBwdStageRows * C::kBN, 0);
  for (int ctid = 0; ctid < C::kWarpgroupThreads; ++ctid)
    for (int k = 0; k < 16; ++k) {
      const int r = s90::bwd_stage_item_row(ctid, k), col = s90::bwd_stage_item_column(ctid, k);
      const int sub = k / 4;
      REQUIRE(r >= 0);
      REQUIRE(r < s90::kBwdStageRows);
      REQUIRE(r / s90::kBwdStagePassRows == s90::bwd_stage_item_pass(k));
      REQUIRE(s90::bwd_stage_item_pass(k) == s90::bwd_stage_item_pass(k & ~1));
      REQUIRE(col >= sub * s90::kBwdStageCols);
      REQUIRE(col + 8 <= (sub + 1) * s90::kBwdStageCols);
      REQUIRE(col % 8 == 0);
      for (int m = 0; m < 8; ++m) ++seen[r * C::kBN + col + m];
      // The row's 8 threads (its dp lanes) are 8 consecutive lanes of one warp, aligned to 8.
      REQUIRE(s90::bwd_stage_item_row(ctid ^ 1, k) == r);
      REQUIRE(s90::bwd_stage_item_row(ctid ^ 2, k) == r);
      REQUIRE(s90::bwd_stage_item_row(ctid ^ 4, k) == r);
      REQUIRE(s90::bwd_stage_item_row(ctid ^ 8, k) != r);
      // The same thread keeps the same 4 rows in every sub-tile (dp accumulates per row, rotated).
      REQUIRE(s90::bwd_stage_item_row(ctid, k) == s90::bwd_stage_item_row(ctid, k % 4));
    }
  for (int v : seen) REQUIRE(v == 1);

  // Which GEMMs take it: aligned u, du, h' and strides / I multiples of 8.
  alignas(16) static unsigned char buf[4][64];
  kx::GroupedGemmProblem p = sm90_problem(4, 1000, 64, 40, 64, 64, 64 * 40, true, 0);
  kx::EpilogueParams ep;
  ep.u = buf[0];
  ep.c = buf[1];
  ep.h = buf[2];
  ep.ldu = 80;
  ep.ldc = 80;
  ep.ldh = 40;
  ep.inter = 40;
  REQUIRE(s90::bwd_act_staged_takes(p, ep));
  kx::EpilogueParams bad = ep;
  bad.u = buf[0] + 8;
  REQUIRE_FALSE(s90::bwd_act_staged_takes(p, bad));
  bad = ep;
  bad.h = buf[2] + 2;
  REQUIRE_FALSE(s90::bwd_act_staged_takes(p, bad));
  bad = ep;
  bad.ldc = 84;
  REQUIRE_FALSE(s90::bwd_act_staged_takes(p, bad));
  bad = ep;
  bad.inter = 44;
  REQUIRE_FALSE(s90::bwd_act_staged_takes(p, bad));
  bad = ep;
  bad.h = nullptr;
  REQUIRE_FALSE(s90::bwd_act_staged_takes(p, bad));
  kx::GroupedGemmProblem odd = p;
  odd.n = 44;
  REQUIRE_FALSE(s90::bwd_act_staged_takes(odd, ep));
}

namespace {

struct Desc {
  uint32_t start, lbo, sbo, swizzle;
};
Desc decode_desc(uint64_t d) {
  return {static_cast<uint32_t>(d & 0x3FFF) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4, static_cast<uint32_t>(d >> 62)};
}
// The 128-byte swizzle as the hardware applies it to a shared-memory byte address (bits 4-6 XOR
// bits 7-9; tiles sit on 1024-byte boundaries).
uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7) << 4); }

// Where wgmma reads 16-bit element (mn, k) of an m64/n256 x k16 operand through descriptor d, in
// the canonical layouts of the PTX ISA (units of 16-byte "T" = 8 elements):
//   K-major, 128B swizzle:  ((8, m), (T, 2k)) : ((8T, SBO), (1, T))
//   MN-major, 128B swizzle: ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))
uint32_t wgmma_read_addr(const Desc& d, bool mn_major, int mn, int k) {
  uint32_t off;
  if (!mn_major)
    off = (mn % 8) * 128 + (mn / 8) * d.sbo + k * 2;
  else
    off = (mn % 8) * 2 + ((mn / 8) % 8) * 16 + (mn / 64) * d.lbo + (k % 8) * 128 + (k / 8) * d.sbo;
  return swizzle128(d.start + off);
}

}  // namespace

TEST_CASE("sm90 TMA-store epilogue: smem budget, ring depth, swizzled staging, fragment coverage",
          "[experts][sm90]") {
  const size_t optin = 232448;  // H100 / H200 opt-in shared memory per block (227 KB)
  // Budget: ring + two [64][128] T regions + barriers + prefix; 4 stages up to E = 483, 3 beyond,
  // 3 stages for every E the API allows; the regions start on swizzle atoms after the ring.
  using L4 = s90::SmemLayoutTmaStore<4>;
  using L3 = s90::SmemLayoutTmaStore<3>;
  REQUIRE(s90::kTmaStoreRegionBytes == 64 * 128 * 2);
  REQUIRE(L4::kStaging == 4 * L4::kStageBytes);
  REQUIRE(L3::kStaging == 3 * L3::kStageBytes);
  REQUIRE(L4::kFullBarrier == L4::kStaging + 2 * s90::kTmaStoreRegionBytes);
  REQUIRE(L4::bytes(0) == 1024 + 4 * 49152 + 32768 + 64 + 12 * 4 + 4);
  REQUIRE(L4::bytes(483) <= optin);
  REQUIRE(L4::bytes(484) > optin);
  REQUIRE(s90::tma_store_stages(0, optin) == 4);    // weight gradients: no prefix
  REQUIRE(s90::tma_store_stages(483, optin) == 4);
  REQUIRE(s90::tma_store_stages(484, optin) == 3);
  REQUIRE(s90::tma_store_stages(MOEKIT_EXPERTS_MAX_EXPERTS, optin) == 3);
  REQUIRE(L3::bytes(MOEKIT_EXPERTS_MAX_EXPERTS) <= optin);
  REQUIRE(s90::tma_store_stages(1, 100000) == 0);
  // Never more than the plain 4-stage ring (grouped_sm90_smem_bytes sizes the check by it).
  REQUIRE(L3::bytes(MOEKIT_EXPERTS_MAX_EXPERTS) <= s90::SmemLayout::bytes(MOEKIT_EXPERTS_MAX_EXPERTS));
  // Staging offsets: box col / 64 of 8 KB, inside it TMA's 128B swizzle (swizzled_offset).
  for (uint32_t r = 0; r < 64; ++r)
    for (uint32_t col = 0; col < 128; ++col)
      REQUIRE(s90::tma_store_offset(r, col) == (col / 64) * 8192 + s90::swizzled_offset(r, col % 64));
  // Fragment writes of one warpgroup and half tile (warp, lane, h, jj): every 4-byte word of the
  // 16 KB region exactly once, each holding the element pair (row, col), (row, col + 1) the
  // accumulator pair d[4 j + 2 h], d[4 j + 2 h + 1] covers (row 16 warp + lane / 4 + 8 h, column
  // 8 jj + 2 (lane % 4)); one (h, jj) warp instruction hits 32 distinct banks.
  std::vector<int> seen(s90::kTmaStoreRegionBytes / 4, 0);
  for (int warp = 0; warp < 4; ++warp)
    for (int h = 0; h < 2; ++h)
      for (int jj = 0; jj < 16; ++jj) {
        std::set<uint32_t> banks;
        for (int lane = 0; lane < 32; ++lane) {
          const uint32_t r = 16 * warp + lane / 4 + 8 * h, col = 8 * jj + 2 * (lane % 4);
          const uint32_t off = s90::tma_store_offset(r, col);
          REQUIRE(off % 4 == 0);
          REQUIRE(s90::tma_store_offset(r, col + 1) == off + 2);  // the pair's second element
          REQUIRE(off < s90::kTmaStoreRegionBytes);
          ++seen[off / 4];
          banks.insert((off / 4) % 32);
        }
        REQUIRE(banks.size() == 32);
      }
  for (int v : seen) REQUIRE(v == 1);
  // Output tensor maps: [R][N] rows of ldc (box 64 x 64), weight gradients {N, M, G}.
  const s90::TmaSpec o = s90::tma_spec_store_rows(1000, 328, 336);
  REQUIRE(o.rank == 2);
  REQUIRE(o.dims[0] == 328);
  REQUIRE(o.dims[1] == 1000);
  REQUIRE(o.strides[0] == 336 * 2);
  REQUIRE(o.box[0] == 64);
  REQUIRE(o.box[1] == 64);
  REQUIRE(s90::tma_spec_valid(o));
  const s90::TmaSpec w = s90::tma_spec_store_wgrad(32, 200, 328);
  REQUIRE(w.rank == 3);
  REQUIRE(w.dims[0] == 328);
  REQUIRE(w.dims[1] == 200);
  REQUIRE(w.dims[2] == 32);
  REQUIRE(w.strides[0] == 328 * 2);
  REQUIRE(w.strides[1] == 200ull * 328 * 2);
  REQUIRE(w.box[2] == 1);
  REQUIRE(s90::tma_spec_valid(w));
  REQUIRE(!s90::tma_spec_valid(s90::tma_spec_store_wgrad(4, 64, 12)));  // N * 2 bytes not a 16-byte multiple
}

TEST_CASE("sm90 TMA-store epilogue takes kEpiStore with aligned C and unsplit wgrad, nothing else",
          "[experts][sm90]") {
  namespace kx = moekit::kernels::experts;
  alignas(16) static unsigned char buf[64];
  kx::GroupedGemmProblem p{};
  p.axis = kx::kAxisM;
  p.num_groups = 4;
  p.max_rows = 1000;
  p.n = 328;
  p.k = 192;
  p.splits = 1;
  kx::EpilogueParams ep{};
  ep.c = buf;
  ep.ldc = 328;
  REQUIRE(s90::tma_store_takes(p, kx::kEpiStore, ep));
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiGateUp, ep));
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiRelu2, ep));
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiBwdAct, ep));
  ep.ldc = 332;  // not a multiple of 8 elements
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiStore, ep));
  ep.ldc = 320;  // rows overlap (ldc < N)
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiStore, ep));
  ep.ldc = 336;
  ep.c = buf + 8;  // 8-byte aligned only
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiStore, ep));
  ep.c = nullptr;
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiStore, ep));
  ep.c = buf;
  REQUIRE(s90::tma_store_takes(p, kx::kEpiStore, ep));
  p.axis = kx::kAxisK;
  p.m = 200;
  REQUIRE(s90::tma_store_takes(p, kx::kEpiWgrad, ep));
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiStore, ep));
  p.splits = 2;  // fp32 split partials: register-direct
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiWgrad, ep));
  p.splits = 1;
  p.n = 12;
  REQUIRE(!s90::tma_store_takes(p, kx::kEpiWgrad, ep));
}

TEST_CASE("sm90 gate-up TMA-store epilogue: staging offsets, output maps, what it takes", "[experts][sm90]") {
  namespace kx = moekit::kernels::experts;
  // The epilogue's XOR form of the staging offsets is tma_store_offset: pair columns 8 j + 2 q,
  // single columns (interleaved h) 4 j + q; rows lr and lr + 8 are 1024 bytes apart.
  for (uint32_t r = 0; r < 64; ++r) {
    if (r < 56) REQUIRE(s90::tma_store_row_base(r + 8) == s90::tma_store_row_base(r) + 1024);
    for (uint32_t col = 0; col < 128; ++col) {
      const uint32_t base = s90::tma_store_row_base(r);
      // Pairs: column 8 j + 2 q = col with q = (col % 8) / 2, col even.
      if (col % 2 == 0)
        REQUIRE(s90::tma_store_col_offset(base, col - col % 8) + 2 * (col % 8) == s90::tma_store_offset(r, col));
      // Interleaved h: column 4 j + q = col with q = col % 4.
      REQUIRE(s90::tma_store_col_offset(base, col - col % 4) + 2 * (col % 4) == s90::tma_store_offset(r, col));
      // And with a 1024-aligned region added before the XOR.
      REQUIRE(s90::tma_store_col_offset(3 * 16384 + base, col - col % 4) + 2 * (col % 4) ==
              3 * 16384 + s90::tma_store_offset(r, col));
    }
    for (uint32_t ch = 0; ch < 16; ++ch) {
      REQUIRE(s90::tma_store_chunk_offset(r, ch) == s90::tma_store_offset(r, 8 * ch));
      if (r < 56) REQUIRE(s90::tma_store_chunk_offset(r + 8, ch) == s90::tma_store_chunk_offset(r, ch) + 1024);
    }
  }
  // Interleaved h fragment writes (2-byte elements 4 j + q of rows 16 warp + lane / 4 + 8 h):
  // every element of the region once, no two lanes of a warp in the same bank at different words.
  std::vector<int> seen(s90::kTmaStoreRegionBytes / 2, 0);
  for (int warp = 0; warp < 4; ++warp)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 32; ++j) {
        std::map<uint32_t, std::set<uint32_t>> words_of_bank;
        for (int lane = 0; lane < 32; ++lane) {
          const uint32_t r = 16 * warp + lane / 4 + 8 * h, col = 4 * j + lane % 4;
          const uint32_t off = s90::tma_store_offset(r, col);
          ++seen[off / 2];
          words_of_bank[(off / 4) % 32].insert(off / 4);
        }
        for (const auto& kv : words_of_bank) REQUIRE(kv.second.size() == 1);
      }
  for (int v : seen) REQUIRE(v == 1);

  // Output maps: h [R][I] rows of ldc; concatenated u as {I, 2, R} (each half clips at I), else
  // [R][N] rows of ldu.
  kx::GroupedGemmProblem p{};
  p.axis = kx::kAxisM;
  p.num_groups = 4;
  p.max_rows = 1000;
  p.k = 192;
  p.splits = 1;
  p.n = 400;
  p.gate_up_half = 200;
  REQUIRE(s90::gate_up_h_cols(p, kx::kEpiGateUp) == 200);
  const s90::TmaSpec u = s90::tma_spec_store_u(p, 408);
  REQUIRE(u.rank == 3);
  REQUIRE(u.dims[0] == 200);
  REQUIRE(u.dims[1] == 2);
  REQUIRE(u.dims[2] == 1000);
  REQUIRE(u.strides[0] == 200 * 2);
  REQUIRE(u.strides[1] == 408 * 2);
  REQUIRE(u.box[0] == 64);
  REQUIRE(u.box[1] == 1);
  REQUIRE(u.box[2] == 64);
  REQUIRE(s90::tma_spec_valid(u));
  p.gate_up_half = 0;  // interleaved: h has N / 2 columns, u is [R][N]
  REQUIRE(s90::gate_up_h_cols(p, kx::kEpiGateUp) == 200);
  REQUIRE(s90::gate_up_h_cols(p, kx::kEpiRelu2) == 400);
  const s90::TmaSpec ui = s90::tma_spec_store_u(p, 408);
  REQUIRE(ui.rank == 2);
  REQUIRE(ui.dims[0] == 400);
  REQUIRE(ui.strides[0] == 408 * 2);
  REQUIRE(s90::tma_spec_valid(ui));

  alignas(16) static unsigned char hbuf[64], ubuf[64];
  kx::EpilogueParams ep{};
  ep.c = hbuf;
  ep.ldc = 200;
  p.gate_up_half = 200;
  REQUIRE(s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiRelu2, ep));  // relu2 has no pairing
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiStore, ep));
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiBwdAct, ep));
  ep.u = ubuf;
  ep.ldu = 400;
  REQUIRE(s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  ep.ldu = 396;  // u rows overlap
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  ep.ldu = 404;  // not a multiple of 8 elements
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  ep.ldu = 400;
  ep.u = ubuf + 8;  // 8-byte aligned only
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  ep.u = ubuf;
  ep.c = nullptr;  // u alone: register-direct
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  ep.c = hbuf + 4;
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  ep.c = hbuf;
  ep.ldc = 196;  // h rows overlap
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  ep.ldc = 204;
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  ep.ldc = 208;
  REQUIRE(s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  p.n = 404;  // pairing needs N = 2 I
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  p.n = 408;
  p.gate_up_half = 204;  // I not a multiple of 8: the tail copies' 16-byte chunks would straddle
  ep.ldc = 208;
  ep.ldu = 408;
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  p.gate_up_half = 0;  // interleaved N = 408: h has 204 columns
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiGateUp, ep));
  REQUIRE(s90::tma_store_gate_up_takes(p, kx::kEpiRelu2, ep) == false);  // relu2 h has N = 408 > ldc
  ep.ldc = 408;
  REQUIRE(s90::tma_store_gate_up_takes(p, kx::kEpiRelu2, ep));
  p.b_nk = 1;  // forward only
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiRelu2, ep));
  p.b_nk = 0;
  p.axis = kx::kAxisK;
  REQUIRE(!s90::tma_store_gate_up_takes(p, kx::kEpiRelu2, ep));
}

TEST_CASE("sm90 wgmma descriptors read exactly what TMA's 128-byte swizzle wrote", "[experts][sm90]") {
  // Shared memory as byte addresses: a stage at 1024-aligned `base`; TMA writes element (row,
  // inner) of a box at swizzled_offset(row, inner) from the box start.
  const uint32_t base = 3 * 49152 + 1024;  // stage 3 of a 1024-aligned ring
  using L = s90::SmemLayout;
  for (int wg = 0; wg < 2; ++wg)
    for (int kk = 0; kk < 4; ++kk) {
      // A [128 rows][64 k]: warpgroup wg reads rows 64 wg .., k step kk.
      const uint64_t da = s90::wgmma_desc(base + wg * 64 * 128, s90::kDescALbo, s90::kDescASbo) +
                          ((kk * s90::kAStepBytes) >> 4);
      const Desc d = decode_desc(da);
      REQUIRE(d.swizzle == 1);
      for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 16; ++k)
          REQUIRE(wgmma_read_addr(d, false, m, k) == base + s90::swizzled_offset(64 * wg + m, 16 * kk + k));
    }
  for (int kk = 0; kk < 4; ++kk) {
    // B KN: four boxes [64 k][64 n]; logical column n of the tile lives in box n / 64.
    const uint32_t b0 = base + L::kABytes;
    const uint64_t db = s90::wgmma_desc(b0, s90::kDescBKnLbo, s90::kDescBKnSbo) + ((kk * s90::kBKnStepBytes) >> 4);
    const Desc d = decode_desc(db);
    for (int n = 0; n < 256; ++n)
      for (int k = 0; k < 16; ++k)
        REQUIRE(wgmma_read_addr(d, true, n, k) ==
                b0 + (n / 64) * L::kBBoxBytes + s90::swizzled_offset(16 * kk + k, n % 64));
    // B NK: one box [256 n][64 k].
    const uint64_t dn = s90::wgmma_desc(b0, s90::kDescBNkLbo, s90::kDescBNkSbo) + ((kk * s90::kBNkStepBytes) >> 4);
    const Desc e = decode_desc(dn);
    for (int n = 0; n < 256; ++n)
      for (int k = 0; k < 16; ++k)
        REQUIRE(wgmma_read_addr(e, false, n, k) == b0 + s90::swizzled_offset(n, 16 * kk + k));
  }
  // A of a weight gradient (X^T, M-major): consumer warpgroup c reads box c, [64 rows = k][64 m].
  for (int c = 0; c < 2; ++c)
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t box = base + c * L::kBBoxBytes;
      const uint64_t da = s90::wgmma_desc(box, s90::kDescAMnLbo, s90::kDescAMnSbo) + ((kk * s90::kAMnStepBytes) >> 4);
      const Desc d = decode_desc(da);
      for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 16; ++k)
          REQUIRE(wgmma_read_addr(d, true, m, k) == box + s90::swizzled_offset(16 * kk + k, m));
    }
  // The swizzle permutes 16-byte chunks within each 128-byte row: a bijection on every atom.
  std::set<uint32_t> seen;
  for (uint32_t r = 0; r < 8; ++r)
    for (uint32_t c = 0; c < 64; ++c) REQUIRE(seen.insert(s90::swizzled_offset(r, c)).second);
  REQUIRE(*seen.rbegin() == 1023 - 1);
}

TEST_CASE("sm90 tiles cover the sm_80 path's columns: gate/up boxes and epilogue columns", "[experts][sm90]") {
  for (int I : {8, 24, 72, 136, 200, 768, 2048}) {
    // Paired (concatenated gate | up, N = 2I): tile n_tile of 256 virtual columns.
    const int N = 2 * I, tiles = (N + 255) / 256;
    std::vector<int> stored(I, 0);
    for (int t = 0; t < tiles; ++t) {
      const int n0 = 256 * t;
      // Logical tile column L (box L / 64) holds gate / up column I_L of the map.
      auto map_column = [&](int L, int* half) {
        const int j = L / 64;
        *half = s90::kn_box_half(j, true);
        return s90::kn_box_column(n0, j, true) + L % 64;
      };
      for (int j = 0; j < 16; ++j)
        for (int q = 0; q < 4; ++q)
          for (int e = 0; e < 2; ++e) {
            const int i = s90::paired_h_column(n0, j, q) + e;
            int half_g = -1, half_u = -1;
            const int g = map_column(8 * j + 2 * q + e, &half_g);
            const int u = map_column(8 * (j + 16) + 2 * q + e, &half_u);
            REQUIRE(half_g == 0);
            REQUIRE(half_u == 1);
            REQUIRE(g == i);  // the gate column of h column i ...
            REQUIRE(u == i);  // ... and its up column, in the same lane
            if (i < I) {
              ++stored[i];
              // The sm_80 path's tile t computes the same h columns (virtual columns of tile t).
              bool in_sm80_tile = false;
              for (int v = n0; v < n0 + 256 && v < N; ++v)
                if (((v >> 3) & 1) == 0 && kx::paired_gate_index(v) == i) in_sm80_tile = true;
              REQUIRE(in_sm80_tile);
            }
          }
    }
    for (int c : stored) REQUIRE(c == 1);  // every h column exactly once
    // Plain columns (interleaved, relu2, down, dgrad): tile t covers [256 t, 256 t + 256) once.
    std::vector<int> plain(N, 0);
    for (int t = 0; t < tiles; ++t)
      for (int j = 0; j < 32; ++j)
        for (int q = 0; q < 4; ++q)
          for (int e = 0; e < 2; ++e) {
            const int c = s90::plain_column(256 * t, j, q) + e;
            REQUIRE(s90::kn_box_column(256 * t, j / 8, false) + (8 * j + 2 * q + e) % 64 == c);
            if (c < N) ++plain[c];
          }
    for (int c : plain) REQUIRE(c == 1);
  }
}
