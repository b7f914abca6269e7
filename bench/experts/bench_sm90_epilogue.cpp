// A/B timing of the SM90 grouped GEMM's TMA-store epilogue (MOEKIT_SM90_TMA_STORE) against the
// register-direct stores, in one binary and one process, on the kernels it changes: the forward
// down projection (kEpiStore, B KN), dx = du W_gu^T (kEpiStore, B NK), the two weight
// gradients (kEpiWgrad, splits = 1), and the forward gate-up GEMM with the gate-up TMA-store
// epilogue (MOEKIT_SM90_TMA_STORE_GATE_UP): SwiGLU (concatenated gate/up) and relu2, h alone and
// h with u (the u a training forward saves), weights before down. Both epilogues come from
// tests/experts/experts_sm90_epilogue_launch.cu (the kernels instantiated there, whatever the
// library's default); tests/experts/experts_sm90_epilogue_test.cpp checks that they write the
// same bits. Balanced rows (R / E per expert); inputs are a constant bit pattern (timing only).
//   moekit-bench-sm90-epilogue [--preset=dsv3-ep8|qwen3-30b|mixtral|all] [--iters=20] [--rounds=4]
//                              [--kernels=fwd-gu-swiglu-hu,fwd-down,...]
// Each round times both epilogues back to back (`iters` launches each), the register-direct one
// first in even rounds and the TMA-store one first in odd rounds, so a clock that drifts under
// sustained load (which favours whichever runs first) cancels out; the medians over the rounds
// are reported (a single round's ratio can be off by several per cent on long kernels).
//                              [--json=bench/results/sm90-epilogue-h200.json]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/common/bench_util.hpp"
#include "kernels/experts/grouped_gemm_sm90.hpp"
#include "tests/experts/experts_sm90_epilogue_launch.hpp"
#include "tests/experts/experts_sm90_support.hpp"


namespace {

namespace kx = moekit::kernels::experts;
namespace shim = moekit::test::sm90_epilogue;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

struct Buf {
  void* p = nullptr;
  explicit Buf(size_t bytes) {
    check(cudaMalloc(&p, bytes), "cudaMalloc");
    check(cudaMemset(p, 0x3c, bytes), "cudaMemset");  // bf16 0x3c3c ~ 0.0115
  }
  ~Buf() { cudaFree(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

struct Shape {
  const char* name;
  int e, h, i;
  int64_t rows;
};

std::string arg(int argc, char** argv, const std::string& key, const std::string& def) {
  const std::string k = "--" + key + "=";
  for (int a = 1; a < argc; ++a)
    if (std::string(argv[a]).rfind(k, 0) == 0) return std::string(argv[a]).substr(k.size());
  return def;
}

// Mean time of `iters` back-to-back launches after 3 warm-ups, in microseconds.
template <class F>
double time_us(F&& launch, int iters) {
  for (int w = 0; w < 3; ++w) check(launch(), "launch");
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "event");
  check(cudaEventCreate(&b), "event");
  check(cudaEventRecord(a), "record");
  for (int it = 0; it < iters; ++it) check(launch(), "launch");
  check(cudaEventRecord(b), "record");
  check(cudaEventSynchronize(b), "sync");
  float ms = 0.0f;
  check(cudaEventElapsedTime(&ms, a, b), "elapsed");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return 1000.0 * ms / iters;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string preset = arg(argc, argv, "preset", "all");
  const int iters = std::atoi(arg(argc, argv, "iters", "20").c_str());
  const int rounds = std::max(1, std::atoi(arg(argc, argv, "rounds", "4").c_str()));
  const std::string only = arg(argc, argv, "kernels", "");
  const std::string json = arg(argc, argv, "json", "");
  const std::vector<Shape> presets = {{"dsv3-ep8", 32, 7168, 2048, 32768},
                                      {"qwen3-30b", 128, 2048, 768, 131072},
                                      {"mixtral", 8, 4096, 14336, 16384}};
  int device = 0, major = 0, minor = 0;
  check(cudaGetDevice(&device), "device");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "attr");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "attr");
  if (major != 9 || minor != 0) {
    std::printf("SKIP: needs a compute capability 9.0 device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "props");
  std::string out = "{\"device\": \"" + std::string(prop.name) + "\", \"results\": [\n";
  bool first = true;
  std::printf("%-10s %-16s %10s %10s %8s %8s %7s\n", "shape", "kernel", "reg us", "tma us", "reg TF", "tma TF",
              "tma/reg");
  for (const Shape& s : presets) {
    if (preset != "all" && preset != s.name) continue;
    const int E = s.e, H = s.h, I = s.i;
    const int64_t R = s.rows;
    std::vector<int32_t> off(E + 1);
    for (int g = 0; g <= E; ++g) off[g] = static_cast<int32_t>(R * g / E);
    int32_t* d_off = nullptr;
    check(cudaMalloc(&d_off, off.size() * sizeof(int32_t)), "cudaMalloc");
    check(cudaMemcpy(d_off, off.data(), off.size() * sizeof(int32_t), cudaMemcpyHostToDevice), "copy");
    const size_t eb = 2;
    Buf x(R * H * eb), hbuf(R * I * eb), du(R * 2 * I * eb), dy(R * H * eb), y(R * H * eb), dx(R * H * eb);
    Buf wgu(static_cast<size_t>(E) * H * 2 * I * eb), wd(static_cast<size_t>(E) * I * H * eb);
    Buf dwd(static_cast<size_t>(E) * I * H * eb), dwgu(static_cast<size_t>(E) * H * 2 * I * eb);
    Buf pw(R * 4);
    Buf uout(R * 2 * I * eb), hout(R * I * eb), wr2(static_cast<size_t>(E) * H * I * eb);

    struct Run {
      const char* kernel;
      kx::GroupedGemmProblem p;
      kx::EpilogueParams ep;
      bool wgrad;
      double flops;
      kx::EpiKind kind = kx::kEpiStore;
    };
    std::vector<Run> runs;
    // C[R, n] = A[R, k] B_g over the groups (axis M), B KN [E][k][n] or NK [E][n][k].
    auto axis_m = [&](const char* kernel, double flops, int n, int k, const void* a, const void* b, bool b_nk) {
      Run r{kernel, {}, {}, false, flops};
      r.p = moekit::test::sm90::axis_m_problem(E, d_off, R, n, k, a, b, b_nk);
      return r;
    };
    // C_g[m, n] = X_g^T Y_g over each group's rows (axis K), X [R, m], Y [R, n], C [E][m][n].
    auto axis_k = [&](const char* kernel, double flops, int m, int n, const void* x_rows, const void* y_rows,
                      void* c) {
      Run r{kernel, {}, {}, true, flops};
      r.p.axis = kx::kAxisK;
      r.p.num_groups = E;
      r.p.offsets = d_off;
      r.p.max_rows = R;
      r.p.m = m;
      r.p.n = n;
      r.p.a = x_rows;
      r.p.lda = m;
      r.p.b = y_rows;
      r.p.ldb = n;
      r.p.splits = 1;
      r.ep.c = c;
      return r;
    };
    // Forward gate-up: u = x W_gu (B KN [E][H][N]), h = act(u) p (weights before down); SwiGLU with
    // the concatenated gate/up layout (N = 2 I) or relu2 (N = I); h alone or h and u.
    for (int relu2 = 0; relu2 < 2; ++relu2)
      for (int with_u = 0; with_u < 2; ++with_u) {
        static const char* names[2][2] = {{"fwd-gu-swiglu-h", "fwd-gu-swiglu-hu"}, {"fwd-relu2-h", "fwd-relu2-hu"}};
        const int N = relu2 ? I : 2 * I;
        Run r = axis_m(names[relu2][with_u], 2.0 * R * H * N, N, H, x.p, relu2 ? wr2.p : wgu.p, false);
        r.kind = relu2 ? kx::kEpiRelu2 : kx::kEpiGateUp;
        r.p.gate_up_half = relu2 ? 0 : I;
        r.ep.c = hout.p;
        r.ep.ldc = I;
        r.ep.u = with_u ? uout.p : nullptr;
        r.ep.ldu = N;
        r.ep.row_weights = static_cast<const float*>(pw.p);
        r.ep.weight_after_down = 0;
        r.ep.act = kx::ActParams{relu2 ? kx::kActRelu2 : kx::kActSwiglu, 1.702f, 0.0f};
        r.ep.inter = I;
        runs.push_back(r);
      }
    {  // forward down: y = h W_down (B KN [E][I][H]), weights after down
      Run r = axis_m("fwd-down", 2.0 * R * I * H, H, I, hbuf.p, wd.p, false);
      r.ep.c = y.p;
      r.ep.ldc = H;
      r.ep.row_weights = static_cast<const float*>(pw.p);
      r.ep.weight_after_down = 1;
      runs.push_back(r);
    }
    {  // dx = du W_gu^T (B NK: W_gu [E][H][2I] as [N = H][K = 2I])
      Run r = axis_m("dx", 2.0 * R * 2 * I * H, H, 2 * I, du.p, wgu.p, true);
      r.ep.c = dx.p;
      r.ep.ldc = H;
      runs.push_back(r);
    }
    runs.push_back(axis_k("dW_down", 2.0 * R * I * H, I, H, hbuf.p, dy.p, dwd.p));              // h^T dy
    runs.push_back(axis_k("dW_gate_up", 2.0 * R * H * 2 * I, H, 2 * I, x.p, du.p, dwgu.p));  // x^T du
    for (const Run& r : runs) {
      const bool gate_up = r.kind == kx::kEpiGateUp || r.kind == kx::kEpiRelu2;
      const bool takes = gate_up ? kx::sm90::tma_store_gate_up_takes(r.p, r.kind, r.ep)
                                 : kx::sm90::tma_store_takes(r.p, r.wgrad ? kx::kEpiWgrad : kx::kEpiStore, r.ep);
      if (!takes) {
        std::printf("%-10s %-16s the TMA-store epilogue does not take it\n", s.name, r.kernel);
        continue;
      }
      if (!only.empty() && ("," + only + ",").find("," + std::string(r.kernel) + ",") == std::string::npos) continue;
      std::vector<double> samples[2];
      for (int round = 0; round < rounds; ++round)
        for (int o = 0; o < 2; ++o) {
          const int tma = (round & 1) ? 1 - o : o;  // even rounds: register-direct first
          samples[tma].push_back(time_us(
              [&] {
                if (gate_up) return shim::launch_gate_up(true, r.p, r.kind, r.ep, tma != 0);
                return r.wgrad ? shim::launch_wgrad(true, r.p, r.ep, tma != 0)
                               : shim::launch_store(true, r.p, r.ep, tma != 0);
              },
              iters));
        }
      double us[2];
      std::string spread;
      for (int v = 0; v < 2; ++v) {
        const moekit::bench::Timing x = moekit::bench::summarise(samples[v]);
        us[v] = x.median_us;
        char b[64];
        std::snprintf(b, sizeof(b), "%s[%.1f, %.1f]", v ? ", " : "", x.min_us, x.max_us);
        spread += b;
      }
      const double tf0 = r.flops / us[0] * 1e-6, tf1 = r.flops / us[1] * 1e-6;
      std::printf("%-10s %-16s %10.1f %10.1f %8.1f %8.1f %7.3f  min/max %s\n", s.name, r.kernel, us[0], us[1], tf0,
                  tf1, us[0] / us[1], spread.c_str());
      char line[512];
      std::snprintf(line, sizeof(line),
                    "%s  {\"shape\": \"%s\", \"kernel\": \"%s\", \"dtype\": \"bf16\", \"register_us\": %.2f, "
                    "\"tma_us\": %.2f, \"register_tflops\": %.1f, \"tma_tflops\": %.1f, \"speedup\": %.4f}",
                    first ? "" : ",\n", s.name, r.kernel, us[0], us[1], tf0, tf1, us[0] / us[1]);
      out += line;
      first = false;
    }
    cudaFree(d_off);
  }
  out += "\n]}\n";
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", json.c_str());
      return 1;
    }
    std::fputs(out.c_str(), f);
    std::fclose(f);
  }
  return 0;
}
