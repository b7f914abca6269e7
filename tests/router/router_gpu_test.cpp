// Router family, GPU suite: the device against the double reference (indices, loads and counts
// exactly; weights, aux statistics and gradients within tolerance) on the model table and awkward
// shapes, all three logit dtypes, row strides, masks, accumulation, exact ties, NaN/inf rows;
// bitwise determinism; CUDA-graph capture of forward + backward; bad inputs leave poisoned
// device buffers untouched; aux loss, bias update and fake gate (bit-exact random stream).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "kernels/router/tuning.hpp"
#include "moekit/router.h"
#include "tests/reference/router_ref.hpp"
#include "tests/router/router_cases.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/device.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

using namespace moekit::test;
namespace ref = moekit::ref;

namespace {

const moekit_dtype_t kDtypes[] = {MOEKIT_DTYPE_F32, MOEKIT_DTYPE_F16, MOEKIT_DTYPE_BF16};
// Weights and aux statistics are computed in fp32 from exact inputs whatever the logits dtype.
const Tolerance kWeightTol{2e-5, 1e-6};
const Tolerance kScoreSumTol{1e-4, 1e-5};

bool has_text_in_last_error(const char* part) {
  return std::string(moekit_get_last_error()).find(part) != std::string::npos;
}

struct ForwardSetup {
  moekit_router_config_t config;
  int64_t T = 0;
  moekit_dtype_t dtype = MOEKIT_DTYPE_F32;
  std::vector<float> logits;  // [T, E], exact in dtype
  int64_t stride = 0;         // 0: E
  std::vector<float> bias;    // empty: none
  std::vector<uint8_t> mask;  // empty: none
  bool load = true;
  bool stats = true;
  std::vector<int32_t> initial_load;  // with config.accumulate_load
  int64_t row_stride() const { return stride ? stride : config.num_experts; }
};

struct DeviceInputs {
  DeviceBuffer logits, bias, mask;
};

// Logits with their row stride; the padding columns hold values that would win if they were read.
// The buffer holds exactly (T - 1) stride + E elements (what the API requires): the last row ends
// at the allocation's end, so compute-sanitizer flags any read past E in it.
DeviceInputs upload(const ForwardSetup& s) {
  const int E = s.config.num_experts;
  const int64_t ld = s.row_stride();
  const size_t count = s.T == 0 ? 0 : static_cast<size_t>((s.T - 1) * ld + E);
  std::vector<float> rows(count, round_to(s.dtype, 60.0f));
  for (int64_t t = 0; t < s.T; ++t)
    std::copy(s.logits.begin() + t * E, s.logits.begin() + (t + 1) * E, rows.begin() + t * ld);
  DeviceInputs d;
  d.logits = DeviceBuffer::from(pack(s.dtype, rows));
  if (!s.bias.empty()) d.bias = DeviceBuffer::from(s.bias);
  if (!s.mask.empty()) d.mask = DeviceBuffer::from(s.mask);
  return d;
}

struct ForwardOut {
  std::vector<float> weights;
  std::vector<int32_t> indices;
  std::vector<int32_t> load;
  std::vector<float> score_sum;
  int32_t count = -1;
  DeviceBuffer d_indices, d_load, d_count;  // kept for the backward
};

moekit_status_t call_forward(const ForwardSetup& s, const DeviceInputs& in, DeviceBuffer& w, DeviceBuffer& idx,
                             DeviceBuffer& load, DeviceBuffer& S, DeviceBuffer& N, DeviceBuffer& ws,
                             cudaStream_t stream) {
  return moekit_router_forward(&s.config, s.T, s.dtype, in.logits.get(), s.row_stride(), in.bias.get<float>(),
                               in.mask.get<uint8_t>(), w.get<float>(), idx.get<int32_t>(),
                               s.load ? load.get<int32_t>() : nullptr, s.stats ? S.get<float>() : nullptr,
                               s.stats ? N.get<int32_t>() : nullptr, ws.get(), ws.bytes(), stream);
}

ForwardOut run_forward(const ForwardSetup& s, const DeviceInputs& in) {
  const int E = s.config.num_experts, K = s.config.top_k;
  DeviceBuffer w(4 * s.T * K), idx(4 * s.T * K), load(4 * E), S(4 * E), N(4);
  w.poison();
  idx.poison();
  S.poison();
  N.poison();
  if (s.config.accumulate_load && !s.initial_load.empty())
    load = DeviceBuffer::from(s.initial_load);
  else
    load.poison();
  size_t bytes = 0;
  MOEKIT_REQUIRE_OK(moekit_router_forward_workspace_size(&s.config, s.T, &bytes));
  DeviceBuffer ws(bytes);
  ws.poison();
  MOEKIT_REQUIRE_OK(call_forward(s, in, w, idx, load, S, N, ws, nullptr));
  CUDA_REQUIRE(cudaDeviceSynchronize());
  ForwardOut o;
  o.weights = w.to_host<float>();
  o.indices = idx.to_host<int32_t>();
  o.load = load.to_host<int32_t>();
  o.score_sum = S.to_host<float>();
  o.count = N.to_host<int32_t>()[0];
  o.d_indices = std::move(idx);
  o.d_load = std::move(load);
  o.d_count = std::move(N);
  return o;
}

ref::RouterForward reference(const ForwardSetup& s) {
  return ref::router_forward(s.config, s.T, s.logits, s.bias.empty() ? nullptr : &s.bias,
                             s.mask.empty() ? nullptr : &s.mask);
}

// Indices, loads and the count exactly; weights and S within tolerance.
void check_forward(const ForwardSetup& s, const ForwardOut& o, const ref::RouterForward& r) {
  const int E = s.config.num_experts, K = s.config.top_k;
  int64_t bad_index = -1, bad_weight = -1;
  for (int64_t i = 0; i < s.T * K; ++i) {
    if (bad_index < 0 && o.indices[i] != r.indices[i]) bad_index = i;
    if (bad_weight < 0 && !close(o.weights[i], r.weights[i], kWeightTol)) bad_weight = i;
  }
  if (bad_index >= 0) {
    const int64_t t = bad_index / K;
    std::string got, want;
    for (int k = 0; k < K; ++k) {
      got += std::to_string(o.indices[t * K + k]) + " ";
      want += std::to_string(r.indices[t * K + k]) + " ";
    }
    INFO("token " << t << ": device " << got << "/ reference " << want);
    CHECK(bad_index < 0);
  }
  if (bad_weight >= 0) {
    INFO("weight " << bad_weight << ": device " << o.weights[bad_weight] << " reference " << r.weights[bad_weight]);
    CHECK(bad_weight < 0);
  }
  if (s.load) {
    for (int e = 0; e < E; ++e) {
      const int64_t base = s.config.accumulate_load && !s.initial_load.empty() ? s.initial_load[e] : 0;
      if (o.load[e] != base + r.load[e]) {
        INFO("expert " << e << ": load " << o.load[e] << " expected " << base + r.load[e]);
        CHECK(o.load[e] == base + r.load[e]);
        break;
      }
    }
  }
  if (s.stats) {
    CHECK(o.count == r.token_count);
    for (int e = 0; e < E; ++e) {
      if (!close(o.score_sum[e], r.score_sum[e], kScoreSumTol)) {
        INFO("expert " << e << ": S " << o.score_sum[e] << " reference " << r.score_sum[e]);
        CHECK(close(o.score_sum[e], r.score_sum[e], kScoreSumTol));
        break;
      }
    }
  }
}

ForwardSetup make_setup(const RouterCase& rc, int64_t T, moekit_dtype_t dtype, std::mt19937_64& rng) {
  ForwardSetup s;
  s.config = rc.config;
  s.T = T;
  s.dtype = dtype;
  if (rc.bias) s.bias = coarse_bias(rc.config.num_experts, rng);
  s.logits = separated_logits(rc.config, T, dtype, rc.bias ? &s.bias : nullptr, rng);
  return s;
}

// ---- backward --------------------------------------------------------------------------------
struct BackwardSetup {
  std::vector<float> grad_weights;  // empty: NULL
  float coeff = 0.0f;
  int64_t grad_stride = 0;          // 0: E
};

std::vector<float> run_backward(const ForwardSetup& s, const DeviceInputs& in, const DeviceBuffer& indices,
                                const DeviceBuffer& load, const DeviceBuffer& count, const BackwardSetup& b) {
  const int E = s.config.num_experts;
  const int64_t gld = b.grad_stride ? b.grad_stride : E;
  DeviceBuffer gw = b.grad_weights.empty() ? DeviceBuffer() : DeviceBuffer::from(b.grad_weights);
  const size_t elements = s.T == 0 ? 0 : static_cast<size_t>((s.T - 1) * gld + E);  // last row ends at E
  DeviceBuffer grad(dtype_bytes(s.dtype) * elements);
  grad.poison();
  size_t bytes = 1;
  MOEKIT_REQUIRE_OK(moekit_router_backward_workspace_size(&s.config, s.T, &bytes));
  DeviceBuffer ws(bytes);
  MOEKIT_REQUIRE_OK(moekit_router_backward(
      &s.config, s.T, s.dtype, in.logits.get(), s.row_stride(), in.bias.get<float>(), in.mask.get<uint8_t>(),
      indices.get<int32_t>(), gw.get<float>(), b.coeff, b.coeff != 0.0f ? load.get<int32_t>() : nullptr,
      b.coeff != 0.0f ? count.get<int32_t>() : nullptr, grad.get(), gld, ws.get(), ws.bytes(), nullptr));
  CUDA_REQUIRE(cudaDeviceSynchronize());
  const std::vector<float> all = unpack(s.dtype, grad.to_host<uint8_t>());
  std::vector<float> g(static_cast<size_t>(s.T) * E);
  for (int64_t t = 0; t < s.T; ++t)
    for (int e = 0; e < E; ++e) g[t * E + e] = all[t * gld + e];
  // padding columns were never written
  for (int64_t t = 0; t + 1 < s.T; ++t)
    for (int64_t e = E; e < gld; ++e) CHECK(std::isnan(all[t * gld + e]));
  return g;
}

// The reference gradient and what bounds the comparison (ref::router_backward_device_order).
struct GradientReference {
  std::vector<double> value;  // router_backward
  ref::BackwardEvaluation order;
};

// Spacing of the dtype's values at magnitude x (subnormal spacing below the normal range).
double dtype_ulp(moekit_dtype_t dtype, double x) {
  const int mantissa = dtype == MOEKIT_DTYPE_F32 ? 23 : dtype == MOEKIT_DTYPE_F16 ? 10 : 7;
  const int min_exp = dtype == MOEKIT_DTYPE_F16 ? -14 : -126;
  int exp = min_exp;
  if (x > 0.0 && std::isfinite(x)) exp = std::max(min_exp, std::ilogb(x));
  return std::ldexp(1.0, exp - mantissa);
}

// Per element: |device - round(reference)| <= 2 B + B_ref + ulp, with B the computed bound on the
// device's fp32 error (kernels' evaluation order, documented MUFU accuracies; the factor 2 is the
// margin for that error model), B_ref the bound on the double reference's own rounding, and ulp the
// dtype's spacing at the larger magnitude (the device rounds its fp32 value once, the reference is
// rounded once: they can land on neighbouring values, a full subnormal step in f16).
void check_gradient(const ForwardSetup& s, const std::vector<float>& got, const GradientReference& want) {
  const int E = s.config.num_experts;
  for (int64_t tok = 0; tok < s.T; ++tok) {
    for (int e = 0; e < E; ++e) {
      const size_t i = static_cast<size_t>(tok * E + e);
      const double exact = want.value[i];
      const double r = round_to(s.dtype, static_cast<float>(exact));
      const double g = got[i];
      if (!std::isfinite(exact)) {
        INFO("token " << tok << " expert " << e << ": device " << g << " reference " << exact);
        CHECK((std::isnan(exact) ? std::isnan(g) : g == exact));
        return;
      }
      const double bound = 2.0 * want.order.bound[i] + want.order.reference_bound[i];
      const double tol = bound + dtype_ulp(s.dtype, std::fabs(exact) + bound);
      if (!(std::fabs(g - r) <= tol)) {
        INFO("token " << tok << " expert " << e << ": device " << g << " reference " << r << " (exact " << exact
                      << "), allowed " << tol << " = 2 x bound " << want.order.bound[i] << " + reference bound "
                      << want.order.reference_bound[i] << " + " << dtype_name(s.dtype) << " ulp");
        CHECK(std::fabs(g - r) <= tol);
        return;
      }
    }
  }
}

GradientReference reference_gradient(const ForwardSetup& s, const ForwardOut& o, const BackwardSetup& b) {
  std::vector<double> z(s.logits.begin(), s.logits.end());
  std::vector<int64_t> load(o.load.begin(), o.load.end());
  const auto* bias = s.bias.empty() ? nullptr : &s.bias;
  const auto* mask = s.mask.empty() ? nullptr : &s.mask;
  const auto* gw = b.grad_weights.empty() ? nullptr : &b.grad_weights;
  GradientReference r;
  r.value = ref::router_backward(s.config, s.T, z, bias, mask, o.indices, gw, b.coeff, load, o.count);
  r.order = ref::router_backward_device_order(s.config, s.T, z, bias, mask, o.indices, gw, b.coeff, load, o.count,
                                              false);
  return r;
}

std::vector<int64_t> token_counts_for(const moekit_router_config_t& c) {
  if (c.num_experts >= 2048) return {1, 7, 150};
  return {1, 7, 300, 2500};
}

}  // namespace

// ---- forward ---------------------------------------------------------------------------------

TEST_CASE("router forward matches the reference on the model table", "[router][forward]") {
  auto rng = make_rng(0xf0a1);
  for (const RouterCase& rc : model_cases()) {
    for (moekit_dtype_t dtype : kDtypes) {
      for (int64_t T : token_counts_for(rc.config)) {
        INFO(rc.name << " " << dtype_name(dtype) << " T=" << T);
        ForwardSetup s = make_setup(rc, T, dtype, rng);
        if (T >= 300) s.mask = random_mask(rng, T);
        if (T == 7) s.stride = rc.config.num_experts + 3;    // odd stride: 2/4-byte loads
        if (T == 300) s.stride = rc.config.num_experts + 4;  // 8-byte rows (16-bit dtypes)
        const DeviceInputs in = upload(s);
        const ForwardOut o = run_forward(s, in);
        const auto r = reference(s);
        check_forward(s, o, r);
      }
    }
  }
}

// Many tokens per block (several grid-stride steps per team, the prefetch, the block sums over
// many tokens). Heavy under compute-sanitizer: run the sanitizers with the filter "~[large]".
TEST_CASE("router forward and backward on 40000 tokens", "[router][forward][backward][large]") {
  auto rng = make_rng(0x1a46);
  for (const RouterCase& rc : model_cases()) {
    if (rc.config.num_experts > 512) continue;
    for (moekit_dtype_t dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F32}) {
      INFO(rc.name << " " << dtype_name(dtype));
      ForwardSetup s = make_setup(rc, 40000, dtype, rng);
      s.mask = random_mask(rng, s.T);
      const DeviceInputs in = upload(s);
      const ForwardOut o = run_forward(s, in);
      check_forward(s, o, reference(s));
      BackwardSetup b;
      b.grad_weights = uniform(rng, static_cast<size_t>(s.T) * rc.config.top_k, -1.0f, 1.0f);
      b.coeff = 0.1f;
      check_gradient(s, run_backward(s, in, o.d_indices, o.d_load, o.d_count, b), reference_gradient(s, o, b));
    }
  }
}

TEST_CASE("router forward: load accumulation with and without aux statistics", "[router][forward]") {
  auto rng = make_rng(0xacc1);
  for (const RouterCase& rc : model_cases()) {
    if (rc.config.num_experts > 512 && rc.name != "e2048-k32") continue;
    INFO(rc.name);
    ForwardSetup s = make_setup(rc, 999, MOEKIT_DTYPE_BF16, rng);
    s.mask = random_mask(rng, s.T);
    s.config.accumulate_load = 1;
    s.initial_load.resize(rc.config.num_experts);
    for (int e = 0; e < rc.config.num_experts; ++e) s.initial_load[e] = 1000 + 3 * e;
    const DeviceInputs in = upload(s);
    const auto r = reference(s);
    s.stats = false;  // atomics straight into the load
    check_forward(s, run_forward(s, in), r);
    s.stats = true;  // partial rows and the finalize
    check_forward(s, run_forward(s, in), r);
    s.load = false;  // statistics only
    check_forward(s, run_forward(s, in), r);
  }
}

TEST_CASE("router forward: exact ties go to the lower index", "[router][forward][ties]") {
  for (const RouterCase& rc : model_cases()) {
    for (moekit_dtype_t dtype : kDtypes) {
      INFO(rc.name << " " << dtype_name(dtype));
      ForwardSetup s;
      s.config = rc.config;
      s.T = 40;
      s.dtype = dtype;
      s.logits.assign(static_cast<size_t>(s.T) * rc.config.num_experts, 0.25f);  // every row all-equal
      const DeviceInputs in = upload(s);
      const ForwardOut o = run_forward(s, in);
      check_forward(s, o, reference(s));
      for (int64_t t = 0; t < s.T; ++t)
        for (int k = 0; k < rc.config.top_k; ++k) REQUIRE(o.indices[t * rc.config.top_k + k] == k);
    }
  }
  // ties inside a row of distinct values: pairs of equal logits
  auto c = router_config(64, 6);
  c.score_func = MOEKIT_SCORE_SIGMOID;
  ForwardSetup s;
  s.config = c;
  s.T = 3;
  s.dtype = MOEKIT_DTYPE_BF16;
  for (int t = 0; t < 3; ++t)
    for (int e = 0; e < 64; ++e) s.logits.push_back(round_to(MOEKIT_DTYPE_BF16, static_cast<float>((e * 7 + t) % 16) / 4.0f));
  const DeviceInputs in = upload(s);
  check_forward(s, run_forward(s, in), reference(s));
}

// One lane's span holds the K best of its token (which lane varies with the token), so that lane
// wins pick after pick: its two cached values are gone after pick 1 and every later pick refills
// it. The lane emptied by the last pick (r = K - 1) is not refilled (kernels/router/forward_fast.cuh):
// K = 2 empties the lane exactly at the last pick, K = 3 refills once and then empties it at the
// last pick, K = V + 1 takes the whole span and one more expert from another lane. Every fast-path
// team width (E = 8: one lane a token, up to E = 512: a warp), groups (DeepSeek-V3's 8/4 top-2
// sum), softmax and sigmoid, all dtypes, T = 37 (the last warp-step partly past T).
TEST_CASE("router forward: one lane holds the top picks, the last pick empties it", "[router][forward][refill]") {
  auto rng = make_rng(0x1a57);
  std::normal_distribution<float> normal(-3.0f, 1.0f);
  struct Shape {
    int E, G, Gk;
  };
  for (const Shape sh : {Shape{8, 1, 1}, Shape{16, 1, 1}, Shape{64, 1, 1}, Shape{128, 1, 1}, Shape{256, 1, 1},
                         Shape{256, 8, 4}, Shape{512, 1, 1}}) {
    const int V = moekit::kernels::router::fast_shape(sh.E).values_per_lane;
    for (int K : {2, 3, std::min(V + 1, sh.E)}) {
      for (int sf : {MOEKIT_SCORE_SOFTMAX, MOEKIT_SCORE_SIGMOID}) {
        for (moekit_dtype_t dtype : kDtypes) {
          INFO("E=" << sh.E << " G=" << sh.G << "/" << sh.Gk << " K=" << K << " score " << sf << " "
                    << dtype_name(dtype));
          ForwardSetup s;
          s.config = router_config(sh.E, K);
          s.config.score_func = sf;
          s.config.num_groups = sh.G;
          s.config.num_groups_kept = sh.Gk;
          if (sh.G > 1) s.config.group_score = MOEKIT_GROUP_SCORE_TOP2_SUM;
          s.T = 37;
          s.dtype = dtype;
          std::vector<int> hot(static_cast<size_t>(s.T));
          for (int64_t t = 0; t < s.T; ++t) {
            hot[t] = static_cast<int>((t * 5) % (sh.E / V)) * V;  // first expert of the hot lane
            // the hot span from 6 down in steps of 1/4 (exact in every dtype, far apart after any
            // score function), the others below 1.5 (the hot span's lowest is 2.25)
            // every exact tie is resolved the same way on both sides; near-ties (group sums) are
            // redrawn, as in separated_logits
            std::vector<float> row(static_cast<size_t>(sh.E));
            for (int attempt = 0;; ++attempt) {
              for (int e = 0; e < sh.E; ++e) {
                const int in_span = e - hot[t];
                row[e] = in_span >= 0 && in_span < V ? 6.0f - 0.25f * static_cast<float>(in_span)
                                                     : round_to(dtype, std::min(normal(rng), 1.5f));
              }
              if (ref::selection_margin(s.config, row.data(), nullptr) >= 1e-5) break;
              REQUIRE(attempt < 200);
            }
            s.logits.insert(s.logits.end(), row.begin(), row.end());
          }
          const DeviceInputs in = upload(s);
          const ForwardOut o = run_forward(s, in);
          check_forward(s, o, reference(s));
          for (int64_t t = 0; t < s.T; ++t)
            for (int k = 0; k < std::min(K, V); ++k) REQUIRE(o.indices[t * K + k] == hot[t] + k);
        }
      }
    }
  }
}

// -0 and +0 are the same selection value: ties go to the lower index whatever the sign. Top-k
// then softmax selects by z + b, which is -0 where a -0 logit meets a -0 bias and +0 where a +0
// logit does; the generic path's keys once kept that sign and put every +0 (and, with groups
// masked to 0, every dropped expert) ahead of the -0s. Fast path, generic path, generic groups.
TEST_CASE("router forward: signed zeros tie and go to the lower index", "[router][forward][ties]") {
  struct Shape {
    int E, K, G, Gk;
  };
  for (const Shape sh : {Shape{64, 6, 1, 1}, Shape{600, 6, 1, 1}, Shape{8, 4, 4, 2}}) {
    for (moekit_dtype_t dtype : kDtypes) {
      INFO("E=" << sh.E << " K=" << sh.K << " G=" << sh.G << "/" << sh.Gk << " " << dtype_name(dtype));
      ForwardSetup s;
      s.config = router_config(sh.E, sh.K);
      s.config.softmax_order = MOEKIT_TOPK_THEN_SOFTMAX;
      s.config.num_groups = sh.G;
      s.config.num_groups_kept = sh.Gk;
      s.T = 5;
      s.dtype = dtype;
      s.bias.assign(static_cast<size_t>(sh.E), -0.0f);
      for (int64_t t = 0; t < s.T; ++t)
        for (int e = 0; e < sh.E; ++e) s.logits.push_back((e + t) % 2 == 0 ? -0.0f : 0.0f);
      const DeviceInputs in = upload(s);
      const ForwardOut o = run_forward(s, in);
      check_forward(s, o, reference(s));
      for (int64_t t = 0; t < s.T; ++t)
        for (int k = 0; k < sh.K; ++k) REQUIRE(o.indices[t * sh.K + k] == k);
    }
  }
}

TEST_CASE("router forward: NaN and infinite logits never break the index range", "[router][forward][nan]") {
  auto rng = make_rng(0x0a0a);
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  // Special values by position; the finite rest is redrawn until it is well separated.
  const std::vector<std::function<float(int e, int E)>> patterns = {
      [=](int, int) { return nan; },                                      // all NaN
      [=](int, int) { return -inf; },                                     // all -inf
      [=](int e, int) { return e % 3 == 0 ? nan : 0.0f; },                // a third NaN
      [=](int e, int E) { return e == E / 2 ? inf : 0.0f; },              // one +inf
      [=](int e, int) { return e == 0 ? -inf : 0.0f; },                   // one -inf
      [=](int e, int) { return e == 0 ? inf : (e % 2 ? nan : 0.0f); },    // +inf and every other NaN
  };
  for (const RouterCase& rc : model_cases()) {
    for (moekit_dtype_t dtype : kDtypes) {
      INFO(rc.name << " " << dtype_name(dtype));
      const int E = rc.config.num_experts, K = rc.config.top_k;
      ForwardSetup s = make_setup(rc, static_cast<int64_t>(patterns.size()) + 2, dtype, rng);
      const float* bias = s.bias.empty() ? nullptr : s.bias.data();
      std::normal_distribution<float> normal(0.0f, 1.5f);
      for (size_t p = 0; p < patterns.size(); ++p) {
        float* row = s.logits.data() + p * E;
        for (int attempt = 0;; ++attempt) {
          bool drawn = false;  // rows made only of specials have nothing to redraw (and tie exactly)
          for (int e = 0; e < E; ++e) {
            const float special = patterns[p](e, E);
            drawn = drawn || special == 0.0f;
            row[e] = special == 0.0f ? round_to(dtype, normal(rng)) : special;
          }
          if (!drawn || ref::selection_margin(rc.config, row, bias) >= 1e-5) break;
          REQUIRE(attempt < 200);
        }
      }
      const DeviceInputs in = upload(s);
      const ForwardOut o = run_forward(s, in);
      for (int32_t i : o.indices) REQUIRE((i >= 0 && i < E));
      check_forward(s, o, reference(s));
      // An all-NaN row gets experts 0..K-1 (NaN ties -inf, lower index first); with groups masked
      // to 0 the 0-masked experts of the first dropped groups beat the -inf ones instead.
      if (rc.config.num_groups == 1 || rc.config.group_mask == MOEKIT_GROUP_MASK_NEG_INF)
        for (int k = 0; k < K; ++k) CHECK(o.indices[k] == k);
    }
  }
}

// Every E up to 17 (a lane's span longer than the row, rows ending inside a 16-byte chunk, one and
// two lanes a token), E around the fast path's lane and path boundaries, and the generic path, in
// all three dtypes, with tight, odd (2- and 4-byte accesses) and 8-byte row strides; the logits
// and gradient buffers end at the last row's E (compute-sanitizer sees any access past it).
// Forward against the reference, then the backward (aux term and grad_weights) on its indices.
TEST_CASE("router forward and backward: awkward shapes, every dtype and row alignment", "[router][forward][backward][shapes]") {
  auto rng = make_rng(0x5a9e);
  struct Shape {
    int E, K, G, Gk;
    int sf;
    int order;
    bool bias;
    int normalize;
  };
  std::vector<Shape> shapes = {
      {1, 1, 1, 1, MOEKIT_SCORE_SOFTMAX, MOEKIT_SOFTMAX_THEN_TOPK, false, 1},
      {2, 2, 1, 1, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {8, 8, 1, 1, MOEKIT_SCORE_SOFTMAX, MOEKIT_SOFTMAX_THEN_TOPK, false, 1},
      {8, 1, 4, 1, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {32, 32, 1, 1, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {16, 16, 2, 2, MOEKIT_SCORE_SOFTMAX, MOEKIT_SOFTMAX_THEN_TOPK, false, 1},
      {33, 5, 1, 1, MOEKIT_SCORE_SQRT_SOFTPLUS, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {100, 1, 1, 1, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      // E = 65..128 (teams of 8 lanes, V = 16, forward and backward): K above the team width, so
      // the backward scatters over several ranks per lane (up to 4)
      {96, 12, 1, 1, MOEKIT_SCORE_SOFTMAX, MOEKIT_SOFTMAX_THEN_TOPK, false, 1},
      {128, 32, 1, 1, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {128, 9, 1, 1, MOEKIT_SCORE_SOFTMAX, MOEKIT_TOPK_THEN_SOFTMAX, false, 0},
      {80, 16, 4, 2, MOEKIT_SCORE_SQRT_SOFTPLUS, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {257, 32, 1, 1, MOEKIT_SCORE_SOFTMAX, MOEKIT_SOFTMAX_THEN_TOPK, false, 1},
      {512, 32, 16, 16, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {513, 3, 1, 1, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {1000, 32, 10, 3, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
      {4096, 32, 1, 1, MOEKIT_SCORE_SOFTMAX, MOEKIT_SOFTMAX_THEN_TOPK, false, 1},
      {4096, 32, 4096, 32, MOEKIT_SCORE_SIGMOID, MOEKIT_SOFTMAX_THEN_TOPK, true, 1},
  };
  const int score_funcs[] = {MOEKIT_SCORE_SOFTMAX, MOEKIT_SCORE_SIGMOID, MOEKIT_SCORE_SQRT_SOFTPLUS};
  for (int E = 1; E <= 17; ++E) {
    for (int variant = 0; variant < 2; ++variant) {
      const int sf = score_funcs[(E + variant) % 3];
      const int order = sf == MOEKIT_SCORE_SOFTMAX && variant == 1 ? MOEKIT_TOPK_THEN_SOFTMAX : MOEKIT_SOFTMAX_THEN_TOPK;
      shapes.push_back({E, std::min(E, 1 + (E + variant) % 4), 1, 1, sf, order, sf != MOEKIT_SCORE_SOFTMAX, variant == 0});
    }
  }
  for (int E : {24, 31, 63, 65, 127, 129, 255, 511})
    shapes.push_back({E, std::min(E, 6), 1, 1, score_funcs[E % 3], MOEKIT_SOFTMAX_THEN_TOPK, E % 2 == 1, 1});

  for (const Shape& sh : shapes) {
    for (moekit_dtype_t dtype : kDtypes) {
      for (int64_t T : {int64_t{1}, int64_t{3}, int64_t{sh.E > 200 ? 64 : 1000}}) {
        auto c = router_config(sh.E, sh.K);
        c.score_func = sh.sf;
        c.softmax_order = sh.order;
        c.num_groups = sh.G;
        c.num_groups_kept = sh.Gk;
        c.normalize = sh.normalize;
        RouterCase rc{"shape", c, sh.bias};
        ForwardSetup s = make_setup(rc, T, dtype, rng);
        // tight rows, odd rows (2- or 4-byte accesses only), rows of 8-byte multiples (16-bit dtypes)
        const int64_t pad = T == 1 ? 0 : T == 3 ? 1 : (dtype == MOEKIT_DTYPE_F32 ? 3 : 4);
        s.stride = sh.E + pad;
        if (T > 3) s.mask = random_mask(rng, T);
        INFO("E=" << sh.E << " K=" << sh.K << " G=" << sh.G << "/" << sh.Gk << " score " << sh.sf << " order "
                  << sh.order << " bias " << sh.bias << " normalize " << sh.normalize << " " << dtype_name(dtype)
                  << " T=" << T << " stride " << s.stride);
        const DeviceInputs in = upload(s);
        const ForwardOut o = run_forward(s, in);
        check_forward(s, o, reference(s));
        BackwardSetup b;
        b.grad_weights = uniform(rng, static_cast<size_t>(T) * sh.K, -1.0f, 1.0f);
        b.coeff = 0.37f;
        b.grad_stride = sh.E + (pad == 0 ? 0 : pad + 2);
        check_gradient(s, run_backward(s, in, o.d_indices, o.d_load, o.d_count, b), reference_gradient(s, o, b));
      }
    }
  }
}

TEST_CASE("router forward: T = 0 writes the statistics and nothing else", "[router][forward][shapes]") {
  for (int accumulate : {0, 1}) {
    auto c = router_config(64, 4);
    c.accumulate_load = accumulate;
    DeviceBuffer w(16), idx(16), S(4 * 64), N(4);
    w.poison();
    idx.poison();
    S.poison();
    N.poison();
    std::vector<int32_t> start(64, 5);
    DeviceBuffer load = DeviceBuffer::from(start);
    size_t bytes = 7;
    MOEKIT_REQUIRE_OK(moekit_router_forward_workspace_size(&c, 0, &bytes));
    CHECK(bytes == 0);
    MOEKIT_REQUIRE_OK(moekit_router_forward(&c, 0, MOEKIT_DTYPE_BF16, nullptr, 64, nullptr, nullptr, nullptr,
                                            nullptr, load.get<int32_t>(), S.get<float>(), N.get<int32_t>(),
                                            nullptr, 0, nullptr));
    CUDA_REQUIRE(cudaDeviceSynchronize());
    CHECK(still_poisoned(w));
    CHECK(still_poisoned(idx));
    for (float v : S.to_host<float>()) CHECK(v == 0.0f);
    CHECK(N.to_host<int32_t>()[0] == 0);
    for (int32_t v : load.to_host<int32_t>()) CHECK(v == (accumulate ? 5 : 0));
    // backward at T = 0: nothing to write
    DeviceBuffer g(16);
    g.poison();
    MOEKIT_REQUIRE_OK(moekit_router_backward(&c, 0, MOEKIT_DTYPE_BF16, nullptr, 64, nullptr, nullptr, nullptr, nullptr,
                                             0.0f, nullptr, nullptr, nullptr, 64, nullptr, 0, nullptr));
    CUDA_REQUIRE(cudaDeviceSynchronize());
  }
}

TEST_CASE("router forward: all tokens masked", "[router][forward]") {
  auto rng = make_rng(0x3a51);
  const RouterCase rc = model_cases()[0];
  ForwardSetup s = make_setup(rc, 200, MOEKIT_DTYPE_BF16, rng);
  s.mask.assign(200, 0);
  const DeviceInputs in = upload(s);
  const ForwardOut o = run_forward(s, in);
  check_forward(s, o, reference(s));
  CHECK(o.count == 0);
  for (int32_t v : o.load) CHECK(v == 0);
  for (float v : o.score_sum) CHECK(v == 0.0f);
}

TEST_CASE("router forward and backward are bitwise deterministic", "[router][determinism]") {
  auto rng = make_rng(0xde7e);
  for (const RouterCase& rc : model_cases()) {
    INFO(rc.name);
    const int64_t T = rc.config.num_experts >= 2048 ? 300 : 3000;
    ForwardSetup s = make_setup(rc, T, MOEKIT_DTYPE_BF16, rng);
    s.mask = random_mask(rng, T);
    const DeviceInputs in = upload(s);
    const ForwardOut a = run_forward(s, in);
    const ForwardOut b = run_forward(s, in);
    CHECK(std::memcmp(a.weights.data(), b.weights.data(), 4 * a.weights.size()) == 0);
    CHECK(a.indices == b.indices);
    CHECK(std::memcmp(a.score_sum.data(), b.score_sum.data(), 4 * a.score_sum.size()) == 0);
    BackwardSetup bs;
    bs.grad_weights = uniform(rng, static_cast<size_t>(T) * rc.config.top_k, -1.0f, 1.0f);
    bs.coeff = 0.3f;
    const auto ga = run_backward(s, in, a.d_indices, a.d_load, a.d_count, bs);
    const auto gb = run_backward(s, in, a.d_indices, a.d_load, a.d_count, bs);
    CHECK(std::memcmp(ga.data(), gb.data(), 4 * ga.size()) == 0);
  }
}

// ---- backward --------------------------------------------------------------------------------

TEST_CASE("router backward matches the reference gradient", "[router][backward]") {
  auto rng = make_rng(0xb4c4);
  for (const RouterCase& rc : model_cases()) {
    for (moekit_dtype_t dtype : kDtypes) {
      for (float coeff : {0.0f, 0.37f}) {
        const int64_t T = rc.config.num_experts >= 2048 ? 40 : 300;
        INFO(rc.name << " " << dtype_name(dtype) << " coeff " << coeff);
        ForwardSetup s = make_setup(rc, T, dtype, rng);
        s.mask = random_mask(rng, T);
        if (coeff != 0.0f) s.stride = rc.config.num_experts + 1;
        const DeviceInputs in = upload(s);
        const ForwardOut o = run_forward(s, in);
        check_forward(s, o, reference(s));
        BackwardSetup b;
        b.grad_weights = uniform(rng, static_cast<size_t>(T) * rc.config.top_k, -1.0f, 1.0f);
        b.coeff = coeff;
        if (coeff != 0.0f) b.grad_stride = rc.config.num_experts + 5;
        check_gradient(s, run_backward(s, in, o.d_indices, o.d_load, o.d_count, b), reference_gradient(s, o, b));
        if (coeff != 0.0f) {  // only the aux term
          BackwardSetup aux_only = b;
          aux_only.grad_weights.clear();
          check_gradient(s, run_backward(s, in, o.d_indices, o.d_load, o.d_count, aux_only),
                         reference_gradient(s, o, aux_only));
        }
      }
    }
  }
}

TEST_CASE("router backward: repeated and out-of-range indices", "[router][backward]") {
  auto rng = make_rng(0xd0b1);
  for (const RouterCase& rc : model_cases()) {
    if (rc.name != "qwen3" && rc.name != "gpt-oss" && rc.name != "deepseek-v3" && rc.name != "e2048-k32") continue;
    INFO(rc.name);
    const int E = rc.config.num_experts, K = rc.config.top_k;
    ForwardSetup s = make_setup(rc, 50, MOEKIT_DTYPE_F32, rng);
    const DeviceInputs in = upload(s);
    ForwardOut o = run_forward(s, in);
    for (int64_t t = 0; t < s.T; ++t) {  // overwrite some entries
      if (t % 3 == 0) o.indices[t * K + K - 1] = o.indices[t * K];          // repeat
      if (t % 5 == 1) o.indices[t * K + 1] = (t % 2) ? -7 : E + 11;         // out of range
    }
    DeviceBuffer idx = DeviceBuffer::from(o.indices);
    BackwardSetup b;
    b.grad_weights = uniform(rng, static_cast<size_t>(s.T) * K, -1.0f, 1.0f);
    b.coeff = 0.2f;
    check_gradient(s, run_backward(s, in, idx, o.d_load, o.d_count, b), reference_gradient(s, o, b));
  }
}

// ---- graph capture -----------------------------------------------------------------------------

TEST_CASE("router forward, finalize, aux loss, backward and bias update capture into a CUDA graph", "[router][graph]") {
  auto rng = make_rng(0x9a9f);
  for (const RouterCase& rc : model_cases()) {
    if (rc.name != "deepseek-v3" && rc.name != "qwen3" && rc.name != "e2048-k32" && rc.name != "mixtral") continue;
    INFO(rc.name);
    const int E = rc.config.num_experts, K = rc.config.top_k;
    const int64_t T = 3000;
    ForwardSetup s = make_setup(rc, T, MOEKIT_DTYPE_BF16, rng);
    s.mask = random_mask(rng, T);
    const DeviceInputs in = upload(s);
    const ForwardOut eager = run_forward(s, in);
    BackwardSetup bs;
    bs.grad_weights = uniform(rng, static_cast<size_t>(T) * K, -1.0f, 1.0f);
    bs.coeff = 0.25f;
    const auto eager_grad = run_backward(s, in, eager.d_indices, eager.d_load, eager.d_count, bs);

    DeviceBuffer w(4 * T * K), idx(4 * T * K), load(4 * E), S(4 * E), N(4), aux(4), grad(2 * T * E);
    DeviceBuffer gw = DeviceBuffer::from(bs.grad_weights);
    // the bias update works on its own copy: the forward's correction bias stays fixed
    std::vector<float> bias0 = uniform(rng, E, -1.0f, 1.0f);
    DeviceBuffer bias = DeviceBuffer::from(bias0);
    w.poison();
    idx.poison();
    grad.poison();
    size_t bytes = 0;
    MOEKIT_REQUIRE_OK(moekit_router_forward_workspace_size(&s.config, T, &bytes));
    DeviceBuffer ws(bytes);
    cudaStream_t stream;
    CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    CUDA_REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    const float* bias_ptr = in.bias.get<float>();
    moekit_status_t st = moekit_router_forward(&s.config, T, s.dtype, in.logits.get(), E, bias_ptr,
                                               in.mask.get<uint8_t>(), w.get<float>(), idx.get<int32_t>(),
                                               load.get<int32_t>(), S.get<float>(), N.get<int32_t>(), ws.get(),
                                               ws.bytes(), stream);
    if (st == MOEKIT_STATUS_SUCCESS)
      st = moekit_aux_loss_forward(E, K, load.get<int32_t>(), S.get<float>(), N.get<int32_t>(), aux.get<float>(), stream);
    if (st == MOEKIT_STATUS_SUCCESS)
      st = moekit_router_backward(&s.config, T, s.dtype, in.logits.get(), E, bias_ptr, in.mask.get<uint8_t>(),
                                  idx.get<int32_t>(), gw.get<float>(), bs.coeff, load.get<int32_t>(),
                                  N.get<int32_t>(), grad.get(), E, nullptr, 0, stream);
    if (st == MOEKIT_STATUS_SUCCESS)
      st = moekit_router_bias_update(E, 1e-3f, 0, bias.get<float>(), load.get<int32_t>(), 1, stream);
    const std::string message = moekit_get_last_error();
    const cudaError_t end = cudaStreamEndCapture(stream, &graph);
    INFO(message);
    REQUIRE(st == MOEKIT_STATUS_SUCCESS);
    CUDA_REQUIRE(end);
    cudaGraphExec_t exec;
    CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 2; ++replay) {
      CUDA_REQUIRE(cudaGraphLaunch(exec, stream));
      CUDA_REQUIRE(cudaStreamSynchronize(stream));
      INFO("replay " << replay);
      const auto wh = w.to_host<float>();
      CHECK(std::memcmp(wh.data(), eager.weights.data(), 4 * wh.size()) == 0);
      CHECK(idx.to_host<int32_t>() == eager.indices);
      const auto sh = S.to_host<float>();
      CHECK(std::memcmp(sh.data(), eager.score_sum.data(), 4 * sh.size()) == 0);
      CHECK(N.to_host<int32_t>()[0] == eager.count);
      const auto gh = unpack(s.dtype, grad.to_host<uint8_t>());
      CHECK(std::memcmp(gh.data(), eager_grad.data(), 4 * gh.size()) == 0);
      // the bias update consumed and reset the load
      for (int32_t v : load.to_host<int32_t>()) CHECK(v == 0);
      std::vector<int64_t> l64(eager.load.begin(), eager.load.end());
      std::vector<double> sd(eager.score_sum.begin(), eager.score_sum.end());
      CHECK(close(aux.to_host<float>()[0], ref::aux_loss(E, K, l64, sd, eager.count), {1e-4, 1e-7}));
    }
    // two updates from the same load moved the bias twice by the same sign
    std::vector<float> expect = bias0;
    std::vector<int32_t> l = eager.load;
    ref::bias_update(E, 1e-3f, false, expect, l, false);
    ref::bias_update(E, 1e-3f, false, expect, l, false);
    CHECK(bias.to_host<float>() == expect);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

// On sm_90 every router kernel is a programmatic dependent of the stream's previous kernel
// (kernels/common/pdl.cuh): it is scheduled while that kernel runs and must wait in-kernel before
// touching memory. Two forward + backward pairs queued on one created stream with no host sync,
// the second forward writing the outputs, workspace and statistics the first backward reads: each
// backward must see its own forward's indices, load and count (read after write), and the second
// forward must not overwrite them before the first backward has read them (write after read).
// Both gradients and the second forward's outputs equal the same calls run one at a time.
TEST_CASE("router calls queued back to back on a created stream see each other's results in order", "[router][stream]") {
  auto rng = make_rng(0x5e91);
  for (const RouterCase& rc : model_cases()) {
    // the fast path with and without groups, the thread-per-token path, the generic path
    if (rc.name != "deepseek-v3" && rc.name != "qwen3" && rc.name != "mixtral" && rc.name != "e2048-k32") continue;
    INFO(rc.name);
    const int E = rc.config.num_experts, K = rc.config.top_k;
    const int64_t T = E >= 2048 ? 2000 : 20000;  // long forwards: a missing wait would read early
    ForwardSetup sa = make_setup(rc, T, MOEKIT_DTYPE_BF16, rng);
    sa.config.accumulate_load = 0;
    sa.mask = random_mask(rng, T);
    ForwardSetup sb = make_setup(rc, T, MOEKIT_DTYPE_BF16, rng);
    sb.config = sa.config;
    sb.mask = random_mask(rng, T);
    const DeviceInputs ina = upload(sa), inb = upload(sb);
    BackwardSetup bs;
    bs.grad_weights = uniform(rng, static_cast<size_t>(T) * K, -1.0f, 1.0f);
    bs.coeff = 0.25f;
    // one call at a time (legacy stream, synchronised after each)
    const ForwardOut ea = run_forward(sa, ina), eb = run_forward(sb, inb);
    const std::vector<float> ga = run_backward(sa, ina, ea.d_indices, ea.d_load, ea.d_count, bs);
    const std::vector<float> gb = run_backward(sb, inb, eb.d_indices, eb.d_load, eb.d_count, bs);

    // the same four calls back to back on one stream, sharing every output and the workspace
    DeviceBuffer w(4 * T * K), idx(4 * T * K), load(4 * E), S(4 * E), N(4);
    DeviceBuffer grad_a(2 * T * E), grad_b(2 * T * E);
    DeviceBuffer gw = DeviceBuffer::from(bs.grad_weights);
    for (DeviceBuffer* b : {&w, &idx, &load, &S, &N, &grad_a, &grad_b}) b->poison();
    size_t bytes = 0;
    MOEKIT_REQUIRE_OK(moekit_router_forward_workspace_size(&sa.config, T, &bytes));
    DeviceBuffer ws(bytes);
    ws.poison();
    cudaStream_t stream;
    CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    auto backward = [&](const ForwardSetup& s, const DeviceInputs& in, DeviceBuffer& grad) {
      return moekit_router_backward(&s.config, T, s.dtype, in.logits.get(), s.row_stride(), in.bias.get<float>(),
                                    in.mask.get<uint8_t>(), idx.get<int32_t>(), gw.get<float>(), bs.coeff,
                                    load.get<int32_t>(), N.get<int32_t>(), grad.get(), E, nullptr, 0, stream);
    };
    MOEKIT_REQUIRE_OK(call_forward(sa, ina, w, idx, load, S, N, ws, stream));
    MOEKIT_REQUIRE_OK(backward(sa, ina, grad_a));
    MOEKIT_REQUIRE_OK(call_forward(sb, inb, w, idx, load, S, N, ws, stream));
    MOEKIT_REQUIRE_OK(backward(sb, inb, grad_b));
    CUDA_REQUIRE(cudaStreamSynchronize(stream));
    CUDA_REQUIRE(cudaStreamDestroy(stream));
    const std::vector<float> qa = unpack(sa.dtype, grad_a.to_host<uint8_t>());
    const std::vector<float> qb = unpack(sb.dtype, grad_b.to_host<uint8_t>());
    CHECK(std::memcmp(qa.data(), ga.data(), 4 * ga.size()) == 0);
    CHECK(std::memcmp(qb.data(), gb.data(), 4 * gb.size()) == 0);
    const auto wh = w.to_host<float>();
    CHECK(std::memcmp(wh.data(), eb.weights.data(), 4 * wh.size()) == 0);
    CHECK(idx.to_host<int32_t>() == eb.indices);
    CHECK(load.to_host<int32_t>() == eb.load);
    CHECK(N.to_host<int32_t>()[0] == eb.count);
  }
}

// ---- bad inputs on device buffers ----------------------------------------------------------------

TEST_CASE("router calls with bad arguments leave poisoned device buffers untouched", "[router][validation]") {
  const int E = 64, K = 4;
  const int64_t T = 100;
  DeviceBuffer logits(2 * T * E), bias(4 * E), w(4 * T * K), idx(4 * T * K), load(4 * E), S(4 * E), N(4),
      grad(2 * T * E), gw(4 * T * K), aux(4), ws(1 << 20);
  for (DeviceBuffer* b : {&w, &idx, &load, &S, &N, &grad, &aux, &bias}) b->poison();
  logits.zero();
  gw.zero();
  auto c = router_config(E, K);
  auto run = [&](const moekit_router_config_t& cfg, int64_t t, moekit_dtype_t dt, int64_t stride, float* s_ptr,
                 int32_t* n_ptr, size_t ws_bytes) {
    return moekit_router_forward(&cfg, t, dt, logits.get(), stride, nullptr, nullptr, w.get<float>(), idx.get<int32_t>(),
                                 load.get<int32_t>(), s_ptr, n_ptr, ws.get(), ws_bytes, nullptr);
  };
  auto bad_k = router_config(E, 65);
  auto bad_g = router_config(E, K);
  bad_g.num_groups = 3;
  auto bad_gk = router_config(E, K);
  bad_gk.num_groups = 4;
  bad_gk.num_groups_kept = 6;
  CHECK(run(bad_k, T, MOEKIT_DTYPE_BF16, E, S.get<float>(), N.get<int32_t>(), ws.bytes()) == MOEKIT_STATUS_INVALID_ARGUMENT);
  CHECK(run(bad_g, T, MOEKIT_DTYPE_BF16, E, S.get<float>(), N.get<int32_t>(), ws.bytes()) == MOEKIT_STATUS_INVALID_ARGUMENT);
  CHECK(run(bad_gk, T, MOEKIT_DTYPE_BF16, E, S.get<float>(), N.get<int32_t>(), ws.bytes()) == MOEKIT_STATUS_INVALID_ARGUMENT);
  CHECK(run(c, T, static_cast<moekit_dtype_t>(3), E, S.get<float>(), N.get<int32_t>(), ws.bytes()) == MOEKIT_STATUS_UNSUPPORTED);
  CHECK(run(c, T, MOEKIT_DTYPE_BF16, E - 1, S.get<float>(), N.get<int32_t>(), ws.bytes()) == MOEKIT_STATUS_INVALID_ARGUMENT);
  CHECK(run(c, T, MOEKIT_DTYPE_BF16, E, S.get<float>(), nullptr, ws.bytes()) == MOEKIT_STATUS_INVALID_ARGUMENT);
  size_t need = 0;
  MOEKIT_REQUIRE_OK(moekit_router_forward_workspace_size(&c, T, &need));
  CHECK(run(c, T, MOEKIT_DTYPE_BF16, E, S.get<float>(), N.get<int32_t>(), need - 1) == MOEKIT_STATUS_WORKSPACE_TOO_SMALL);
  CHECK(has_text_in_last_error("workspace_bytes"));
  CHECK(moekit_router_backward(&c, T, MOEKIT_DTYPE_BF16, logits.get(), E, nullptr, nullptr, idx.get<int32_t>(),
                               gw.get<float>(), 1.0f, nullptr, N.get<int32_t>(), grad.get(), E, nullptr, 0,
                               nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  CHECK(moekit_router_backward(&c, T, MOEKIT_DTYPE_BF16, logits.get(), E, nullptr, nullptr, idx.get<int32_t>(),
                               gw.get<float>(), 0.0f, nullptr, nullptr, logits.get(), E, nullptr, 0,
                               nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);  // grad_logits == logits
  CHECK(moekit_aux_loss_forward(E, E + 1, load.get<int32_t>(), S.get<float>(), N.get<int32_t>(), aux.get<float>(),
                                nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  CHECK(moekit_router_bias_update(E, INFINITY, 0, bias.get<float>(), load.get<int32_t>(), 1, nullptr) ==
        MOEKIT_STATUS_INVALID_ARGUMENT);
  CHECK(moekit_fake_gate_forward(T, E, K, E, 0.0f, 1, 0, nullptr, w.get<float>(), idx.get<int32_t>(),
                                 load.get<int32_t>(), 0, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  CUDA_REQUIRE(cudaDeviceSynchronize());
  for (DeviceBuffer* b : {&w, &idx, &load, &S, &N, &grad, &aux, &bias}) CHECK(still_poisoned(*b));
}

// ---- aux loss and bias update ----------------------------------------------------------------------

TEST_CASE("aux loss value on the device", "[router][aux]") {
  auto rng = make_rng(0xa0c5);
  for (const RouterCase& rc : model_cases()) {
    INFO(rc.name);
    const int E = rc.config.num_experts, K = rc.config.top_k;
    ForwardSetup s = make_setup(rc, rc.config.num_experts >= 2048 ? 100 : 2000, MOEKIT_DTYPE_F32, rng);
    s.mask = random_mask(rng, s.T);
    const DeviceInputs in = upload(s);
    const ForwardOut o = run_forward(s, in);
    DeviceBuffer S = DeviceBuffer::from(o.score_sum), aux(4);
    aux.poison();
    MOEKIT_REQUIRE_OK(moekit_aux_loss_forward(E, K, o.d_load.get<int32_t>(), S.get<float>(), o.d_count.get<int32_t>(),
                                              aux.get<float>(), nullptr));
    CUDA_REQUIRE(cudaDeviceSynchronize());
    std::vector<int64_t> l64(o.load.begin(), o.load.end());
    std::vector<double> sd(o.score_sum.begin(), o.score_sum.end());
    const double want = ref::aux_loss(E, K, l64, sd, o.count);
    CHECK(close(aux.to_host<float>()[0], want, {1e-4, 1e-7}));
  }
  // uniform routing gives 1 (N = 4 tokens, K = 2 of E = 8: L_i = 1, S_i = N / E)
  std::vector<int32_t> load(8, 1);
  std::vector<float> S(8, 0.5f);
  std::vector<int32_t> n = {4};
  DeviceBuffer dl = DeviceBuffer::from(load), ds = DeviceBuffer::from(S), dn = DeviceBuffer::from(n), aux(4);
  MOEKIT_REQUIRE_OK(moekit_aux_loss_forward(8, 2, dl.get<int32_t>(), ds.get<float>(), dn.get<int32_t>(), aux.get<float>(), nullptr));
  CUDA_REQUIRE(cudaDeviceSynchronize());
  CHECK(std::fabs(aux.to_host<float>()[0] - 1.0f) < 1e-6f);
}

TEST_CASE("bias update on the device", "[router][bias]") {
  auto rng = make_rng(0xb1a5);
  for (int E : {1, 8, 256, 4096}) {
    for (int recenter : {0, 1}) {
      for (int reset : {0, 1}) {
        INFO("E=" << E << " recenter " << recenter << " reset " << reset);
        std::vector<float> b = uniform(rng, E, -2.0f, 2.0f);
        std::vector<int32_t> l(E);
        std::uniform_int_distribution<int> d(0, 50);
        for (auto& x : l) x = d(rng);
        if (E >= 8) l[3] = l[5] = 0;  // some experts exactly at a mean of equal loads
        DeviceBuffer db = DeviceBuffer::from(b), dl = DeviceBuffer::from(l);
        MOEKIT_REQUIRE_OK(moekit_router_bias_update(E, 0.01f, recenter, db.get<float>(), dl.get<int32_t>(), reset, nullptr));
        CUDA_REQUIRE(cudaDeviceSynchronize());
        ref::bias_update(E, 0.01f, recenter != 0, b, l, reset != 0);
        const auto got = db.to_host<float>();
        if (recenter) {
          for (int e = 0; e < E; ++e) CHECK(close(got[e], b[e], {1e-5, 1e-5}));
        } else {
          CHECK(got == b);  // sign decisions and fp32 additions are exact
        }
        CHECK(dl.to_host<int32_t>() == l);
      }
    }
  }
  // equal loads: nothing moves
  std::vector<float> b(16, 0.5f);
  std::vector<int32_t> l(16, 9);
  DeviceBuffer db = DeviceBuffer::from(b), dl = DeviceBuffer::from(l);
  MOEKIT_REQUIRE_OK(moekit_router_bias_update(16, 0.1f, 0, db.get<float>(), dl.get<int32_t>(), 0, nullptr));
  CUDA_REQUIRE(cudaDeviceSynchronize());
  CHECK(db.to_host<float>() == b);
}

// ---- fake gate ---------------------------------------------------------------------------------------

TEST_CASE("fake gate matches the reference bit for bit", "[router][fake_gate]") {
  auto rng = make_rng(0xfa6e);
  struct Case {
    int64_t T;
    int E, K, skip;
    float noise;
  };
  const Case cases[] = {{4096, 64, 8, 0, 0.0f}, {4096, 64, 8, 0, 0.5f}, {1000, 256, 8, 3, 0.1f}, {333, 4096, 32, 0, 1.0f},
                        {77, 5, 5, 0, 0.3f},    {1, 8, 2, 6, 0.0f},     {0, 8, 2, 0, 0.5f},      {500, 2048, 32, 17, 0.7f}};
  for (const Case& k : cases) {
    for (int masked : {0, 1}) {
      for (int accumulate : {0, 1}) {
        INFO("T=" << k.T << " E=" << k.E << " K=" << k.K << " skip=" << k.skip << " noise=" << k.noise << " mask "
                  << masked << " accumulate " << accumulate);
        std::vector<uint8_t> mask = random_mask(rng, k.T);
        DeviceBuffer dm = masked ? DeviceBuffer::from(mask) : DeviceBuffer();
        DeviceBuffer w(4 * k.T * k.K), idx(4 * k.T * k.K);
        w.poison();
        idx.poison();
        std::vector<int32_t> start(k.E, 2);
        DeviceBuffer load = DeviceBuffer::from(start);
        const uint64_t seed = 0x1234567890abcdefull + k.E, offset = 42 + static_cast<uint64_t>(k.T);
        MOEKIT_REQUIRE_OK(moekit_fake_gate_forward(k.T, k.E, k.K, k.skip, k.noise, seed, offset, dm.get<uint8_t>(),
                                                   w.get<float>(), idx.get<int32_t>(), load.get<int32_t>(), accumulate,
                                                   nullptr));
        CUDA_REQUIRE(cudaDeviceSynchronize());
        const auto r = ref::fake_gate(k.T, k.E, k.K, k.skip, k.noise, seed, offset, masked ? &mask : nullptr);
        CHECK(idx.to_host<int32_t>() == r.indices);
        CHECK(w.to_host<float>() == r.weights);
        const auto l = load.to_host<int32_t>();
        for (int e = 0; e < k.E; ++e) CHECK(l[e] == r.load[e] + (accumulate ? 2 : 0));
      }
    }
  }
}
