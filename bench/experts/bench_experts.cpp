// moekit-bench-experts: the grouped expert FFN (forward, and forward + backward) on the issue's
// shapes, balanced and skewed, next to a per-expert cuBLASLt loop (host-read counts) and against the
// dense bf16 GEMM rate measured with cuBLASLt in the same run.
//
//   moekit-bench-experts --preset=all --json=bench/results/experts-h100.json
//   moekit-bench-experts --experts=64 --hidden=4096 --inter=1024 --rows=65536 --dist=skewed
//
// Presets: dsv3-ep8 (E=32 H=7168 I=2048, 32768 rows), qwen3-30b (E=128 H=2048 I=768, 131072 rows),
// mixtral (E=8 H=4096 I=14336, 16384 rows). Distributions: balanced (rows / E each) and skewed
// (counts proportional to u^3, u uniform from a fixed-seed splitmix64 stream; compare_torch.py
// draws the same counts). Overrides: --experts --hidden --inter --rows --dist=balanced|skewed|both
// --activation=swiglu|relu2|quick_geglu|geglu|swiglu_oai --dtype=bf16|f16|f32 --warmup --repeats
// --seed --no-loop --no-backward --dense-n --path=sm80|sm90|all --bwd-steps.
//
// --bwd-steps: also times the backward alone and each of its steps, per path, through the public
// API by asking for one gradient at a time (u saved): grad_row_weights alone runs the
// activation-backward dgrad (dout W_down^T with du, h', dp in its epilogue) plus the small dp
// finish ("act"); grad_xp alone adds the gate-up dgrad du W_gu^T ("dx"), grad_w_down alone the
// down weight gradient h'^T dout ("wd"), grad_w_gate_up alone the gate-up weight gradient
// xp^T du ("wgu"). dx, wd and wgu are those times minus "act"; "sum" is act + dx + wd + wgu
// next to the full backward. Each step with its TFLOP/s, in the table and the JSON
// ("backward_steps" per path).
//
// Paths: --path picks the grouped-GEMM kernels (config->gemm_path): sm80 (mma.sync), sm90 (TMA +
// wgmma, compute capability 9.0 and a build with gpu_archs 90), or all (default: every path this
// device and build can run), timed side by side on the same tensors in the same run. The JSON
// keeps "moekit" for the default (AUTO) path and adds "paths": {"sm80": {...}, "sm90": {...}}.
//
// FLOPs: forward 2 rows H NU + 2 rows I H (NU = 2I gated, I for relu2); forward + backward three
// times that (each GEMM has a dgrad and a wgrad of the same size; u is saved, not recomputed).
// "of dense" is the achieved rate over the dense n^3 bf16 GEMM rate of cuBLASLt on this device.
// Before timing, a small problem with the chosen activation and dtype is checked against the CPU
// reference, and the per-expert loop against the grouped path; a mismatch aborts.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/common/bench_util.hpp"
#include "moekit/moekit.h"
#include "tests/reference/experts_ref.hpp"
#include "tests/support/numeric.hpp"

namespace {

using moekit::bench::Json;
using Buffer = moekit::bench::DeviceBuffer;
using moekit::bench::parse_dtype;

#define LT_OK(expr)                                                                      \
  do {                                                                                   \
    const cublasStatus_t s_ = (expr);                                                    \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                   \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr,             \
                   cublasLtGetStatusString(s_));                                         \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "moekit-bench-experts: %s\n", what.c_str());
  std::exit(1);
}

struct Shape {
  std::string name;
  int experts;
  int hidden;
  int inter;
  int64_t rows;
};

int parse_activation(const std::string& s, float* limit) {
  *limit = 0.0f;
  if (s == "swiglu") return MOEKIT_ACTIVATION_SWIGLU;
  if (s == "relu2") return MOEKIT_ACTIVATION_RELU2;
  if (s == "quick_geglu") {
    *limit = 7.0f;
    return MOEKIT_ACTIVATION_QUICK_GEGLU;
  }
  if (s == "geglu") return MOEKIT_ACTIVATION_GEGLU;
  if (s == "swiglu_oai") return MOEKIT_ACTIVATION_SWIGLU_OAI;
  die("unknown --activation=" + s);
}

// Fills a device buffer with a fixed pseudo-random block of N(0, scale^2) values in `dtype`,
// repeated (the block is 16M elements: far larger than L2, never zeros).
void fill_random(Buffer& b, moekit_dtype_t dtype, float scale, uint64_t seed) {
  const size_t es = moekit::test::dtype_bytes(dtype);
  const size_t count = b.bytes / es;
  const size_t block = std::min<size_t>(count, size_t(1) << 24);
  if (block == 0) return;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> host(block);
  for (auto& x : host) x = d(rng);
  const std::vector<uint8_t> packed = moekit::test::pack(dtype, host);
  BENCH_CUDA(cudaMemcpy(b.p, packed.data(), packed.size(), cudaMemcpyHostToDevice));
  for (size_t done = block; done < count; done += block) {
    const size_t n = std::min(block, count - done);
    BENCH_CUDA(cudaMemcpy(b.at(done * es), b.p, n * es, cudaMemcpyDeviceToDevice));
  }
}

// Dense n^3 bf16 GEMM through cuBLASLt (fp32 accumulation): the compute ceiling of this device.
double dense_gemm_rate(cudaStream_t stream, int n, int warmup, int repeats) {
  cublasLtHandle_t lt;
  LT_OK(cublasLtCreate(&lt));
  Buffer a(size_t(n) * n * 2), b(size_t(n) * n * 2), c(size_t(n) * n * 2), ws(size_t(32) << 20);
  fill_random(a, MOEKIT_DTYPE_BF16, 1.0f, 1);
  fill_random(b, MOEKIT_DTYPE_BF16, 1.0f, 2);
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc;
  LT_OK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  LT_OK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, n, n, n));
  LT_OK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, n, n, n));
  LT_OK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, n, n, n));
  cublasLtMatmulPreference_t pref;
  LT_OK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t wsb = ws.bytes;
  LT_OK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  LT_OK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &result, &found));
  if (!found) die("cuBLASLt found no dense bf16 GEMM");
  const float one = 1.0f, zero = 0.0f;
  const auto t = moekit::bench::time_us(stream, warmup, repeats, [&](int) {
    LT_OK(cublasLtMatmul(lt, desc, &one, a.p, la, b.p, lb, &zero, c.p, lc, c.p, lc, &result.algo, ws.p, ws.bytes,
                         stream));
  });
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  return 2.0 * double(n) * n * n / (t.median_us * 1e-6);
}

// Everything one grouped-FFN problem needs on the device.
struct Problem {
  moekit_experts_config_t config;
  moekit_mlp_config_t mlp;
  int64_t rows = 0;
  std::vector<int64_t> counts;
  Buffer offsets, xp, p, wgu, wd, u, out, dout, dxp, dwgu, dwd, dp, fws, bws;
  size_t fbytes = 0, bbytes = 0;

  int nu() const { return config.activation == MOEKIT_ACTIVATION_RELU2 ? config.inter : 2 * config.inter; }
  size_t es() const { return moekit::test::dtype_bytes(static_cast<moekit_dtype_t>(config.dtype)); }

  Problem(const Shape& s, const std::vector<int64_t>& c, moekit_dtype_t dtype, int activation, float limit,
          bool backward, uint64_t seed)
      : counts(c) {
    BENCH_OK(moekit_experts_config_init(&config, sizeof(config)));
    config.num_experts = s.experts;
    config.hidden = s.hidden;
    config.inter = s.inter;
    config.dtype = dtype;
    config.activation = activation;
    config.act_limit = limit;
    BENCH_OK(moekit_mlp_config_init(&mlp, sizeof(mlp)));
    mlp.hidden = s.hidden;
    mlp.inter = s.inter;
    mlp.dtype = dtype;
    mlp.activation = activation;
    mlp.act_limit = limit;
    std::vector<int32_t> off(1, 0);
    for (int64_t x : counts) off.push_back(static_cast<int32_t>(off.back() + x));
    rows = off.back();
    const size_t E = s.experts, H = s.hidden, I = s.inter, NU = nu(), R = rows;
    offsets = Buffer(off.size() * 4);
    offsets.upload(off);
    xp = Buffer(R * H * es());
    fill_random(xp, dtype, 1.0f, seed + 1);
    std::vector<float> pw(R);
    std::mt19937_64 rng(seed + 2);
    std::uniform_real_distribution<float> ud(0.1f, 1.0f);
    for (auto& x : pw) x = ud(rng);
    p = Buffer(R * 4);
    p.upload(pw);
    wgu = Buffer(E * H * NU * es());
    fill_random(wgu, dtype, 1.0f / std::sqrt(float(H)), seed + 3);
    wd = Buffer(E * I * H * es());
    fill_random(wd, dtype, 1.0f / std::sqrt(float(I)), seed + 4);
    u = Buffer(R * NU * es());
    out = Buffer(R * H * es());
    BENCH_OK(moekit_experts_forward_workspace_size(&config, rows, &fbytes));
    fws = Buffer(fbytes);
    if (backward) {
      dout = Buffer(R * H * es());
      fill_random(dout, dtype, 1.0f, seed + 5);
      dxp = Buffer(R * H * es());
      dwgu = Buffer(E * H * NU * es());
      dwd = Buffer(E * I * H * es());
      dp = Buffer(R * 4);
      BENCH_OK(moekit_experts_backward_workspace_size(&config, rows, 1, &bbytes));
      bws = Buffer(bbytes);
    }
  }

  void forward(cudaStream_t stream, void* u_out) {
    BENCH_OK(moekit_experts_forward(&config, rows, offsets.as<int32_t>(), xp.p, p.as<float>(), wgu.p, nullptr, wd.p,
                                     nullptr, u_out, out.p, fws.p, fbytes, stream));
  }
  void backward(cudaStream_t stream) { backward_parts(stream, true, true, true, true); }
  // The backward asked for only some gradients (--bwd-steps).
  void backward_parts(cudaStream_t stream, bool want_xp, bool want_wgu, bool want_wd, bool want_p) {
    BENCH_OK(moekit_experts_backward(&config, rows, offsets.as<int32_t>(), xp.p, p.as<float>(), wgu.p, nullptr, wd.p,
                                      nullptr, u.p, dout.p, want_xp ? dxp.p : nullptr, want_wgu ? dwgu.p : nullptr,
                                      nullptr, want_wd ? dwd.p : nullptr, nullptr,
                                      want_p ? dp.as<float>() : nullptr, bws.p, bbytes, stream));
  }
};

// The per-expert cuBLASLt loop: the expert counts are copied to the host (a synchronisation), then
// each non-empty expert runs the dense MLP (cuBLASLt GEMM, activation kernel, cuBLASLt GEMM) on its
// rows. Routing weights are not applied (same FLOPs); comparison only, not graph-safe.
struct Loop {
  moekit_mlp_handle_t handle = nullptr;
  Buffer fws, bws;
  size_t fbytes = 0, bbytes = 0;
  std::vector<int32_t> host_offsets;

  Loop(const Problem& P, bool backward) {
    BENCH_OK(moekit_mlp_handle_create(&handle));
    const int64_t most = *std::max_element(P.counts.begin(), P.counts.end());
    BENCH_OK(moekit_mlp_forward_workspace_size(&P.mlp, most, &fbytes));
    fws = Buffer(fbytes);
    if (backward) {
      BENCH_OK(moekit_mlp_backward_workspace_size(&P.mlp, most, 1, &bbytes));
      bws = Buffer(bbytes);
    }
    host_offsets.resize(P.counts.size() + 1);
  }
  ~Loop() { moekit_mlp_handle_destroy(handle); }

  void read_counts(const Problem& P, cudaStream_t stream) {
    BENCH_CUDA(cudaMemcpyAsync(host_offsets.data(), P.offsets.p, host_offsets.size() * 4, cudaMemcpyDeviceToHost,
                               stream));
    BENCH_CUDA(cudaStreamSynchronize(stream));
  }
  void forward(Problem& P, cudaStream_t stream, bool save_u) {
    read_counts(P, stream);
    const size_t H = P.config.hidden, I = P.config.inter, NU = P.nu(), es = P.es();
    for (size_t e = 0; e + 1 < host_offsets.size(); ++e) {
      const int64_t r0 = host_offsets[e], n = host_offsets[e + 1] - r0;
      if (n == 0) continue;
      BENCH_OK(moekit_mlp_forward(handle, &P.mlp, n, P.xp.at(r0 * H * es), P.wgu.at(e * H * NU * es), nullptr,
                                   P.wd.at(e * I * H * es), nullptr, save_u ? P.u.at(r0 * NU * es) : nullptr,
                                   P.out.at(r0 * H * es), fws.p, fbytes, stream));
    }
  }
  void backward(Problem& P, cudaStream_t stream) {
    read_counts(P, stream);
    const size_t H = P.config.hidden, I = P.config.inter, NU = P.nu(), es = P.es();
    for (size_t e = 0; e + 1 < host_offsets.size(); ++e) {
      const int64_t r0 = host_offsets[e], n = host_offsets[e + 1] - r0;
      void* dwgu = P.dwgu.at(e * H * NU * es);
      void* dwd = P.dwd.at(e * I * H * es);
      BENCH_OK(moekit_mlp_backward(handle, &P.mlp, n, n ? P.xp.at(r0 * H * es) : nullptr, P.wgu.at(e * H * NU * es),
                                    nullptr, P.wd.at(e * I * H * es), nullptr, n ? P.u.at(r0 * NU * es) : nullptr,
                                    n ? P.dout.at(r0 * H * es) : nullptr, n ? P.dxp.at(r0 * H * es) : nullptr, dwgu,
                                    nullptr, dwd, nullptr, bws.p, bbytes, stream));
    }
  }
};

double rel_norm_error(const std::vector<float>& got, const std::vector<double>& want, size_t n) {
  double e2 = 0, r2 = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    e2 += (got[i] - want[i]) * (got[i] - want[i]);
    r2 += want[i] * want[i];
  }
  return std::sqrt(e2 / std::max(r2, 1e-300));
}

// Checks a small problem with the chosen activation and dtype against the CPU reference (forward
// and backward), and the per-expert loop against the grouped path. Aborts on a mismatch.
void validate(moekit_dtype_t dtype, int activation, float limit, int32_t gemm_path, cudaStream_t stream) {
  const Shape s{"validate", 4, 128, 96, 0};
  const std::vector<int64_t> counts = {0, 37, 200, 129};
  Problem P(s, counts, dtype, activation, limit, true, 99);
  P.config.gemm_path = gemm_path;
  const size_t R = P.rows, H = s.hidden, I = s.inter, NU = P.nu(), E = s.experts;
  const double tol = dtype == MOEKIT_DTYPE_BF16 ? 1e-2 : dtype == MOEKIT_DTYPE_F16 ? 2e-3 : 2e-5;
  moekit::ref::ExpertsProblem h;
  h.num_experts = s.experts;
  h.hidden = s.hidden;
  h.inter = s.inter;
  h.act.kind = activation;
  h.act.alpha = static_cast<double>(P.config.act_alpha);
  h.act.limit = limit;
  h.interleaved = activation == MOEKIT_ACTIVATION_QUICK_GEGLU;  // AUTO layout
  h.max_rows = P.rows;
  h.offsets = P.offsets.download<int32_t>(E + 1);
  auto unpack = [&](const Buffer& b, size_t n) {
    const auto f = moekit::test::unpack(dtype, b.download<uint8_t>(n * P.es()));
    return std::vector<double>(f.begin(), f.end());
  };
  h.xp = unpack(P.xp, R * H);
  const auto pw = P.p.download<float>(R);
  h.row_weights.assign(pw.begin(), pw.end());
  h.w_gate_up = unpack(P.wgu, E * H * NU);
  h.w_down = unpack(P.wd, E * I * H);
  const moekit::ref::Rounder round = [dtype](double x) {
    return static_cast<double>(moekit::test::round_to(dtype, static_cast<float>(x)));
  };
  P.forward(stream, P.u.p);
  P.backward(stream);
  BENCH_CUDA(cudaStreamSynchronize(stream));
  const auto f = moekit::ref::experts_forward(h, round);
  const auto out = moekit::test::unpack(dtype, P.out.download<uint8_t>(R * H * P.es()));
  const auto u = moekit::test::unpack(dtype, P.u.download<uint8_t>(R * NU * P.es()));
  const auto b = moekit::ref::experts_backward(h, std::vector<double>(u.begin(), u.end()), unpack(P.dout, R * H), round);
  struct Check { const char* name; std::vector<float> got; const std::vector<double>* want; size_t n; };
  const Check checks[] = {
      {"out", out, &f.out, R * H},
      {"grad_xp", moekit::test::unpack(dtype, P.dxp.download<uint8_t>(R * H * P.es())), &b.grad_xp, R * H},
      {"grad_w_gate_up", moekit::test::unpack(dtype, P.dwgu.download<uint8_t>(E * H * NU * P.es())), &b.grad_w_gate_up,
       E * H * NU},
      {"grad_w_down", moekit::test::unpack(dtype, P.dwd.download<uint8_t>(E * I * H * P.es())), &b.grad_w_down, E * I * H},
  };
  for (const Check& c : checks) {
    const double err = rel_norm_error(c.got, *c.want, c.n);
    if (!(err < tol)) die(std::string("validation: ") + c.name + " relative error " + std::to_string(err));
  }
  // The loop computes without routing weights: compare it with the grouped path at p = 1.
  Loop loop(P, false);
  Buffer grouped(R * H * P.es());
  BENCH_OK(moekit_experts_forward(&P.config, P.rows, P.offsets.as<int32_t>(), P.xp.p, nullptr, P.wgu.p, nullptr,
                                   P.wd.p, nullptr, nullptr, grouped.p, P.fws.p, P.fbytes, stream));
  loop.forward(P, stream, false);
  BENCH_CUDA(cudaStreamSynchronize(stream));
  const auto g = moekit::test::unpack(dtype, grouped.download<uint8_t>(R * H * P.es()));
  const auto l = moekit::test::unpack(dtype, P.out.download<uint8_t>(R * H * P.es()));
  const double err = rel_norm_error(l, std::vector<double>(g.begin(), g.end()), R * H);
  if (!(err < tol)) die("validation: per-expert loop differs from the grouped path by " + std::to_string(err));
  std::printf("validated %s (%s, gemm_path %d) against the CPU reference and the per-expert loop\n",
              moekit::test::dtype_bytes(dtype) == 4 ? "f32" : dtype == MOEKIT_DTYPE_F16 ? "f16" : "bf16",
              activation == MOEKIT_ACTIVATION_SWIGLU ? "swiglu" : "activation", static_cast<int>(gemm_path));
}

struct PathChoice {
  const char* name;  // JSON key and table label
  int32_t gemm_path;
};

// Whether config->gemm_path = SM90 runs on this device and build (compute capability 9.0 and the
// sm_90a kernels): a one-row forward answers UNSUPPORTED otherwise.
bool sm90_runs(cudaStream_t stream, std::string* why) {
  moekit_experts_config_t c;
  BENCH_OK(moekit_experts_config_init(&c, sizeof(c)));
  c.num_experts = 1;
  c.hidden = 8;
  c.inter = 8;
  c.activation = MOEKIT_ACTIVATION_RELU2;
  c.gemm_path = MOEKIT_GEMM_PATH_SM90;
  size_t bytes = 0;
  BENCH_OK(moekit_experts_forward_workspace_size(&c, 1, &bytes));
  Buffer off(8), x(16), w(128), out(16), ws(bytes);
  off.upload(std::vector<int32_t>{0, 1});
  BENCH_CUDA(cudaMemset(x.p, 0, 16));
  BENCH_CUDA(cudaMemset(w.p, 0, 128));
  const moekit_status_t st = moekit_experts_forward(&c, 1, off.as<int32_t>(), x.p, nullptr, w.p, nullptr, w.p,
                                                    nullptr, nullptr, out.p, ws.p, bytes, stream);
  if (st == MOEKIT_STATUS_UNSUPPORTED) {
    *why = moekit_get_last_error();
    return false;
  }
  if (st != MOEKIT_STATUS_SUCCESS) die(std::string("SM90 probe: ") + moekit_get_last_error());
  BENCH_CUDA(cudaStreamSynchronize(stream));
  return true;
}

// --bwd-steps: the backward alone and its steps (see the header), microseconds.
struct BwdSteps {
  bool timed = false;
  double full = 0, act = 0, dx = 0, wd = 0, wgu = 0;
};

struct Row {
  std::string shape, dist, path;
  double fwd_us, fwd_tflops, fwd_frac, fb_us, fb_tflops, fb_frac;
  BwdSteps steps;
};

}  // namespace

int main(int argc, char** argv) {
  moekit::bench::Args args(argc, argv);
  if (args.has("help")) {
    std::printf(
        "moekit-bench-experts [--preset=dsv3-ep8|qwen3-30b|mixtral|all] [--experts=E --hidden=H --inter=I "
        "--rows=R] [--dist=balanced|skewed|both] [--activation=swiglu|relu2|quick_geglu|geglu|swiglu_oai] "
        "[--dtype=bf16|f16|f32] [--warmup=3 --repeats=10 --seed=1234] [--no-loop] [--no-backward] "
        "[--dense-n=8192] [--path=sm80|sm90|all] [--bwd-steps] [--json=path]\n");
    return 0;
  }
  const std::vector<Shape> presets = {{"dsv3-ep8", 32, 7168, 2048, 32768},
                                      {"qwen3-30b", 128, 2048, 768, 131072},
                                      {"mixtral", 8, 4096, 14336, 16384}};
  std::vector<Shape> shapes;
  const bool custom = args.has("experts") || args.has("hidden") || args.has("inter") || args.has("rows");
  const std::string preset = args.get("preset", custom ? "" : "all");
  for (const auto& p : presets)
    if (preset == "all" || preset == p.name) shapes.push_back(p);
  if (!preset.empty() && shapes.empty()) die("unknown --preset=" + preset);
  if (preset.empty()) shapes.push_back({"custom", 32, 4096, 1024, 32768});
  for (auto& s : shapes) {
    s.experts = static_cast<int>(args.get_int("experts", s.experts));
    s.hidden = static_cast<int>(args.get_int("hidden", s.hidden));
    s.inter = static_cast<int>(args.get_int("inter", s.inter));
    s.rows = args.get_int("rows", s.rows);
  }
  const std::string dist = args.get("dist", "both");
  if (dist != "balanced" && dist != "skewed" && dist != "both") die("unknown --dist=" + dist);
  const moekit_dtype_t dtype = parse_dtype(args.get("dtype", "bf16"));
  float limit = 0;
  const std::string act_name = args.get("activation", "swiglu");
  const int activation = parse_activation(act_name, &limit);
  const int warmup = static_cast<int>(args.get_int("warmup", 3));
  const int repeats = static_cast<int>(args.get_int("repeats", 10));
  const uint64_t seed = static_cast<uint64_t>(args.get_int("seed", 1234));
  const bool run_loop = !args.has("no-loop");
  const bool run_backward = !args.has("no-backward");
  const bool bwd_steps = run_backward && args.has("bwd-steps");

  // A blocking stream on purpose: uploads and fills (Buffer::upload, fill_random) use plain
  // cudaMemcpy on the legacy default stream, which a blocking stream waits for; a
  // cudaStreamNonBlocking stream would need an explicit synchronisation after them.
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreate(&stream));
  const std::string path_arg = args.get("path", "all");
  if (path_arg != "sm80" && path_arg != "sm90" && path_arg != "all") die("unknown --path=" + path_arg);
  std::vector<PathChoice> paths;
  {
    std::string why;
    const bool sm90 = dtype != MOEKIT_DTYPE_F32 && sm90_runs(stream, &why);
    if (dtype == MOEKIT_DTYPE_F32) why = "fp32 runs the SIMT kernels on every path";
    if (path_arg != "sm90") paths.push_back({"sm80", MOEKIT_GEMM_PATH_SM80});
    if (path_arg != "sm80") {
      if (sm90)
        paths.push_back({"sm90", MOEKIT_GEMM_PATH_SM90});
      else if (path_arg == "sm90")
        die("--path=sm90: " + why);
      else
        std::printf("path sm90 skipped: %s\n", why.c_str());
    }
  }
  validate(dtype, activation, limit, MOEKIT_GEMM_PATH_AUTO, stream);
  for (const PathChoice& pc : paths) validate(dtype, activation, limit, pc.gemm_path, stream);
  const int dense_n = static_cast<int>(args.get_int("dense-n", 8192));
  const double dense = dense_gemm_rate(stream, dense_n, 3, 10);
  std::printf("device: %s, dense bf16 GEMM %d^3 (cuBLASLt) %.1f TFLOP/s, commit %s\n",
              moekit::bench::device_description().c_str(), dense_n, dense / 1e12,
              moekit::bench::build_commit().c_str());

  std::vector<Row> rows;
  Json shapes_json = Json::array();
  for (const Shape& s : shapes) {
    for (int skew = 0; skew < 2; ++skew) {
      if ((skew && dist == "balanced") || (!skew && dist == "skewed")) continue;
      const char* dname = skew ? "skewed" : "balanced";
      const std::vector<int64_t> counts = moekit::bench::expert_counts(s.experts, s.rows, skew != 0, seed);
      Problem P(s, counts, dtype, activation, limit, run_backward, seed);
      const double NU = P.nu();
      const double fwd_flops = 2.0 * P.rows * s.hidden * NU + 2.0 * P.rows * double(s.inter) * s.hidden;
      const double fb_flops = 3.0 * fwd_flops;
      const double gate_up_flops = 2.0 * P.rows * s.hidden * NU;            // dx and wgu alike
      const double dgrad_down_flops = 2.0 * P.rows * double(s.inter) * s.hidden;  // act and wd alike
      auto rate = [](double flops, double us) { return flops / (us * 1e-6); };
      // The default path ("moekit", AUTO), then each chosen path on the same tensors. Forward and
      // forward+backward of all paths are timed in interleaved rounds (time_us_interleaved: the
      // same kernels timed one after the other differed 5-19 % by position alone on an H200).
      std::vector<std::pair<int32_t, std::string>> choices{{MOEKIT_GEMM_PATH_AUTO, "moekit grouped (auto)"}};
      for (const PathChoice& pc : paths) choices.push_back({pc.gemm_path, std::string("moekit ") + pc.name});
      std::vector<std::function<void(int)>> fwd_runs, fb_runs;
      for (const auto& ch : choices) {
        const int32_t gp = ch.first;
        fwd_runs.push_back([&P, &stream, gp](int) {
          P.config.gemm_path = gp;
          P.forward(stream, nullptr);
        });
        fb_runs.push_back([&P, &stream, gp](int) {
          P.config.gemm_path = gp;
          P.forward(stream, P.u.p);
          P.backward(stream);
        });
      }
      const std::vector<moekit::bench::Timing> fwd_t = moekit::bench::time_us_interleaved(stream, warmup, repeats, fwd_runs);
      std::vector<moekit::bench::Timing> fb_t(choices.size());
      if (run_backward) fb_t = moekit::bench::time_us_interleaved(stream, warmup, repeats, fb_runs);
      std::vector<Row> timed;
      for (size_t j = 0; j < choices.size(); ++j) {
        Row r{s.name, dname, choices[j].second, 0, 0, 0, 0, 0, 0, {}};
        r.fwd_us = fwd_t[j].median_us;
        if (run_backward) r.fb_us = fb_t[j].median_us;
        if (bwd_steps && j > 0) {  // the backward's steps of each chosen path, one path at a time
          P.config.gemm_path = choices[j].first;
          P.forward(stream, P.u.p);  // the saved u every backward below reads
          auto bwd = [&](bool want_xp, bool want_wgu, bool want_wd, bool want_p) {
            return moekit::bench::time_us(stream, warmup, repeats, [&](int) {
                     P.backward_parts(stream, want_xp, want_wgu, want_wd, want_p);
                   }).median_us;
          };
          r.steps.timed = true;
          r.steps.full = bwd(true, true, true, true);
          r.steps.act = bwd(false, false, false, true);
          r.steps.dx = bwd(true, false, false, false) - r.steps.act;
          r.steps.wd = bwd(false, false, true, false) - r.steps.act;
          r.steps.wgu = bwd(false, true, false, false) - r.steps.act;
        }
        timed.push_back(r);
      }
      P.config.gemm_path = MOEKIT_GEMM_PATH_AUTO;
      Row grouped = timed[0];
      std::vector<Row> path_rows(timed.begin() + 1, timed.end());
      Row loop_row{s.name, dname, "cuBLASLt per-expert loop", 0, 0, 0, 0, 0, 0, {}};
      if (run_loop) {
        Loop loop(P, run_backward);
        loop_row.fwd_us = moekit::bench::time_us(stream, warmup, repeats, [&](int) { loop.forward(P, stream, false); })
                              .median_us;
        if (run_backward)
          loop_row.fb_us = moekit::bench::time_us(stream, warmup, repeats, [&](int) {
                             loop.forward(P, stream, true);
                             loop.backward(P, stream);
                           }).median_us;
      }
      Json entry = Json::object()
                       .set("shape", s.name)
                       .set("distribution", dname)
                       .set("experts", s.experts)
                       .set("hidden", s.hidden)
                       .set("inter", s.inter)
                       .set("rows", P.rows)
                       .set("max_expert_rows", *std::max_element(counts.begin(), counts.end()))
                       .set("forward_flops", fwd_flops)
                       .set("forward_backward_flops", fb_flops);
      std::vector<Row*> all_rows{&grouped};
      for (Row& r : path_rows) all_rows.push_back(&r);
      all_rows.push_back(&loop_row);
      Json paths_json = Json::object();
      for (Row* r : all_rows) {
        if (r == &loop_row && !run_loop) continue;
        r->fwd_tflops = rate(fwd_flops, r->fwd_us) / 1e12;
        r->fwd_frac = rate(fwd_flops, r->fwd_us) / dense;
        if (run_backward) {
          r->fb_tflops = rate(fb_flops, r->fb_us) / 1e12;
          r->fb_frac = rate(fb_flops, r->fb_us) / dense;
        }
        rows.push_back(*r);
        Json j = Json::object()
                     .set("forward_us", r->fwd_us)
                     .set("forward_tflops", r->fwd_tflops)
                     .set("forward_of_dense", r->fwd_frac);
        if (run_backward)
          j.set("forward_backward_us", r->fb_us)
              .set("forward_backward_tflops", r->fb_tflops)
              .set("forward_backward_of_dense", r->fb_frac);
        if (r->steps.timed) {
          const BwdSteps& b = r->steps;
          const double sum = b.act + b.dx + b.wd + b.wgu;
          auto step = [&](double us, double flops) {
            return Json::object().set("us", us).set("tflops", us > 0 ? rate(flops, us) / 1e12 : 0.0);
          };
          j.set("backward_steps",
                Json::object()
                    .set("backward_us", b.full)
                    .set("backward_tflops", rate(2.0 * fwd_flops, b.full) / 1e12)
                    .set("act", step(b.act, dgrad_down_flops))
                    .set("dx", step(b.dx, gate_up_flops))
                    .set("wd", step(b.wd, dgrad_down_flops))
                    .set("wgu", step(b.wgu, gate_up_flops))
                    .set("sum_us", sum)
                    .set("what", "act: dout W_down^T + activation backward epilogue (du, h', dp) + dp finish; "
                                 "dx: du W_gu^T; wd: h'^T dout; wgu: xp^T du (each alone through the API, minus act)"));
        }
        if (r == &grouped)
          entry.set("moekit", j);
        else if (r == &loop_row)
          entry.set("cublaslt_loop", j);
        else
          paths_json.set(paths[static_cast<size_t>(r - path_rows.data())].name, j);
      }
      entry.set("paths", paths_json);
      if (path_rows.size() == 2) {
        // sm90 over sm80, measured back to back on the same tensors.
        entry.set("sm90_over_sm80_forward", path_rows[0].fwd_us / path_rows[1].fwd_us);
        if (run_backward) entry.set("sm90_over_sm80_forward_backward", path_rows[0].fb_us / path_rows[1].fb_us);
      }
      shapes_json.push(entry);
      std::printf("%s %s done\n", s.name.c_str(), dname);
    }
  }

  std::printf("\n%-10s %-9s %-25s %10s %8s %7s %10s %8s %7s\n", "shape", "dist", "path", "fwd_us", "TFLOP/s", "of dense",
              "fwdbwd_us", "TFLOP/s", "of dense");
  for (const Row& r : rows)
    std::printf("%-10s %-9s %-25s %10.1f %8.1f %6.1f%% %10.1f %8.1f %6.1f%%\n", r.shape.c_str(), r.dist.c_str(),
                r.path.c_str(), r.fwd_us, r.fwd_tflops, 100 * r.fwd_frac, r.fb_us, r.fb_tflops, 100 * r.fb_frac);

  if (bwd_steps) {
    std::printf("\nbackward steps (us, TFLOP/s): act = dout W_down^T + act-backward epilogue + dp finish, dx = du W_gu^T, "
                "wd = h'^T dout, wgu = xp^T du\n");
    std::printf("%-10s %-9s %-14s %10s %14s %14s %14s %14s %10s\n", "shape", "dist", "path", "bwd_us", "act",
                "dx", "wd", "wgu", "sum_us");
    for (const Row& r : rows) {
      if (!r.steps.timed) continue;
      const BwdSteps& b = r.steps;
      const Shape* sh = nullptr;
      for (const Shape& x : shapes)
        if (x.name == r.shape) sh = &x;
      const double nu = activation == MOEKIT_ACTIVATION_RELU2 ? sh->inter : 2.0 * sh->inter;
      const double rows_n = static_cast<double>(sh->rows);
      const double gu = 2.0 * rows_n * sh->hidden * nu, dd = 2.0 * rows_n * sh->inter * sh->hidden;
      auto tf = [](double flops, double us) { return us > 0 ? flops / (us * 1e-6) / 1e12 : 0.0; };
      std::printf("%-10s %-9s %-14s %10.1f %7.1f/%6.1f %7.1f/%6.1f %7.1f/%6.1f %7.1f/%6.1f %10.1f\n", r.shape.c_str(),
                  r.dist.c_str(), r.path.c_str(), b.full, b.act, tf(dd, b.act), b.dx, tf(gu, b.dx), b.wd,
                  tf(dd, b.wd), b.wgu, tf(gu, b.wgu), b.act + b.dx + b.wd + b.wgu);
    }
  }

  if (args.has("json")) {
    Json root = Json::object()
                    .set("benchmark", "moekit-bench-experts")
                    .set("device", moekit::bench::device_description())
                    .set("commit", moekit::bench::build_commit())
                    .set("date", moekit::bench::utc_now())
                    .set("dtype", args.get("dtype", "bf16"))
                    .set("activation", act_name)
                    .set("paths_timed", [&] {
                      std::string names;
                      for (const PathChoice& pc : paths) names += (names.empty() ? "" : ",") + std::string(pc.name);
                      return names;
                    }())
                    .set("dense_gemm_n", dense_n)
                    .set("dense_gemm_tflops", dense / 1e12)
                    .set("flops", "forward 2 R H NU + 2 R I H; forward+backward 3x forward")
                    .set("shapes", shapes_json);
    if (!moekit::bench::write_file(args.get("json", ""), root.dump())) die("cannot write " + args.get("json", ""));
    std::printf("wrote %s\n", args.get("json", "").c_str());
  }
  cudaStreamDestroy(stream);
  return 0;
}
