// moekit-bench-router: times the router forward (with its load / aux statistics) and backward on
// the model table's configurations, against the floor set by the device-to-device copy bandwidth
// measured in the same run.
//
//   moekit-bench-router --preset=all --json=out.json
//   moekit-bench-router --preset=dsv3 --tokens=32768 --dtype=bf16
//   moekit-bench-router --experts=384 --top-k=8 --score=sigmoid --bias=1 --groups=8 --groups-kept=4
//
// Presets (bf16, T = 4096 and 32768 unless --tokens= gives a comma list):
//   dsv3       E=256 K=8  sigmoid + fp32 bias, groups 8/4 top-2 sum, normalise, scale 2.5; load
//              accumulated for the bias update (NeMo: gamma = 1e-3, alpha = 0)
//   qwen3      E=128 K=8  softmax first, normalise; load + aux statistics, aux gradient
//   gptoss     E=128 K=4  top-k logits then softmax; load + aux statistics, aux gradient
//   mixtral    E=8   K=2  softmax first, normalise; load + aux statistics, aux gradient
//   qwen3next  E=512 K=10 softmax first, normalise; load + aux statistics, aux gradient
//   e2048      E=2048 K=32 sigmoid + bias, normalise; load accumulated
// Overrides: --experts --top-k --score=softmax|sigmoid|sqrtsoftplus --order=first|topk
// --groups --groups-kept --group-score=auto|max|top2|topn --topn --mask-neg-inf=0|1 --bias=0|1
// --normalize=0|1 --scale --stats=none|load|aux --mask=0|1 --dtype=bf16|f16|f32 --warmup
// --repeats --seed.
//
// Floors (every input read once from DRAM, every output written once, over the copy bandwidth):
//   forward   T E s (logits) + T K 8 (weights, indices) [+ T (mask)]
//   backward  T E s (logits) + T K 8 (indices, grad_weights) + T E s (grad_logits) [+ T (mask)]
// with s the logits' element size. Inputs rotate over buffers that together exceed the L2 twice,
// so every timed call reads from DRAM. Before timing, every configuration is run on a small batch
// and compared with the CPU reference (indices exactly, weights, loads, statistics and the gradient
// within tolerance); a mismatch aborts.
//
// Four times per call (medians over the repeats):
//   gpu   the device time of the call: a large memset is queued before the start event, so the
//         host has enqueued the call's kernels before the device reaches them and the events see
//         the kernels back to back (launch gaps between a call's own kernels included). This is
//         what a training step pays when the host runs ahead of the device, and what "x floor"
//         compares with the floor.
//   call  events around each call with nothing queued before it: when the host takes longer to
//         issue the call than the device takes to run it, this includes the host's part.
//   b2b   the device time per call of kBackToBack calls queued back to back behind the memset,
//         between two events: what each call of a sequence costs once the next call's kernels
//         follow without a gap or an event in between (the event-bounded gpu time of a small call
//         includes ~2 us of event and kernel start overhead on an H200; this does not).
//   host  host wall-clock time of the call (validation, launch), without waiting for the device.
// "launch" is the gpu time of the smallest moekit kernel (the aux loss, one block); "empty
// kernel" the gpu and b2b times of a kernel that does nothing (bench/common/empty_kernel.cu),
// timed the same way: a floor below it cannot be reached by any call, whatever its kernel does.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench/common/bench_util.hpp"
#include "moekit/moekit.h"
#include "tests/reference/router_ref.hpp"
#include "tests/support/numeric.hpp"

namespace {

using moekit::bench::Json;
using Buffer = moekit::bench::DeviceBuffer;
using moekit::bench::dtype_name;
using moekit::bench::parse_dtype;

enum class Stats { kNone, kLoad, kAux };

struct Preset {
  std::string name;
  moekit_router_config_t config;
  bool bias;
  Stats stats;
};

moekit_router_config_t make_config(int E, int K) {
  moekit_router_config_t c;
  moekit_router_config_init(&c, sizeof(c));
  c.num_experts = E;
  c.top_k = K;
  return c;
}

std::vector<Preset> presets() {
  std::vector<Preset> v;
  {
    auto c = make_config(256, 8);
    c.score_func = MOEKIT_SCORE_SIGMOID;
    c.num_groups = 8;
    c.num_groups_kept = 4;
    c.normalize = 1;
    c.route_scale = 2.5f;
    c.accumulate_load = 1;
    v.push_back({"dsv3", c, true, Stats::kLoad});
  }
  {
    auto c = make_config(128, 8);
    c.normalize = 1;
    v.push_back({"qwen3", c, false, Stats::kAux});
  }
  {
    auto c = make_config(128, 4);
    c.softmax_order = MOEKIT_TOPK_THEN_SOFTMAX;
    v.push_back({"gptoss", c, false, Stats::kAux});
  }
  {
    auto c = make_config(8, 2);
    c.normalize = 1;
    v.push_back({"mixtral", c, false, Stats::kAux});
  }
  {
    auto c = make_config(512, 10);
    c.normalize = 1;
    v.push_back({"qwen3next", c, false, Stats::kAux});
  }
  {
    auto c = make_config(2048, 32);
    c.score_func = MOEKIT_SCORE_SIGMOID;
    c.normalize = 1;
    c.accumulate_load = 1;
    v.push_back({"e2048", c, true, Stats::kLoad});
  }
  return v;
}

const char* stats_name(Stats s) { return s == Stats::kNone ? "none" : s == Stats::kLoad ? "load" : "aux"; }

// Applies the command-line overrides to a preset.
void apply_overrides(const moekit::bench::Args& args, Preset* p) {
  moekit_router_config_t& c = p->config;
  if (args.has("experts")) c.num_experts = static_cast<int32_t>(args.get_int("experts", c.num_experts));
  if (args.has("top-k")) c.top_k = static_cast<int32_t>(args.get_int("top-k", c.top_k));
  if (args.has("score")) {
    const std::string s = args.get("score", "");
    c.score_func = s == "softmax" ? MOEKIT_SCORE_SOFTMAX : s == "sigmoid" ? MOEKIT_SCORE_SIGMOID
                   : s == "sqrtsoftplus" ? MOEKIT_SCORE_SQRT_SOFTPLUS : -1;
  }
  if (args.has("order")) c.softmax_order = args.get("order", "first") == "topk" ? MOEKIT_TOPK_THEN_SOFTMAX : MOEKIT_SOFTMAX_THEN_TOPK;
  if (args.has("groups")) c.num_groups = static_cast<int32_t>(args.get_int("groups", 1));
  if (args.has("groups-kept")) c.num_groups_kept = static_cast<int32_t>(args.get_int("groups-kept", 1));
  if (args.has("group-score")) {
    const std::string s = args.get("group-score", "auto");
    c.group_score = s == "max" ? MOEKIT_GROUP_SCORE_MAX : s == "top2" ? MOEKIT_GROUP_SCORE_TOP2_SUM
                    : s == "topn" ? MOEKIT_GROUP_SCORE_TOPN_SUM : MOEKIT_GROUP_SCORE_AUTO;
  }
  if (args.has("topn")) c.group_score_topn = static_cast<int32_t>(args.get_int("topn", 2));
  if (args.has("mask-neg-inf")) c.group_mask = args.get_int("mask-neg-inf", 0) ? MOEKIT_GROUP_MASK_NEG_INF : MOEKIT_GROUP_MASK_ZERO;
  if (args.has("normalize")) c.normalize = static_cast<int32_t>(args.get_int("normalize", 0));
  if (args.has("scale")) c.route_scale = static_cast<float>(args.get_double("scale", 1.0));
  if (args.has("bias")) p->bias = args.get_int("bias", 0) != 0;
  if (args.has("stats")) {
    const std::string s = args.get("stats", "aux");
    p->stats = s == "none" ? Stats::kNone : s == "load" ? Stats::kLoad : Stats::kAux;
  }
  c.accumulate_load = p->stats == Stats::kLoad ? 1 : 0;
  if (moekit_router_config_check(&c) != MOEKIT_STATUS_SUCCESS) {
    std::fprintf(stderr, "%s: %s\n", p->name.c_str(), moekit_get_last_error());
    std::exit(2);
  }
}

// Random N(0, 1.5) logits exact in the dtype. For validation the rows are redrawn until no
// near-tie can reorder fp32 against the double reference.
std::vector<float> make_logits(const moekit_router_config_t& c, int64_t T, moekit_dtype_t dtype,
                               const std::vector<float>* bias, std::mt19937_64& rng, bool separated) {
  const int E = c.num_experts;
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<float> z(static_cast<size_t>(T) * E);
  for (int64_t t = 0; t < T; ++t) {
    float* row = z.data() + t * E;
    for (int attempt = 0;; ++attempt) {
      for (int e = 0; e < E; ++e) row[e] = moekit::test::round_to(dtype, normal(rng));
      if (!separated || moekit::ref::selection_margin(c, row, bias ? bias->data() : nullptr) >= 1e-5) break;
      if (attempt > 500) {
        std::fprintf(stderr, "could not draw a well-separated row\n");
        std::exit(1);
      }
    }
  }
  return z;
}

std::vector<float> make_bias(int E, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> d(-32, 32);
  std::vector<float> b(E);
  for (auto& x : b) x = static_cast<float>(d(rng)) / 64.0f;
  return b;
}

// Runs one configuration on T tokens and compares everything with the reference.
bool validate(const Preset& p, moekit_dtype_t dtype, int64_t T, std::mt19937_64& rng) {
  const moekit_router_config_t& c = p.config;
  const int E = c.num_experts, K = c.top_k;
  std::vector<float> bias = p.bias ? make_bias(E, rng) : std::vector<float>();
  const std::vector<float> z = make_logits(c, T, dtype, p.bias ? &bias : nullptr, rng, true);
  std::vector<uint8_t> mask(T);
  for (int64_t t = 0; t < T; ++t) mask[t] = (t % 7) != 3;
  Buffer d_z(moekit::test::dtype_bytes(dtype) * z.size()), d_b(4 * E), d_m(T), d_w(4 * T * K), d_i(4 * T * K),
      d_l(4 * E), d_s(4 * E), d_n(4), d_g(moekit::test::dtype_bytes(dtype) * z.size()), d_gw(4 * T * K);
  d_z.upload(moekit::test::pack(dtype, z));
  if (p.bias) d_b.upload(bias);
  d_m.upload(mask);
  BENCH_CUDA(cudaMemset(d_l.p, 0, d_l.bytes));
  size_t bytes = 0;
  BENCH_OK(moekit_router_forward_workspace_size(&c, T, &bytes));
  Buffer ws(bytes);
  // Validated with the statistics the timed calls ask for (--stats), so the kernel variant that is
  // timed is the one checked (aux statistics select a different forward than load alone); the
  // aux-loss term of the backward needs N, so without aux statistics it is checked with
  // coefficient 0.
  const bool aux = p.stats == Stats::kAux;
  BENCH_OK(moekit_router_forward(&c, T, dtype, d_z.p, E, p.bias ? d_b.as<float>() : nullptr, d_m.as<uint8_t>(),
                                  d_w.as<float>(), d_i.as<int32_t>(), d_l.as<int32_t>(),
                                  aux ? d_s.as<float>() : nullptr, aux ? d_n.as<int32_t>() : nullptr, ws.p, ws.bytes,
                                  nullptr));
  std::mt19937_64 g(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> gw(T * K);
  for (auto& x : gw) x = u(g);
  d_gw.upload(gw);
  const float coeff = aux ? 0.05f : 0.0f;
  BENCH_OK(moekit_router_backward(&c, T, dtype, d_z.p, E, p.bias ? d_b.as<float>() : nullptr, d_m.as<uint8_t>(),
                                   d_i.as<int32_t>(), d_gw.as<float>(), coeff, aux ? d_l.as<int32_t>() : nullptr,
                                   aux ? d_n.as<int32_t>() : nullptr, d_g.p, E, nullptr, 0, nullptr));
  BENCH_CUDA(cudaDeviceSynchronize());
  const auto r = moekit::ref::router_forward(c, T, z, p.bias ? &bias : nullptr, &mask);
  const auto w = d_w.download<float>();
  const auto idx = d_i.download<int32_t>();
  const auto load = d_l.download<int32_t>();
  const auto S = aux ? d_s.download<float>() : std::vector<float>();
  const int32_t N = aux ? d_n.download<int32_t>()[0] : r.token_count;
  int errors = 0;
  for (int64_t i = 0; i < T * K; ++i) {
    if (idx[i] != r.indices[i]) ++errors;
    if (!moekit::test::close(w[i], r.weights[i], {2e-5, 1e-6})) ++errors;
  }
  for (int e = 0; e < E; ++e) {
    if (load[e] != r.load[e]) ++errors;
    if (aux && !moekit::test::close(S[e], r.score_sum[e], {1e-4, 1e-5})) ++errors;
  }
  if (N != r.token_count) ++errors;  // from the device with aux statistics
  // The gradient within the GPU suite's per-element allowance (tests/router/router_gpu_test.cpp,
  // check_gradient): 2 x the computed bound on the kernels' fp32 error + the bound on the double
  // reference's rounding + one ulp of the dtype.
  std::vector<double> zd(z.begin(), z.end());
  std::vector<int64_t> l64(load.begin(), load.end());
  const auto* bp = p.bias ? &bias : nullptr;
  const auto gref = moekit::ref::router_backward(c, T, zd, bp, &mask, idx, &gw, coeff, l64, N);
  const auto order = moekit::ref::router_backward_device_order(c, T, zd, bp, &mask, idx, &gw, coeff, l64, N, false);
  const auto gdev = moekit::test::unpack(dtype, d_g.download<uint8_t>());
  const int mantissa = dtype == MOEKIT_DTYPE_F32 ? 23 : dtype == MOEKIT_DTYPE_F16 ? 10 : 7;
  const int min_exp = dtype == MOEKIT_DTYPE_F16 ? -14 : -126;
  for (size_t i = 0; i < gref.size(); ++i) {
    const double want = moekit::test::round_to(dtype, static_cast<float>(gref[i]));
    const double bound = 2.0 * order.bound[i] + order.reference_bound[i];
    const double mag = std::fabs(gref[i]) + bound;
    const int exp = mag > 0.0 && std::isfinite(mag) ? std::max(min_exp, std::ilogb(mag)) : min_exp;
    if (!(std::fabs(gdev[i] - want) <= bound + std::ldexp(1.0, exp - mantissa))) ++errors;
  }
  if (errors) std::fprintf(stderr, "validation of %s (%s, T=%lld) failed: %d mismatches\n", p.name.c_str(),
                           dtype_name(dtype), static_cast<long long>(T), errors);
  return errors == 0;
}

struct Row {
  std::string preset;
  int64_t tokens;
  std::string pass;
  double us, floor_us, gbps, bytes, call_us, host_us, b2b_us;
};

struct CallTiming {
  moekit::bench::Timing gpu;   // device time (queue filled before the start event)
  moekit::bench::Timing call;  // events around the call, nothing queued before it
  moekit::bench::Timing b2b;   // per call, kBackToBack calls back to back between two events
  double host_us = 0.0;        // median host time of a call
};

constexpr int kBackToBack = 20;

// The four timings of the header comment. filler: a device buffer whose memset keeps the device
// busy while the host enqueues the call (its size covers the host's share many times over).
CallTiming time_call(cudaStream_t stream, int warmup, int repeats, Buffer& filler, const std::function<void(int)>& run) {
  CallTiming r;
  for (int i = 0; i < warmup; ++i) run(i);
  BENCH_CUDA(cudaStreamSynchronize(stream));
  std::vector<cudaEvent_t> ev(2 * static_cast<size_t>(repeats));
  for (auto& e : ev) BENCH_CUDA(cudaEventCreate(&e));
  std::vector<double> host(static_cast<size_t>(repeats)), gpu(static_cast<size_t>(repeats));
  for (int i = 0; i < repeats; ++i) {
    BENCH_CUDA(cudaMemsetAsync(filler.p, i & 0xff, filler.bytes, stream));
    BENCH_CUDA(cudaEventRecord(ev[2 * i], stream));
    const auto h0 = std::chrono::steady_clock::now();
    run(i);
    const auto h1 = std::chrono::steady_clock::now();
    BENCH_CUDA(cudaEventRecord(ev[2 * i + 1], stream));
    host[static_cast<size_t>(i)] = std::chrono::duration<double, std::micro>(h1 - h0).count();
  }
  BENCH_CUDA(cudaStreamSynchronize(stream));
  BENCH_CUDA(cudaGetLastError());
  for (int i = 0; i < repeats; ++i) {
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    gpu[static_cast<size_t>(i)] = 1000.0 * ms;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  using moekit::bench::summarise;
  r.gpu = summarise(gpu);
  r.host_us = summarise(host).median_us;
  r.call = moekit::bench::time_us(stream, 0, repeats, run);
  // Back to back: a few rounds of kBackToBack calls behind the memset, one event pair per round.
  const int rounds = std::max(3, repeats / kBackToBack);
  std::vector<double> b2b(static_cast<size_t>(rounds));
  cudaEvent_t b0, b1;
  BENCH_CUDA(cudaEventCreate(&b0));
  BENCH_CUDA(cudaEventCreate(&b1));
  for (int round = 0; round < rounds; ++round) {
    BENCH_CUDA(cudaMemsetAsync(filler.p, round & 0xff, filler.bytes, stream));
    BENCH_CUDA(cudaEventRecord(b0, stream));
    for (int i = 0; i < kBackToBack; ++i) run(round * kBackToBack + i);
    BENCH_CUDA(cudaEventRecord(b1, stream));
    BENCH_CUDA(cudaEventSynchronize(b1));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, b0, b1));
    b2b[static_cast<size_t>(round)] = 1000.0 * ms / kBackToBack;
  }
  cudaEventDestroy(b0);
  cudaEventDestroy(b1);
  r.b2b = summarise(b2b);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  moekit::bench::Args args(argc, argv);
  const std::string which = args.get("preset", "all");
  const moekit_dtype_t dtype = parse_dtype(args.get("dtype", "bf16"));
  const int warmup = static_cast<int>(args.get_int("warmup", 10));
  const int repeats = static_cast<int>(args.get_int("repeats", 50));
  const bool use_mask = args.get_int("mask", 0) != 0;
  std::vector<int64_t> token_list;
  for (const std::string& t : args.get_list("tokens", "4096,32768")) token_list.push_back(std::stoll(t));
  std::vector<Preset> run;
  for (Preset p : presets())
    if (which == "all" || which == p.name) {
      apply_overrides(args, &p);
      run.push_back(p);
    }
  if (run.empty()) {
    std::fprintf(stderr, "unknown --preset=%s (dsv3, qwen3, gptoss, mixtral, qwen3next, e2048, all)\n", which.c_str());
    return 2;
  }
  int device = 0;
  BENCH_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, device));
  std::mt19937_64 rng(static_cast<uint64_t>(args.get_int("seed", 1)));

  for (const Preset& p : run)
    if (!validate(p, dtype, 257, rng) || !validate(p, dtype, 3, rng)) return 1;
  std::printf("validated %zu configuration(s) against the CPU reference\n", run.size());

  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double bandwidth = moekit::bench::measure_copy_bandwidth(stream);
  Buffer filler(size_t{256} << 20);  // ~70 us of memset on any current part
  double launch_us = 0.0, launch_call_us = 0.0;
  const CallTiming empty = time_call(stream, warmup, repeats, filler, [&](int) { moekit::bench::launch_empty_kernel(stream); });
  {
    Buffer l(32), s(32), n(4), aux(4);
    BENCH_CUDA(cudaMemset(l.p, 0, 32));
    BENCH_CUDA(cudaMemset(s.p, 0, 32));
    BENCH_CUDA(cudaMemset(n.p, 0, 4));
    const CallTiming t = time_call(stream, warmup, repeats, filler, [&](int) {
      BENCH_OK(moekit_aux_loss_forward(8, 2, l.as<int32_t>(), s.as<float>(), n.as<int32_t>(), aux.as<float>(), stream));
    });
    launch_us = t.gpu.median_us;
    launch_call_us = t.call.median_us;
  }
  const size_t elem = moekit::test::dtype_bytes(dtype);
  std::vector<Row> rows;
  Json results = Json::array();
  for (const Preset& p : run) {
    const moekit_router_config_t& c = p.config;
    const int E = c.num_experts, K = c.top_k;
    for (int64_t T : token_list) {
      // rotate inputs and outputs over copies that together exceed twice the L2
      const size_t per_call = T * E * elem * 2 + T * K * 16;
      const size_t want_copies = std::max<size_t>(2, 2 * static_cast<size_t>(prop.l2CacheSize) / per_call + 1);
      const int copies = static_cast<int>(std::min<size_t>(want_copies, std::max<size_t>(2, (size_t{2} << 30) / per_call)));
      std::vector<Buffer> z, w, idx, gw, grad;
      std::vector<float> bias = make_bias(E, rng);
      const std::vector<float> host_z = make_logits(c, T, dtype, nullptr, rng, false);
      const auto packed = moekit::test::pack(dtype, host_z);
      std::vector<float> host_gw(T * K);
      for (size_t i = 0; i < host_gw.size(); ++i) host_gw[i] = static_cast<float>((i * 7919) % 2001) / 1000.0f - 1.0f;
      for (int i = 0; i < copies; ++i) {
        z.emplace_back(packed.size());
        z.back().upload(packed);
        w.emplace_back(4 * T * K);
        idx.emplace_back(4 * T * K);
        gw.emplace_back(4 * T * K);
        gw.back().upload(host_gw);
        grad.emplace_back(T * E * elem);
      }
      Buffer d_bias(4 * E), load(4 * E), S(4 * E), N(4), mask(T);
      d_bias.upload(bias);
      BENCH_CUDA(cudaMemset(load.p, 0, load.bytes));
      BENCH_CUDA(cudaMemset(mask.p, 1, mask.bytes));
      size_t ws_bytes = 0;
      BENCH_OK(moekit_router_forward_workspace_size(&c, T, &ws_bytes));
      Buffer ws(ws_bytes);
      const bool aux = p.stats == Stats::kAux;
      const float coeff = aux ? 1e-3f : 0.0f;
      auto forward = [&](int i) {
        const int k = i % copies;
        BENCH_OK(moekit_router_forward(&c, T, dtype, z[k].p, E, p.bias ? d_bias.as<float>() : nullptr,
                                        use_mask ? mask.as<uint8_t>() : nullptr, w[k].as<float>(), idx[k].as<int32_t>(),
                                        p.stats != Stats::kNone ? load.as<int32_t>() : nullptr,
                                        aux ? S.as<float>() : nullptr, aux ? N.as<int32_t>() : nullptr, ws.p,
                                        ws.bytes, stream));
      };
      for (int i = 0; i < copies; ++i) forward(i);  // indices for the backward
      auto backward = [&](int i) {
        const int k = i % copies;
        BENCH_OK(moekit_router_backward(&c, T, dtype, z[k].p, E, p.bias ? d_bias.as<float>() : nullptr,
                                         use_mask ? mask.as<uint8_t>() : nullptr, idx[k].as<int32_t>(),
                                         gw[k].as<float>(), coeff, aux ? load.as<int32_t>() : nullptr,
                                         aux ? N.as<int32_t>() : nullptr, grad[k].p, E, nullptr, 0, stream));
      };
      const double mask_bytes = use_mask ? static_cast<double>(T) : 0.0;
      const double fwd_bytes = static_cast<double>(T) * E * elem + static_cast<double>(T) * K * 8 + mask_bytes;
      const double bwd_bytes = 2.0 * T * E * elem + static_cast<double>(T) * K * 8 + mask_bytes;
      const CallTiming tf = time_call(stream, warmup, repeats, filler, forward);
      const CallTiming tb = time_call(stream, warmup, repeats, filler, backward);
      for (int pass = 0; pass < 2; ++pass) {
        const CallTiming& ct = pass == 0 ? tf : tb;
        const auto& t = ct.gpu;
        const double bytes = pass == 0 ? fwd_bytes : bwd_bytes;
        Row r{p.name, T, pass == 0 ? "forward" : "backward", t.median_us, 1e6 * bytes / bandwidth,
              bytes / (t.median_us * 1e-6) / 1e9, bytes, ct.call.median_us, ct.host_us, ct.b2b.median_us};
        rows.push_back(r);
        Json j = Json::object();
        j.set("preset", p.name)
            .set("pass", r.pass)
            .set("tokens", T)
            .set("experts", static_cast<int64_t>(E))
            .set("top_k", static_cast<int64_t>(K))
            .set("groups", static_cast<int64_t>(c.num_groups))
            .set("groups_kept", static_cast<int64_t>(c.num_groups_kept))
            .set("score_func", static_cast<int64_t>(c.score_func))
            .set("softmax_order", static_cast<int64_t>(c.softmax_order))
            .set("bias", p.bias)
            .set("stats", stats_name(p.stats))
            .set("aux_coeff", static_cast<double>(pass == 1 ? coeff : 0.0f))
            .set("mask", use_mask)
            .set("dtype", dtype_name(dtype))
            .set("median_us", t.median_us)  // gpu time (see the top of this file)
            .set("min_us", t.min_us)
            .set("max_us", t.max_us)
            .set("call_median_us", ct.call.median_us)
            .set("b2b_median_us", ct.b2b.median_us)
            .set("host_us", ct.host_us)
            .set("repeats", static_cast<int64_t>(t.repeats))
            .set("bytes", bytes)
            .set("floor_us", r.floor_us)
            .set("x_floor", t.median_us / r.floor_us)
            .set("x_floor_call", ct.call.median_us / r.floor_us)
            .set("x_floor_b2b", ct.b2b.median_us / r.floor_us)
            .set("achieved_gbps", r.gbps)
            .set("rotated_copies", static_cast<int64_t>(copies));
        results.push(j);
      }
    }
  }

  std::printf("\n%s, %s logits, copy bandwidth %.0f GB/s (read + write), smallest launch %.2f us gpu / %.2f us call,\n"
              "empty kernel %.2f us gpu / %.2f us b2b / %.2f us call\n",
              moekit::bench::device_description().c_str(), dtype_name(dtype), bandwidth / 1e9, launch_us,
              launch_call_us, empty.gpu.median_us, empty.b2b.median_us, empty.call.median_us);
  std::printf("%-10s %7s %-9s %10s %10s %9s %8s %10s %10s %9s\n", "preset", "tokens", "pass", "gpu us", "floor us",
              "x floor", "GB/s", "b2b us", "call us", "host us");
  for (const Row& r : rows)
    std::printf("%-10s %7lld %-9s %10.2f %10.2f %9.2f %8.0f %10.2f %10.2f %9.2f\n", r.preset.c_str(),
                static_cast<long long>(r.tokens), r.pass.c_str(), r.us, r.floor_us, r.us / r.floor_us, r.gbps, r.b2b_us,
                r.call_us, r.host_us);

  const std::string json_path = args.get("json", "");
  if (!json_path.empty()) {
    Json doc = Json::object();
    doc.set("benchmark", "moekit-bench-router")
        .set("gpu", moekit::bench::device_description())
        .set("num_gpus", static_cast<int64_t>(1))
        .set("commit", moekit::bench::build_commit())
        .set("date", moekit::bench::utc_now())
        .set("copy_bandwidth_gbps", bandwidth / 1e9)
        .set("launch_us", launch_us)
        .set("launch_call_us", launch_call_us)
        .set("empty_kernel_us", empty.gpu.median_us)
        .set("empty_kernel_b2b_us", empty.b2b.median_us)
        .set("empty_kernel_call_us", empty.call.median_us)
        .set("timing", "median_us and x_floor: device time with the queue filled before each call; "
                       "b2b_median_us: device time per call of calls queued back to back; "
                       "call_median_us: events around the call alone; host_us: host time of the call")
        .set("results", results);
    if (!moekit::bench::write_file(json_path, doc.dump())) {
      std::fprintf(stderr, "could not write %s\n", json_path.c_str());
      return 1;
    }
    std::printf("wrote %s\n", json_path.c_str());
  }
  cudaStreamDestroy(stream);
  return 0;
}
