// A whole-layer check against the double reference that reports instead of asserting: the demo and
// the benchmark run it before they time anything. (The GPU suite makes the same comparisons, and
// more, with Catch2 assertions.) The device's logits are compared with the reference projection and
// then fed to the reference router, so routing is judged on the same inputs; a problem whose
// selection has a near-tie closer than fp32 resolves is redrawn.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tests/layer/layer_cases.hpp"
#include "tests/layer/layer_device.hpp"
#include "tests/reference/layer_ref.hpp"

namespace moekit::test::layer {

struct CheckLine {
  std::string name;
  double rel = 0.0;        // ||got - want|| / ||want|| (0 when both are zero)
  double max_ratio = 0.0;  // max |got - want| / max |want|
  bool ok = false;
};

struct CheckReport {
  bool ok = false;
  std::string failure;     // what went wrong when !ok
  std::vector<CheckLine> lines;
};

inline double norm_tolerance(moekit_dtype_t d) {
  return d == MOEKIT_DTYPE_BF16 ? 2e-2 : d == MOEKIT_DTYPE_F16 ? 5e-3 : 1e-4;
}

inline CheckLine compare_values(const std::string& name, const std::vector<double>& got,
                                const std::vector<double>& want, moekit_dtype_t dtype) {
  CheckLine l;
  l.name = name;
  double err2 = 0, ref2 = 0, max_err = 0, max_ref = 0;
  bool finite = got.size() == want.size();
  for (size_t i = 0; finite && i < want.size(); ++i) {
    if (!std::isfinite(got[i])) {
      finite = false;
      break;
    }
    const double e = std::fabs(got[i] - want[i]);
    err2 += e * e;
    ref2 += want[i] * want[i];
    max_err = std::max(max_err, e);
    max_ref = std::max(max_ref, std::fabs(want[i]));
  }
  if (!finite) {
    l.rel = l.max_ratio = INFINITY;
    return l;
  }
  l.rel = ref2 > 0 ? std::sqrt(err2 / ref2) : (max_err > 0 ? INFINITY : 0.0);
  l.max_ratio = max_ref > 0 ? max_err / max_ref : (max_err > 0 ? INFINITY : 0.0);
  l.ok = l.rel < norm_tolerance(dtype) && l.max_ratio <= 4 * norm_tolerance(dtype);
  return l;
}

// Runs forward and backward of `c` at T tokens on `stream` and compares y, dx and every parameter
// gradient with the reference (and the routing decisions exactly).
inline CheckReport check_against_reference(const LayerCase& c, int64_t T, uint64_t seed, cudaStream_t stream) {
  CheckReport report;
  const auto round_to_dtype = [](moekit_dtype_t d) {
    return [d](double x) { return static_cast<double>(round_to(d, static_cast<float>(x))); };
  };
  const ref::LayerRounding rounding{round_to_dtype(c.dtype),
                                    round_to_dtype(c.router_fp32 ? MOEKIT_DTYPE_F32 : c.dtype)};
  const int E = c.num_experts(), K = c.top_k(), H = c.hidden;
  for (int attempt = 0; attempt < 4; ++attempt) {
    std::mt19937_64 rng(seed + 0x9e3779b97f4a7c15ull * attempt);
    const ref::LayerProblem problem = make_problem(c, T, rng);
    const std::vector<double> dy = normal_vec(rng, static_cast<size_t>(T) * H, 1.0, c.dtype);
    DeviceProblem dp(c, problem, dy, stream);
    dp.poison_outputs(0xff);
    moekit_check(dp.forward(), "moekit_layer_forward");
    moekit_check(dp.backward(), "moekit_layer_backward");
    cuda_check(cudaStreamSynchronize(stream), "running the layer");
    const moekit_layer_saved_view_t v = dp.view();
    const std::vector<double> raw = download_values(v.logits, static_cast<size_t>(T * v.logits_row_stride),
                                                    static_cast<moekit_dtype_t>(v.logits_dtype), stream);
    std::vector<double> logits(static_cast<size_t>(T) * E);
    std::vector<float> zf(logits.size());
    double margin = INFINITY;
    for (int64_t t = 0; t < T; ++t) {
      for (int e = 0; e < E; ++e) {
        logits[t * E + e] = raw[t * v.logits_row_stride + e];
        zf[t * E + e] = static_cast<float>(logits[t * E + e]);
      }
      margin = std::min(margin, ref::selection_margin(c.router, zf.data() + t * E,
                                                      problem.correction_bias.empty() ? nullptr
                                                                                      : problem.correction_bias.data()));
    }
    if (margin < 1e-5) continue;  // a near-tie: draw another problem

    report.lines.push_back(compare_values("router logits", logits, ref::layer_logits(problem, rounding.logits),
                                          static_cast<moekit_dtype_t>(v.logits_dtype)));
    const ref::LayerForward f = ref::layer_forward(problem, rounding, &zf);
    const std::vector<int32_t> idx = download_as<int32_t>(v.indices, static_cast<size_t>(T) * K, stream);
    const std::vector<int32_t> offsets = download_as<int32_t>(v.expert_offsets, static_cast<size_t>(E) + 1, stream);
    if (idx != f.router.indices) {
      report.failure = "the device's expert indices differ from the reference router's";
      return report;
    }
    if (offsets != f.plan.expert_offsets) {
      report.failure = "the device's routing plan differs from the reference plan";
      return report;
    }
    const ref::LayerGrads g = ref::layer_backward(problem, rounding, f, dy, c.aux_coeff);
    const moekit_dtype_t d = c.dtype;
    auto add = [&](const char* name, const void* ptr, const std::vector<double>& want) {
      report.lines.push_back(compare_values(name, download_values(ptr, want.size(), d, stream), want, d));
    };
    add("y", dp.y().get(), f.y);
    add("grad x", dp.dx().get(), g.x);
    const GradBuffers& gb = dp.grads();
    add("grad router weight", gb.router_weight.get(), g.router_weight);
    if (c.router_bias) add("grad router bias", gb.router_bias.get(), g.router_bias);
    add("grad w_gate_up", gb.w_gate_up.get(), g.w_gate_up);
    add("grad w_down", gb.w_down.get(), g.w_down);
    if (c.expert_bias) {
      add("grad b_gate_up", gb.b_gate_up.get(), g.b_gate_up);
      add("grad b_down", gb.b_down.get(), g.b_down);
    }
    if (c.has_shared) {
      add("grad shared w_gate_up", gb.shared_w_gate_up.get(), g.shared_w_gate_up);
      add("grad shared w_down", gb.shared_w_down.get(), g.shared_w_down);
      if (c.shared_bias) {
        add("grad shared b_gate_up", gb.shared_b_gate_up.get(), g.shared_b_gate_up);
        add("grad shared b_down", gb.shared_b_down.get(), g.shared_b_down);
      }
      if (c.shared_gate) add("grad shared gate", gb.shared_gate_weight.get(), g.shared_gate_weight);
    }
    report.ok = true;
    for (const CheckLine& l : report.lines)
      if (!l.ok) {
        report.ok = false;
        report.failure = l.name + " is outside the tolerance";
      }
    return report;
  }
  report.failure = "four random problems in a row had near-tied routing (a bug in the generator)";
  return report;
}

}  // namespace moekit::test::layer
