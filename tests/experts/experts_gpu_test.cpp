// Experts family, GPU suite: the grouped expert FFN and the dense MLP against the double reference.
//   - small-integer relu2 problems compared bit for bit (every fp32 product and sum is exact);
//   - random bf16 / f16 / f32 problems for every activation, both gate/up layouts, biases, both
//     routing-weight placements, groups of 0, 1, 7, 4097 rows, rows not a multiple of the tile,
//     I not a multiple of 64 (8, 24, 40, 200), H = 8, thousands of experts;
//   - poisoned outputs: every row inside a segment written, every row past the total untouched;
//     empty experts' weight and bias gradients exactly zero;
//   - bitwise determinism over repeated runs, saved u == recomputed u, CUDA-graph capture (with
//     the routing changed on the device between replays), garbage offsets stay in bounds;
//   - the dense MLP in both weight layouts, forward and backward, T = 0, graph capture;
//   - every call of every problem once more inside a cudaStreamCaptureModeGlobal capture, whose
//     replay must equal the eager run bit for bit: the capture fails on any work the library puts
//     anywhere but the caller's stream, and the comparison catches timing-dependent results.
// Ordering: see settle() below. The library runs on cudaStreamNonBlocking streams; the suite's own
// uploads and poisons run on the legacy default stream, so a device-wide barrier separates them.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moekit/moekit.h"
#include "tests/experts/experts_cases.hpp"
#include "tests/reference/experts_ref.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/device.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

namespace ref = moekit::ref;
using moekit::test::DeviceBuffer;
using moekit::test::dtype_name;
using moekit::test::experts::Spec;

namespace {

ref::Rounder rounder(moekit_dtype_t dtype) {
  return [dtype](double x) { return static_cast<double>(moekit::test::round_to(dtype, static_cast<float>(x))); };
}

// Norm-relative and max-abs tolerances for GEMM-sized outputs (the reference is rounded at the
// same points as the device, so what remains is fp32-vs-double accumulation and rare one-ulp
// rounding flips of intermediates).
struct NormTol {
  double norm;
  double max;
};
NormTol norm_tol(moekit_dtype_t d) {
  switch (d) {
    case MOEKIT_DTYPE_BF16: return {1e-2, 3e-2};
    case MOEKIT_DTYPE_F16: return {2e-3, 1e-2};
    default: return {2e-5, 2e-4};
  }
}

std::vector<uint8_t> pack_d(moekit_dtype_t dtype, const std::vector<double>& v) {
  std::vector<float> f(v.begin(), v.end());
  return moekit::test::pack(dtype, f);
}

template <class T>
DeviceBuffer upload(const std::vector<T>& v) {
  return DeviceBuffer::from(v);
}

std::vector<float> to_floats(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

// Compares `got` rows [0, rows) x cols with the reference (already rounded like the device).
void compare(const char* name, const std::vector<float>& got, const std::vector<double>& want, int64_t rows,
             int64_t cols, moekit_dtype_t dtype, bool exact) {
  INFO(name << " (" << rows << " x " << cols << ", " << dtype_name(dtype) << (exact ? ", exact" : "") << ")");
  REQUIRE(got.size() >= static_cast<size_t>(rows * cols));
  double err2 = 0, ref2 = 0, max_err = 0, max_ref = 0;
  int64_t worst = -1;
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double g = got[i], w = want[i];
    if (exact) {
      // No NaN passes, not even against a NaN: every exact reference value is finite.
      if (!(g == w)) {
        INFO("element " << i << " (row " << i / cols << ", col " << i % cols << "): got " << g << ", want " << w);
        REQUIRE(g == w);
      }
      continue;
    }
    REQUIRE(std::isfinite(g));
    const double e = std::fabs(g - w);
    err2 += e * e;
    ref2 += w * w;
    if (e > max_err) { max_err = e; worst = i; }
    max_ref = std::max(max_ref, std::fabs(w));
  }
  if (exact || rows * cols == 0) return;
  const NormTol tol = norm_tol(dtype);
  const double rel = std::sqrt(err2) / std::max(std::sqrt(ref2), 1e-30);
  INFO("relative norm error " << rel << ", max abs error " << max_err << " at " << worst << " (row "
                              << (worst >= 0 ? worst / cols : -1) << ") of max |ref| " << max_ref);
  if (ref2 == 0) {
    REQUIRE(max_err == 0);
  } else {
    REQUIRE(rel < tol.norm);
    REQUIRE(max_err <= tol.max * max_ref);
  }
}

// ---- Ordering between the suite's own device work and the library's ---------------------------
// DeviceBuffer::from, poison() and zero() run cudaMemcpy / cudaMemset on the legacy default stream.
// cudaMemset of device memory returns before it has run, cudaMemcpy from pageable memory may
// return before its DMA has landed, and a cudaStreamNonBlocking stream (what this suite, like a
// framework's side stream, runs the library on) does not wait for the legacy stream. So before a
// library call is enqueued, that work must have finished, or a late poison lands on the outputs or
// on the intermediates in the workspace after the library wrote them (the first H200 run failed
// that way; compute-sanitizer, which serialises every launch and memset, passed).
void settle() { CUDA_REQUIRE(cudaDeviceSynchronize()); }

// How a test enqueues library calls: directly, or captured once in cudaStreamCaptureModeGlobal and
// replayed. The capture fails when a call enqueues on any other stream (the legacy default stream
// included), synchronises or allocates; the replay must then give the eager run's bits.
enum class Mode { kEager, kGraph };
const char* mode_name(Mode m) { return m == Mode::kEager ? "eager" : "graph replay"; }

struct GraphExec {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~GraphExec() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
  }
};

// Runs `calls` (returning the first non-success moekit status, or SUCCESS) on `stream` after
// settle(), in `mode`, and waits for the stream.
template <class Calls>
void run_on(cudaStream_t stream, Mode mode, Calls&& calls) {
  settle();
  if (mode == Mode::kEager) {
    MOEKIT_REQUIRE_OK(calls());
  } else {
    GraphExec g;
    CUDA_REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    const moekit_status_t status = calls();
    const std::string message = moekit_get_last_error();
    const cudaError_t end = cudaStreamEndCapture(stream, &g.graph);
    INFO("captured calls -> " << moekit_status_string(status) << ": " << message);
    REQUIRE(status == MOEKIT_STATUS_SUCCESS);
    CUDA_REQUIRE(end);
    CUDA_REQUIRE(cudaGraphInstantiate(&g.exec, g.graph, 0));
    CUDA_REQUIRE(cudaGraphLaunch(g.exec, stream));
  }
  CUDA_REQUIRE(cudaStreamSynchronize(stream));
  CUDA_REQUIRE(cudaGetLastError());
}

bool all_bytes(const std::vector<uint8_t>& b, size_t from, size_t to, uint8_t value) {
  for (size_t i = from; i < to; ++i)
    if (b[i] != value) return false;
  return true;
}

// Rows [0, total) of a poisoned [R, cols] output are written (no NaN), rows [total, R) keep the
// poison byte for byte.
void require_rows_written(const char* name, const DeviceBuffer& buf, moekit_dtype_t dtype, int64_t total, int64_t R,
                          int64_t cols) {
  INFO(name << ": rows [0, " << total << ") written, [" << total << ", " << R << ") untouched");
  const std::vector<uint8_t> bytes = buf.to_host<uint8_t>();
  const size_t es = moekit::test::dtype_bytes(dtype);
  REQUIRE(bytes.size() == static_cast<size_t>(R * cols) * es);
  const std::vector<float> v = moekit::test::unpack(dtype, bytes);
  for (int64_t i = 0; i < total * cols; ++i)
    if (std::isnan(v[i])) {
      INFO("row " << i / cols << " col " << i % cols << " was not written");
      REQUIRE(!std::isnan(v[i]));
    }
  REQUIRE(all_bytes(bytes, static_cast<size_t>(total * cols) * es, bytes.size(), 0xff));
}

// ---- Which grouped-GEMM path the problems run on ------------------------------------------------
// MOEKIT_TEST_GEMM_PATH = sm80 (default), sm90 or auto sets config->gemm_path of every problem of
// the suite (tests/experts/meson.build registers the suite once per path). A run asked for sm90
// where that path cannot run (a device that is not compute capability 9.0, or a library built
// without gpu_archs 90) exits 77, SKIP, naming the reason. The [paths] cases below walk both
// paths explicitly (PathScope), warning visibly when they skip SM90.

// Whether config->gemm_path = SM90 runs here; otherwise *why says what stops it.
bool sm90_usable(std::string* why) {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    *why = "no usable CUDA device";
    return false;
  }
  if (major != 9 || minor != 0) {
    *why = "device " + std::to_string(device) + " is compute capability " + std::to_string(major) + "." +
           std::to_string(minor) + ", the SM90 path needs 9.0";
    return false;
  }
  // The build: a one-row forward with gemm_path = SM90 answers UNSUPPORTED without sm_90a kernels.
  moekit_experts_config_t c;
  moekit_experts_config_init(&c, sizeof(c));
  c.num_experts = 1;
  c.hidden = 8;
  c.inter = 8;
  c.activation = MOEKIT_ACTIVATION_RELU2;
  c.gemm_path = MOEKIT_GEMM_PATH_SM90;
  size_t bytes = 0;
  moekit_experts_forward_workspace_size(&c, 1, &bytes);
  DeviceBuffer off = DeviceBuffer::from(std::vector<int32_t>{0, 1});
  DeviceBuffer xp(8 * 2), w(64 * 2), out(8 * 2), ws(bytes);
  xp.zero();
  w.zero();
  (void)cudaDeviceSynchronize();
  const moekit_status_t st = moekit_experts_forward(&c, 1, off.get<int32_t>(), xp.get(), nullptr, w.get(), nullptr,
                                                    w.get(), nullptr, nullptr, out.get(), ws.get(), bytes, nullptr);
  if (st == MOEKIT_STATUS_UNSUPPORTED) {
    *why = moekit_get_last_error();
    return false;
  }
  (void)cudaDeviceSynchronize();
  return true;
}

int32_t suite_gemm_path() {
  static const int32_t path = [] {
    const char* env = std::getenv("MOEKIT_TEST_GEMM_PATH");
    const std::string v = env ? env : "sm80";
    if (v == "sm90") {
      std::string why;
      if (!sm90_usable(&why)) {
        std::printf("SKIP: MOEKIT_TEST_GEMM_PATH=sm90 but the SM90 path cannot run here: %s\n", why.c_str());
        std::fflush(stdout);
        std::_Exit(77);
      }
      return static_cast<int32_t>(MOEKIT_GEMM_PATH_SM90);
    }
    if (v == "auto") return static_cast<int32_t>(MOEKIT_GEMM_PATH_AUTO);
    if (v != "sm80") {
      std::printf("MOEKIT_TEST_GEMM_PATH=%s is not sm80, sm90 or auto\n", v.c_str());
      std::fflush(stdout);
      std::_Exit(2);
    }
    return static_cast<int32_t>(MOEKIT_GEMM_PATH_SM80);
  }();
  return path;
}

int32_t g_path_override = -1;  // >= 0: the path of problems built inside a PathScope

struct PathScope {
  explicit PathScope(int32_t path) { g_path_override = path; }
  ~PathScope() { g_path_override = -1; }
};

int32_t current_gemm_path() { return g_path_override >= 0 ? g_path_override : suite_gemm_path(); }

const char* path_name(int32_t path) {
  return path == MOEKIT_GEMM_PATH_SM90 ? "SM90" : path == MOEKIT_GEMM_PATH_SM80 ? "SM80" : "AUTO";
}

// SM80 always; SM90 where it runs (else a visible warning).
std::vector<int32_t> both_paths() {
  std::vector<int32_t> paths{MOEKIT_GEMM_PATH_SM80};
  static std::string why;
  static const bool sm90 = sm90_usable(&why);
  if (sm90)
    paths.push_back(MOEKIT_GEMM_PATH_SM90);
  else
    WARN("SM90 grouped-GEMM path skipped: " << why);
  return paths;
}

struct Problem {
  Spec spec;
  moekit_dtype_t dtype;
  ref::ExpertsProblem host;
  moekit_experts_config_t config;
  DeviceBuffer offsets, xp, p, wgu, bgu, wd, bd;

  Problem(const Spec& s, moekit_dtype_t d, ref::ExpertsProblem h) : spec(s), dtype(d), host(std::move(h)) {
    REQUIRE(moekit_experts_config_init(&config, sizeof(config)) == MOEKIT_STATUS_SUCCESS);
    config.num_experts = s.num_experts();
    config.hidden = s.hidden;
    config.inter = s.inter;
    config.dtype = d;
    config.activation = s.activation;
    config.gate_up_layout = s.interleaved ? MOEKIT_GATE_UP_INTERLEAVED : MOEKIT_GATE_UP_CONCATENATED;
    config.weight_after_down = s.weight_after_down ? 1 : 0;
    config.act_alpha = static_cast<float>(s.alpha);
    config.act_limit = static_cast<float>(s.limit);
    config.gemm_path = current_gemm_path();
    offsets = upload(host.offsets);
    xp = upload(pack_d(d, host.xp));
    if (!host.row_weights.empty()) p = upload(to_floats(host.row_weights));
    wgu = upload(pack_d(d, host.w_gate_up));
    if (!host.b_gate_up.empty()) bgu = upload(pack_d(d, host.b_gate_up));
    wd = upload(pack_d(d, host.w_down));
    if (!host.b_down.empty()) bd = upload(pack_d(d, host.b_down));
  }
  int64_t R() const { return host.max_rows; }
  int64_t total() const { return host.offsets.back(); }
  size_t es() const { return moekit::test::dtype_bytes(dtype); }
  const float* pw() const { return p.get<float>(); }
};

struct ForwardRun {
  DeviceBuffer out, u;
  std::vector<float> out_h, u_h;
  std::vector<uint8_t> raw;  // out's and u's bytes, for bitwise comparisons
};

ForwardRun run_forward(Problem& P, bool save_u, cudaStream_t stream, Mode mode = Mode::kEager) {
  const int64_t R = P.R();
  const int H = P.spec.hidden, NU = P.spec.nu();
  ForwardRun r;
  r.out = DeviceBuffer(static_cast<size_t>(R) * H * P.es());
  r.out.poison();
  if (save_u) {
    r.u = DeviceBuffer(static_cast<size_t>(R) * NU * P.es());
    r.u.poison();
  }
  size_t bytes = 0;
  MOEKIT_REQUIRE_OK(moekit_experts_forward_workspace_size(&P.config, R, &bytes));
  DeviceBuffer ws(bytes);
  ws.poison();
  INFO("forward, " << mode_name(mode));
  run_on(stream, mode, [&] {
    return moekit_experts_forward(&P.config, R, P.offsets.get<int32_t>(), P.xp.get(), P.pw(), P.wgu.get(),
                                  P.bgu.get(), P.wd.get(), P.bd.get(), r.u.get(), r.out.get(), ws.get(), bytes,
                                  stream);
  });
  require_rows_written("out", r.out, P.dtype, P.total(), R, H);
  r.raw = r.out.to_host<uint8_t>();
  r.out_h = moekit::test::unpack(P.dtype, r.raw);
  if (save_u) {
    require_rows_written("u_out", r.u, P.dtype, P.total(), R, NU);
    const std::vector<uint8_t> u_raw = r.u.to_host<uint8_t>();
    r.u_h = moekit::test::unpack(P.dtype, u_raw);
    r.raw.insert(r.raw.end(), u_raw.begin(), u_raw.end());
  }
  return r;
}

struct BackwardRun {
  DeviceBuffer dxp, dwgu, dbgu, dwd, dbd, dp;
  std::vector<uint8_t> raw;  // every output's bytes, for bitwise comparisons
};

BackwardRun run_backward(Problem& P, const DeviceBuffer* u, const DeviceBuffer& dout, cudaStream_t stream,
                         Mode mode = Mode::kEager) {
  const int64_t R = P.R();
  const int E = P.spec.num_experts(), H = P.spec.hidden, I = P.spec.inter, NU = P.spec.nu();
  BackwardRun r;
  r.dxp = DeviceBuffer(static_cast<size_t>(R) * H * P.es());
  r.dwgu = DeviceBuffer(static_cast<size_t>(E) * H * NU * P.es());
  r.dwd = DeviceBuffer(static_cast<size_t>(E) * I * H * P.es());
  if (P.bgu.get()) r.dbgu = DeviceBuffer(static_cast<size_t>(E) * NU * P.es());
  if (P.bd.get()) r.dbd = DeviceBuffer(static_cast<size_t>(E) * H * P.es());
  if (P.p.get()) r.dp = DeviceBuffer(static_cast<size_t>(R) * sizeof(float));
  for (DeviceBuffer* b : {&r.dxp, &r.dwgu, &r.dwd, &r.dbgu, &r.dbd, &r.dp}) b->poison();
  size_t bytes = 0;
  MOEKIT_REQUIRE_OK(moekit_experts_backward_workspace_size(&P.config, R, u ? 1 : 0, &bytes));
  DeviceBuffer ws(bytes);
  ws.poison();
  INFO("backward, " << mode_name(mode) << (u ? ", saved u" : ", u recomputed"));
  run_on(stream, mode, [&] {
    return moekit_experts_backward(&P.config, R, P.offsets.get<int32_t>(), P.xp.get(), P.pw(), P.wgu.get(),
                                   P.bgu.get(), P.wd.get(), P.bd.get(), u ? u->get() : nullptr, dout.get(),
                                   r.dxp.get(), r.dwgu.get(), r.dbgu.get(), r.dwd.get(), r.dbd.get(),
                                   r.dp.get<float>(), ws.get(), bytes, stream);
  });
  for (DeviceBuffer* b : {&r.dxp, &r.dwgu, &r.dwd, &r.dbgu, &r.dbd, &r.dp}) {
    const auto bytes_h = b->to_host<uint8_t>();
    r.raw.insert(r.raw.end(), bytes_h.begin(), bytes_h.end());
  }
  return r;
}

// Runs the backward of forward run f three more times on the same dout and requires the bits of
// every gradient to repeat (the library's determinism promise).
void require_backward_repeats(Problem& P, const ForwardRun& f, const DeviceBuffer& dout, cudaStream_t stream) {
  const BackwardRun first = run_backward(P, &f.u, dout, stream);
  for (int rep = 0; rep < 3; ++rep) REQUIRE(run_backward(P, &f.u, dout, stream).raw == first.raw);
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// Largest power of two q <= 1 of which every value is a multiple (0 when none down to 2^-24 is).
double common_quantum(const std::vector<double>& values) {
  double q = 1.0;
  for (double x : values)
    while (std::fmod(x, q) != 0.0) {  // fmod is exact; NaN and inf never divide
      q *= 0.5;
      if (q < 0x1p-24) return 0.0;
    }
  return q;
}

// The exact problems (relu2; x, W, dout in {-1, 0, 1}; small integer biases; routing weights
// powers of two) are compared bit for bit. That holds only while every fp32 sum the device forms is
// exact: all its terms multiples of one power of two q, and every partial sum, in whatever order
// the device forms it (tensor-core k chunks, row splits, lanes), below 2^24 q in magnitude, which
// the sum of the terms' magnitudes bounds. The per-row sums are inside that by construction
// (|u| <= H + 2, |G| <= H, dp an integer sum below 2^24); the weight- and bias-gradient sums run
// over whole segments (4097 rows in one problem) and only the data can bound them. So this checks
// every sum on the data, against one q for all of them (conservative): a failure here means the
// problem is not a valid exact problem, not that the device is wrong.
void require_exact_sums(const Problem& P, const std::vector<float>& u, const std::vector<double>& dout,
                        const ref::ExpertsForwardResult& f, const ref::ExpertsBackwardResult& b,
                        const ref::Rounder& round) {
  const ref::ExpertsProblem& h = P.host;
  REQUIRE(h.act.kind == ref::kRelu2);
  const int E = h.num_experts, H = h.hidden, I = h.inter;  // NU = I
  REQUIRE(max_abs(h.xp) <= 1.0);
  REQUIRE(max_abs(h.w_gate_up) <= 1.0);
  REQUIRE(max_abs(h.w_down) <= 1.0);
  REQUIRE(max_abs(dout) <= 1.0);
  const double b_gu = max_abs(h.b_gate_up), b_down = max_abs(h.b_down);
  std::vector<double> values;  // every term that need not be an integer: p, h, h', du
  double most = 0.0;           // largest sum of term magnitudes
  auto sum = [&most](double s) { most = std::max(most, s); };
  for (int e = 0; e < E; ++e) {
    std::vector<double> col_du(I, 0.0), col_hp(I, 0.0);
    double col_p = 0.0;
    for (int64_t r = h.offsets[e]; r < h.offsets[e + 1]; ++r) {
      const double p = h.row_weights.empty() ? 1.0 : h.row_weights[r];
      values.push_back(p);
      double s_h = 0.0, s_du = 0.0, s_dp = 0.0;
      for (int i = 0; i < I; ++i) {
        const size_t ri = static_cast<size_t>(r) * I + i;
        const double ur = u[ri], a = ur > 0.0 ? ur * ur : 0.0, hp = round(a * p);
        values.push_back(f.h[ri]);
        values.push_back(b.du[ri]);
        values.push_back(hp);
        s_h += std::fabs(f.h[ri]);
        s_du += std::fabs(b.du[ri]);
        col_du[i] += std::fabs(b.du[ri]);
        col_hp[i] += std::fabs(hp);
        double G = 0.0, s_G = 0.0;
        for (int c = 0; c < H; ++c) {
          const double t = dout[static_cast<size_t>(r) * H + c] * h.w_down[(static_cast<size_t>(e) * I + i) * H + c];
          G += t;
          s_G += std::fabs(t);
        }
        sum(s_G);                 // G = dout W_down^T
        s_dp += std::fabs(G) * a;
      }
      sum(H + b_gu);                                  // u = xp W_gu + b_gu
      sum(std::max(p, 1.0) * (s_h + b_down));         // out, either weight placement
      sum(s_du);                                      // dxp = du W_gu^T
      sum(s_dp + H * b_down);                         // dp = <G, a> + <dout, b_down>
      col_p += p;
    }
    for (int i = 0; i < I; ++i) {
      sum(col_du[i]);  // dW_gu = xp^T du and db_gu (|x| <= 1)
      sum(col_hp[i]);  // dW_down = h'^T dout (|dout| <= 1)
    }
    sum(col_p);        // db_down = sum p dout
  }
  const double q = common_quantum(values);
  INFO("exactness precondition: terms are multiples of " << q << "; largest sum of magnitudes " << most);
  REQUIRE(q > 0.0);
  REQUIRE(most < 0x1p24 * q);
}

// Runs forward and backward and checks every output against the reference; then runs both again
// inside a graph capture, whose replay must give the same bits.
void check_problem(Problem& P, bool exact, bool recompute_u, cudaStream_t stream) {
  INFO(P.spec.describe() << " dtype " << dtype_name(P.dtype) << (recompute_u ? " (u recomputed)" : "") << " path "
                         << path_name(P.config.gemm_path));
  const int64_t R = P.R(), T = P.total();
  const int E = P.spec.num_experts(), H = P.spec.hidden, I = P.spec.inter, NU = P.spec.nu();
  const ref::Rounder round = rounder(P.dtype);
  const ref::ExpertsForwardResult f = ref::experts_forward(P.host, round);

  ForwardRun fr = run_forward(P, true, stream);
  compare("u_out", fr.u_h, f.u, T, NU, P.dtype, exact);
  compare("out", fr.out_h, f.out, T, H, P.dtype, exact);
  {
    const ForwardRun replay = run_forward(P, true, stream, Mode::kGraph);
    INFO("forward graph replay == eager, bit for bit");
    REQUIRE(replay.raw == fr.raw);
  }

  // dout: integers for exact problems, N(0, 1) otherwise; rows past the total hold values too.
  auto rng = moekit::test::make_rng(0xd0 + R);
  std::vector<double> dout(static_cast<size_t>(R) * H);
  if (exact) {
    std::uniform_int_distribution<int> d(-1, 1);
    for (auto& x : dout) x = d(rng);
  } else {
    dout = moekit::test::experts::normal_vec(rng, dout.size(), 1.0, P.dtype);
  }
  DeviceBuffer dout_d = upload(pack_d(P.dtype, dout));
  // The backward reads the device's saved u (what a framework would keep).
  std::vector<double> u_saved(fr.u_h.begin(), fr.u_h.end());
  const ref::ExpertsBackwardResult b = ref::experts_backward(P.host, u_saved, dout, round);
  if (exact) require_exact_sums(P, fr.u_h, dout, f, b, round);
  BackwardRun br = run_backward(P, recompute_u ? nullptr : &fr.u, dout_d, stream);
  {
    const BackwardRun replay = run_backward(P, recompute_u ? nullptr : &fr.u, dout_d, stream, Mode::kGraph);
    INFO("backward graph replay == eager, bit for bit");
    REQUIRE(replay.raw == br.raw);
  }

  std::vector<double> rounded;
  auto rnd = [&](const std::vector<double>& v) {
    rounded.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) rounded[i] = round(v[i]);
    return rounded;
  };
  require_rows_written("grad_xp", br.dxp, P.dtype, T, R, H);
  compare("grad_xp", moekit::test::unpack(P.dtype, br.dxp.to_host<uint8_t>()), rnd(b.grad_xp), T, H, P.dtype, exact);
  const auto dwgu = moekit::test::unpack(P.dtype, br.dwgu.to_host<uint8_t>());
  const auto dwd = moekit::test::unpack(P.dtype, br.dwd.to_host<uint8_t>());
  compare("grad_w_gate_up", dwgu, rnd(b.grad_w_gate_up), int64_t(E) * H, NU, P.dtype, exact);
  compare("grad_w_down", dwd, rnd(b.grad_w_down), int64_t(E) * I, H, P.dtype, exact);
  std::vector<float> dbgu, dbd;
  if (P.bgu.get()) {
    dbgu = moekit::test::unpack(P.dtype, br.dbgu.to_host<uint8_t>());
    compare("grad_b_gate_up", dbgu, rnd(b.grad_b_gate_up), E, NU, P.dtype, exact);
  }
  if (P.bd.get()) {
    dbd = moekit::test::unpack(P.dtype, br.dbd.to_host<uint8_t>());
    compare("grad_b_down", dbd, rnd(b.grad_b_down), E, H, P.dtype, exact);
  }
  if (P.p.get()) {
    const auto dp_bytes = br.dp.to_host<uint8_t>();
    std::vector<float> dp(R);
    std::memcpy(dp.data(), dp_bytes.data(), dp_bytes.size());
    std::vector<double> want(b.grad_row_weights.begin(), b.grad_row_weights.end());
    for (auto& w : want) w = static_cast<float>(w);
    // dp is fp32 but built from dtype intermediates: the dtype's tolerance applies.
    compare("grad_row_weights", dp, want, T, 1, exact ? MOEKIT_DTYPE_F32 : P.dtype, exact);
    REQUIRE(all_bytes(dp_bytes, static_cast<size_t>(T) * 4, dp_bytes.size(), 0xff));
  }
  // Empty experts: weight and bias gradients exactly +0.
  for (int e = 0; e < E; ++e) {
    if (P.host.offsets[e + 1] != P.host.offsets[e]) continue;
    INFO("empty expert " << e);
    for (int64_t i = 0; i < int64_t(H) * NU; ++i) REQUIRE(dwgu[e * int64_t(H) * NU + i] == 0.0f);
    for (int64_t i = 0; i < int64_t(I) * H; ++i) REQUIRE(dwd[e * int64_t(I) * H + i] == 0.0f);
    for (int64_t i = 0; i < NU && !dbgu.empty(); ++i) REQUIRE(dbgu[e * int64_t(NU) + i] == 0.0f);
    for (int64_t i = 0; i < H && !dbd.empty(); ++i) REQUIRE(dbd[e * int64_t(H) + i] == 0.0f);
  }
}

struct ActCase {
  const char* name;
  int kind;
  double alpha;
  double limit;
};
const ActCase kActs[] = {
    {"swiglu", MOEKIT_ACTIVATION_SWIGLU, 1.702, 0.0},
    {"swiglu limit", MOEKIT_ACTIVATION_SWIGLU, 1.702, 1.25},
    {"relu2", MOEKIT_ACTIVATION_RELU2, 1.702, 0.0},
    {"quick_geglu", MOEKIT_ACTIVATION_QUICK_GEGLU, 1.702, 1.5},
    {"quick_geglu L7", MOEKIT_ACTIVATION_QUICK_GEGLU, 1.702, 7.0},
    {"geglu", MOEKIT_ACTIVATION_GEGLU, 1.702, 0.0},
    {"swiglu_oai", MOEKIT_ACTIVATION_SWIGLU_OAI, 1.702, 0.0},
    {"swiglu_oai limit", MOEKIT_ACTIVATION_SWIGLU_OAI, 1.702, 0.9},
};

Spec spec_for(const ActCase& a, int variant) {
  Spec s;
  s.activation = a.kind;
  s.alpha = a.alpha;
  s.limit = a.limit;
  const bool gated = a.kind != MOEKIT_ACTIVATION_RELU2;
  s.interleaved = gated && (variant == 1 || (variant == 0 && a.kind == MOEKIT_ACTIVATION_QUICK_GEGLU));
  s.weight_after_down = variant == 2;
  s.bias_gate_up = variant >= 1;
  s.bias_down = variant >= 1;
  s.row_weights = variant != 3;
  return s;
}

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { CUDA_REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
};

}  // namespace

TEST_CASE("small-integer relu2 problems match the reference bit for bit", "[gpu][experts][exact]") {
  Stream stream;
  for (moekit_dtype_t dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F16, MOEKIT_DTYPE_F32}) {
    for (int variant = 0; variant < 4; ++variant) {
      Spec s;
      s.activation = MOEKIT_ACTIVATION_RELU2;
      s.hidden = 64;
      s.inter = 40;
      s.counts = variant == 3 ? std::vector<int>{4097, 0, 3} : std::vector<int>{0, 1, 7, 300, 0, 129};
      s.tail_rows = 9;
      s.bias_gate_up = variant != 0;
      s.bias_down = variant != 0;
      s.weight_after_down = variant == 2;
      s.row_weights = true;
      auto rng = moekit::test::make_rng(0x100 + variant);
      Problem P(s, dtype, moekit::test::experts::make_integer(s, rng));
      check_problem(P, true, variant == 1, stream.s);
    }
  }
}

TEST_CASE("every activation, layout, bias and weight placement against the reference", "[gpu][experts]") {
  Stream stream;
  uint64_t salt = 0x200;
  for (moekit_dtype_t dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F16, MOEKIT_DTYPE_F32}) {
    for (const ActCase& a : kActs) {
      for (int variant = 0; variant < 4; ++variant) {
        if (dtype != MOEKIT_DTYPE_BF16 && variant == 3) continue;
        Spec s = spec_for(a, variant);
        s.hidden = 96;
        s.inter = 40;
        s.counts = {0, 1, 7, 130, 64};
        s.tail_rows = 3;
        auto rng = moekit::test::make_rng(++salt);
        Problem P(s, dtype, moekit::test::experts::make_random(s, rng, dtype));
        INFO(a.name << " variant " << variant);
        check_problem(P, false, variant == 2, stream.s);
      }
    }
  }
}

TEST_CASE("awkward shapes: H = 8, I = 8 / 24 / 200, K tails, a 4097-row group, many experts",
          "[gpu][experts]") {
  Stream stream;
  struct Shape {
    int hidden, inter;
    std::vector<int> counts;
    int tail;
  };
  std::vector<Shape> shapes = {
      {8, 8, {3, 0, 2, 1}, 4},
      {136, 24, {33, 129, 0, 5}, 1},
      {96, 200, {257, 64, 0}, 2},
      {64, 24, {4097, 0}, 7},
      {40, 8, {}, 5},  // 300 experts, filled below
  };
  {
    auto rng = moekit::test::make_rng(0x300);
    std::uniform_int_distribution<int> d(0, 6);
    for (int e = 0; e < 300; ++e) shapes.back().counts.push_back(d(rng) < 2 ? 0 : d(rng) * 3);
  }
  uint64_t salt = 0x310;
  for (moekit_dtype_t dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F16, MOEKIT_DTYPE_F32}) {
    for (const Shape& sh : shapes) {
      for (int act : {MOEKIT_ACTIVATION_SWIGLU, MOEKIT_ACTIVATION_RELU2}) {
        Spec s;
        s.activation = act;
        s.hidden = sh.hidden;
        s.inter = sh.inter;
        s.counts = sh.counts;
        s.tail_rows = sh.tail;
        s.bias_gate_up = s.bias_down = true;
        auto rng = moekit::test::make_rng(++salt);
        Problem P(s, dtype, moekit::test::experts::make_random(s, rng, dtype));
        check_problem(P, false, false, stream.s);
      }
    }
  }
}

TEST_CASE("more tiles than resident CTAs, skewed groups, weight-gradient splits", "[gpu][experts]") {
  Stream stream;
  // 8 experts x ~1100 rows x (H = 256, NU = 512): more tiles than SMs, so every persistent CTA
  // walks several tiles and overlaps a prologue with an epilogue.
  {
    Spec s;
    s.hidden = 256;
    s.inter = 256;
    s.counts = {1100, 1030, 1201, 999, 1100, 1024, 1111, 1089};
    s.bias_gate_up = s.bias_down = true;
    auto rng = moekit::test::make_rng(0x400);
    Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_BF16));
    check_problem(P, false, false, stream.s);
  }
  // Skewed counts proportional to u^3 (the benchmark's distribution) over 32 experts.
  {
    Spec s;
    s.hidden = 64;
    s.inter = 48;
    auto rng = moekit::test::make_rng(0x401);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::vector<double> w(32);
    double sum = 0;
    for (auto& x : w) sum += (x = std::pow(u(rng), 3.0));
    s.counts.clear();
    for (auto x : w) s.counts.push_back(static_cast<int>(3000 * x / sum));
    Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_BF16));
    check_problem(P, false, false, stream.s);
  }
  // Three or more tiles per persistent CTA: the gate-up GEMM has 74 row tiles x 4 column tiles =
  // 296 tiles, more than twice the 132 CTAs of an H100 / H200 (one per SM), so CTAs 0..31 run 3
  // tiles. Only a third tile reuses a row-weight buffer (double-buffered by tile parity: tile 2
  // refills the buffer the epilogue of tile 0 read); the cases above give each CTA at most 2
  // tiles. H = 64 is 2 k tiles, fewer than the stages (zero-filled copies past the end).
  {
    Spec s;
    s.hidden = 64;
    s.inter = 512;
    s.counts = {3000, 0, 2900, 1, 2850, 257};
    s.bias_gate_up = true;
    auto rng = moekit::test::make_rng(0x404);
    Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_BF16));
    check_problem(P, false, false, stream.s);
  }
  // One expert, few weight-gradient tiles, many rows: the weight gradients split the rows and the
  // bias gradients split their column sums; both are summed in a second ordered pass.
  for (moekit_dtype_t dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F32}) {
    Spec s;
    s.hidden = 64;
    s.inter = 64;
    s.counts = {6000};
    s.bias_gate_up = s.bias_down = true;
    auto rng = moekit::test::make_rng(0x402);
    Problem P(s, dtype, moekit::test::experts::make_random(s, rng, dtype));
    check_problem(P, false, false, stream.s);
  }
  // The largest expert count, almost all empty.
  {
    Spec s;
    s.hidden = 8;
    s.inter = 8;
    s.counts.assign(MOEKIT_EXPERTS_MAX_EXPERTS, 0);
    for (int e = 0; e < MOEKIT_EXPERTS_MAX_EXPERTS; e += 97) s.counts[e] = 1 + e % 13;
    auto rng = moekit::test::make_rng(0x403);
    Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_BF16));
    check_problem(P, false, false, stream.s);
  }
}

TEST_CASE("bitwise determinism, saved u == recomputed u, graph capture with new routing", "[gpu][experts]") {
  for (moekit_dtype_t dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F32}) {
    INFO(dtype_name(dtype));
    Stream stream;
    Spec s;
    s.hidden = 128;
    s.inter = 72;
    s.counts = {500, 0, 1, 2000, 37};
    s.bias_gate_up = s.bias_down = true;
    auto rng = moekit::test::make_rng(0x500);
    Problem P(s, dtype, moekit::test::experts::make_random(s, rng, dtype));
    const int64_t R = P.R();
    const int H = s.hidden;
    std::vector<double> dout = moekit::test::experts::normal_vec(rng, static_cast<size_t>(R) * H, 1.0, dtype);
    DeviceBuffer dout_d = upload(pack_d(dtype, dout));

    ForwardRun f1 = run_forward(P, true, stream.s);
    ForwardRun f2 = run_forward(P, true, stream.s);
    REQUIRE(f1.out.to_host<uint8_t>() == f2.out.to_host<uint8_t>());
    REQUIRE(f1.u.to_host<uint8_t>() == f2.u.to_host<uint8_t>());
    BackwardRun b1 = run_backward(P, &f1.u, dout_d, stream.s);
    BackwardRun b2 = run_backward(P, &f1.u, dout_d, stream.s);
    REQUIRE(b1.raw == b2.raw);
    BackwardRun b3 = run_backward(P, nullptr, dout_d, stream.s);
    REQUIRE(b1.raw == b3.raw);

    // Capture forward + backward once; replay with the same routing, then with new offsets
    // written on the device (the graph must not have baked in any host copy of them).
    size_t fbytes = 0, bbytes = 0;
    MOEKIT_REQUIRE_OK(moekit_experts_forward_workspace_size(&P.config, R, &fbytes));
    MOEKIT_REQUIRE_OK(moekit_experts_backward_workspace_size(&P.config, R, 1, &bbytes));
    DeviceBuffer fws(fbytes), bws(bbytes), out(static_cast<size_t>(R) * H * P.es()),
        u(static_cast<size_t>(R) * s.nu() * P.es()), dxp(static_cast<size_t>(R) * H * P.es()),
        dwgu(size_t(s.num_experts()) * H * s.nu() * P.es()),
        dwd(size_t(s.num_experts()) * s.inter * H * P.es()), dbgu(size_t(s.num_experts()) * s.nu() * P.es()),
        dbd(size_t(s.num_experts()) * H * P.es()), dp(static_cast<size_t>(R) * 4);
    for (DeviceBuffer* b : {&out, &u, &dxp, &dwgu, &dwd, &dbgu, &dbd, &dp}) b->poison();
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_REQUIRE(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
    const moekit_status_t fs =
        moekit_experts_forward(&P.config, R, P.offsets.get<int32_t>(), P.xp.get(), P.pw(), P.wgu.get(), P.bgu.get(),
                               P.wd.get(), P.bd.get(), u.get(), out.get(), fws.get(), fbytes, stream.s);
    const moekit_status_t bs = moekit_experts_backward(
        &P.config, R, P.offsets.get<int32_t>(), P.xp.get(), P.pw(), P.wgu.get(), P.bgu.get(), P.wd.get(), P.bd.get(),
        u.get(), dout_d.get(), dxp.get(), dwgu.get(), dbgu.get(), dwd.get(), dbd.get(), dp.get<float>(), bws.get(),
        bbytes, stream.s);
    const cudaError_t end = cudaStreamEndCapture(stream.s, &graph);
    INFO(moekit_get_last_error());
    REQUIRE(fs == MOEKIT_STATUS_SUCCESS);
    REQUIRE(bs == MOEKIT_STATUS_SUCCESS);
    CUDA_REQUIRE(end);
    CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
    settle();  // the poisons above ran on the legacy stream
    CUDA_REQUIRE(cudaGraphLaunch(exec, stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    REQUIRE(out.to_host<uint8_t>() == f1.out.to_host<uint8_t>());
    std::vector<uint8_t> graph_raw;
    for (DeviceBuffer* b : {&dxp, &dwgu, &dwd, &dbgu, &dbd, &dp}) {
      const auto h = b->to_host<uint8_t>();
      graph_raw.insert(graph_raw.end(), h.begin(), h.end());
    }
    REQUIRE(graph_raw == b1.raw);

    // New routing on the device: fewer rows, a different split. Replay and compare with eager.
    const std::vector<int32_t> new_offsets = {0, 700, 900, 900, 1500, 1600};
    CUDA_REQUIRE(cudaMemcpy(P.offsets.get(), new_offsets.data(), new_offsets.size() * 4, cudaMemcpyHostToDevice));
    P.host.offsets = new_offsets;
    for (DeviceBuffer* b : {&out, &u, &dxp, &dp}) b->poison();
    settle();  // the new offsets and the poisons went through the legacy stream
    CUDA_REQUIRE(cudaGraphLaunch(exec, stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    ForwardRun f3 = run_forward(P, true, stream.s);
    BackwardRun b4 = run_backward(P, &f3.u, dout_d, stream.s);
    REQUIRE(out.to_host<uint8_t>() == f3.out.to_host<uint8_t>());
    graph_raw.clear();
    for (DeviceBuffer* b : {&dxp, &dwgu, &dwd, &dbgu, &dbd, &dp}) {
      const auto h = b->to_host<uint8_t>();
      graph_raw.insert(graph_raw.end(), h.begin(), h.end());
    }
    REQUIRE(graph_raw == b4.raw);
    require_rows_written("graph out", out, dtype, 1600, R, H);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
}

TEST_CASE("max_rows = 0, garbage offsets and rejected calls", "[gpu][experts]") {
  Stream stream;
  Spec s;
  s.hidden = 64;
  s.inter = 32;
  s.counts = {5, 0, 9};
  s.bias_gate_up = s.bias_down = true;
  auto rng = moekit::test::make_rng(0x600);
  Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_BF16));
  const int E = s.num_experts(), H = s.hidden, I = s.inter, NU = s.nu();

  SECTION("max_rows = 0: forward is a no-op, backward writes zero weight and bias gradients") {
    size_t bytes = 0;
    MOEKIT_REQUIRE_OK(moekit_experts_backward_workspace_size(&P.config, 0, 0, &bytes));
    DeviceBuffer ws(bytes), dwgu(size_t(E) * H * NU * 2), dwd(size_t(E) * I * H * 2), dbgu(size_t(E) * NU * 2),
        dbd(size_t(E) * H * 2);
    for (Mode mode : {Mode::kEager, Mode::kGraph}) {
      INFO(mode_name(mode));
      for (DeviceBuffer* b : {&dwgu, &dwd, &dbgu, &dbd}) b->poison();
      run_on(stream.s, mode, [&] {
        moekit_status_t st = moekit_experts_forward(&P.config, 0, P.offsets.get<int32_t>(), nullptr, nullptr,
                                                    P.wgu.get(), nullptr, P.wd.get(), nullptr, nullptr, nullptr,
                                                    nullptr, 0, stream.s);
        if (st == MOEKIT_STATUS_SUCCESS)
          st = moekit_experts_backward(&P.config, 0, P.offsets.get<int32_t>(), nullptr, nullptr, P.wgu.get(),
                                       P.bgu.get(), P.wd.get(), P.bd.get(), nullptr, nullptr, nullptr, dwgu.get(),
                                       dbgu.get(), dwd.get(), dbd.get(), nullptr, ws.get(), bytes, stream.s);
        return st;
      });
      for (DeviceBuffer* b : {&dwgu, &dwd, &dbgu, &dbd}) REQUIRE(all_bytes(b->to_host<uint8_t>(), 0, b->bytes(), 0));
    }
  }

  SECTION("garbage offsets never leave [0, max_rows)") {
    // Negative, decreasing and past-the-end offsets: results are meaningless but every access
    // stays in the buffers (run under compute-sanitizer) and the calls succeed.
    const std::vector<int32_t> garbage = {7, -40, 1000000, 3};
    DeviceBuffer off = upload(garbage);
    const int64_t R = P.R();
    size_t fb = 0, bb = 0;
    MOEKIT_REQUIRE_OK(moekit_experts_forward_workspace_size(&P.config, R, &fb));
    MOEKIT_REQUIRE_OK(moekit_experts_backward_workspace_size(&P.config, R, 0, &bb));
    DeviceBuffer fws(fb), bws(bb), out(size_t(R) * H * 2), dxp(size_t(R) * H * 2), dwgu(size_t(E) * H * NU * 2),
        dwd(size_t(E) * I * H * 2), dp(size_t(R) * 4);
    run_on(stream.s, Mode::kEager, [&] {
      moekit_status_t st = moekit_experts_forward(&P.config, R, off.get<int32_t>(), P.xp.get(), P.pw(), P.wgu.get(),
                                                  P.bgu.get(), P.wd.get(), P.bd.get(), nullptr, out.get(), fws.get(),
                                                  fb, stream.s);
      if (st == MOEKIT_STATUS_SUCCESS)
        st = moekit_experts_backward(&P.config, R, off.get<int32_t>(), P.xp.get(), P.pw(), P.wgu.get(), P.bgu.get(),
                                     P.wd.get(), P.bd.get(), nullptr, out.get(), dxp.get(), dwgu.get(), nullptr,
                                     dwd.get(), nullptr, dp.get<float>(), bws.get(), bb, stream.s);
      return st;
    });
  }

  SECTION("a rejected call writes nothing") {
    const int64_t R = P.R();
    size_t fb = 0;
    MOEKIT_REQUIRE_OK(moekit_experts_forward_workspace_size(&P.config, R, &fb));
    DeviceBuffer ws(fb), out(size_t(R) * H * 2), u(size_t(R) * NU * 2);
    out.poison();
    u.poison();
    REQUIRE(moekit_experts_forward(&P.config, R, P.offsets.get<int32_t>(), P.xp.get(), P.pw(), P.wgu.get(),
                                   P.bgu.get(), P.wd.get(), P.bd.get(), u.get(), out.get(), ws.get(), fb - 256,
                                   stream.s) == MOEKIT_STATUS_WORKSPACE_TOO_SMALL);
    REQUIRE(std::string(moekit_get_last_error()).find("workspace_bytes") != std::string::npos);
    REQUIRE(moekit_experts_forward(&P.config, R, P.offsets.get<int32_t>(),
                                   static_cast<const char*>(P.xp.get()) + 2, P.pw(), P.wgu.get(), P.bgu.get(),
                                   P.wd.get(), P.bd.get(), u.get(), out.get(), ws.get(), fb,
                                   stream.s) == MOEKIT_STATUS_MISALIGNED);
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    REQUIRE(moekit::test::still_poisoned(out));
    REQUIRE(moekit::test::still_poisoned(u));
  }
}

// ---------------------------------------------------------------------------------------------
// Both grouped-GEMM paths (SM80, and SM90 on compute capability 9.0) on the shapes that stress the
// Hopper kernel's tiling: TMA boxes past K, N and R, row tiles straddling group boundaries, gate
// boxes past I, empty groups, one row, many experts. Every problem runs forward and backward
// against the reference and once more as a graph replay (check_problem).

TEST_CASE("both GEMM paths: skewed routing, empty experts, T = 1, 257 experts, straddling tiles, K/N tails",
          "[gpu][experts][paths]") {
  Stream stream;
  uint64_t salt = 0x900;
  for (int32_t path : both_paths()) {
    PathScope scope(path);
    INFO("gemm_path " << path_name(path));
    for (moekit_dtype_t dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F16}) {
      struct Case {
        const char* name;
        int act;
        double limit;
        bool interleaved;
        int hidden, inter;
        std::vector<int> counts;
        int64_t tail;
      };
      std::vector<Case> cases = {
          {"T = 1 among empty experts", MOEKIT_ACTIVATION_SWIGLU, 0.0, false, 128, 64, {0, 0, 1, 0}, 0},
          {"straddling row tiles, gate boxes past I", MOEKIT_ACTIVATION_SWIGLU, 0.0, false, 256, 136,
           {100, 200, 57, 300, 0, 129}, 5},
          {"K and N tails (H = 200, I = 72), interleaved", MOEKIT_ACTIVATION_QUICK_GEGLU, 1.5, true, 200, 72,
           {3, 130, 0, 250}, 4},
          {"K and N tails, relu2", MOEKIT_ACTIVATION_RELU2, 0.0, false, 200, 72, {129, 1, 255}, 3},
          {"K and N tails, concatenated", MOEKIT_ACTIVATION_SWIGLU_OAI, 0.9, false, 8, 8, {5, 0, 140}, 2},
      };
      // Skewed counts proportional to u^3 over 32 experts (the benchmark's distribution).
      {
        auto rng = moekit::test::make_rng(0x9ff);
        std::uniform_real_distribution<double> u(0.0, 1.0);
        std::vector<double> w(32);
        double sum = 0;
        for (auto& x : w) sum += (x = std::pow(u(rng), 3.0));
        Case c{"skewed u^3 over 32 experts", MOEKIT_ACTIVATION_SWIGLU, 0.0, false, 64, 48, {}, 7};
        for (auto x : w) c.counts.push_back(static_cast<int>(3000 * x / sum));
        cases.push_back(c);
      }
      // 257 experts, 0 .. 9 rows each (about a tenth empty).
      {
        auto rng = moekit::test::make_rng(0x9fe);
        std::uniform_int_distribution<int> d(0, 9);
        Case c{"257 experts", MOEKIT_ACTIVATION_GEGLU, 0.0, false, 64, 32, {}, 1};
        for (int e = 0; e < 257; ++e) c.counts.push_back(d(rng));
        cases.push_back(c);
      }
      for (const Case& c : cases) {
        Spec s;
        s.activation = c.act;
        s.limit = c.limit;
        s.interleaved = c.interleaved;
        s.hidden = c.hidden;
        s.inter = c.inter;
        s.counts = c.counts;
        s.tail_rows = c.tail;
        s.bias_gate_up = s.bias_down = true;
        auto rng = moekit::test::make_rng(++salt);
        Problem P(s, dtype, moekit::test::experts::make_random(s, rng, dtype));
        REQUIRE(P.config.gemm_path == path);
        INFO(c.name);
        check_problem(P, false, false, stream.s);
      }
    }
  }
}

// The activation-backward dgrad (dout W_down^T with du, h' and dp in its epilogue) as the
// bandwidth-tuned SM90 epilogue runs it: u loads issued a batch ahead of the stores, and u
// prefetched into L2 kUPrefetchKTiles = 8 k tiles before the k loop ends. H = 576 is 9 k tiles
// (the prefetch lands mid-loop, at k tile 1), H = 64 one k tile (at k tile 0); I = 264 is a full
// column tile plus an 8-column tail (a 16-byte prefetch; interleaved: two halves of 16 bytes);
// 300 experts of 0..9 rows give ~270 row tiles x 2 column tiles, so every persistent CTA runs
// several tiles (132 SMs) and most tiles end inside their group (rows past the group: neither
// prefetched nor stored). Concatenated, interleaved and relu2 layouts; SwiGLU (the instances with
// the kind fixed at compile time, with and without the clamp) and other kinds (the run-time-kind
// instances); row weights; both paths.
TEST_CASE("both GEMM paths: activation-backward dgrad over many tiles per CTA, u prefetch, column tails",
          "[gpu][experts][paths]") {
  Stream stream;
  uint64_t salt = 0xa00;
  for (int32_t path : both_paths()) {
    PathScope scope(path);
    INFO("gemm_path " << path_name(path));
    struct Case {
      int act;
      double limit;
      bool interleaved;
      int hidden;
      moekit_dtype_t dtype;
    };
    const Case cases[] = {
        {MOEKIT_ACTIVATION_SWIGLU, 0.0, false, 576, MOEKIT_DTYPE_BF16},
        {MOEKIT_ACTIVATION_SWIGLU, 1.25, true, 576, MOEKIT_DTYPE_BF16},
        {MOEKIT_ACTIVATION_QUICK_GEGLU, 7.0, true, 576, MOEKIT_DTYPE_BF16},
        {MOEKIT_ACTIVATION_RELU2, 0.0, false, 576, MOEKIT_DTYPE_F16},
        {MOEKIT_ACTIVATION_SWIGLU_OAI, 0.9, false, 64, MOEKIT_DTYPE_F16},
    };
    for (const Case& c : cases) {
      Spec s;
      s.activation = c.act;
      s.limit = c.limit;
      s.interleaved = c.interleaved;
      s.hidden = c.hidden;
      s.inter = 264;
      auto rng = moekit::test::make_rng(++salt);
      std::uniform_int_distribution<int> d(0, 9);
      s.counts.clear();
      for (int e = 0; e < 300; ++e) s.counts.push_back(d(rng));
      s.tail_rows = 6;
      s.row_weights = true;
      Problem P(s, c.dtype, moekit::test::experts::make_random(s, rng, c.dtype));
      REQUIRE(P.config.gemm_path == path);
      check_problem(P, false, false, stream.s);
    }
  }
}

// The staged activation-backward epilogue of the SM90 path (MOEKIT_SM90_BWD_ACT_STAGED, the default):
// accumulators staged 32 rows x 64 columns at a time through shared memory, items of 8 h columns
// of one row, 16-byte u loads and du / h' stores, dp per row over 8 lanes by a fixed tree; a
// 4-stage ring up to E = 4067 and a 3-stage one above (E = 4100 below runs that instance). Shapes that hit its edges:
// I = 8 (one item per row of the only sub-tile), 72 (a full sub-tile and one item of the next),
// 200 (three sub-tiles and one item), 264 (a full tile and an 8-column tail tile), 520 (three
// column tiles); row tiles straddling groups, empty experts, a 513-row group (several row tiles
// of one expert), 300 experts of 0..9 rows (many tiles per persistent CTA, most ending inside
// their group). Exact: relu2 on small integers, bit for bit against the reference (du, h' and dp
// all reach the gradients exactly). Every gated layout with random data: concatenated and
// interleaved, SwiGLU with and without the clamp (the compile-time-kind instances) and other
// kinds (the run-time-kind instances), bf16 and f16, with row weights; plus bitwise run-to-run
// determinism of the whole backward on an interleaved problem. Both paths (sm_80 as control).
TEST_CASE("both GEMM paths: staged activation-backward epilogue, column tails, exact relu2, every layout",
          "[gpu][experts][paths]") {
  Stream stream;
  uint64_t salt = 0xb00;
  std::vector<int> many;
  {
    auto rng = moekit::test::make_rng(0xb0f);
    std::uniform_int_distribution<int> d(0, 9);
    for (int e = 0; e < 300; ++e) many.push_back(d(rng));
  }
  for (int32_t path : both_paths()) {
    PathScope scope(path);
    INFO("gemm_path " << path_name(path));
    {  // exact relu2, bit for bit
      struct Case {
        int inter;
        std::vector<int> counts;
      };
      const Case cases[] = {
          {8, {0, 3, 130, 0, 1}}, {72, many}, {200, {257, 0, 129, 64}}, {264, {1, 0, 200}}, {520, {0, 513, 0, 1}},
      };
      for (const Case& c : cases) {
        Spec s;
        s.activation = MOEKIT_ACTIVATION_RELU2;
        s.hidden = 64;
        s.inter = c.inter;
        s.counts = c.counts;
        s.tail_rows = 5;
        s.bias_gate_up = s.bias_down = true;
        s.row_weights = true;
        auto rng = moekit::test::make_rng(++salt);
        Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_integer(s, rng));
        REQUIRE(P.config.gemm_path == path);
        check_problem(P, true, false, stream.s);
      }
    }
    {  // gated layouts and kinds against the reference
      struct Case {
        int act;
        double limit;
        bool interleaved;
        int hidden, inter;
        moekit_dtype_t dtype;
        bool many_experts;
      };
      const Case cases[] = {
          {MOEKIT_ACTIVATION_SWIGLU, 0.0, false, 128, 200, MOEKIT_DTYPE_BF16, true},
          {MOEKIT_ACTIVATION_SWIGLU, 0.0, false, 64, 520, MOEKIT_DTYPE_F16, false},
          {MOEKIT_ACTIVATION_SWIGLU, 1.5, false, 200, 72, MOEKIT_DTYPE_F16, true},
          {MOEKIT_ACTIVATION_SWIGLU, 0.0, true, 64, 200, MOEKIT_DTYPE_F16, false},
          {MOEKIT_ACTIVATION_SWIGLU, 7.0, true, 128, 8, MOEKIT_DTYPE_BF16, true},
          {MOEKIT_ACTIVATION_GEGLU, 0.0, false, 64, 136, MOEKIT_DTYPE_BF16, false},
          {MOEKIT_ACTIVATION_QUICK_GEGLU, 1.25, true, 64, 264, MOEKIT_DTYPE_F16, true},
          {MOEKIT_ACTIVATION_SWIGLU_OAI, 0.9, true, 64, 72, MOEKIT_DTYPE_BF16, false},
      };
      for (const Case& c : cases) {
        Spec s;
        s.activation = c.act;
        s.limit = c.limit;
        s.interleaved = c.interleaved;
        s.hidden = c.hidden;
        s.inter = c.inter;
        s.counts = c.many_experts ? many : std::vector<int>{0, 513, 0, 1, 130};
        s.tail_rows = 3;
        s.row_weights = true;
        auto rng = moekit::test::make_rng(++salt);
        Problem P(s, c.dtype, moekit::test::experts::make_random(s, rng, c.dtype));
        REQUIRE(P.config.gemm_path == path);
        check_problem(P, false, false, stream.s);
      }
    }
    {  // E = 4100 > 4067: the staged kernel's 3-stage instance; most experts empty
      for (int act : {MOEKIT_ACTIVATION_RELU2, MOEKIT_ACTIVATION_SWIGLU}) {
        Spec s;
        s.activation = act;
        s.hidden = 16;
        s.inter = 72;
        s.counts.assign(4100, 0);
        for (int e = 0; e < 4100; e += 37) s.counts[e] = 1 + (e % 9);
        s.counts[4099] = 130;
        s.tail_rows = 4;
        s.bias_gate_up = s.bias_down = act == MOEKIT_ACTIVATION_RELU2;
        s.row_weights = true;
        auto rng = moekit::test::make_rng(++salt);
        const bool exact = act == MOEKIT_ACTIVATION_RELU2;
        Problem P(s, MOEKIT_DTYPE_BF16,
                  exact ? moekit::test::experts::make_integer(s, rng)
                        : moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_BF16));
        REQUIRE(P.config.gemm_path == path);
        check_problem(P, exact, false, stream.s);
      }
    }
    {  // bitwise determinism, interleaved SwiGLU with clamp, row weights
      Spec s;
      s.limit = 2.0;
      s.interleaved = true;
      s.hidden = 128;
      s.inter = 200;
      s.counts = many;
      s.row_weights = true;
      auto rng = moekit::test::make_rng(0xb40);
      Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_BF16));
      std::vector<double> dout = moekit::test::experts::normal_vec(rng, static_cast<size_t>(P.R()) * s.hidden, 1.0,
                                                                   MOEKIT_DTYPE_BF16);
      DeviceBuffer dout_d = upload(pack_d(MOEKIT_DTYPE_BF16, dout));
      require_backward_repeats(P, run_forward(P, true, stream.s), dout_d, stream.s);
    }
  }
}

TEST_CASE("both GEMM paths: bitwise determinism over repeated runs", "[gpu][experts][paths]") {
  Stream stream;
  for (int32_t path : both_paths()) {
    PathScope scope(path);
    INFO("gemm_path " << path_name(path));
    Spec s;
    s.hidden = 512;
    s.inter = 384;
    s.counts = {700, 0, 1, 1500, 333};
    s.bias_gate_up = s.bias_down = true;
    auto rng = moekit::test::make_rng(0x910);
    Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_random(s, rng, MOEKIT_DTYPE_BF16));
    std::vector<double> dout = moekit::test::experts::normal_vec(rng, static_cast<size_t>(P.R()) * s.hidden, 1.0,
                                                                 MOEKIT_DTYPE_BF16);
    DeviceBuffer dout_d = upload(pack_d(MOEKIT_DTYPE_BF16, dout));
    const ForwardRun f1 = run_forward(P, true, stream.s);
    for (int rep = 0; rep < 3; ++rep) REQUIRE(run_forward(P, true, stream.s).raw == f1.raw);
    require_backward_repeats(P, f1, dout_d, stream.s);
  }
}

TEST_CASE("both GEMM paths: a small exact problem, bit for bit and equal across paths",
          "[gpu][experts][paths][exact]") {
  // Small enough for compute-sanitizer --tool racecheck / synccheck on the SM90 kernels: one tile
  // column, a few row tiles straddling groups, every forward and dgrad kind.
  Stream stream;
  std::vector<uint8_t> first;
  for (int32_t path : both_paths()) {
    PathScope scope(path);
    INFO("gemm_path " << path_name(path));
    Spec s;
    s.activation = MOEKIT_ACTIVATION_RELU2;
    s.hidden = 64;
    s.inter = 40;
    s.counts = {0, 1, 7, 130, 0, 3};
    s.tail_rows = 9;
    s.bias_gate_up = s.bias_down = true;
    auto rng = moekit::test::make_rng(0x920);
    Problem P(s, MOEKIT_DTYPE_BF16, moekit::test::experts::make_integer(s, rng));
    check_problem(P, true, false, stream.s);
    const ForwardRun f = run_forward(P, true, stream.s);
    if (first.empty()) {
      first = f.raw;
    } else {
      INFO("exact results equal across paths");
      REQUIRE(f.raw == first);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dense MLP

namespace {

struct MlpHandle {
  moekit_mlp_handle_t h = nullptr;
  MlpHandle() { MOEKIT_REQUIRE_OK(moekit_mlp_handle_create(&h)); }
  ~MlpHandle() { moekit_mlp_handle_destroy(h); }
};

// Checks the MLP against the experts reference with one expert and p = 1.
void check_mlp(moekit_mlp_handle_t handle, const ActCase& a, bool interleaved, bool out_in, bool biases,
               moekit_dtype_t dtype, int64_t T, int H, int I, cudaStream_t stream, uint64_t salt) {
  Spec s;
  s.activation = a.kind;
  s.alpha = a.alpha;
  s.limit = a.limit;
  s.interleaved = interleaved && a.kind != MOEKIT_ACTIVATION_RELU2;
  s.hidden = H;
  s.inter = I;
  s.counts = {static_cast<int>(T)};
  s.tail_rows = 0;
  s.bias_gate_up = s.bias_down = biases;
  s.row_weights = false;
  INFO("MLP " << a.name << (out_in ? " OUT_IN" : " IN_OUT") << " " << s.describe() << " " << dtype_name(dtype));
  auto rng = moekit::test::make_rng(salt);
  const ref::ExpertsProblem host = moekit::test::experts::make_random(s, rng, dtype);
  const int NU = s.nu();
  moekit_mlp_config_t c;
  MOEKIT_REQUIRE_OK(moekit_mlp_config_init(&c, sizeof(c)));
  c.hidden = H;
  c.inter = I;
  c.dtype = dtype;
  c.activation = a.kind;
  c.gate_up_layout = s.interleaved ? MOEKIT_GATE_UP_INTERLEAVED : MOEKIT_GATE_UP_CONCATENATED;
  c.weight_layout = out_in ? MOEKIT_WEIGHT_OUT_IN : MOEKIT_WEIGHT_IN_OUT;
  c.act_alpha = static_cast<float>(a.alpha);
  c.act_limit = static_cast<float>(a.limit);
  auto layout = [&](const std::vector<double>& w, int rows, int cols) {
    return out_in ? ref::transpose(w, rows, cols) : w;
  };
  DeviceBuffer x = upload(pack_d(dtype, host.xp)), wgu = upload(pack_d(dtype, layout(host.w_gate_up, H, NU))),
               wd = upload(pack_d(dtype, layout(host.w_down, I, H))), bgu, bd;
  if (biases) {
    bgu = upload(pack_d(dtype, host.b_gate_up));
    bd = upload(pack_d(dtype, host.b_down));
  }
  const size_t es = moekit::test::dtype_bytes(dtype);
  DeviceBuffer y(size_t(T) * H * es), u(size_t(T) * NU * es);
  size_t fb = 0;
  MOEKIT_REQUIRE_OK(moekit_mlp_forward_workspace_size(&c, T, &fb));
  DeviceBuffer fws(fb);
  auto forward = [&](Mode mode, DeviceBuffer& y_out, DeviceBuffer& u_out) {
    INFO("forward, " << mode_name(mode));
    y_out.poison();
    u_out.poison();
    fws.poison();
    run_on(stream, mode, [&] {
      return moekit_mlp_forward(handle, &c, T, x.get(), wgu.get(), bgu.get(), wd.get(), bd.get(), u_out.get(),
                                y_out.get(), fws.get(), fb, stream);
    });
  };
  forward(Mode::kEager, y, u);
  const ref::Rounder round = rounder(dtype);
  const ref::ExpertsForwardResult f = ref::experts_forward(host, round);
  const auto u_h = moekit::test::unpack(dtype, u.to_host<uint8_t>());
  compare("mlp u", u_h, f.u, T, NU, dtype, false);
  compare("mlp y", moekit::test::unpack(dtype, y.to_host<uint8_t>()), f.out, T, H, dtype, false);
  {
    DeviceBuffer y2(y.bytes()), u2(u.bytes());
    forward(Mode::kGraph, y2, u2);
    INFO("forward graph replay == eager, bit for bit");
    REQUIRE(y2.to_host<uint8_t>() == y.to_host<uint8_t>());
    REQUIRE(u2.to_host<uint8_t>() == u.to_host<uint8_t>());
  }

  std::vector<double> dy = moekit::test::experts::normal_vec(rng, size_t(T) * H, 1.0, dtype);
  DeviceBuffer dy_d = upload(pack_d(dtype, dy));
  const ref::ExpertsBackwardResult b =
      ref::experts_backward(host, std::vector<double>(u_h.begin(), u_h.end()), dy, round);
  // Saved u and recomputed u, each eager and as a graph replay: all four give the eager
  // saved-u run's bits.
  std::vector<uint8_t> first;
  for (int saved = 1; saved >= 0; --saved)
    for (Mode mode : {Mode::kEager, Mode::kGraph}) {
      INFO("backward, " << (saved ? "saved u" : "u recomputed") << ", " << mode_name(mode));
      DeviceBuffer dx(size_t(T) * H * es), dwgu(size_t(H) * NU * es), dwd(size_t(I) * H * es),
          dbgu(size_t(NU) * es), dbd(size_t(H) * es);
      for (DeviceBuffer* p : {&dx, &dwgu, &dwd, &dbgu, &dbd}) p->poison();
      size_t bb = 0;
      MOEKIT_REQUIRE_OK(moekit_mlp_backward_workspace_size(&c, T, saved, &bb));
      DeviceBuffer bws(bb);
      bws.poison();
      run_on(stream, mode, [&] {
        return moekit_mlp_backward(handle, &c, T, x.get(), wgu.get(), bgu.get(), wd.get(), bd.get(),
                                   saved ? u.get() : nullptr, dy_d.get(), dx.get(), dwgu.get(),
                                   biases ? dbgu.get() : nullptr, dwd.get(), biases ? dbd.get() : nullptr, bws.get(),
                                   bb, stream);
      });
      std::vector<uint8_t> raw;
      for (DeviceBuffer* p : {&dx, &dwgu, &dwd, &dbgu, &dbd}) {
        const auto h = p->to_host<uint8_t>();
        raw.insert(raw.end(), h.begin(), h.end());
      }
      if (!first.empty()) {
        REQUIRE(raw == first);
        continue;
      }
      first = raw;
      std::vector<double> r;
      auto rnd = [&](const std::vector<double>& v) {
        r.resize(v.size());
        for (size_t i = 0; i < v.size(); ++i) r[i] = round(v[i]);
        return r;
      };
      compare("mlp grad_x", moekit::test::unpack(dtype, dx.to_host<uint8_t>()), rnd(b.grad_xp), T, H, dtype, false);
      compare("mlp grad_w_gate_up", moekit::test::unpack(dtype, dwgu.to_host<uint8_t>()),
              rnd(layout(b.grad_w_gate_up, H, NU)), H, NU, dtype, false);
      compare("mlp grad_w_down", moekit::test::unpack(dtype, dwd.to_host<uint8_t>()),
              rnd(layout(b.grad_w_down, I, H)), I, H, dtype, false);
      if (biases) {
        compare("mlp grad_b_gate_up", moekit::test::unpack(dtype, dbgu.to_host<uint8_t>()), rnd(b.grad_b_gate_up),
                1, NU, dtype, false);
        compare("mlp grad_b_down", moekit::test::unpack(dtype, dbd.to_host<uint8_t>()), rnd(b.grad_b_down), 1, H,
                dtype, false);
      } else {
        // Bias gradients not requested: untouched.
        REQUIRE(moekit::test::still_poisoned(dbgu));
        REQUIRE(moekit::test::still_poisoned(dbd));
      }
    }
}

}  // namespace

TEST_CASE("dense MLP forward and backward against the reference", "[gpu][experts][mlp]") {
  Stream stream;
  MlpHandle handle;
  uint64_t salt = 0x700;
  for (moekit_dtype_t dtype : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F16, MOEKIT_DTYPE_F32}) {
    for (const ActCase& a : kActs) {
      for (int v = 0; v < 2; ++v)
        check_mlp(handle.h, a, v == 1, v == 1, v == 1, dtype, 77 + 50 * v, 64, 40, stream.s, ++salt);
    }
  }
  check_mlp(handle.h, kActs[0], false, false, true, MOEKIT_DTYPE_BF16, 1, 8, 8, stream.s, ++salt);
  check_mlp(handle.h, kActs[2], false, true, true, MOEKIT_DTYPE_BF16, 3001, 128, 200, stream.s, ++salt);
}

TEST_CASE("dense MLP: T = 0 and graph capture", "[gpu][experts][mlp]") {
  Stream stream;
  moekit_mlp_config_t c;
  MOEKIT_REQUIRE_OK(moekit_mlp_config_init(&c, sizeof(c)));
  c.hidden = 64;
  c.inter = 32;
  const int H = 64, I = 32, NU = 64;
  auto rng = moekit::test::make_rng(0x800);
  DeviceBuffer wgu = upload(pack_d(MOEKIT_DTYPE_BF16, moekit::test::experts::normal_vec(rng, H * NU, 0.1, MOEKIT_DTYPE_BF16)));
  DeviceBuffer wd = upload(pack_d(MOEKIT_DTYPE_BF16, moekit::test::experts::normal_vec(rng, I * H, 0.1, MOEKIT_DTYPE_BF16)));
  DeviceBuffer bgu(NU * 2), bd(H * 2), dwgu(H * NU * 2), dwd(I * H * 2), dbgu(NU * 2), dbd(H * 2);
  bgu.zero();
  bd.zero();

  SECTION("T = 0 writes zero weight and bias gradients") {
    MlpHandle handle;
    for (Mode mode : {Mode::kEager, Mode::kGraph}) {
      INFO(mode_name(mode));
      for (DeviceBuffer* b : {&dwgu, &dwd, &dbgu, &dbd}) b->poison();
      run_on(stream.s, mode, [&] {
        moekit_status_t st = moekit_mlp_forward(handle.h, &c, 0, nullptr, wgu.get(), nullptr, wd.get(), nullptr,
                                                nullptr, nullptr, nullptr, 0, stream.s);
        if (st == MOEKIT_STATUS_SUCCESS)
          st = moekit_mlp_backward(handle.h, &c, 0, nullptr, wgu.get(), bgu.get(), wd.get(), bd.get(), nullptr,
                                   nullptr, nullptr, dwgu.get(), dbgu.get(), dwd.get(), dbd.get(), nullptr, 0,
                                   stream.s);
        return st;
      });
      for (DeviceBuffer* b : {&dwgu, &dwd, &dbgu, &dbd}) REQUIRE(all_bytes(b->to_host<uint8_t>(), 0, b->bytes(), 0));
    }
  }

  SECTION("forward + backward captured in a graph, also with a fresh handle, equal eager results") {
    const int64_t T = 300;
    DeviceBuffer x = upload(pack_d(MOEKIT_DTYPE_BF16, moekit::test::experts::normal_vec(rng, T * H, 1.0, MOEKIT_DTYPE_BF16)));
    DeviceBuffer dy = upload(pack_d(MOEKIT_DTYPE_BF16, moekit::test::experts::normal_vec(rng, T * H, 1.0, MOEKIT_DTYPE_BF16)));
    size_t fb = 0, bb = 0;
    MOEKIT_REQUIRE_OK(moekit_mlp_forward_workspace_size(&c, T, &fb));
    MOEKIT_REQUIRE_OK(moekit_mlp_backward_workspace_size(&c, T, 1, &bb));
    DeviceBuffer fws(fb), bws(bb);
    auto run = [&](moekit_mlp_handle_t h, DeviceBuffer& y, DeviceBuffer& u, DeviceBuffer& dx) {
      const moekit_status_t a = moekit_mlp_forward(h, &c, T, x.get(), wgu.get(), bgu.get(), wd.get(), bd.get(),
                                                   u.get(), y.get(), fws.get(), fb, stream.s);
      const moekit_status_t b = moekit_mlp_backward(h, &c, T, x.get(), wgu.get(), bgu.get(), wd.get(), bd.get(),
                                                    u.get(), dy.get(), dx.get(), dwgu.get(), dbgu.get(), dwd.get(),
                                                    dbd.get(), bws.get(), bb, stream.s);
      return a != MOEKIT_STATUS_SUCCESS ? a : b;
    };
    // The weight and bias gradients of the run that just finished (then poisoned for the next).
    auto take_grads = [&] {
      std::vector<uint8_t> raw;
      for (DeviceBuffer* b : {&dwgu, &dwd, &dbgu, &dbd}) {
        const auto h = b->to_host<uint8_t>();
        raw.insert(raw.end(), h.begin(), h.end());
        b->poison();
      }
      return raw;
    };
    for (int fresh = 0; fresh < 2; ++fresh) {
      INFO((fresh ? "fresh handle (plans created inside the capture)" : "warm handle"));
      MlpHandle handle;
      DeviceBuffer y1(T * H * 2), u1(T * NU * 2), dx1(T * H * 2), y2(T * H * 2), u2(T * NU * 2), dx2(T * H * 2);
      for (DeviceBuffer* b : {&y1, &u1, &dx1, &y2, &u2, &dx2, &dwgu, &dwd, &dbgu, &dbd}) b->poison();
      std::vector<uint8_t> eager_grads, graph_grads;
      if (!fresh) {
        run_on(stream.s, Mode::kEager, [&] { return run(handle.h, y1, u1, dx1); });
        eager_grads = take_grads();
      }
      run_on(stream.s, Mode::kGraph, [&] { return run(handle.h, y2, u2, dx2); });
      graph_grads = take_grads();
      if (fresh) {
        run_on(stream.s, Mode::kEager, [&] { return run(handle.h, y1, u1, dx1); });
        eager_grads = take_grads();
      }
      require_rows_written("y", y1, MOEKIT_DTYPE_BF16, T, T, H);
      require_rows_written("u", u1, MOEKIT_DTYPE_BF16, T, T, NU);
      require_rows_written("grad_x", dx1, MOEKIT_DTYPE_BF16, T, T, H);
      REQUIRE(y1.to_host<uint8_t>() == y2.to_host<uint8_t>());
      REQUIRE(u1.to_host<uint8_t>() == u2.to_host<uint8_t>());
      REQUIRE(dx1.to_host<uint8_t>() == dx2.to_host<uint8_t>());
      REQUIRE(eager_grads == graph_grads);
    }
  }
}
