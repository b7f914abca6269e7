// Layer family, GPU suite: moekit_layer_forward / moekit_layer_backward against the double
// reference (tests/reference/layer_ref) for a small version of every model of the table, with
// padding tokens, T = 0 and T = 1; bitwise determinism; one CUDA graph holding a whole forward +
// backward (captured in cudaStreamCaptureModeGlobal, which fails on any work off the caller's
// stream), replayed bit for bit; recompute == saved pre-activations bit for bit; the load
// accumulation; the stage events; every bad argument rejected with a message and nothing written.
//
// Tags: [race] is the small subset (every model at T = 1) meant for compute-sanitizer racecheck, whose
// cost on the grouped GEMMs' shared-memory pipeline makes the whole suite slow under it.
//
// Ordering: every upload, poison and download runs on the test's cudaStreamNonBlocking stream
// (tests/layer/layer_device.hpp), the stream the layer runs on, so nothing relies on the legacy
// default stream.
//
// How routing is compared: the device's logits (read from the saved buffer) are checked against
// the reference projection with a GEMM tolerance, and then fed to the reference router, so the
// selection is judged on the same inputs; inputs whose selection has a near-tie closer than fp32
// can resolve (router_ref selection_margin < 1e-5) are redrawn.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moekit/moekit.h"
#include "tests/layer/layer_cases.hpp"
#include "tests/layer/layer_device.hpp"
#include "tests/reference/layer_ref.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

namespace ref = moekit::ref;
using moekit::test::make_rng;
using namespace moekit::test::layer;

#define CUDA_OK(expr)                                                                                \
  do {                                                                                               \
    const cudaError_t cuda_ok_error_ = (expr);                                                       \
    INFO(#expr << " -> " << cudaGetErrorName(cuda_ok_error_) << ": " << cudaGetErrorString(cuda_ok_error_)); \
    REQUIRE(cuda_ok_error_ == cudaSuccess);                                                          \
  } while (0)

#define LAYER_OK(expr)                                                                        \
  do {                                                                                        \
    const moekit_status_t layer_ok_status_ = (expr);                                          \
    INFO(#expr << " -> " << moekit_status_string(layer_ok_status_) << ": " << moekit_get_last_error()); \
    REQUIRE(layer_ok_status_ == MOEKIT_STATUS_SUCCESS);                                       \
  } while (0)

namespace {

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s); }
};

ref::Rounder rounder(moekit_dtype_t d) {
  return [d](double x) { return static_cast<double>(moekit::test::round_to(d, static_cast<float>(x))); };
}

ref::LayerRounding rounding_of(const LayerCase& c) {
  return {rounder(c.dtype), rounder(c.router_fp32 ? MOEKIT_DTYPE_F32 : c.dtype)};
}

// Norm-relative and max-abs tolerances for GEMM-sized outputs. The reference rounds at the
// device's points; what remains is fp32-vs-double accumulation and the rare one-ulp flip of an
// intermediate, carried through up to four chained GEMMs in the backward.
struct NormTol {
  double norm;
  double max;
};
NormTol norm_tol(moekit_dtype_t d) {
  switch (d) {
    case MOEKIT_DTYPE_BF16: return {2e-2, 8e-2};
    case MOEKIT_DTYPE_F16: return {5e-3, 2e-2};
    default: return {1e-4, 1e-3};
  }
}

void compare(const std::string& name, const std::vector<double>& got, const std::vector<double>& want,
             moekit_dtype_t dtype) {
  INFO(name << " (" << want.size() << " values)");
  REQUIRE(got.size() == want.size());
  double err2 = 0, ref2 = 0, max_err = 0, max_ref = 0;
  size_t worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) {
      INFO("element " << i << " is " << got[i] << " (want " << want[i] << ")");
      REQUIRE(std::isfinite(got[i]));
    }
    const double e = std::fabs(got[i] - want[i]);
    err2 += e * e;
    ref2 += want[i] * want[i];
    if (e > max_err) {
      max_err = e;
      worst = i;
    }
    max_ref = std::max(max_ref, std::fabs(want[i]));
  }
  if (ref2 == 0) {
    INFO("the reference is all zero; max |got| " << max_err);
    REQUIRE(max_err == 0);
    return;
  }
  const NormTol tol = norm_tol(dtype);
  const double rel = std::sqrt(err2) / std::sqrt(ref2);
  INFO("relative norm error " << rel << ", max abs error " << max_err << " at " << worst << " (got " << got[worst]
                              << ", want " << want[worst] << ") of max |ref| " << max_ref);
  REQUIRE(rel < tol.norm);
  REQUIRE(max_err <= tol.max * max_ref);
}

template <class T>
void require_equal(const std::string& name, const std::vector<T>& got, const std::vector<T>& want) {
  INFO(name);
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i)
    if (!(got[i] == want[i])) {
      INFO("element " << i << ": got " << got[i] << ", want " << want[i]);
      REQUIRE(got[i] == want[i]);
    }
}

std::vector<double> columns(const std::vector<double>& m, int64_t rows, int64_t stride, int64_t cols) {
  std::vector<double> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = m[r * stride + c];
  return out;
}

// The device's logits [T, E] (dropping the stride's padding columns).
std::vector<double> device_logits(DeviceProblem& dp) {
  const moekit_layer_saved_view_t v = dp.view();
  const int64_t T = dp.num_tokens(), E = dp.lcase().num_experts();
  const std::vector<double> raw = download_values(v.logits, static_cast<size_t>(T * v.logits_row_stride),
                                                  static_cast<moekit_dtype_t>(v.logits_dtype), dp.stream());
  return columns(raw, T, v.logits_row_stride, E);
}

double min_margin(const LayerCase& c, const ref::LayerProblem& p, const std::vector<double>& logits) {
  const int E = c.num_experts();
  double m = INFINITY;
  std::vector<float> row(E);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    for (int e = 0; e < E; ++e) row[e] = static_cast<float>(logits[t * E + e]);
    m = std::min(m, ref::selection_margin(c.router, row.data(),
                                          p.correction_bias.empty() ? nullptr : p.correction_bias.data()));
  }
  return m;
}

std::vector<double> grad_y_for(const LayerCase& c, int64_t T, std::mt19937_64& rng) {
  return normal_vec(rng, static_cast<size_t>(T) * c.hidden, 1.0, c.dtype);
}

// One case at T tokens: a problem whose routing has no near-tie, run on the device (forward and
// backward, outputs poisoned first), everything compared with the reference.
void check_case(const LayerCase& c, int64_t T, uint64_t salt) {
  INFO("case " << c.describe() << ", T = " << T);
  Stream stream;
  const ref::LayerRounding rounding = rounding_of(c);
  for (int attempt = 0;; ++attempt) {
    INFO("attempt " << attempt);
    REQUIRE(attempt < 4);  // a near-tie has probability ~1e-2 per problem: four in a row is a bug
    auto rng = make_rng(salt + 0x9e3779b97f4a7c15ull * attempt);
    const ref::LayerProblem problem = make_problem(c, T, rng);
    const std::vector<double> dy = grad_y_for(c, T, rng);
    DeviceProblem dp(c, problem, dy, stream.s);
    dp.poison_outputs(0xff);
    dp.poison_workspaces(0xff);
    LAYER_OK(dp.forward());
    LAYER_OK(dp.backward());
    CUDA_OK(cudaStreamSynchronize(stream.s));
    CUDA_OK(cudaGetLastError());

    const std::vector<double> logits = device_logits(dp);
    if (min_margin(c, problem, logits) < 1e-5) continue;  // redraw: selection too close to call

    const moekit_dtype_t logits_dtype = c.router_fp32 ? MOEKIT_DTYPE_F32 : c.dtype;
    compare("logits", logits, ref::layer_logits(problem, rounding.logits), logits_dtype);
    const std::vector<float> zf(logits.begin(), logits.end());
    const ref::LayerForward f = ref::layer_forward(problem, rounding, &zf);

    const moekit_layer_saved_view_t v = dp.view();
    const int E = c.num_experts(), K = c.top_k(), H = c.hidden;
    const size_t TK = static_cast<size_t>(T) * K;
    cudaStream_t s = stream.s;
    require_equal("indices", download_as<int32_t>(v.indices, TK, s), f.router.indices);
    {
      const std::vector<float> w = download_as<float>(v.weights, TK, s);
      for (size_t i = 0; i < TK; ++i) {
        INFO("weights[" << i << "] = " << w[i] << ", reference " << f.weights[i]);
        REQUIRE(moekit::test::close(w[i], f.weights[i], {2e-5, 1e-6}));
      }
    }
    {
      const std::vector<int32_t> load = download_as<int32_t>(v.expert_load, E, s);
      const std::vector<int32_t> out_load = download_as<int32_t>(dp.load().get(), E, s);
      std::vector<int32_t> want(f.router.load.begin(), f.router.load.end());
      require_equal("saved expert_load", load, want);
      require_equal("expert_load output", out_load, want);
      require_equal("aux_token_count", download_as<int32_t>(v.aux_token_count, 1, s),
                    std::vector<int32_t>{static_cast<int32_t>(f.router.token_count)});
      const float aux = download_as<float>(dp.aux().get(), 1, s)[0];
      INFO("aux loss " << aux << ", reference " << f.aux_loss);
      REQUIRE(moekit::test::close(aux, f.aux_loss, {1e-4, 1e-6}));
    }
    // The plan, exactly.
    require_equal("expert_offsets", download_as<int32_t>(v.expert_offsets, E + 1, s), f.plan.expert_offsets);
    require_equal("expert_counts", download_as<int32_t>(v.expert_counts, E, s), f.plan.expert_counts);
    require_equal("row_of_slot", download_as<int32_t>(v.row_of_slot, TK, s), f.plan.row_of_slot);
    require_equal("slot_of_row", download_as<int32_t>(v.slot_of_row, f.plan.total, s), f.plan.slot_of_row);
    require_equal("plan totals", download_as<int32_t>(v.plan_totals, MOEKIT_PLAN_NUM_TOTALS, s),
                  std::vector<int32_t>{f.plan.total, f.plan.dropped, 0});
    // Saved pre-activations.
    const int64_t total = f.plan.total;
    if (!c.recompute) {
      REQUIRE(v.expert_u != nullptr);
      compare("saved expert u", download_values(v.expert_u, total * f.experts.nu(), c.dtype, s),
              std::vector<double>(f.expert_out.u.begin(), f.expert_out.u.begin() + total * f.experts.nu()), c.dtype);
    } else {
      REQUIRE(v.expert_u == nullptr);
    }
    if (c.shared_gate) {
      const std::vector<float> gl = download_as<float>(v.shared_gate_logit, static_cast<size_t>(T), s);
      compare("shared gate logit", std::vector<double>(gl.begin(), gl.end()), f.gate_logit, c.dtype);
      compare("saved shared output", download_values(v.shared_out, T * H, c.dtype, s), f.shared_out.out, c.dtype);
    }

    // Outputs.
    compare("y", download_values(dp.y().get(), T * H, c.dtype, s), f.y, c.dtype);
    const ref::LayerGrads g = ref::layer_backward(problem, rounding, f, dy, c.aux_coeff);
    compare("grad_x", download_values(dp.dx().get(), T * H, c.dtype, s), g.x, c.dtype);
    const GradBuffers& gb = dp.grads();
    auto grad = [&](const char* name, const DevBuf& b, const std::vector<double>& want) {
      compare(name, download_values(b.get(), want.size(), c.dtype, s), want, c.dtype);
    };
    grad("grads.router_weight", gb.router_weight, g.router_weight);
    if (c.router_bias) grad("grads.router_bias", gb.router_bias, g.router_bias);
    grad("grads.w_gate_up", gb.w_gate_up, g.w_gate_up);
    grad("grads.w_down", gb.w_down, g.w_down);
    if (c.expert_bias) {
      grad("grads.b_gate_up", gb.b_gate_up, g.b_gate_up);
      grad("grads.b_down", gb.b_down, g.b_down);
    }
    if (c.has_shared) {
      grad("grads.shared_w_gate_up", gb.shared_w_gate_up, g.shared_w_gate_up);
      grad("grads.shared_w_down", gb.shared_w_down, g.shared_w_down);
      if (c.shared_bias) {
        grad("grads.shared_b_gate_up", gb.shared_b_gate_up, g.shared_b_gate_up);
        grad("grads.shared_b_down", gb.shared_b_down, g.shared_b_down);
      }
      if (c.shared_gate) grad("grads.shared_gate_weight", gb.shared_gate_weight, g.shared_gate_weight);
    }
    return;
  }
}

const LayerCase& case_named(const std::vector<LayerCase>& cases, const std::string& name) {
  for (const LayerCase& c : cases)
    if (c.name == name) return c;
  throw std::runtime_error("no case " + name);
}

// A problem ready on the device, for the tests that do not compare with the reference.
struct Prepared {
  Stream stream;
  ref::LayerProblem problem;
  std::vector<double> dy;
  std::unique_ptr<DeviceProblem> dp;
  Prepared(const LayerCase& c, int64_t T, uint64_t salt) {
    auto rng = make_rng(salt);
    problem = make_problem(c, T, rng);
    dy = grad_y_for(c, T, rng);
    dp = std::make_unique<DeviceProblem>(c, problem, dy, stream.s);
  }
};

std::vector<std::vector<uint8_t>> run_eager(DeviceProblem& dp, int poison) {
  dp.poison_outputs(poison);
  dp.poison_workspaces(poison);
  LAYER_OK(dp.forward());
  LAYER_OK(dp.backward());
  CUDA_OK(cudaStreamSynchronize(dp.stream()));
  return dp.all_outputs();
}

void require_same_bits(const std::vector<std::vector<uint8_t>>& a, const std::vector<std::vector<uint8_t>>& b,
                       const char* what) {
  INFO(what);
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    INFO("output #" << i << " (" << a[i].size() << " bytes)");
    REQUIRE(a[i].size() == b[i].size());
    REQUIRE(std::memcmp(a[i].data(), b[i].data(), a[i].size()) == 0);
  }
}

bool all_bytes(const std::vector<uint8_t>& v, uint8_t byte) {
  return std::all_of(v.begin(), v.end(), [byte](uint8_t b) { return b == byte; });
}

}  // namespace

TEST_CASE("layer forward and backward match the reference for every model of the table", "[layer]") {
  const std::vector<LayerCase> cases = model_cases();
  uint64_t salt = 1;
  for (const LayerCase& c : cases) {
    SECTION(c.name) { check_case(c, 160, 0x1a7e0000 + salt); }
    ++salt;
  }
}

TEST_CASE("layer with one token matches the reference", "[layer][race]") {
  const std::vector<LayerCase> cases = model_cases();
  uint64_t salt = 1;
  for (const LayerCase& c : cases) {
    SECTION(c.name) { check_case(c, 1, 0x1a7e1000 + salt); }
    ++salt;
  }
}

TEST_CASE("layer variants: every token padding, fp32 router with a bias, gated shared MLP in nn.Linear layout", "[layer]") {
  std::vector<LayerCase> cases = model_cases();
  SECTION("all padding") {
    LayerCase c = case_named(cases, "deepseek-v3");
    c.mask_fraction = 1.0;  // every token is padding: no rows, y = shared(x), N = 0
    check_case(c, 40, 0x1a7e2001);
  }
  SECTION("qwen3 with an fp32 router and a router bias, weights after down, no mask") {
    LayerCase c = case_named(cases, "qwen3");
    c.router_fp32 = true;
    c.router_bias = true;  // bf16 bias added to fp32 logits; its gradient summed from fp32 dz
    c.experts.weight_after_down = 1;
    c.recompute = false;
    c.mask_fraction = 0.0;
    check_case(c, 96, 0x1a7e2002);
  }
  SECTION("gpt-oss with a gated shared MLP in nn.Linear layout and recompute") {
    LayerCase c = case_named(cases, "gpt-oss");
    c.has_shared = true;
    c.shared.inter = 32;
    c.shared.weight_layout = MOEKIT_WEIGHT_OUT_IN;
    c.shared_gate = true;
    c.shared_bias = true;
    c.recompute = true;
    check_case(c, 72, 0x1a7e2003);
  }
}

TEST_CASE("layer with T = 0 writes the statistics and zero gradients", "[layer]") {
  for (const LayerCase& c : model_cases()) {
    SECTION(c.name) {
      Prepared pr(c, 0, 0x1a7e3000);
      DeviceProblem& dp = *pr.dp;
      dp.poison_outputs(0xff);
      LAYER_OK(dp.forward());
      LAYER_OK(dp.backward());
      CUDA_OK(cudaStreamSynchronize(dp.stream()));
      cudaStream_t s = dp.stream();
      const int E = c.num_experts();
      require_equal("expert_load", download_as<int32_t>(dp.load().get(), E, s), std::vector<int32_t>(E, 0));
      REQUIRE(download_as<float>(dp.aux().get(), 1, s)[0] == 0.0f);
      const moekit_layer_saved_view_t v = dp.view();
      require_equal("aux_token_count", download_as<int32_t>(v.aux_token_count, 1, s), std::vector<int32_t>{0});
      require_equal("expert_offsets", download_as<int32_t>(v.expert_offsets, E + 1, s), std::vector<int32_t>(E + 1, 0));
      for (const DevBuf* b : dp.grads().all()) {
        if (b->bytes() == 0) continue;
        REQUIRE(all_bytes(download(*b, s), 0));
      }
    }
  }
}

TEST_CASE("layer outputs are bitwise reproducible", "[layer][determinism]") {
  const std::vector<LayerCase> cases = model_cases();
  for (const char* name : {"deepseek-v3", "qwen3-next", "nemotron"}) {
    SECTION(name) {
      Prepared pr(case_named(cases, name), 200, 0x1a7e4000);
      const auto first = run_eager(*pr.dp, 0xff);
      const auto second = run_eager(*pr.dp, 0x00);  // other scratch content must not matter
      require_same_bits(first, second, "two eager runs");
    }
  }
}

TEST_CASE("a whole forward + backward captured in one CUDA graph replays bit for bit", "[layer][graph]") {
  const std::vector<LayerCase> cases = model_cases();
  for (const char* name : {"deepseek-v3", "gpt-oss", "glm-4.5", "qwen3"}) {
    SECTION(name) {
      Prepared pr(case_named(cases, name), 128, 0x1a7e5000);
      DeviceProblem& dp = *pr.dp;
      const auto eager = run_eager(dp, 0xff);
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      dp.poison_outputs(0x00);
      CUDA_OK(cudaStreamSynchronize(dp.stream()));
      CUDA_OK(cudaStreamBeginCapture(dp.stream(), cudaStreamCaptureModeGlobal));
      const moekit_status_t f = dp.forward();
      const std::string f_msg = moekit_get_last_error();
      const moekit_status_t b = dp.backward();
      const std::string b_msg = moekit_get_last_error();
      const cudaError_t end = cudaStreamEndCapture(dp.stream(), &graph);
      INFO("forward under capture: " << moekit_status_string(f) << " " << f_msg);
      INFO("backward under capture: " << moekit_status_string(b) << " " << b_msg);
      REQUIRE(f == MOEKIT_STATUS_SUCCESS);
      REQUIRE(b == MOEKIT_STATUS_SUCCESS);
      CUDA_OK(end);
      CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
      for (int replay = 0; replay < 2; ++replay) {
        dp.poison_outputs(replay == 0 ? 0x00 : 0xff);
        CUDA_OK(cudaGraphLaunch(exec, dp.stream()));
        CUDA_OK(cudaStreamSynchronize(dp.stream()));
        require_same_bits(eager, dp.all_outputs(), replay == 0 ? "first replay" : "second replay");
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }
  }
}

TEST_CASE("recomputing the pre-activations gives the saved path's bits", "[layer]") {
  const std::vector<LayerCase> cases = model_cases();
  for (const char* name : {"deepseek-v3", "nemotron", "qwen3-next"}) {
    SECTION(name) {
      LayerCase saved = case_named(cases, name), recomputed = saved;
      saved.recompute = false;
      recomputed.recompute = true;
      Prepared a(saved, 150, 0x1a7e6000), b(recomputed, 150, 0x1a7e6000);
      REQUIRE(b.dp->saved_bytes() < a.dp->saved_bytes());
      require_same_bits(run_eager(*a.dp, 0xff), run_eager(*b.dp, 0xff), "saved u vs recomputed u");
    }
  }
}

TEST_CASE("the forward adds its load into expert_load when the router accumulates", "[layer]") {
  LayerCase c = case_named(model_cases(), "deepseek-v3");
  c.router.accumulate_load = 1;
  Prepared pr(c, 120, 0x1a7e7000);
  DeviceProblem& dp = *pr.dp;
  const int E = c.num_experts();
  std::vector<int32_t> start(E);
  for (int e = 0; e < E; ++e) start[e] = 1000 * e + 7;
  dp.load().upload(start.data(), start.size() * 4, dp.stream());
  LAYER_OK(dp.forward());
  LAYER_OK(dp.forward());
  const moekit_layer_saved_view_t v = dp.view();
  const std::vector<int32_t> once = download_as<int32_t>(v.expert_load, E, dp.stream());
  const std::vector<int32_t> total = download_as<int32_t>(dp.load().get(), E, dp.stream());
  int64_t routed = 0;
  for (int e = 0; e < E; ++e) {
    INFO("expert " << e);
    REQUIRE(total[e] == start[e] + 2 * once[e]);
    routed += once[e];
  }
  REQUIRE(routed > 0);
}

TEST_CASE("stage events are recorded for the stages that run", "[layer]") {
  const std::vector<LayerCase> cases = model_cases();
  for (const char* name : {"deepseek-v3", "qwen3"}) {
    SECTION(name) {
      const LayerCase& c = case_named(cases, name);
      Prepared pr(c, 64, 0x1a7e8000);
      DeviceProblem& dp = *pr.dp;
      std::vector<cudaEvent_t> events(2 * MOEKIT_LAYER_NUM_STAGES);
      for (auto& e : events) CUDA_OK(cudaEventCreate(&e));
      std::vector<void*> handles(events.begin(), events.end());
      REQUIRE(moekit_layer_set_stage_events(dp.layer(), handles.data(), 3) == MOEKIT_STATUS_INVALID_ARGUMENT);
      REQUIRE(std::string(moekit_get_last_error()).find("num_events") != std::string::npos);
      LAYER_OK(moekit_layer_set_stage_events(dp.layer(), handles.data(), static_cast<int32_t>(handles.size())));
      // Every event is recorded once before `before`, then the stream sleeps 2 ms on the host:
      // an event the layer records lands after the sleep, one it skips keeps its early time.
      // (Asking the elapsed time of a never-recorded event would be an API error, which
      // compute-sanitizer rightly reports.)
      cudaEvent_t before;
      CUDA_OK(cudaEventCreate(&before));
      for (cudaEvent_t e : events) CUDA_OK(cudaEventRecord(e, dp.stream()));
      CUDA_OK(cudaEventRecord(before, dp.stream()));
      CUDA_OK(cudaLaunchHostFunc(
          dp.stream(), [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(2)); }, nullptr));
      LAYER_OK(dp.forward());
      LAYER_OK(dp.backward());
      CUDA_OK(cudaStreamSynchronize(dp.stream()));
      for (int st = 0; st < MOEKIT_LAYER_NUM_STAGES; ++st) {
        const bool shared_stage = st == MOEKIT_LAYER_STAGE_SHARED || st == MOEKIT_LAYER_STAGE_SHARED_BACKWARD;
        const bool runs = !shared_stage || c.has_shared;
        float begin_ms = 0.0f, end_ms = 0.0f, stage_ms = -1.0f;
        CUDA_OK(cudaEventElapsedTime(&begin_ms, before, events[2 * st]));
        CUDA_OK(cudaEventElapsedTime(&end_ms, before, events[2 * st + 1]));
        CUDA_OK(cudaEventElapsedTime(&stage_ms, events[2 * st], events[2 * st + 1]));
        INFO("stage " << st << ": begins " << begin_ms << " ms and ends " << end_ms << " ms after the marker");
        if (runs) {
          REQUIRE(begin_ms >= 1.5f);
          REQUIRE(stage_ms >= 0.0f);
        } else {
          REQUIRE(begin_ms <= 0.0f);
          REQUIRE(end_ms <= 0.0f);
        }
      }
      cudaEventDestroy(before);
      LAYER_OK(moekit_layer_set_stage_events(dp.layer(), nullptr, 0));
      LAYER_OK(dp.forward());
      CUDA_OK(cudaStreamSynchronize(dp.stream()));
      for (auto& e : events) cudaEventDestroy(e);
    }
  }
}

TEST_CASE("bad layer arguments are rejected with a message and write nothing", "[layer][errors]") {
  const LayerCase c = case_named(model_cases(), "deepseek-v3");
  Prepared pr(c, 64, 0x1a7e9000);
  DeviceProblem& dp = *pr.dp;
  cudaStream_t s = dp.stream();
  moekit_layer_t L = dp.layer();
  const int64_t T = dp.num_tokens();
  moekit_layer_params_t p = dp.params();
  moekit_layer_grads_t g = dp.grad_ptrs();
  char* ws = static_cast<char*>(dp.forward_ws().get());
  char* bws = static_cast<char*>(dp.backward_ws().get());
  char* saved = static_cast<char*>(dp.saved().get());
  const size_t fb = dp.forward_ws().bytes(), bb = dp.backward_ws().bytes(), sb = dp.saved().bytes();
  void* x = dp.x().get();
  void* y = dp.y().get();
  const uint8_t* mask = dp.mask().as<uint8_t>();
  int32_t* load = dp.load().as<int32_t>();
  float* aux = dp.aux().as<float>();

  // Everything the calls could write, poisoned; checked untouched after every rejection.
  auto poison = [&] {
    dp.poison_outputs(0xa5);
    CUDA_OK(cudaStreamSynchronize(s));
  };
  auto untouched = [&] {
    CUDA_OK(cudaStreamSynchronize(s));
    for (DevBuf* b : {&dp.y(), &dp.dx(), &dp.load(), &dp.aux(), &dp.saved()}) REQUIRE(all_bytes(download(*b, s), 0xa5));
    for (const DevBuf* b : {&dp.grads().router_weight, &dp.grads().w_gate_up, &dp.grads().shared_w_down})
      REQUIRE(all_bytes(download(*b, s), 0xa5));
  };
  auto expect = [&](moekit_status_t got, moekit_status_t want, const char* needle) {
    const std::string msg = moekit_get_last_error();
    INFO("status " << moekit_status_string(got) << ", message '" << msg << "', expected " << moekit_status_string(want)
                   << " naming '" << needle << "'");
    REQUIRE(got == want);
    REQUIRE(msg.find(needle) != std::string::npos);
    REQUIRE(msg.find("moekit_layer_") != std::string::npos);
    untouched();
  };
  auto fwd = [&](moekit_layer_t l, int64_t t, const void* xx, const moekit_layer_params_t* pp, void* yy,
                 void* sv, size_t svb, void* w, size_t wb) {
    return moekit_layer_forward(l, t, xx, mask, pp, yy, load, aux, sv, svb, w, wb, s);
  };
  poison();

  SECTION("forward") {
    expect(fwd(nullptr, T, x, &p, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "layer is NULL");
    expect(fwd(L, -1, x, &p, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens = -1");
    expect(fwd(L, int64_t(1) << 40, x, &p, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens");
    expect(fwd(L, T, nullptr, &p, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "x is NULL");
    expect(fwd(L, T, x, &p, nullptr, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "y is NULL");
    expect(fwd(L, T, x, nullptr, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "params is NULL");
    expect(fwd(L, T, x, &p, static_cast<char*>(y) + 2, saved, sb, ws, fb), MOEKIT_STATUS_MISALIGNED, "y = ");
    expect(fwd(L, T, x, &p, y, saved, sb - 1, ws, fb), MOEKIT_STATUS_WORKSPACE_TOO_SMALL, "saved_bytes");
    expect(fwd(L, T, x, &p, y, saved, sb, ws, fb - 1), MOEKIT_STATUS_WORKSPACE_TOO_SMALL, "workspace_bytes");
    expect(fwd(L, T, x, &p, y, saved, sb, ws + 16, fb), MOEKIT_STATUS_MISALIGNED, "workspace = ");
    expect(fwd(L, T, x, &p, y, saved + 1, sb, ws, fb), MOEKIT_STATUS_MISALIGNED, "saved = ");
    expect(fwd(L, T, x, &p, x, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "y = ");
    expect(fwd(L, T, x, &p, y, ws, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "overlaps");
    expect(moekit_layer_forward(L, T, x, mask, &p, y, reinterpret_cast<int32_t*>(reinterpret_cast<char*>(load) + 2),
                                aux, saved, sb, ws, fb, s),
           MOEKIT_STATUS_MISALIGNED, "expert_load");
    moekit_layer_params_t q = p;
    q.struct_size = 8;
    expect(fwd(L, T, x, &q, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "params->struct_size");
    q = p;
    q.router_weight = nullptr;
    expect(fwd(L, T, x, &q, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "params->router_weight");
    q = p;
    q.router_bias = p.router_weight;
    expect(fwd(L, T, x, &q, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "params->router_bias");
    q = p;
    q.shared_w_down = nullptr;
    expect(fwd(L, T, x, &q, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "params->shared_w_down");
    q = p;
    q.shared_gate_weight = p.w_down;
    expect(fwd(L, T, x, &q, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "params->shared_gate_weight");
    q = p;
    q.w_gate_up = static_cast<const char*>(p.w_gate_up) + 8;
    expect(fwd(L, T, x, &q, y, saved, sb, ws, fb), MOEKIT_STATUS_MISALIGNED, "params->w_gate_up");
    q = p;
    q.w_down = y;  // an output overlapping a parameter
    expect(fwd(L, T, x, &q, y, saved, sb, ws, fb), MOEKIT_STATUS_INVALID_ARGUMENT, "overlaps");
  }
  SECTION("backward") {
    void* dy = dp.dy().get();
    void* dx = dp.dx().get();
    auto bwd = [&](const void* sv, size_t svb, const void* gy, float coeff, void* gx, const moekit_layer_grads_t* gg,
                   void* w, size_t wb) {
      return moekit_layer_backward(L, T, x, mask, &p, sv, svb, gy, coeff, gx, gg, w, wb, s);
    };
    expect(bwd(saved, sb, nullptr, 0.f, dx, &g, bws, bb), MOEKIT_STATUS_INVALID_ARGUMENT, "grad_y is NULL");
    expect(bwd(saved, sb, dy, 0.f, nullptr, &g, bws, bb), MOEKIT_STATUS_INVALID_ARGUMENT, "grad_x is NULL");
    expect(bwd(saved, sb, dy, NAN, dx, &g, bws, bb), MOEKIT_STATUS_INVALID_ARGUMENT, "aux_loss_coeff");
    expect(bwd(saved, sb - 1, dy, 0.f, dx, &g, bws, bb), MOEKIT_STATUS_WORKSPACE_TOO_SMALL, "saved_bytes");
    expect(bwd(saved, sb, dy, 0.f, dx, &g, bws, bb - 1), MOEKIT_STATUS_WORKSPACE_TOO_SMALL, "workspace_bytes");
    expect(bwd(saved, sb, dy, 0.f, dy, &g, bws, bb), MOEKIT_STATUS_INVALID_ARGUMENT, "overlaps");
    expect(bwd(saved, sb, dy, 0.f, saved, &g, bws, bb), MOEKIT_STATUS_INVALID_ARGUMENT, "overlaps");
    moekit_layer_grads_t h = g;
    h.router_bias = dx;  // the layer has no router bias
    expect(bwd(saved, sb, dy, 0.f, dx, &h, bws, bb), MOEKIT_STATUS_INVALID_ARGUMENT, "grads->router_bias");
    h = g;
    h.w_down = static_cast<char*>(g.w_down) + 4;
    expect(bwd(saved, sb, dy, 0.f, dx, &h, bws, bb), MOEKIT_STATUS_MISALIGNED, "grads->w_down");
    h = g;
    h.w_down = g.w_gate_up;
    expect(bwd(saved, sb, dy, 0.f, dx, &h, bws, bb), MOEKIT_STATUS_INVALID_ARGUMENT, "overlaps");
    h = g;
    h.struct_size = 3;
    expect(bwd(saved, sb, dy, 0.f, dx, &h, bws, bb), MOEKIT_STATUS_INVALID_ARGUMENT, "grads->struct_size");
  }
}
