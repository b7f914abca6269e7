#include "src/experts/experts_grouped.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels/experts/grouped_gemm.hpp"
#include "src/common/dtype.hpp"
#include "src/common/error.hpp"
#include "src/common/workspace.hpp"
#include "src/experts/experts_config.hpp"

namespace moekit::experts {
namespace {

namespace kx = moekit::kernels::experts;

// The stream-K tail's workspace of the sm_90a GEMMs (kx::kStreamKSlots; StreamKTail in
// grouped_problem.cuh): partial slots and their flags, shared by the GEMMs of one call, which run
// in turn and each leave the flags zero.
struct StreamKWorkspace {
  float* partials = nullptr;
  int* flags = nullptr;
  int slots = 0;
};

// Slots for the forward's two GEMMs of a bf16/f16 config with R rows (0 for fp32, which runs the
// SIMT kernel): gate-up N = NU, K = H; down N = H, K = I.
int stream_k_slots(const moekit_experts_config_t& c, int64_t R, int nu) {
  if (c.dtype == MOEKIT_DTYPE_F32) return 0;
  return std::max(kx::stream_k_slots(R, c.num_experts, nu, c.hidden),
                  kx::stream_k_slots(R, c.num_experts, c.hidden, c.inter));
}

template <class Carver>
StreamKWorkspace carve_stream_k(Carver& ws, int slots) {
  StreamKWorkspace k;
  k.slots = slots;
  k.partials = ws.template take<float>(static_cast<size_t>(slots) * kx::kStreamKSlotFloats, "stream_k_partials");
  k.flags = ws.template take<int>(static_cast<size_t>(slots) * kx::kStreamKSlotFlags, "stream_k_flags");
  return k;
}

// MOEKIT_SM90_STREAMK=0 runs every tile whole (A/B of whole calls; read once per process). The
// workspace size does not depend on it.
bool stream_k_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("MOEKIT_SM90_STREAMK");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on;
}

// The part of the carved workspace a call hands its GEMMs: none on the sm_80 path or with
// MOEKIT_SM90_STREAMK=0.
StreamKWorkspace stream_k_for(const StreamKWorkspace& carved, kx::GemmPath path) {
  return path == kx::kGemmPathSm90 && stream_k_enabled() ? carved : StreamKWorkspace{};
}

// Zeroes the tail's flags before the call's first GEMM (stream-ordered, graph-capturable).
cudaError_t arm_stream_k(const StreamKWorkspace& k, cudaStream_t stream) {
  if (k.slots == 0) return cudaSuccess;
  return cudaMemsetAsync(k.flags, 0, static_cast<size_t>(k.slots) * kx::kStreamKSlotFlags * sizeof(int), stream);
}
void use_stream_k(kx::GroupedGemmProblem* p, const StreamKWorkspace& k) {
  p->sk_partials = k.partials;
  p->sk_flags = k.flags;
  p->sk_slots = k.slots;
}

// Forward: h [R, I] between the two GEMMs, and the stream-K tail's workspace.
struct ForwardLayout {
  void* h = nullptr;
  StreamKWorkspace sk;
};

template <class Carver>
ForwardLayout carve_forward(Carver& ws, const moekit_experts_config_t& c, int64_t R) {
  ForwardLayout l;
  l.h = ws.template take<unsigned char>(static_cast<size_t>(R) * c.inter * dtype_bytes(c.dtype), "h");
  const ActivationSpec spec = activation_spec(c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
  l.sk = carve_stream_k(ws, stream_k_slots(c, R, spec.nu(c.inter)));
  return l;
}

struct BackwardPlan {
  int nu = 0;
  int dp_tiles = 0;          // columns of dp_partial
  int splits_w_down = 1;     // row splits of dW_down
  int splits_w_gate_up = 1;  // row splits of dW_gu
  int splits_b_gate_up = 1;  // row splits of db_gu
  int splits_b_down = 1;     // row splits of db_down
  size_t scratch_floats = 0; // the largest split partial, reused by each pass in turn
};

BackwardPlan plan_backward(const moekit_experts_config_t& c, int64_t R) {
  const auto dtype = static_cast<moekit_dtype_t>(c.dtype);
  const ActivationSpec spec = activation_spec(c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
  BackwardPlan p;
  const int E = c.num_experts, H = c.hidden, I = c.inter;
  p.nu = spec.nu(I);
  p.dp_tiles = kx::grouped_tiles_n(dtype, I);
  p.splits_w_down = kx::grouped_wgrad_splits(dtype, E, I, H, R);
  p.splits_w_gate_up = kx::grouped_wgrad_splits(dtype, E, H, p.nu, R);
  p.splits_b_gate_up = kx::column_sum_splits(E, p.nu, R);
  p.splits_b_down = kx::column_sum_splits(E, H, R);
  auto need = [&](int splits, size_t per_split) {
    if (splits > 1) p.scratch_floats = std::max(p.scratch_floats, static_cast<size_t>(splits) * per_split);
  };
  need(p.splits_w_down, static_cast<size_t>(E) * I * H);
  need(p.splits_w_gate_up, static_cast<size_t>(E) * H * p.nu);
  need(p.splits_b_gate_up, static_cast<size_t>(E) * p.nu);
  need(p.splits_b_down, static_cast<size_t>(E) * H);
  return p;
}

struct BackwardLayout {
  void* u = nullptr;        // recomputed u [R, NU] (only without a saved u)
  void* du = nullptr;       // [R, NU]
  void* h = nullptr;        // h' [R, I]
  float* dp_partial = nullptr;  // [R, dp_tiles]
  float* scratch = nullptr;     // split partials
};

template <class Carver>
BackwardLayout carve_backward(Carver& ws, const moekit_experts_config_t& c, int64_t R, bool has_saved_u,
                              const BackwardPlan& p) {
  const size_t es = dtype_bytes(c.dtype);
  BackwardLayout l;
  if (!has_saved_u) l.u = ws.template take<unsigned char>(static_cast<size_t>(R) * p.nu * es, "u");
  l.du = ws.template take<unsigned char>(static_cast<size_t>(R) * p.nu * es, "du");
  l.h = ws.template take<unsigned char>(static_cast<size_t>(R) * c.inter * es, "h_prime");
  l.dp_partial = ws.template take<float>(static_cast<size_t>(R) * p.dp_tiles, "dp_partial");
  l.scratch = ws.template take<float>(p.scratch_floats, "split_partials");
  return l;
}

// Device facts every call checks, read once per device (attribute queries, no synchronisation).
struct DeviceFacts {
  int major = 0;
  int minor = 0;
  int smem_optin = 0;
};

moekit_status_t device_facts(int device, DeviceFacts* out) {
  constexpr int kCached = 64;
  static std::atomic<uint64_t> cache[kCached];  // 0: unknown; else 1 << 63 | major << 40 | minor << 32 | optin
  if (device >= 0 && device < kCached) {
    const uint64_t v = cache[device].load(std::memory_order_relaxed);
    if (v != 0) {
      out->major = static_cast<int>((v >> 40) & 0xff);
      out->minor = static_cast<int>((v >> 32) & 0xff);
      out->smem_optin = static_cast<int>(v & 0xffffffffu);
      return MOEKIT_STATUS_SUCCESS;
    }
  }
  DeviceFacts f;
  MOEKIT_CUDA_TRY(cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, device),
                  "querying the compute capability");
  MOEKIT_CUDA_TRY(cudaDeviceGetAttribute(&f.minor, cudaDevAttrComputeCapabilityMinor, device),
                  "querying the compute capability");
  MOEKIT_CUDA_TRY(cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                  "querying the shared-memory limit");
  if (device >= 0 && device < kCached)
    cache[device].store((uint64_t(1) << 63) | (static_cast<uint64_t>(f.major & 0xff) << 40) |
                            (static_cast<uint64_t>(f.minor & 0xff) << 32) | static_cast<uint32_t>(f.smem_optin),
                        std::memory_order_relaxed);
  *out = f;
  return MOEKIT_STATUS_SUCCESS;
}

kx::GroupedGemmProblem axis_m_problem(const moekit_experts_config_t& c, int64_t R, const int32_t* offsets,
                                      const void* a, int64_t lda, int k, const void* b, int64_t ldb,
                                      int64_t b_group_stride, bool b_nk, int n) {
  kx::GroupedGemmProblem p{};
  p.axis = kx::kAxisM;
  p.num_groups = c.num_experts;
  p.offsets = offsets;
  p.max_rows = R;
  p.m = 0;
  p.n = n;
  p.k = k;
  p.a = a;
  p.lda = lda;
  p.b = b;
  p.ldb = ldb;
  p.b_group_stride = b_group_stride;
  p.b_nk = b_nk ? 1 : 0;
  p.gate_up_half = 0;
  p.splits = 1;
  return p;
}

kx::GroupedGemmProblem axis_k_problem(const moekit_experts_config_t& c, int64_t R, const int32_t* offsets,
                                      const void* x, int m, const void* y, int n, int splits) {
  kx::GroupedGemmProblem p{};
  p.axis = kx::kAxisK;
  p.num_groups = c.num_experts;
  p.offsets = offsets;
  p.max_rows = R;
  p.m = m;
  p.n = n;
  p.k = 0;
  p.a = x;
  p.lda = m;
  p.b = y;
  p.ldb = n;
  p.b_group_stride = 0;
  p.b_nk = 0;
  p.gate_up_half = 0;
  p.splits = splits;
  return p;
}

// u = xp W_gu (+ b) with the gate-up epilogue: h (optional) and/or round(u) (optional).
// sk: the stream-K tail's workspace (armed by the caller; none: no tail).
moekit_status_t run_gate_up(const moekit_experts_config_t& c, kx::GemmPath path, const ActivationSpec& spec,
                            int64_t R, const int32_t* offsets, const void* xp, const float* row_weights,
                            const void* w_gate_up, const void* b_gate_up, void* u_out, void* h,
                            const StreamKWorkspace& sk, cudaStream_t stream) {
  const int H = c.hidden, I = c.inter, NU = spec.nu(I);
  kx::GroupedGemmProblem p = axis_m_problem(c, R, offsets, xp, H, H, w_gate_up, NU,
                                            static_cast<int64_t>(H) * NU, false, NU);
  p.gate_up_half = spec.gated && !spec.interleaved ? I : 0;
  use_stream_k(&p, sk);
  kx::EpilogueParams ep;
  ep.c = h;
  ep.ldc = I;
  ep.bias = b_gate_up;
  ep.bias_group_stride = NU;
  ep.row_weights = row_weights;
  ep.u = u_out;
  ep.ldu = NU;
  ep.act = spec.act;
  ep.interleaved = spec.interleaved ? 1 : 0;
  ep.inter = I;
  ep.weight_after_down = c.weight_after_down ? 1 : 0;
  MOEKIT_CUDA_TRY(kx::launch_grouped_gemm(static_cast<moekit_dtype_t>(c.dtype), p,
                                          spec.gated ? kx::kEpiGateUp : kx::kEpiRelu2, ep, stream, path),
                  "launching the gate-up grouped GEMM");
  return MOEKIT_STATUS_SUCCESS;
}

// Weight gradient C_g = X_g^T Y_g [M, N] into `out` (with a split pass when the plan asks for it).
moekit_status_t run_wgrad(const moekit_experts_config_t& c, kx::GemmPath path, int64_t R, const int32_t* offsets,
                          const void* x, int m, const void* y, int n, int splits, float* scratch, void* out,
                          const char* what, cudaStream_t stream) {
  const auto dtype = static_cast<moekit_dtype_t>(c.dtype);
  const kx::GroupedGemmProblem p = axis_k_problem(c, R, offsets, x, m, y, n, splits);
  kx::EpilogueParams ep;
  ep.c = out;
  ep.split_out = scratch;
  MOEKIT_CUDA_TRY(kx::launch_grouped_gemm(dtype, p, kx::kEpiWgrad, ep, stream, path), what);
  if (splits > 1)
    MOEKIT_CUDA_TRY(kx::launch_split_sum(dtype, scratch, splits, static_cast<int64_t>(c.num_experts) * m * n, out,
                                         stream),
                    what);
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace

size_t forward_workspace_bytes(const moekit_experts_config_t& c, int64_t max_rows) {
  WorkspaceCarver ws(nullptr);
  carve_forward(ws, c, max_rows);
  return ws.bytes();
}

size_t backward_workspace_bytes(const moekit_experts_config_t& c, int64_t max_rows, bool has_saved_u) {
  WorkspaceCarver ws(nullptr);
  carve_backward(ws, c, max_rows, has_saved_u, plan_backward(c, max_rows));
  return ws.bytes();
}

// check_device, and the kernels the bf16/f16 GEMMs of this config run on, from the same device
// facts: an explicit SM90 vetted here; AUTO takes the sm_90a path wherever it may run (a build with
// the sm_90a objects, compute capability 9.0, its shared memory fits): measured 2.2-2.5x the sm_80
// path's forward and 1.6-1.8x its forward+backward on an H200 (docs/experts.md); else sm_80.
static moekit_status_t vet_device(const moekit_experts_config_t& c, kx::GemmPath* path) {
  int device = 0;
  MOEKIT_CUDA_TRY(cudaGetDevice(&device), "querying the current device");
  DeviceFacts facts;
  MOEKIT_TRY(device_facts(device, &facts));
  const int major = facts.major, optin = facts.smem_optin;
  // What the sm_90a path needs: its objects in this build, compute capability 9.0, its shared memory.
  const bool sm90_built = kernels::experts::grouped_sm90_built();
  const bool sm90_device = facts.major == 9 && facts.minor == 0;
  const size_t need90 = kernels::experts::grouped_sm90_smem_bytes(c.num_experts);
  const bool sm90_fits = need90 <= static_cast<size_t>(optin);
  if (c.gemm_path == MOEKIT_GEMM_PATH_SM90) {
    if (!sm90_built)
      return fail(MOEKIT_STATUS_UNSUPPORTED,
                  "config->gemm_path = MOEKIT_GEMM_PATH_SM90, but this build has no sm_90a kernels (configure "
                  "with gpu_archs containing 90)");
    if (!sm90_device)
      return fail(MOEKIT_STATUS_UNSUPPORTED,
                  "config->gemm_path = MOEKIT_GEMM_PATH_SM90 needs compute capability 9.0 (device %d is %d.%d)",
                  device, facts.major, facts.minor);
    if (!sm90_fits)
      return fail(MOEKIT_STATUS_NOT_AVAILABLE,
                  "config->num_experts = %d needs %zu bytes of shared memory per block on the sm_90a path; device "
                  "%d offers %d",
                  c.num_experts, need90, device, optin);
  }
  if (major < 8)
    return fail(MOEKIT_STATUS_NOT_AVAILABLE, "the grouped experts need compute capability 8.0 or newer (device %d is %d.x)",
                device, major);
  const size_t need = kernels::experts::grouped_max_smem_bytes(static_cast<moekit_dtype_t>(c.dtype), c.num_experts);
  if (need > static_cast<size_t>(optin))
    return fail(MOEKIT_STATUS_NOT_AVAILABLE,
                "config->num_experts = %d needs %zu bytes of shared memory per block; device %d offers %d",
                c.num_experts, need, device, optin);
  const bool sm90_runs = sm90_built && sm90_device && sm90_fits;
  *path = c.gemm_path == MOEKIT_GEMM_PATH_SM90 || (c.gemm_path == MOEKIT_GEMM_PATH_AUTO && sm90_runs)
              ? kx::kGemmPathSm90
              : kx::kGemmPathSm80;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t check_device(const moekit_experts_config_t& c) {
  kx::GemmPath path;
  return vet_device(c, &path);
}

moekit_status_t forward(const moekit_experts_config_t& c, const ForwardArgs& a, void* workspace,
                        cudaStream_t stream) {
  const int64_t R = a.max_rows;
  if (R == 0) return MOEKIT_STATUS_SUCCESS;
  kx::GemmPath path;
  MOEKIT_TRY(vet_device(c, &path));
  const auto dtype = static_cast<moekit_dtype_t>(c.dtype);
  const ActivationSpec spec = activation_spec(c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
  const int H = c.hidden, I = c.inter;
  WorkspaceCarver ws(workspace);
  const ForwardLayout l = carve_forward(ws, c, R);

  const StreamKWorkspace sk = stream_k_for(l.sk, path);
  MOEKIT_CUDA_TRY(arm_stream_k(sk, stream), "zeroing the stream-K flags");
  MOEKIT_TRY(run_gate_up(c, path, spec, R, a.expert_offsets, a.xp, a.row_weights, a.w_gate_up, a.b_gate_up, a.u_out,
                         l.h, sk, stream));

  kx::GroupedGemmProblem p = axis_m_problem(c, R, a.expert_offsets, l.h, I, I, a.w_down, H,
                                            static_cast<int64_t>(I) * H, false, H);
  use_stream_k(&p, sk);
  kx::EpilogueParams ep;
  ep.c = a.out;
  ep.ldc = H;
  ep.bias = a.b_down;
  ep.bias_group_stride = H;
  ep.row_weights = a.row_weights;
  ep.weight_after_down = c.weight_after_down ? 1 : 0;
  MOEKIT_CUDA_TRY(kx::launch_grouped_gemm(dtype, p, kx::kEpiStore, ep, stream, path),
                  "launching the down grouped GEMM");
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t backward(const moekit_experts_config_t& c, const BackwardArgs& a, void* workspace,
                         cudaStream_t stream) {
  const int64_t R = a.max_rows;
  kx::GemmPath path;
  MOEKIT_TRY(vet_device(c, &path));
  const auto dtype = static_cast<moekit_dtype_t>(c.dtype);
  const ActivationSpec spec = activation_spec(c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
  const int E = c.num_experts, H = c.hidden, I = c.inter, NU = spec.nu(I);
  const BackwardPlan plan = plan_backward(c, R);
  WorkspaceCarver ws(workspace);
  const BackwardLayout l = carve_backward(ws, c, R, a.u != nullptr, plan);

  const bool need_du = a.grad_xp || a.grad_w_gate_up || a.grad_b_gate_up || a.grad_row_weights || a.grad_w_down;
  if (R > 0 && need_du) {
    const void* u = a.u;
    if (!u) {
      MOEKIT_TRY(run_gate_up(c, path, spec, R, a.expert_offsets, a.xp, a.row_weights, a.w_gate_up, a.b_gate_up, l.u,
                             nullptr, StreamKWorkspace{}, stream));
      u = l.u;
    }
    // G = dout W_down^T over h columns, with the activation backward in the epilogue.
    const kx::GroupedGemmProblem p = axis_m_problem(c, R, a.expert_offsets, a.grad_out, H, H, a.w_down, H,
                                                    static_cast<int64_t>(I) * H, true, I);
    kx::EpilogueParams ep;
    ep.c = l.du;
    ep.ldc = NU;
    ep.row_weights = a.row_weights;
    ep.u = const_cast<void*>(u);
    ep.ldu = NU;
    ep.h = l.h;
    ep.ldh = I;
    ep.dp_partial = l.dp_partial;
    ep.ld_dp = plan.dp_tiles;
    ep.act = spec.act;
    ep.interleaved = spec.interleaved ? 1 : 0;
    ep.inter = I;
    MOEKIT_CUDA_TRY(kx::launch_grouped_gemm(dtype, p, kx::kEpiBwdAct, ep, stream, path),
                    "launching the down-projection dgrad grouped GEMM");
  }
  if (a.grad_row_weights && R > 0)
    MOEKIT_CUDA_TRY(kx::launch_dp_finish(dtype, E, a.expert_offsets, R, l.dp_partial, plan.dp_tiles, a.grad_out,
                                         a.b_down, H, a.grad_row_weights, stream),
                    "launching the routing-weight gradient");
  if (a.grad_xp && R > 0) {
    const kx::GroupedGemmProblem p = axis_m_problem(c, R, a.expert_offsets, l.du, NU, NU, a.w_gate_up, NU,
                                                    static_cast<int64_t>(H) * NU, true, H);
    kx::EpilogueParams ep;
    ep.c = a.grad_xp;
    ep.ldc = H;
    MOEKIT_CUDA_TRY(kx::launch_grouped_gemm(dtype, p, kx::kEpiStore, ep, stream, path),
                    "launching the gate-up dgrad grouped GEMM");
  }
  if (a.grad_w_down)
    MOEKIT_TRY(run_wgrad(c, path, R, a.expert_offsets, l.h, I, a.grad_out, H, plan.splits_w_down, l.scratch,
                         a.grad_w_down, "launching the down-projection weight gradient", stream));
  if (a.grad_w_gate_up)
    MOEKIT_TRY(run_wgrad(c, path, R, a.expert_offsets, a.xp, H, l.du, NU, plan.splits_w_gate_up, l.scratch,
                         a.grad_w_gate_up, "launching the gate-up weight gradient", stream));
  if (a.grad_b_gate_up)
    MOEKIT_CUDA_TRY(kx::launch_column_sums(dtype, E, a.expert_offsets, R, l.du, NU, nullptr, plan.splits_b_gate_up,
                                           l.scratch, a.grad_b_gate_up, stream),
                    "launching the gate-up bias gradient");
  if (a.grad_b_down)
    MOEKIT_CUDA_TRY(kx::launch_column_sums(dtype, E, a.expert_offsets, R, a.grad_out, H, a.row_weights,
                                           plan.splits_b_down, l.scratch, a.grad_b_down, stream),
                    "launching the down bias gradient");
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit::experts
