// Layer family, CPU suite (no device needed):
//   - the reference: its backward against central finite differences of the objective it
//     differentiates, for a tiny version of every model of the table (aux term included); a layer
//     of one expert equals the experts reference; an all-padding batch gives the shared MLP alone;
//   - the configuration: every bad field of the layer config and of the three family configs it
//     points to is rejected by moekit_layer_config_check and moekit_layer_create with a message
//     that names it through the caller's path ("config->experts->inter");
//   - the size queries and the saved layout: T = 0, growth with T, what recompute removes (exactly
//     the two pre-activation pieces and the permuted tokens), every piece of moekit_layer_saved_view inside the buffer,
//     aligned and disjoint, the bad arguments of each query; the init functions;
//   - expert parallelism: a layer config against its EP handle (a handle struct filled here, as
//     moekit_ep_create would, without a communicator): every disagreement refused, the token
//     limit, the worst-case received rows in the sizes and the saved view.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "moekit/moekit.h"
#include "src/ep/ep_handle.hpp"
#include "tests/layer/layer_cases.hpp"
#include "tests/reference/layer_ref.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

namespace ref = moekit::ref;
using moekit::test::make_rng;
using namespace moekit::test::layer;

namespace {

// Tiny versions of the model cases (same options, H = 16, few experts) for finite differences.
std::vector<LayerCase> tiny_cases() {
  std::vector<LayerCase> v = model_cases();
  for (LayerCase& c : v) {
    c.set_hidden(16);
    c.set_dtype(MOEKIT_DTYPE_F32);
    c.experts.inter = 8;
    if (c.has_shared) c.shared.inter = 16;
    if (c.num_experts() > 16) c.set_experts(16, std::min(c.top_k(), 6));
    if (c.router.num_groups > 1) {
      c.router.num_groups = 4;
      c.router.num_groups_kept = 2;
    }
    if (c.capacity > 0) c.capacity = 3;
    if (c.aux_coeff == 0.0) c.aux_coeff = 0.05;
    else c.aux_coeff = 0.1;
    c.mask_fraction = 0.25;
  }
  return v;
}

// Central differences of `objective` along `values` (a tensor of the problem), at most `max_checks`
// elements (all when the tensor is that small, else a fixed random sample), against `analytic`.
void check_tensor(const std::string& name, std::vector<double>& values, const std::vector<double>& analytic,
                  const std::function<double()>& objective, std::mt19937_64& rng, size_t max_checks = 48) {
  INFO("finite differences of " << name << " (" << values.size() << " values)");
  REQUIRE(analytic.size() == values.size());
  if (values.empty()) return;
  std::vector<size_t> picks(values.size());
  for (size_t i = 0; i < picks.size(); ++i) picks[i] = i;
  if (picks.size() > max_checks) {
    std::shuffle(picks.begin(), picks.end(), rng);
    picks.resize(max_checks);
  }
  double scale = 1e-3;
  for (double g : analytic) scale = std::max(scale, std::fabs(g));
  const double h = 1e-6;
  for (size_t i : picks) {
    const double keep = values[i];
    values[i] = keep + h;
    const double up = objective();
    values[i] = keep - h;
    const double down = objective();
    values[i] = keep;
    const double fd = (up - down) / (2 * h);
    INFO(name << "[" << i << "]: analytic " << analytic[i] << ", finite difference " << fd << " (scale " << scale
              << ")");
    REQUIRE(std::fabs(fd - analytic[i]) <= 2e-6 * scale + 1e-7 * std::fabs(fd));
  }
}

std::string last_error() { return moekit_get_last_error(); }

}  // namespace

TEST_CASE("layer reference backward equals finite differences of its objective", "[layer][reference]") {
  uint64_t salt = 0x1a7f0000;
  for (const LayerCase& c : tiny_cases()) {
    SECTION(c.name) {
      INFO(c.describe());
      auto rng = make_rng(++salt);
      ref::LayerProblem p = make_problem(c, 7, rng);
      const std::vector<double> dy = normal_vec(rng, 7 * 16, 1.0, MOEKIT_DTYPE_F32);
      const ref::LayerRounding none{};
      const ref::LayerForward base = ref::layer_forward(p, none);
      const ref::LayerGrads g = ref::layer_backward(p, none, base, dy, c.aux_coeff);
      // The objective at the base point is the inner product the backward differentiates.
      {
        double j = 0.0;
        for (size_t i = 0; i < dy.size(); ++i) j += dy[i] * base.y[i];
        const double aux = c.aux_coeff * base.aux_loss;
        // The forward's aux statistics come from the router reference on fp32 logits, the objective
        // re-evaluates them from the double logits: they agree to fp32 rounding of the scores
        // (seen: 3e-9 on aux ~0.3), not to double rounding.
        REQUIRE(std::fabs(ref::layer_objective(p, base, dy, c.aux_coeff) - (j + aux)) <=
                1e-9 * (1 + std::fabs(j)) + 1e-6 * std::fabs(aux));
      }
      auto J = [&] { return ref::layer_objective(p, base, dy, c.aux_coeff); };
      check_tensor("x", p.x, g.x, J, rng);
      check_tensor("router_weight", p.router_weight, g.router_weight, J, rng);
      if (c.router_bias) check_tensor("router_bias", p.router_bias, g.router_bias, J, rng);
      check_tensor("w_gate_up", p.w_gate_up, g.w_gate_up, J, rng);
      check_tensor("w_down", p.w_down, g.w_down, J, rng);
      if (c.expert_bias) {
        check_tensor("b_gate_up", p.b_gate_up, g.b_gate_up, J, rng);
        check_tensor("b_down", p.b_down, g.b_down, J, rng);
      }
      if (c.has_shared) {
        check_tensor("shared_w_gate_up", p.shared_w_gate_up, g.shared_w_gate_up, J, rng);
        check_tensor("shared_w_down", p.shared_w_down, g.shared_w_down, J, rng);
        if (c.shared_bias) {
          check_tensor("shared_b_gate_up", p.shared_b_gate_up, g.shared_b_gate_up, J, rng);
          check_tensor("shared_b_down", p.shared_b_down, g.shared_b_down, J, rng);
        }
        if (c.shared_gate) check_tensor("shared_gate_weight", p.shared_gate_weight, g.shared_gate_weight, J, rng);
      }
      // Something flowed everywhere it should: the router gets gradient (main loss and aux).
      double router_norm = 0.0;
      for (double v : g.router_weight) router_norm += v * v;
      REQUIRE(router_norm > 0.0);
    }
  }
}

TEST_CASE("layer reference backward with a gated, biased geglu shared MLP in nn.Linear layout and alignment 4",
          "[layer][reference]") {
  LayerCase c = tiny_cases()[2];  // gpt-oss: router bias, expert biases, quick_geglu
  c.has_shared = true;
  c.shared.inter = 8;
  c.shared.weight_layout = MOEKIT_WEIGHT_OUT_IN;
  c.shared.activation = MOEKIT_ACTIVATION_GEGLU;
  c.shared_bias = true;
  c.shared_gate = true;
  c.alignment = 4;
  auto rng = make_rng(0x1a7f0100);
  ref::LayerProblem p = make_problem(c, 9, rng);
  const std::vector<double> dy = normal_vec(rng, 9 * 16, 1.0, MOEKIT_DTYPE_F32);
  const ref::LayerForward base = ref::layer_forward(p, {});
  const ref::LayerGrads g = ref::layer_backward(p, {}, base, dy, 0.1);
  auto J = [&] { return ref::layer_objective(p, base, dy, 0.1); };
  check_tensor("x", p.x, g.x, J, rng, 200);
  check_tensor("shared_w_gate_up", p.shared_w_gate_up, g.shared_w_gate_up, J, rng, 400);
  check_tensor("shared_w_down", p.shared_w_down, g.shared_w_down, J, rng, 200);
  check_tensor("shared_b_gate_up", p.shared_b_gate_up, g.shared_b_gate_up, J, rng);
  check_tensor("shared_b_down", p.shared_b_down, g.shared_b_down, J, rng);
  check_tensor("shared_gate_weight", p.shared_gate_weight, g.shared_gate_weight, J, rng);
  check_tensor("router_bias", p.router_bias, g.router_bias, J, rng);
}

TEST_CASE("a layer of one expert is the experts reference on every real token", "[layer][reference]") {
  LayerCase c;
  c.name = "one expert";
  c.set_experts(1, 1);
  c.experts.inter = 8;
  c.set_hidden(16);
  c.set_dtype(MOEKIT_DTYPE_F32);
  c.mask_fraction = 0.3;
  auto rng = make_rng(0x1a7f0200);
  const ref::LayerProblem p = make_problem(c, 11, rng);
  const ref::LayerForward f = ref::layer_forward(p, {});
  // Softmax over one expert: weight 1 for every token.
  ref::ExpertsProblem e;
  e.num_experts = 1;
  e.hidden = 16;
  e.inter = 8;
  e.max_rows = 11;
  e.offsets = {0, 11};
  e.xp = p.x;
  e.w_gate_up = p.w_gate_up;
  e.w_down = p.w_down;
  const ref::ExpertsForwardResult want = ref::experts_forward(e, nullptr);
  int real = 0;
  for (int64_t t = 0; t < 11; ++t) {
    const bool is_real = p.mask[t] != 0;
    real += is_real;
    for (int h = 0; h < 16; ++h) {
      INFO("token " << t << " (real " << is_real << "), column " << h);
      REQUIRE(std::fabs(f.y[t * 16 + h] - (is_real ? want.out[t * 16 + h] : 0.0)) <= 1e-12);
    }
  }
  REQUIRE(f.router.token_count == real);
  REQUIRE(f.plan.total == real);
}

TEST_CASE("an all-padding batch gives the gated shared MLP alone", "[layer][reference]") {
  LayerCase c = tiny_cases()[6];  // qwen3-next: gated shared expert
  c.mask_fraction = 1.0;
  auto rng = make_rng(0x1a7f0300);
  const ref::LayerProblem p = make_problem(c, 5, rng);
  const ref::LayerForward f = ref::layer_forward(p, {});
  REQUIRE(f.plan.total == 0);
  REQUIRE(f.router.token_count == 0);
  for (int64_t t = 0; t < 5; ++t) {
    double z = 0.0;
    for (int h = 0; h < 16; ++h) z += p.x[t * 16 + h] * p.shared_gate_weight[h];
    const double g = 1.0 / (1.0 + std::exp(-z));
    for (int h = 0; h < 16; ++h) REQUIRE(std::fabs(f.y[t * 16 + h] - g * f.shared_out.out[t * 16 + h]) <= 1e-12);
  }
  // No routed gradient and no aux term reach the router: its gradient is exactly zero.
  const std::vector<double> dy = normal_vec(rng, 5 * 16, 1.0, MOEKIT_DTYPE_F32);
  const ref::LayerGrads g = ref::layer_backward(p, {}, f, dy, 1.0);
  for (double v : g.router_weight) REQUIRE(v == 0.0);
}

TEST_CASE("layer configs of the model table are valid", "[layer][config]") {
  for (const LayerCase& c : model_cases()) {
    INFO(c.describe());
    const moekit_layer_config_t cfg = c.config();
    REQUIRE(moekit_layer_config_check(&cfg) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(last_error().empty());
  }
}

TEST_CASE("every bad field of a layer config is rejected with a message naming it", "[layer][config]") {
  struct Bad {
    const char* what;
    moekit_status_t status;
    std::function<void(LayerCase&, moekit_layer_config_t&)> spoil;
  };
  const std::vector<Bad> bads = {
      {"config->struct_size", MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase&, moekit_layer_config_t& c) { c.struct_size = 8; }},
      {"config->hidden = 0", MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase&, moekit_layer_config_t& c) { c.hidden = 0; }},
      {"config->hidden = 60", MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase&, moekit_layer_config_t& c) { c.hidden = 60; }},
      {"config->hidden = -8", MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase&, moekit_layer_config_t& c) { c.hidden = -8; }},
      {"config->dtype = 7", MOEKIT_STATUS_UNSUPPORTED, [](LayerCase&, moekit_layer_config_t& c) { c.dtype = 7; }},
      {"config->router is NULL", MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase&, moekit_layer_config_t& c) { c.router = nullptr; }},
      {"config->experts is NULL", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase&, moekit_layer_config_t& c) { c.experts = nullptr; }},
      {"is not a live moekit_ep_handle_t", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase&, moekit_layer_config_t& c) { c.expert_parallel = &c; }},
      {"config->ep_global_statistics = 1 but config->expert_parallel is NULL", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase&, moekit_layer_config_t& c) { c.ep_global_statistics = 1; }},
      {"config->router->top_k = 0", MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase& l, moekit_layer_config_t&) { l.router.top_k = 0; }},
      {"config->router->num_experts = 5000", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.router.num_experts = 5000; }},
      {"config->router->struct_size", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.router.struct_size = 4; }},
      {"config->router->num_groups = 3", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.router.num_groups = 3; }},
      {"config->router->route_scale", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.router.route_scale = INFINITY; }},
      {"config->experts->num_experts = 32 differs from config->router->num_experts = 64",
       MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase& l, moekit_layer_config_t&) { l.experts.num_experts = 32; }},
      {"config->experts->hidden = 128 differs from config->hidden = 64", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.experts.hidden = 128; }},
      {"config->experts->dtype = F16 differs from config->dtype = BF16", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.experts.dtype = MOEKIT_DTYPE_F16; }},
      {"config->experts->inter = 12", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.experts.inter = 12; }},
      {"config->experts->activation = 9", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.experts.activation = 9; }},
      {"config->shared->hidden = 32 differs from config->hidden = 64", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.shared.hidden = 32; }},
      {"config->shared->dtype = F32 differs from config->dtype = BF16", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.shared.dtype = MOEKIT_DTYPE_F32; }},
      {"config->shared->weight_layout = 5", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.shared.weight_layout = 5; }},
      {"config->shared->act_limit", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase& l, moekit_layer_config_t&) { l.shared.act_limit = -1.0f; }},
      {"config->shared_gate = 1 but config->shared is NULL", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase&, moekit_layer_config_t& c) {
         c.shared = nullptr;
         c.shared_gate = 1;
       }},
      {"config->shared_bias = 1 but config->shared is NULL", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase&, moekit_layer_config_t& c) {
         c.shared = nullptr;
         c.shared_bias = 1;
       }},
      {"config->alignment = 0", MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase&, moekit_layer_config_t& c) { c.alignment = 0; }},
      {"config->capacity = -1", MOEKIT_STATUS_INVALID_ARGUMENT, [](LayerCase&, moekit_layer_config_t& c) { c.capacity = -1; }},
      {"config->drop_policy = 5", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](LayerCase&, moekit_layer_config_t& c) { c.drop_policy = 5; }},
  };
  const LayerCase good = model_cases()[0];  // deepseek-v3: H = 64, E = 64, bf16, shared
  for (const Bad& b : bads) {
    INFO("spoiled: " << b.what);
    LayerCase l = good;
    moekit_layer_config_t cfg = l.config();
    b.spoil(l, cfg);
    REQUIRE(moekit_layer_config_check(&cfg) == b.status);
    std::string msg = last_error();
    INFO("message: " << msg);
    REQUIRE(msg.find("moekit_layer_config_check: ") == 0);
    REQUIRE(msg.find(b.what) != std::string::npos);
    // The same refusal from every entry point that takes a config, before anything else.
    moekit_layer_t layer = reinterpret_cast<moekit_layer_t>(&l);
    REQUIRE(moekit_layer_create(&cfg, &layer) == b.status);
    REQUIRE(layer == nullptr);
    msg = last_error();
    REQUIRE(msg.find("moekit_layer_create: ") == 0);
    REQUIRE(msg.find(b.what) != std::string::npos);
    size_t bytes = 12345;
    REQUIRE(moekit_layer_saved_size(&cfg, 10, &bytes) == b.status);
    REQUIRE(bytes == 12345);
    REQUIRE(moekit_layer_workspace_size(&cfg, 10, &bytes, nullptr) == b.status);
    REQUIRE(bytes == 12345);
  }
  REQUIRE(moekit_layer_config_check(nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("config is NULL") != std::string::npos);
}

TEST_CASE("layer init functions write the defaults and refuse short structs", "[layer][config]") {
  moekit_layer_config_t c;
  std::memset(&c, 0x5a, sizeof(c));
  REQUIRE(moekit_layer_config_init(&c, sizeof(c)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(c.struct_size == sizeof(c));
  REQUIRE(c.hidden == 0);
  REQUIRE(c.dtype == MOEKIT_DTYPE_BF16);
  REQUIRE(c.router == nullptr);
  REQUIRE(c.experts == nullptr);
  REQUIRE(c.shared == nullptr);
  REQUIRE(c.alignment == 1);
  REQUIRE(c.capacity == 0);
  REQUIRE(c.recompute == 0);
  REQUIRE(c.router_fp32 == 0);
  REQUIRE(c.expert_parallel == nullptr);
  REQUIRE(moekit_layer_config_init(&c, 16) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("struct_size = 16") != std::string::npos);
  REQUIRE(moekit_layer_config_init(nullptr, sizeof(c)) == MOEKIT_STATUS_INVALID_ARGUMENT);

  moekit_layer_params_t p;
  std::memset(&p, 0x5a, sizeof(p));
  REQUIRE(moekit_layer_params_init(&p, sizeof(p)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(p.struct_size == sizeof(p));
  REQUIRE(p.router_weight == nullptr);
  REQUIRE(p.shared_gate_weight == nullptr);
  REQUIRE(moekit_layer_params_init(&p, 8) == MOEKIT_STATUS_INVALID_ARGUMENT);

  moekit_layer_grads_t g;
  std::memset(&g, 0x5a, sizeof(g));
  REQUIRE(moekit_layer_grads_init(&g, sizeof(g)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(g.struct_size == sizeof(g));
  REQUIRE(g.w_down == nullptr);
  REQUIRE(g.shared_gate_weight == nullptr);
  REQUIRE(moekit_layer_grads_init(nullptr, sizeof(g)) == MOEKIT_STATUS_INVALID_ARGUMENT);

  // A caller compiled against a later header passes a larger struct: accepted, the tail ignored.
  const LayerCase l = model_cases()[0];
  struct Bigger {
    moekit_layer_config_t c;
    int64_t future_field;
  } big;
  big.c = l.config();
  big.c.struct_size = sizeof(big);
  big.future_field = 42;
  REQUIRE(moekit_layer_config_check(&big.c) == MOEKIT_STATUS_SUCCESS);
}

TEST_CASE("layer size queries depend only on the arguments and refuse bad ones", "[layer][sizes]") {
  for (const LayerCase& l : model_cases()) {
    INFO(l.describe());
    const moekit_layer_config_t c = l.config();
    size_t s0 = 0, s1 = 0, s2 = 0, f0 = 0, b0 = 0, f1 = 0, b1 = 0;
    REQUIRE(moekit_layer_saved_size(&c, 0, &s0) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(moekit_layer_saved_size(&c, 100, &s1) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(moekit_layer_saved_size(&c, 1000, &s2) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(s0 > 0);  // the load and statistics have a size without tokens
    REQUIRE(s0 < s1);
    REQUIRE(s1 < s2);
    REQUIRE(s0 % MOEKIT_WORKSPACE_ALIGNMENT == 0);
    REQUIRE(moekit_layer_workspace_size(&c, 0, &f0, &b0) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(moekit_layer_workspace_size(&c, 1000, &f1, &b1) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(f0 < f1);
    REQUIRE(b0 <= b1);
    REQUIRE(f1 % MOEKIT_WORKSPACE_ALIGNMENT == 0);
    REQUIRE(b1 % MOEKIT_WORKSPACE_ALIGNMENT == 0);
    // The same answer twice, and each pointer alone.
    size_t again = 0, fonly = 0, bonly = 0;
    REQUIRE(moekit_layer_saved_size(&c, 1000, &again) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(again == s2);
    REQUIRE(moekit_layer_workspace_size(&c, 1000, &fonly, nullptr) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(moekit_layer_workspace_size(&c, 1000, nullptr, &bonly) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(fonly == f1);
    REQUIRE(bonly == b1);
  }
  const LayerCase l = model_cases()[0];
  const moekit_layer_config_t c = l.config();
  size_t bytes = 7;
  REQUIRE(moekit_layer_saved_size(&c, -1, &bytes) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("num_tokens = -1") != std::string::npos);
  REQUIRE(moekit_layer_saved_size(&c, int64_t(1) << 29, &bytes) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("num_tokens") != std::string::npos);
  REQUIRE(moekit_layer_saved_size(&c, 10, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("saved_bytes is NULL") != std::string::npos);
  REQUIRE(moekit_layer_workspace_size(&c, 10, nullptr, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("forward_bytes and backward_bytes") != std::string::npos);
  REQUIRE(bytes == 7);
}

TEST_CASE("recompute removes exactly the two saved pre-activations and the permuted tokens", "[layer][sizes]") {
  for (const LayerCase& base : model_cases()) {
    INFO(base.describe());
    LayerCase a = base, b = base;
    a.recompute = false;
    b.recompute = true;
    const moekit_layer_config_t ca = a.config(), cb = b.config();
    const int64_t T = 333;
    size_t sa = 0, sb = 0;
    REQUIRE(moekit_layer_saved_size(&ca, T, &sa) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(moekit_layer_saved_size(&cb, T, &sb) == MOEKIT_STATUS_SUCCESS);
    moekit_plan_config_t pc;
    moekit_plan_config_init(&pc, sizeof(pc));
    pc.num_experts = base.num_experts();
    pc.top_k = base.top_k();
    pc.alignment = base.alignment;
    pc.capacity = base.capacity;
    pc.drop_policy = base.drop_policy;
    int64_t R = 0;
    REQUIRE(moekit_plan_max_rows(&pc, T, &R) == MOEKIT_STATUS_SUCCESS);
    const ref::LayerSpec s = spec_of(base);
    const size_t es = moekit_dtype_size(base.dtype);
    auto aligned = [](size_t n) { return (n + 255) / 256 * 256; };
    size_t expect = aligned(static_cast<size_t>(R) * s.expert_nu() * es);
    if (base.has_shared) expect += aligned(static_cast<size_t>(T) * s.shared_nu() * es);
    // xp [R, H] and p [R] fp32 (no expert parallelism in these configs)
    expect += aligned(static_cast<size_t>(R) * base.hidden * es) + aligned(static_cast<size_t>(R) * 4);
    REQUIRE(sa - sb == expect);
  }
}

TEST_CASE("the saved view places every piece inside the buffer, aligned and disjoint", "[layer][sizes]") {
  std::vector<LayerCase> cases = model_cases();
  LayerCase gated_recompute = cases[6];
  gated_recompute.recompute = true;
  cases.push_back(gated_recompute);
  for (const LayerCase& l : cases) {
    for (int64_t T : {int64_t(0), int64_t(1), int64_t(77)}) {
      INFO(l.describe() << ", T = " << T);
      const moekit_layer_config_t c = l.config();
      size_t bytes = 0;
      REQUIRE(moekit_layer_saved_size(&c, T, &bytes) == MOEKIT_STATUS_SUCCESS);
      // A fake device address: the view is host arithmetic and never touches the memory.
      char* base = reinterpret_cast<char*>(uintptr_t(1) << 40);
      moekit_layer_saved_view_t v;
      std::memset(&v, 0, sizeof(v));
      v.struct_size = sizeof(v);
      REQUIRE(moekit_layer_saved_view(&c, T, base, bytes, &v) == MOEKIT_STATUS_SUCCESS);
      REQUIRE(v.struct_size == sizeof(v));
      const ref::LayerSpec s = spec_of(l);
      const size_t K = l.top_k(), E = l.num_experts(), H = l.hidden, es = moekit_dtype_size(l.dtype);
      const size_t Tn = static_cast<size_t>(T), R = static_cast<size_t>(v.max_rows);
      REQUIRE(v.logits_row_stride == (static_cast<int64_t>(E) + 7) / 8 * 8);
      REQUIRE(v.logits_dtype == (l.router_fp32 ? MOEKIT_DTYPE_F32 : l.dtype));
      REQUIRE(R >= Tn * K * (l.capacity > 0 ? 0 : 1));
      struct Piece {
        const void* p;
        size_t n;
        const char* name;
      };
      std::vector<Piece> pieces = {
          {v.logits, Tn * v.logits_row_stride * moekit_dtype_size(static_cast<moekit_dtype_t>(v.logits_dtype)), "logits"},
          {v.weights, Tn * K * 4, "weights"},
          {v.indices, Tn * K * 4, "indices"},
          {v.expert_load, E * 4, "expert_load"},
          {v.aux_score_sum, E * 4, "aux_score_sum"},
          {v.aux_token_count, 4, "aux_token_count"},
          {v.expert_counts, E * 4, "expert_counts"},
          {v.expert_offsets, (E + 1) * 4, "expert_offsets"},
          {v.row_of_slot, Tn * K * 4, "row_of_slot"},
          {v.slot_of_row, R * 4, "slot_of_row"},
          {v.plan_totals, MOEKIT_PLAN_NUM_TOTALS * 4, "plan_totals"},
      };
      REQUIRE((v.expert_u == nullptr) == l.recompute);
      if (v.expert_u) pieces.push_back({v.expert_u, R * s.expert_nu() * es, "expert_u"});
      REQUIRE((v.shared_u == nullptr) == (!l.has_shared || l.recompute));
      if (v.shared_u) pieces.push_back({v.shared_u, Tn * s.shared_nu() * es, "shared_u"});
      REQUIRE((v.expert_xp == nullptr) == l.recompute);
      REQUIRE((v.expert_row_weights == nullptr) == l.recompute);
      if (v.expert_xp) pieces.push_back({v.expert_xp, R * H * es, "expert_xp"});
      if (v.expert_row_weights) pieces.push_back({v.expert_row_weights, R * 4, "expert_row_weights"});
      REQUIRE((v.shared_gate_logit == nullptr) == !l.shared_gate);
      REQUIRE((v.shared_out == nullptr) == !l.shared_gate);
      if (v.shared_gate_logit) pieces.push_back({v.shared_gate_logit, Tn * 4, "shared_gate_logit"});
      if (v.shared_out) pieces.push_back({v.shared_out, Tn * H * es, "shared_out"});
      for (size_t i = 0; i < pieces.size(); ++i) {
        INFO("piece " << pieces[i].name);
        const uintptr_t a = reinterpret_cast<uintptr_t>(pieces[i].p), b0 = reinterpret_cast<uintptr_t>(base);
        REQUIRE(pieces[i].p != nullptr);
        REQUIRE(a % MOEKIT_WORKSPACE_ALIGNMENT == 0);
        REQUIRE(a >= b0);
        REQUIRE(a + pieces[i].n <= b0 + bytes);
        for (size_t j = i + 1; j < pieces.size(); ++j) {
          const uintptr_t c0 = reinterpret_cast<uintptr_t>(pieces[j].p);
          INFO("and " << pieces[j].name);
          REQUIRE((a + pieces[i].n <= c0 || c0 + pieces[j].n <= a || pieces[i].n == 0 || pieces[j].n == 0));
        }
      }
      // The rows agree with the plan family's bound.
      moekit_plan_config_t pc;
      moekit_plan_config_init(&pc, sizeof(pc));
      pc.num_experts = static_cast<int32_t>(E);
      pc.top_k = static_cast<int32_t>(K);
      pc.alignment = l.alignment;
      pc.capacity = l.capacity;
      int64_t rows = -1;
      REQUIRE(moekit_plan_max_rows(&pc, T, &rows) == MOEKIT_STATUS_SUCCESS);
      REQUIRE(v.max_rows == rows);
    }
  }
  const LayerCase l = cases[0];
  const moekit_layer_config_t c = l.config();
  size_t bytes = 0;
  REQUIRE(moekit_layer_saved_size(&c, 10, &bytes) == MOEKIT_STATUS_SUCCESS);
  char* base = reinterpret_cast<char*>(uintptr_t(1) << 40);
  moekit_layer_saved_view_t v;
  std::memset(&v, 0, sizeof(v));
  v.struct_size = sizeof(v);
  REQUIRE(moekit_layer_saved_view(&c, 10, base, bytes - 1, &v) == MOEKIT_STATUS_WORKSPACE_TOO_SMALL);
  REQUIRE(last_error().find("saved_bytes") != std::string::npos);
  REQUIRE(moekit_layer_saved_view(&c, 10, base + 128, bytes, &v) == MOEKIT_STATUS_MISALIGNED);
  REQUIRE(last_error().find("saved = ") != std::string::npos);
  REQUIRE(moekit_layer_saved_view(&c, 10, nullptr, bytes, &v) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(moekit_layer_saved_view(&c, 10, base, bytes, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  v.struct_size = 8;
  REQUIRE(moekit_layer_saved_view(&c, 10, base, bytes, &v) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("view->struct_size") != std::string::npos);
  REQUIRE(v.logits == nullptr);  // nothing written on refusal
}

TEST_CASE("layer entry points refuse a NULL layer without touching the device", "[layer][errors]") {
  moekit_layer_params_t p;
  moekit_layer_params_init(&p, sizeof(p));
  REQUIRE(moekit_layer_forward(nullptr, 1, nullptr, nullptr, &p, nullptr, nullptr, nullptr, nullptr, 0, nullptr, 0,
                               nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error() == "moekit_layer_forward: layer is NULL");
  REQUIRE(moekit_layer_backward(nullptr, 1, nullptr, nullptr, &p, nullptr, 0, nullptr, 0.0f, nullptr, nullptr, nullptr,
                                0, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error() == "moekit_layer_backward: layer is NULL");
  REQUIRE(moekit_layer_set_stage_events(nullptr, nullptr, 0) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(moekit_layer_destroy(nullptr) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(last_error().empty());
  const LayerCase l = model_cases()[0];
  const moekit_layer_config_t c = l.config();
  REQUIRE(moekit_layer_create(&c, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("layer is NULL") != std::string::npos);
}

// ---- expert parallelism ------------------------------------------------------------------------

namespace {

// What moekit_ep_create would hold for this configuration on `rank` (no communicator is touched by
// the config checks and size queries).
moekit_ep fake_ep_handle(const moekit_ep_config_t& config, int32_t rank) {
  moekit_ep h;
  h.config = config;
  h.dims = moekit::ep::dims_of(config);
  h.signature = moekit::ep::config_signature(config);
  h.rank = rank;
  return h;
}

moekit_ep_config_t ep_config_for(const LayerCase& l, int32_t ranks, int64_t max_tokens, int32_t mode) {
  moekit_ep_config_t e;
  moekit_ep_config_init(&e, sizeof(e));
  e.num_ranks = ranks;
  e.num_experts = l.num_experts();
  e.top_k = l.top_k();
  e.dtype = l.dtype;
  e.hidden = l.hidden;
  e.max_tokens = max_tokens;
  e.mode = mode;
  return e;
}

}  // namespace

TEST_CASE("an expert-parallel layer config must agree with its EP handle", "[layer][config][ep]") {
  LayerCase l = model_cases()[0];  // deepseek-v3: H = 64, E = 64, bf16, shared
  const int32_t n = 4;
  const moekit_ep_config_t good = ep_config_for(l, n, 32, MOEKIT_EP_MODE_EXACT);
  REQUIRE(moekit_ep_config_check(&good) == MOEKIT_STATUS_SUCCESS);
  moekit_ep h = fake_ep_handle(good, 2);
  l.experts.num_experts = l.num_experts() / n;
  {
    moekit_layer_config_t c = l.config();
    c.expert_parallel = &h;
    REQUIRE(moekit_layer_config_check(&c) == MOEKIT_STATUS_SUCCESS);
    // Without the handle, E / n experts are a mismatch that names the missing handle.
    c.expert_parallel = nullptr;
    REQUIRE(moekit_layer_config_check(&c) == MOEKIT_STATUS_INVALID_ARGUMENT);
    REQUIRE(last_error().find("config->expert_parallel is NULL") != std::string::npos);
  }
  struct Bad {
    const char* what;
    moekit_status_t status;
    std::function<void(moekit_ep_config_t&, LayerCase&)> spoil;
  };
  const std::vector<Bad> bads = {
      {"config->expert_parallel's num_experts = 128 differs from config->router->num_experts = 64",
       MOEKIT_STATUS_INVALID_ARGUMENT, [](moekit_ep_config_t& e, LayerCase&) { e.num_experts = 128; }},
      {"config->expert_parallel's top_k = 2 differs from config->router->top_k", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](moekit_ep_config_t& e, LayerCase&) { e.top_k = 2; }},
      {"config->expert_parallel's dtype = F16 differs from config->dtype = BF16", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](moekit_ep_config_t& e, LayerCase&) { e.dtype = MOEKIT_DTYPE_F16; }},
      {"config->expert_parallel's hidden = 128 differs from config->hidden = 64", MOEKIT_STATUS_INVALID_ARGUMENT,
       [](moekit_ep_config_t& e, LayerCase&) { e.hidden = 128; }},
      {"config->expert_parallel's combine_dtype = F32 differs from config->dtype = BF16", MOEKIT_STATUS_UNSUPPORTED,
       [](moekit_ep_config_t& e, LayerCase&) { e.combine_dtype = MOEKIT_DTYPE_F32; }},
      {"config->experts->num_experts = 64 differs from the 16 experts each of the 4 ranks",
       MOEKIT_STATUS_INVALID_ARGUMENT, [](moekit_ep_config_t&, LayerCase& c) { c.experts.num_experts = 64; }},
  };
  for (const Bad& b : bads) {
    INFO("spoiled: " << b.what);
    moekit_ep_config_t e = good;
    LayerCase spoiled = l;
    b.spoil(e, spoiled);
    REQUIRE(moekit_ep_config_check(&e) == MOEKIT_STATUS_SUCCESS);  // a valid handle, just not this layer's
    moekit_ep bad_handle = fake_ep_handle(e, 2);
    moekit_layer_config_t c = spoiled.config();
    c.expert_parallel = &bad_handle;
    REQUIRE(moekit_layer_config_check(&c) == b.status);
    const std::string msg = last_error();
    INFO("message: " << msg);
    REQUIRE(msg.find(b.what) != std::string::npos);
    size_t bytes = 777;
    REQUIRE(moekit_layer_saved_size(&c, 4, &bytes) == b.status);
    REQUIRE(bytes == 777);
  }
}

TEST_CASE("expert-parallel layer sizes cover the worst-case received rows", "[layer][sizes][ep]") {
  LayerCase l = model_cases()[0];
  const int32_t n = 4;
  const int64_t max_tokens = 32;
  l.experts.num_experts = l.num_experts() / n;
  for (int32_t mode : {int32_t(MOEKIT_EP_MODE_EXACT), int32_t(MOEKIT_EP_MODE_CAPACITY)}) {
    moekit_ep_config_t e = ep_config_for(l, n, max_tokens, mode);
    e.capacity = mode == MOEKIT_EP_MODE_CAPACITY ? 20 : 0;
    moekit_ep h = fake_ep_handle(e, 1);
    int64_t recv_rows = 0;
    REQUIRE(moekit_ep_max_recv_rows(&e, &recv_rows) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(recv_rows == (mode == MOEKIT_EP_MODE_EXACT ? n * max_tokens : n * 20));
    moekit_layer_config_t c = l.config();
    c.expert_parallel = &h;
    INFO("mode " << mode);
    // T is limited by the handle's max_tokens; T = 0 is a valid call (the rank still serves rows).
    size_t at_max = 0, at_zero = 0, fw = 0, bw = 0;
    REQUIRE(moekit_layer_saved_size(&c, max_tokens, &at_max) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(moekit_layer_saved_size(&c, 0, &at_zero) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(at_zero < at_max);
    REQUIRE(moekit_layer_workspace_size(&c, 0, &fw, &bw) == MOEKIT_STATUS_SUCCESS);
    const size_t H = l.hidden, K = l.top_k(), es = moekit_dtype_size(l.dtype);
    // A rank without tokens still needs the partials, the received rows and the experts' rows.
    REQUIRE(fw >= static_cast<size_t>(recv_rows) * H * es);
    REQUIRE(bw >= 2 * static_cast<size_t>(recv_rows) * H * es);
    {  // global statistics: a gather buffer of the ranks' S in the forward's routing phase
      moekit_layer_config_t g = c;
      g.ep_global_statistics = 1;
      REQUIRE(moekit_layer_config_check(&g) == MOEKIT_STATUS_SUCCESS);
      size_t gfw = 0, gbw = 0;
      REQUIRE(moekit_layer_workspace_size(&g, max_tokens, &gfw, &gbw) == MOEKIT_STATUS_SUCCESS);
      size_t fw_max = 0, bw_max = 0;
      REQUIRE(moekit_layer_workspace_size(&c, max_tokens, &fw_max, &bw_max) == MOEKIT_STATUS_SUCCESS);
      REQUIRE(gfw >= fw_max);
      REQUIRE(gbw == bw_max);
    }
    size_t bytes = 55;
    REQUIRE(moekit_layer_saved_size(&c, max_tokens + 1, &bytes) == MOEKIT_STATUS_INVALID_ARGUMENT);
    REQUIRE(last_error().find("num_tokens = 33 is outside [0, 32]") != std::string::npos);
    REQUIRE(bytes == 55);

    // The view: the received rows' pieces inside the buffer, disjoint from the rest; the plan over
    // the received rows and this rank's 16 experts.
    char* base = reinterpret_cast<char*>(uintptr_t(1) << 40);
    moekit_layer_saved_view_t v;
    std::memset(&v, 0, sizeof(v));
    v.struct_size = sizeof(v);
    REQUIRE(moekit_layer_saved_view(&c, 5, base, bytes = 0, &v) == MOEKIT_STATUS_WORKSPACE_TOO_SMALL);
    REQUIRE(moekit_layer_saved_size(&c, 5, &bytes) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(moekit_layer_saved_view(&c, 5, base, bytes, &v) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(v.recv_rows == recv_rows);
    const size_t Rr = static_cast<size_t>(recv_rows), El = static_cast<size_t>(l.experts.num_experts);
    REQUIRE(v.max_rows >= static_cast<int64_t>(Rr * K));
    // the backward permutes the received rows again: no saved permuted tokens
    REQUIRE(v.expert_xp == nullptr);
    REQUIRE(v.expert_row_weights == nullptr);
    struct Piece {
      const void* p;
      size_t n;
      const char* name;
    };
    const std::vector<Piece> pieces = {
        {v.weights, 5 * K * 4, "weights"},
        {v.indices, 5 * K * 4, "indices"},
        {v.expert_counts, El * 4, "expert_counts"},
        {v.expert_offsets, (El + 1) * 4, "expert_offsets"},
        {v.row_of_slot, Rr * K * 4, "row_of_slot"},
        {v.slot_of_row, static_cast<size_t>(v.max_rows) * 4, "slot_of_row"},
        {v.ep_layout, 1, "ep_layout"},
        {v.recv_x, Rr * H * es, "recv_x"},
        {v.recv_indices, Rr * K * 4, "recv_indices"},
        {v.recv_weights, Rr * K * 4, "recv_weights"},
        {v.recv_mask, Rr, "recv_mask"},
        {v.ep_dropped, 4, "ep_dropped"},
    };
    for (const Piece& a : pieces) {
      INFO(a.name);
      REQUIRE(a.p != nullptr);
      const char* pa = static_cast<const char*>(a.p);
      REQUIRE(pa >= base);
      REQUIRE(pa + a.n <= base + bytes);
      REQUIRE(reinterpret_cast<uintptr_t>(pa) % 256 == 0);
      for (const Piece& b : pieces) {
        if (&a == &b) continue;
        const char* pb = static_cast<const char*>(b.p);
        REQUIRE((pa + a.n <= pb || pb + b.n <= pa));
      }
    }
  }
}
