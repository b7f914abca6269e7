// moekit-demo: one Mixture-of-Experts layer, forward and backward, on the GPU.
//
//   1. checks a small layer with the same options against the CPU reference (y, dx and every
//      parameter gradient; the routing exactly) and says so;
//   2. builds the full-size layer (random weights, a random batch, a padding mask), runs it, and
//      times the whole forward and backward with CUDA events (median of --repeats);
//   3. runs it again with the layer's stage events on and prints the time of every stage (router
//      projection, router, plan, permute, experts, combine, shared expert, and the backward's) with
//      the TFLOP/s of the GEMM stages.
// Presets: dsv3 (default), qwen3-30b, mixtral, gpt-oss, small; sizes can be overridden. Without a
// GPU it says so and exits with status 2.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bench/common/bench_util.hpp"
#include "moekit/moekit.h"
#include "tests/layer/layer_cases.hpp"
#include "tests/layer/layer_check.hpp"
#include "tests/layer/layer_device.hpp"
#include "tests/support/numeric.hpp"

namespace {

using moekit::bench::Args;
using moekit::bench::Json;
namespace ref = moekit::ref;
using namespace moekit::test::layer;

struct Preset {
  std::string name;
  std::string about;
  LayerCase layer;
  int64_t tokens;
};

LayerCase new_case(const std::string& name, int hidden, int inter, int experts, int top_k) {
  LayerCase c;
  c.name = name;
  c.set_experts(experts, top_k);
  c.experts.inter = inter;
  c.set_hidden(hidden);
  c.set_dtype(MOEKIT_DTYPE_BF16);
  c.mask_fraction = 0.05;  // a few padding tokens, as a packed batch has
  return c;
}

std::vector<Preset> presets() {
  std::vector<Preset> v;
  {
    LayerCase c = new_case("dsv3", 7168, 2048, 32, 8);
    c.router.score_func = MOEKIT_SCORE_SIGMOID;
    c.router.num_groups = 8;
    c.router.num_groups_kept = 4;
    c.router.normalize = 1;
    c.router.route_scale = 2.5f;
    c.correction_bias = true;
    c.has_shared = true;
    c.shared.inter = 2048;
    c.set_hidden(7168);
    c.set_dtype(MOEKIT_DTYPE_BF16);
    v.push_back({"dsv3",
                 "DeepSeek-V3 layer as one rank of EP8 sees it, on one GPU: H 7168, I 2048, the rank's 32 of 256 "
                 "experts all local, top-8 of sigmoid scores with an fp32 correction bias in 8 groups keep 4, "
                 "normalised, route scale 2.5, one shared expert (I 2048)",
                 c, 8192});
  }
  {
    LayerCase c = new_case("qwen3-30b", 2048, 768, 128, 8);
    c.router.normalize = 1;
    c.aux_coeff = 1e-3;
    v.push_back({"qwen3-30b", "Qwen3-30B-A3B: H 2048, I 768, 128 experts, softmax then top-8, normalised, aux loss",
                 c, 16384});
  }
  {
    LayerCase c = new_case("mixtral", 4096, 14336, 8, 2);
    c.router.normalize = 1;
    v.push_back({"mixtral", "Mixtral-8x7B: H 4096, I 14336, 8 experts, top-2 of the softmax, renormalised", c, 4096});
  }
  {
    LayerCase c = new_case("gpt-oss", 2880, 2880, 32, 4);
    c.router.softmax_order = MOEKIT_TOPK_THEN_SOFTMAX;
    c.router_bias = true;
    c.expert_bias = true;
    c.experts.activation = MOEKIT_ACTIVATION_QUICK_GEGLU;
    c.experts.act_alpha = 1.702f;
    c.experts.act_limit = 7.0f;
    v.push_back({"gpt-oss",
                 "GPT-OSS-20B: H 2880, I 2880, 32 experts, top-4 logits then softmax, router and expert biases, "
                 "interleaved quick_geglu (limit 7)",
                 c, 8192});
  }
  {
    LayerCase c = new_case("small", 1024, 512, 16, 4);
    c.router.normalize = 1;
    c.has_shared = true;
    c.shared.inter = 1024;
    c.shared_gate = true;
    c.set_hidden(1024);
    c.set_dtype(MOEKIT_DTYPE_BF16);
    v.push_back({"small", "a small Qwen3-Next-like layer: H 1024, I 512, 16 experts, top-4, gated shared expert",
                 c, 2048});
  }
  return v;
}

void usage(const std::vector<Preset>& ps) {
  std::printf(
      "moekit-demo: an MoE layer forward and backward on the GPU, checked against the CPU reference, timed.\n\n"
      "  --preset=NAME   one of:");
  for (const Preset& p : ps) std::printf(" %s", p.name.c_str());
  std::printf(
      " (default dsv3), or all\n"
      "  --tokens=T --hidden=H --experts=E --top-k=K --inter=I --shared-inter=I_s   override sizes\n"
      "  --dtype=bf16|f16|f32 --recompute --router-fp32 --mask=FRACTION             override options\n"
      "  --gemm-path=auto|sm80|sm90   the experts' tensor-core kernels (sm90: Hopper TMA + wgmma)\n"
      "  --repeats=N (default 10) --warmup=N (default 3) --no-check --json=PATH --list\n\n");
  for (const Preset& p : ps) std::printf("  %-10s %s; T %lld\n", p.name.c_str(), p.about.c_str(), (long long)p.tokens);
}

const char* kStageNames[MOEKIT_LAYER_NUM_STAGES] = {
    "router projection", "router",         "plan",           "permute",         "experts",
    "combine",           "shared expert",  "shared expert",  "permute (again)", "combine",
    "experts",           "permute",        "router",         "projection + dx sum"};

double gb(double bytes) { return bytes / double(1 << 30); }

// Random values of unit variance (uniform, scaled), generated on the host by every core in chunks
// and uploaded: fast enough for multi-GB weights and reproducible for a seed.
void fill_random(void* device, size_t count, moekit_dtype_t dtype, double sd, uint64_t seed) {
  if (count == 0) return;
  const size_t es = moekit_dtype_size(dtype);
  const size_t chunk = size_t(1) << 24;
  std::vector<uint8_t> host(std::min(count, chunk) * es);
  const unsigned workers = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  const float scale = static_cast<float>(sd * std::sqrt(3.0));
  for (size_t begin = 0; begin < count; begin += chunk) {
    const size_t n = std::min(chunk, count - begin);
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < workers; ++w)
      pool.emplace_back([&, w] {
        for (size_t i = w; i < n; i += workers) {
          uint64_t z = seed * 0x9e3779b97f4a7c15ull + begin + i + 1;
          z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
          z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
          z ^= z >> 31;
          const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
          const float v = scale * (2.0f * u - 1.0f);
          if (dtype == MOEKIT_DTYPE_F32) {
            std::memcpy(&host[i * 4], &v, 4);
          } else {
            const uint16_t b = dtype == MOEKIT_DTYPE_BF16 ? moekit::test::float_to_bf16_bits(v)
                                                          : moekit::test::float_to_half_bits(v);
            std::memcpy(&host[i * 2], &b, 2);
          }
        }
      });
    for (auto& t : pool) t.join();
    cuda_check(cudaMemcpy(static_cast<char*>(device) + begin * es, host.data(), n * es, cudaMemcpyHostToDevice),
               "uploading random values");
  }
}

struct Timings {
  double forward_ms = 0, backward_ms = 0, total_ms = 0;
  std::vector<double> stage_ms;  // [MOEKIT_LAYER_NUM_STAGES], negative when the stage did not run
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// The full-size layer on the device.
struct BigLayer {
  LayerCase lc;
  moekit_layer_config_t config{};
  int64_t T = 0;
  moekit_layer_t layer = nullptr;
  DevBuf x, mask, y, dy, dx, load, aux, saved, ws;
  ParamBuffers p;
  GradBuffers g;
  moekit_layer_params_t params{};
  moekit_layer_grads_t grads{};
  size_t saved_bytes = 0, forward_bytes = 0, backward_bytes = 0;

  ~BigLayer() {
    if (layer) moekit_layer_destroy(layer);
  }

  void build(const LayerCase& c, int64_t tokens, uint64_t seed) {
    lc = c;
    T = tokens;
    config = lc.config();
    moekit_check(moekit_layer_create(&config, &layer), "moekit_layer_create");
    moekit_check(moekit_layer_saved_size(&config, T, &saved_bytes), "moekit_layer_saved_size");
    moekit_check(moekit_layer_workspace_size(&config, T, &forward_bytes, &backward_bytes),
                 "moekit_layer_workspace_size");
    const ref::LayerSpec s = spec_of(lc);
    const moekit_dtype_t d = lc.dtype;
    const size_t es = moekit_dtype_size(d), H = lc.hidden, E = lc.num_experts(), I = lc.experts.inter;
    const size_t NU = s.expert_nu(), Is = s.shared_inter, NUs = s.shared_nu(), TH = static_cast<size_t>(T) * H;
    // What it will take, before taking it.
    double need = static_cast<double>(saved_bytes + std::max(forward_bytes, backward_bytes));
    need += 2.0 * es * (E * H * NU + E * I * H + E * H + (s.has_shared ? H * NUs + Is * H : 0));
    need += 4.0 * es * TH;
    size_t free_bytes = 0, total = 0;
    cuda_check(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo");
    std::printf("  memory: %.2f GB (parameters and gradients %.2f, saved %.2f, workspace %.2f, activations %.2f) "
                "of %.2f GB free\n",
                gb(need), gb(2.0 * es * (E * H * NU + E * I * H)), gb(saved_bytes),
                gb(std::max(forward_bytes, backward_bytes)), gb(4.0 * es * TH), gb(free_bytes));
    if (need > 0.95 * static_cast<double>(free_bytes))
      throw std::runtime_error("not enough free GPU memory for this size: lower --tokens or --hidden");
    std::printf("  initialising %.2f GB of random weights and inputs ...\n", gb(es * (E * H * NU + E * I * H + TH)));
    std::fflush(stdout);
    uint64_t salt = seed;
    auto param = [&](size_t count, double sd, bool present) {
      if (!present) return DevBuf();
      DevBuf b = DevBuf(count * es);
      fill_random(b.get(), count, d, sd, ++salt);
      return b;
    };
    x = param(TH, 1.0, true);
    dy = param(TH, 1.0, true);
    y = DevBuf(TH * es);
    dx = DevBuf(TH * es);
    p.router_weight = param(E * H, 1.0 / std::sqrt(double(H)), true);
    p.router_bias = param(E, 0.5, lc.router_bias);
    p.w_gate_up = param(E * H * NU, 1.0 / std::sqrt(double(H)), true);
    p.b_gate_up = param(E * NU, 0.1, lc.expert_bias);
    p.w_down = param(E * I * H, 1.0 / std::sqrt(double(I)), true);
    p.b_down = param(E * H, 0.1, lc.expert_bias);
    p.shared_w_gate_up = param(H * NUs, 1.0 / std::sqrt(double(H)), lc.has_shared);
    p.shared_b_gate_up = param(NUs, 0.1, lc.shared_bias);
    p.shared_w_down = param(Is * H, 1.0 / std::sqrt(double(std::max<size_t>(Is, 1))), lc.has_shared);
    p.shared_b_down = param(H, 0.1, lc.shared_bias);
    p.shared_gate_weight = param(H, 1.0 / std::sqrt(double(H)), lc.shared_gate);
    if (lc.correction_bias) {
      p.correction_bias = DevBuf(E * 4);
      fill_random(p.correction_bias.get(), E, MOEKIT_DTYPE_F32, 0.1, ++salt);
    }
    if (lc.mask_fraction > 0) {
      std::vector<uint8_t> m(static_cast<size_t>(T));
      std::mt19937_64 rng(seed);
      std::bernoulli_distribution pad(lc.mask_fraction);
      for (auto& v : m) v = pad(rng) ? 0 : 1;
      mask = DevBuf(m.size());
      cuda_check(cudaMemcpy(mask.get(), m.data(), m.size(), cudaMemcpyHostToDevice), "uploading the mask");
    }
    load = DevBuf(E * 4);
    aux = DevBuf(4);
    saved = DevBuf(saved_bytes);
    ws = DevBuf(std::max(forward_bytes, backward_bytes));
    params = p.pointers();
    g = GradBuffers::like(p);
    grads = g.pointers();
  }

  void forward(cudaStream_t s) {
    moekit_check(moekit_layer_forward(layer, T, x.get(), mask.as<uint8_t>(), &params, y.get(), load.as<int32_t>(),
                                      aux.as<float>(), saved.get(), saved.bytes(), ws.get(), ws.bytes(), s),
                 "moekit_layer_forward");
  }
  void backward(cudaStream_t s) {
    moekit_check(moekit_layer_backward(layer, T, x.get(), mask.as<uint8_t>(), &params, saved.get(), saved.bytes(),
                                       dy.get(), static_cast<float>(lc.aux_coeff), dx.get(), &grads, ws.get(),
                                       ws.bytes(), s),
                 "moekit_layer_backward");
  }
};

// GEMM FLOPs of each stage, from the routed rows the plan produced (read after the timed runs).
std::vector<double> stage_flops(const LayerCase& c, int64_t T, int64_t rows) {
  const ref::LayerSpec s = spec_of(c);
  const double H = c.hidden, E = c.num_experts(), I = c.experts.inter, NU = s.expert_nu();
  const double Is = s.shared_inter, NUs = s.shared_nu(), t = static_cast<double>(T), r = static_cast<double>(rows);
  const double proj = 2 * t * H * E, experts = 2 * r * H * NU + 2 * r * I * H, shared = 2 * t * H * NUs + 2 * t * Is * H;
  std::vector<double> f(MOEKIT_LAYER_NUM_STAGES, 0.0);
  f[MOEKIT_LAYER_STAGE_PROJECTION] = proj;
  f[MOEKIT_LAYER_STAGE_EXPERTS] = experts;
  f[MOEKIT_LAYER_STAGE_SHARED] = shared;
  // Backward: dgrad and wgrad of each GEMM (plus the recomputed first GEMM with recompute).
  f[MOEKIT_LAYER_STAGE_SHARED_BACKWARD] = 2 * shared + (c.recompute ? 2 * t * H * NUs : 0);
  f[MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD] = 2 * experts + (c.recompute ? 2 * r * H * NU : 0);
  f[MOEKIT_LAYER_STAGE_PROJECTION_BACKWARD] = 2 * proj;
  return f;
}

int run_preset(const Preset& preset, const Args& args, Json& results) {
  LayerCase c = preset.layer;
  const int64_t T = args.get_int("tokens", preset.tokens);
  if (T < 1) {
    std::printf("  --tokens = %lld: the demo needs at least one token\n", static_cast<long long>(T));
    return 1;
  }
  if (args.has("hidden")) c.set_hidden(static_cast<int>(args.get_int("hidden", c.hidden)));
  if (args.has("experts") || args.has("top-k")) {
    const int e = static_cast<int>(args.get_int("experts", c.num_experts()));
    const int k = static_cast<int>(args.get_int("top-k", c.top_k()));
    c.set_experts(e, k);
    if (c.router.num_groups > 1 && (e % c.router.num_groups != 0 || c.router.num_groups_kept * (e / c.router.num_groups) < k)) {
      std::printf("  (groups %d/%d do not fit E = %d, K = %d: routing without groups)\n", c.router.num_groups,
                  c.router.num_groups_kept, e, k);
      c.router.num_groups = 1;
      c.router.num_groups_kept = 1;
    }
  }
  if (args.has("inter")) c.experts.inter = static_cast<int>(args.get_int("inter", c.experts.inter));
  if (args.has("shared-inter") && c.has_shared) c.shared.inter = static_cast<int>(args.get_int("shared-inter", 0));
  if (args.has("dtype")) {
    const std::string d = args.get("dtype", "bf16");
    c.set_dtype(d == "f32" ? MOEKIT_DTYPE_F32 : d == "f16" ? MOEKIT_DTYPE_F16 : MOEKIT_DTYPE_BF16);
  }
  if (args.has("recompute")) c.recompute = true;
  if (args.has("router-fp32")) c.router_fp32 = true;
  if (args.has("gemm-path")) {
    const std::string g = args.get("gemm-path", "auto");
    if (g != "auto" && g != "sm80" && g != "sm90") {
      std::printf("  --gemm-path = %s: expected auto, sm80 or sm90\n", g.c_str());
      return 1;
    }
    c.experts.gemm_path = g == "sm90" ? MOEKIT_GEMM_PATH_SM90 : g == "sm80" ? MOEKIT_GEMM_PATH_SM80 : MOEKIT_GEMM_PATH_AUTO;
  }
  if (args.has("mask")) c.mask_fraction = args.get_double("mask", c.mask_fraction);
  const int repeats = static_cast<int>(std::max<int64_t>(1, args.get_int("repeats", 10)));
  const int warmup = static_cast<int>(std::max<int64_t>(0, args.get_int("warmup", 3)));

  std::printf("\n== %s: %s\n", preset.name.c_str(), preset.about.c_str());
  std::printf("  %s, T = %lld tokens (%.0f%% padding)\n", c.describe().c_str(), (long long)T, 100 * c.mask_fraction);
  const moekit_layer_config_t cfg = c.config();
  if (moekit_layer_config_check(&cfg) != MOEKIT_STATUS_SUCCESS) {
    std::printf("  invalid configuration: %s\n", moekit_get_last_error());
    return 1;
  }
  cudaStream_t stream;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");

  // 1. The same options at a small size against the CPU reference.
  if (!args.has("no-check")) {
    LayerCase small = c;
    small.set_hidden(64);
    small.experts.inter = 32;
    if (small.has_shared) small.shared.inter = 32;
    const int64_t check_tokens = 96;
    std::printf("  checking H = 64, I = 32, T = %lld against the CPU reference ... ", (long long)check_tokens);
    std::fflush(stdout);
    const CheckReport r = check_against_reference(small, check_tokens, 0x5eed, stream);
    if (!r.ok) {
      std::printf("FAILED: %s\n", r.failure.c_str());
      for (const CheckLine& l : r.lines)
        std::printf("    %-24s relative error %.3g, max %.3g %s\n", l.name.c_str(), l.rel, l.max_ratio,
                    l.ok ? "" : "<-- outside the tolerance");
      return 1;
    }
    double worst = 0;
    std::string worst_name;
    for (const CheckLine& l : r.lines)
      if (l.rel >= worst) {
        worst = l.rel;
        worst_name = l.name;
      }
    std::printf("ok (routing identical; %zu tensors within tolerance, largest relative error %.2g in %s)\n",
                r.lines.size(), worst, worst_name.c_str());
  }

  // 2. The full-size layer.
  BigLayer big;
  const auto t0 = std::chrono::steady_clock::now();
  big.build(c, T, 1234);
  cuda_check(cudaDeviceSynchronize(), "initialising");
  std::printf("  ready in %.1f s; timing %d forward + backward runs after %d warm-up runs\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), repeats, warmup);
  std::fflush(stdout);
  for (int i = 0; i < warmup; ++i) {
    big.forward(stream);
    big.backward(stream);
  }
  cuda_check(cudaStreamSynchronize(stream), "warm-up");
  cudaEvent_t e0, e1, e2;
  cuda_check(cudaEventCreate(&e0), "event");
  cuda_check(cudaEventCreate(&e1), "event");
  cuda_check(cudaEventCreate(&e2), "event");
  std::vector<double> fwd, bwd, tot;
  const auto progress_start = std::chrono::steady_clock::now();
  auto last_progress = progress_start;
  for (int i = 0; i < repeats; ++i) {
    cuda_check(cudaEventRecord(e0, stream), "record");
    big.forward(stream);
    cuda_check(cudaEventRecord(e1, stream), "record");
    big.backward(stream);
    cuda_check(cudaEventRecord(e2, stream), "record");
    cuda_check(cudaEventSynchronize(e2), "run");
    float a = 0, b = 0;
    cudaEventElapsedTime(&a, e0, e1);
    cudaEventElapsedTime(&b, e1, e2);
    fwd.push_back(a);
    bwd.push_back(b);
    tot.push_back(a + b);
    const auto now = std::chrono::steady_clock::now();
    if (std::chrono::duration<double>(now - last_progress).count() > 2.0) {
      std::printf("  ... run %d of %d, %.2f ms each\n", i + 1, repeats, a + b);
      std::fflush(stdout);
      last_progress = now;
    }
  }
  Timings t;
  t.forward_ms = median(fwd);
  t.backward_ms = median(bwd);
  t.total_ms = median(tot);

  // 3. Per stage, with the layer's stage events.
  std::vector<cudaEvent_t> events(2 * MOEKIT_LAYER_NUM_STAGES);
  for (auto& e : events) cuda_check(cudaEventCreate(&e), "event");
  std::vector<void*> handles(events.begin(), events.end());
  moekit_check(moekit_layer_set_stage_events(big.layer, handles.data(), static_cast<int32_t>(handles.size())),
               "moekit_layer_set_stage_events");
  std::vector<std::vector<double>> per_stage(MOEKIT_LAYER_NUM_STAGES);
  const int stage_runs = std::max(1, std::min(repeats, 5));
  for (int i = 0; i < stage_runs; ++i) {
    big.forward(stream);
    big.backward(stream);
    cuda_check(cudaStreamSynchronize(stream), "stage run");
    for (int s = 0; s < MOEKIT_LAYER_NUM_STAGES; ++s) {
      float ms = 0;
      if (cudaEventElapsedTime(&ms, events[2 * s], events[2 * s + 1]) == cudaSuccess) per_stage[s].push_back(ms);
      (void)cudaGetLastError();
    }
  }
  moekit_check(moekit_layer_set_stage_events(big.layer, nullptr, 0), "moekit_layer_set_stage_events");
  t.stage_ms.assign(MOEKIT_LAYER_NUM_STAGES, -1.0);
  for (int s = 0; s < MOEKIT_LAYER_NUM_STAGES; ++s)
    if (!per_stage[s].empty()) t.stage_ms[s] = median(per_stage[s]);

  // Routed rows of the last run (a host read after the timing: fine outside the timed region).
  moekit_layer_saved_view_t v;
  std::memset(&v, 0, sizeof(v));
  v.struct_size = sizeof(v);
  moekit_check(moekit_layer_saved_view(&big.config, T, big.saved.get(), big.saved.bytes(), &v), "saved view");
  int32_t totals[MOEKIT_PLAN_NUM_TOTALS] = {0, 0, 0};
  float aux = 0;
  cuda_check(cudaMemcpy(totals, v.plan_totals, sizeof(totals), cudaMemcpyDeviceToHost), "reading the plan totals");
  cuda_check(cudaMemcpy(&aux, big.aux.get(), 4, cudaMemcpyDeviceToHost), "reading the aux loss");
  const std::vector<double> flops = stage_flops(c, T, totals[MOEKIT_PLAN_TOTAL_ROWS]);
  double fwd_flops = 0, all_flops = 0;
  for (int s = 0; s < MOEKIT_LAYER_NUM_STAGES; ++s) {
    all_flops += flops[s];
    if (s <= MOEKIT_LAYER_STAGE_SHARED) fwd_flops += flops[s];
  }

  std::printf("\n  %-28s %10s %7s %10s\n", "stage", "ms", "share", "TFLOP/s");
  std::printf("  %-28s %10s %7s %10s\n", "----------------------------", "----------", "-------", "----------");
  double stage_sum = 0;
  for (int s = 0; s < MOEKIT_LAYER_NUM_STAGES; ++s)
    if (t.stage_ms[s] >= 0) stage_sum += t.stage_ms[s];
  Json stages = Json::array();
  for (int s = 0; s < MOEKIT_LAYER_NUM_STAGES; ++s) {
    if (s == MOEKIT_LAYER_STAGE_SHARED_BACKWARD) std::printf("  backward:\n");
    if (s == 0) std::printf("  forward:\n");
    if (t.stage_ms[s] < 0) continue;
    const double tf = flops[s] > 0 && t.stage_ms[s] > 0 ? flops[s] / (t.stage_ms[s] * 1e-3) / 1e12 : 0.0;
    char rate[32] = "";
    if (tf > 0) std::snprintf(rate, sizeof(rate), "%10.1f", tf);
    std::printf("    %-26s %10.3f %6.1f%% %10s\n", kStageNames[s], t.stage_ms[s], 100 * t.stage_ms[s] / stage_sum, rate);
    stages.push(Json::object()
                    .set("stage", kStageNames[s])
                    .set("direction", s <= MOEKIT_LAYER_STAGE_SHARED ? "forward" : "backward")
                    .set("ms", t.stage_ms[s])
                    .set("gemm_tflop", flops[s] / 1e12)
                    .set("tflops", tf));
  }
  std::printf("  %-28s %10s %7s %10s\n", "----------------------------", "----------", "-------", "----------");
  std::printf("  %-28s %10.3f %7s %10.1f\n", "forward (one call)", t.forward_ms, "",
              fwd_flops / (t.forward_ms * 1e-3) / 1e12);
  std::printf("  %-28s %10.3f %7s %10.1f\n", "backward (one call)", t.backward_ms, "",
              (all_flops - fwd_flops) / (t.backward_ms * 1e-3) / 1e12);
  std::printf("  %-28s %10.3f %7s %10.1f\n", "forward + backward", t.total_ms, "", all_flops / (t.total_ms * 1e-3) / 1e12);
  std::printf("  (stages timed in a separate pass with stage events, %.3f ms in all; %d routed rows, %d dropped, "
              "aux loss %.4f, %.0f tokens/s)\n",
              stage_sum, totals[MOEKIT_PLAN_TOTAL_ROWS], totals[MOEKIT_PLAN_TOTAL_DROPPED], aux,
              static_cast<double>(T) / (t.total_ms * 1e-3));

  results.push(Json::object()
                   .set("preset", preset.name)
                   .set("layer", c.describe())
                   .set("tokens", T)
                   .set("routed_rows", static_cast<int64_t>(totals[MOEKIT_PLAN_TOTAL_ROWS]))
                   .set("forward_ms", t.forward_ms)
                   .set("backward_ms", t.backward_ms)
                   .set("forward_backward_ms", t.total_ms)
                   .set("gemm_tflop_forward_backward", all_flops / 1e12)
                   .set("tflops_forward_backward", all_flops / (t.total_ms * 1e-3) / 1e12)
                   .set("aux_loss", static_cast<double>(aux))
                   .set("stages", stages));
  for (auto& e : events) cudaEventDestroy(e);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaEventDestroy(e2);
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args(argc, argv);
  const std::vector<Preset> ps = presets();
  if (args.has("help") || args.has("list")) {
    usage(ps);
    return 0;
  }
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::fprintf(stderr,
                 "moekit-demo: no usable CUDA GPU here (%s).\n"
                 "The demo runs a real MoE layer on a GPU (compute capability 8.0 or newer). On this machine,\n"
                 "./scripts/run-tests builds everything and runs the CPU test suites.\n",
                 e != cudaSuccess ? cudaGetErrorString(e) : "no device");
    return 2;
  }
  std::printf("moekit %d.%d.%d on %s\n", MOEKIT_VERSION_MAJOR, MOEKIT_VERSION_MINOR, MOEKIT_VERSION_PATCH,
              moekit::bench::device_description().c_str());
  const std::string which = args.get("preset", "dsv3");
  std::vector<const Preset*> chosen;
  for (const Preset& p : ps)
    if (which == "all" || p.name == which) chosen.push_back(&p);
  if (chosen.empty()) {
    std::fprintf(stderr, "moekit-demo: unknown preset '%s'\n", which.c_str());
    usage(ps);
    return 1;
  }
  Json results = Json::array();
  int status = 0;
  for (const Preset* p : chosen) {
    try {
      status |= run_preset(*p, args, results);
    } catch (const std::exception& ex) {
      std::printf("  %s: %s\n", p->name.c_str(), ex.what());
      status = 1;
    }
  }
  if (args.has("json")) {
    Json doc = Json::object();
    doc.set("benchmark", "moekit-demo")
        .set("device", moekit::bench::device_description())
        .set("commit", moekit::bench::build_commit())
        .set("date", moekit::bench::utc_now())
        .set("results", results);
    if (!moekit::bench::write_file(args.get("json", ""), doc.dump(1))) {
      std::fprintf(stderr, "moekit-demo: could not write %s\n", args.get("json", "").c_str());
      status = 1;
    }
  }
  return status;
}
