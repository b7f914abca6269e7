#include "src/experts/mlp.hpp"

#include <cstring>
#include <new>

#include "kernels/experts/grouped_gemm.hpp"
#include "src/common/error.hpp"
#include "src/common/workspace.hpp"
#include "src/experts/experts_config.hpp"

namespace moekit::experts {
namespace {

namespace kx = moekit::kernels::experts;

moekit_status_t fail_cublas(cublasStatus_t status, const char* what) {
  return fail(MOEKIT_STATUS_CUBLAS_ERROR, "%s: cuBLASLt error %s (%s)", what, cublasLtGetStatusName(status),
              cublasLtGetStatusString(status));
}

#define MOEKIT_CUBLAS_TRY(expr, what)                                    \
  do {                                                                   \
    const cublasStatus_t moekit_cublas_status_ = (expr);                 \
    if (moekit_cublas_status_ != CUBLAS_STATUS_SUCCESS) return fail_cublas(moekit_cublas_status_, what); \
  } while (0)

cudaDataType_t cuda_type(int32_t dtype) {
  switch (dtype) {
    case MOEKIT_DTYPE_F16: return CUDA_R_16F;
    case MOEKIT_DTYPE_BF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

size_t dtype_bytes(int32_t dtype) { return dtype == MOEKIT_DTYPE_F32 ? 4 : 2; }

// One column-major cuBLASLt GEMM: D[m, n] = op(A) op(B) (+ bias[m] broadcast over n).
struct Gemm {
  cudaDataType_t in, out;
  cublasOperation_t op_a, op_b;
  int64_t m, n, k, lda, ldb, ldd;
  const void* a;
  const void* b;
  void* d;
  const void* bias;
};

void destroy_plan(moekit_mlp_handle::Plan& p) {
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  if (p.a) cublasLtMatrixLayoutDestroy(p.a);
  if (p.b) cublasLtMatrixLayoutDestroy(p.b);
  if (p.d) cublasLtMatrixLayoutDestroy(p.d);
  p = moekit_mlp_handle::Plan{};
}

moekit_status_t make_plan(moekit_mlp_handle& h, const Gemm& g, moekit_mlp_handle::Plan* out) {
  moekit_mlp_handle::Plan p;
  struct Guard {
    moekit_mlp_handle::Plan* plan;
    cublasLtMatmulPreference_t pref = nullptr;
    bool keep = false;
    ~Guard() {
      if (pref) cublasLtMatmulPreferenceDestroy(pref);
      if (!keep) destroy_plan(*plan);
    }
  } guard{&p};
  const char* what = "creating a cuBLASLt matmul plan";
  MOEKIT_CUBLAS_TRY(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &g.op_a, sizeof(g.op_a)), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &g.op_b, sizeof(g.op_b)), what);
  if (g.bias) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const int32_t bias_type = g.out;
    MOEKIT_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
                      what);
    MOEKIT_CUBLAS_TRY(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)), what);
    MOEKIT_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
                      what);
  }
  const bool na = g.op_a == CUBLAS_OP_N, nb = g.op_b == CUBLAS_OP_N;
  MOEKIT_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p.a, g.in, na ? g.m : g.k, na ? g.k : g.m, g.lda), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p.b, g.in, nb ? g.k : g.n, nb ? g.n : g.k, g.ldb), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p.d, g.out, g.m, g.n, g.ldd), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatmulPreferenceCreate(&guard.pref), what);
  const uint64_t ws = kCublasWorkspaceBytes;
  // Split-K schemes that reduce in a separate, ordered step only.
  const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
                           CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  const uint32_t align = MOEKIT_EXPERTS_TENSOR_ALIGNMENT;
  MOEKIT_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(guard.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
                    what);
  MOEKIT_CUBLAS_TRY(
      cublasLtMatmulPreferenceSetAttribute(guard.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes)),
      what);
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    MOEKIT_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(guard.pref, attr, &align, sizeof(align)), what);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  MOEKIT_CUBLAS_TRY(
      cublasLtMatmulAlgoGetHeuristic(h.lt, p.desc, p.a, p.b, p.d, p.d, guard.pref, 1, &result, &found),
      "finding a cuBLASLt algorithm");
  if (found < 1)
    return fail(MOEKIT_STATUS_CUBLAS_ERROR, "cuBLASLt has no algorithm for m = %lld, n = %lld, k = %lld",
                static_cast<long long>(g.m), static_cast<long long>(g.n), static_cast<long long>(g.k));
  p.algo = result.algo;
  guard.keep = true;
  *out = p;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t gemm(moekit_mlp_handle& h, const Gemm& g, void* lt_workspace, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(h.mutex);
  const moekit_mlp_handle::Key key{static_cast<int>(g.in), static_cast<int>(g.out), static_cast<int>(g.op_a),
                                   static_cast<int>(g.op_b), g.m, g.n, g.k, g.lda, g.ldb, g.ldd,
                                   g.bias ? 1 : 0};
  auto it = h.plans.find(key);
  if (it == h.plans.end()) {
    moekit_mlp_handle::Plan plan;
    MOEKIT_TRY(make_plan(h, g, &plan));
    it = h.plans.emplace(key, plan).first;
  }
  moekit_mlp_handle::Plan& p = it->second;
  if (g.bias)
    MOEKIT_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
                      "setting the bias");
  const float one = 1.0f, zero = 0.0f;
  MOEKIT_CUBLAS_TRY(cublasLtMatmul(h.lt, p.desc, &one, g.a, p.a, g.b, p.b, &zero, g.d, p.d, g.d, p.d, &p.algo,
                                   lt_workspace, kCublasWorkspaceBytes, stream),
                    "running a cuBLASLt matmul");
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t check_handle(const moekit_mlp_handle& h) {
  int device = 0;
  MOEKIT_CUDA_TRY(cudaGetDevice(&device), "querying the current device");
  if (device != h.device)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT, "handle was created on device %d but device %d is current", h.device,
                device);
  return MOEKIT_STATUS_SUCCESS;
}

// Row-major C[T, N] = X[T, K] W: W is [K, N] (IN_OUT) or [N, K] (OUT_IN); in cuBLASLt's
// column-major terms C^T[N, T] = op(W) X^T.
Gemm forward_gemm(const moekit_mlp_config_t& c, cudaDataType_t out_type, int64_t T, int64_t K, int64_t N,
                  const void* x, const void* w, void* d, const void* bias) {
  const bool in_out = c.weight_layout == MOEKIT_WEIGHT_IN_OUT;
  Gemm g;
  g.in = cuda_type(c.dtype);
  g.out = out_type;
  g.op_a = in_out ? CUBLAS_OP_N : CUBLAS_OP_T;
  g.op_b = CUBLAS_OP_N;
  g.m = N;
  g.n = T;
  g.k = K;
  g.lda = in_out ? N : K;
  g.ldb = K;
  g.ldd = N;
  g.a = w;
  g.b = x;
  g.d = d;
  g.bias = bias;
  return g;
}

// Row-major dX[T, K] = dC[T, N] W^T with W logical [K, N]: dX^T[K, T] = op(W) dC^T.
Gemm dgrad_gemm(const moekit_mlp_config_t& c, cudaDataType_t out_type, int64_t T, int64_t K, int64_t N,
                const void* dc, const void* w, void* dx) {
  const bool in_out = c.weight_layout == MOEKIT_WEIGHT_IN_OUT;
  Gemm g;
  g.in = cuda_type(c.dtype);
  g.out = out_type;
  g.op_a = in_out ? CUBLAS_OP_T : CUBLAS_OP_N;
  g.op_b = CUBLAS_OP_N;
  g.m = K;
  g.n = T;
  g.k = N;
  g.lda = in_out ? N : K;
  g.ldb = N;
  g.ldd = K;
  g.a = w;
  g.b = dc;
  g.d = dx;
  g.bias = nullptr;
  return g;
}

// Weight gradient dW = X^T dC (logical [K, N]) stored like W.
Gemm wgrad_gemm(const moekit_mlp_config_t& c, int64_t T, int64_t K, int64_t N, const void* x, const void* dc,
                void* dw) {
  Gemm g;
  g.in = cuda_type(c.dtype);
  g.out = cuda_type(c.dtype);
  g.bias = nullptr;
  g.d = dw;
  g.k = T;
  if (c.weight_layout == MOEKIT_WEIGHT_IN_OUT) {
    // dW row-major [K, N] = column-major [N, K]: dW^T = dC^T X.
    g.op_a = CUBLAS_OP_N;
    g.op_b = CUBLAS_OP_T;
    g.m = N;
    g.n = K;
    g.a = dc;
    g.lda = N;
    g.b = x;
    g.ldb = K;
    g.ldd = N;
  } else {
    // dW row-major [N, K] = column-major [K, N]: X^T dC.
    g.op_a = CUBLAS_OP_N;
    g.op_b = CUBLAS_OP_T;
    g.m = K;
    g.n = N;
    g.a = x;
    g.lda = K;
    g.b = dc;
    g.ldb = N;
    g.ldd = K;
  }
  return g;
}

struct MlpForwardLayout {
  float* u32 = nullptr;
  void* h = nullptr;
  void* lt = nullptr;
};

template <class Carver>
MlpForwardLayout carve_forward(Carver& ws, const moekit_mlp_config_t& c, int64_t T) {
  MlpForwardLayout l;
  if (T == 0) return l;
  const ActivationSpec spec = activation_spec(c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
  l.u32 = ws.template take<float>(static_cast<size_t>(T) * spec.nu(c.inter), "u32");
  l.h = ws.template take<unsigned char>(static_cast<size_t>(T) * c.inter * dtype_bytes(c.dtype), "h");
  l.lt = ws.template take<unsigned char>(kCublasWorkspaceBytes, "cublaslt");
  return l;
}

struct MlpBackwardLayout {
  float* u32 = nullptr;   // recomputed u (no saved u)
  float* g = nullptr;     // G [T, I]
  void* du = nullptr;     // [T, NU]
  void* h = nullptr;      // h' [T, I]
  float* partial = nullptr;
  void* lt = nullptr;
};

int bias_splits(const moekit_mlp_config_t& c, int n, int64_t T) {
  (void)c;
  return kx::column_sum_splits(1, n, T);
}

template <class Carver>
MlpBackwardLayout carve_backward(Carver& ws, const moekit_mlp_config_t& c, int64_t T, bool has_saved_u) {
  MlpBackwardLayout l;
  if (T == 0) return l;
  const ActivationSpec spec = activation_spec(c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
  const int NU = spec.nu(c.inter);
  const size_t es = dtype_bytes(c.dtype);
  if (!has_saved_u) l.u32 = ws.template take<float>(static_cast<size_t>(T) * NU, "u32");
  l.g = ws.template take<float>(static_cast<size_t>(T) * c.inter, "grad_h");
  l.du = ws.template take<unsigned char>(static_cast<size_t>(T) * NU * es, "du");
  l.h = ws.template take<unsigned char>(static_cast<size_t>(T) * c.inter * es, "h_prime");
  size_t partial = 0;
  for (int n : {NU, c.hidden}) {
    const int s = bias_splits(c, n, T);
    if (s > 1 && static_cast<size_t>(s) * n > partial) partial = static_cast<size_t>(s) * n;
  }
  l.partial = ws.template take<float>(partial, "bias_partials");
  l.lt = ws.template take<unsigned char>(kCublasWorkspaceBytes, "cublaslt");
  return l;
}

}  // namespace

moekit_status_t mlp_handle_create(moekit_mlp_handle_t* handle) {
  auto* h = new (std::nothrow) moekit_mlp_handle();
  if (!h) return fail(MOEKIT_STATUS_OUT_OF_MEMORY, "allocating the handle failed");
  const cudaError_t err = cudaGetDevice(&h->device);
  if (err != cudaSuccess) {
    delete h;
    return fail_cuda(err, "querying the current device");
  }
  const cublasStatus_t st = cublasLtCreate(&h->lt);
  if (st != CUBLAS_STATUS_SUCCESS) {
    delete h;
    return fail_cublas(st, "cublasLtCreate");
  }
  *handle = h;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t mlp_handle_destroy(moekit_mlp_handle_t handle) {
  if (!handle) return MOEKIT_STATUS_SUCCESS;
  for (auto& kv : handle->plans) destroy_plan(kv.second);
  const cublasStatus_t st = cublasLtDestroy(handle->lt);
  delete handle;
  if (st != CUBLAS_STATUS_SUCCESS) return fail_cublas(st, "cublasLtDestroy");
  return MOEKIT_STATUS_SUCCESS;
}

size_t mlp_forward_workspace_bytes(const moekit_mlp_config_t& c, int64_t T) {
  WorkspaceCarver ws(nullptr);
  carve_forward(ws, c, T);
  return ws.bytes();
}

size_t mlp_backward_workspace_bytes(const moekit_mlp_config_t& c, int64_t T, bool has_saved_u) {
  WorkspaceCarver ws(nullptr);
  carve_backward(ws, c, T, has_saved_u);
  return ws.bytes();
}

moekit_status_t mlp_forward(moekit_mlp_handle_t handle, const moekit_mlp_config_t& c, const MlpForwardArgs& a,
                            void* workspace, cudaStream_t stream) {
  const int64_t T = a.num_tokens;
  if (T == 0) return MOEKIT_STATUS_SUCCESS;
  MOEKIT_TRY(check_handle(*handle));
  const auto dtype = static_cast<moekit_dtype_t>(c.dtype);
  const ActivationSpec spec = activation_spec(c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
  const int H = c.hidden, I = c.inter, NU = spec.nu(I);
  WorkspaceCarver ws(workspace);
  const MlpForwardLayout l = carve_forward(ws, c, T);
  MOEKIT_TRY(gemm(*handle, forward_gemm(c, CUDA_R_32F, T, H, NU, a.x, a.w_gate_up, l.u32, nullptr), l.lt, stream));
  MOEKIT_CUDA_TRY(kx::launch_mlp_act_forward(dtype, spec.act, spec.interleaved, T, I, l.u32, a.b_gate_up, a.u_out,
                                             l.h, stream),
                  "launching the MLP activation");
  MOEKIT_TRY(gemm(*handle, forward_gemm(c, cuda_type(c.dtype), T, I, H, l.h, a.w_down, a.out, a.b_down), l.lt, stream));
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t mlp_backward(moekit_mlp_handle_t handle, const moekit_mlp_config_t& c, const MlpBackwardArgs& a,
                             void* workspace, cudaStream_t stream) {
  const int64_t T = a.num_tokens;
  MOEKIT_TRY(check_handle(*handle));
  const auto dtype = static_cast<moekit_dtype_t>(c.dtype);
  const ActivationSpec spec = activation_spec(c.activation, c.gate_up_layout, c.act_alpha, c.act_limit);
  const int H = c.hidden, I = c.inter, NU = spec.nu(I);
  const size_t es = dtype_bytes(c.dtype);
  if (T == 0) {
    // Nothing flows, but gradients whose size does not depend on T are still written (zeros).
    if (a.grad_w_gate_up)
      MOEKIT_CUDA_TRY(cudaMemsetAsync(a.grad_w_gate_up, 0, static_cast<size_t>(H) * NU * es, stream), "zeroing dW_gu");
    if (a.grad_w_down)
      MOEKIT_CUDA_TRY(cudaMemsetAsync(a.grad_w_down, 0, static_cast<size_t>(I) * H * es, stream), "zeroing dW_down");
    if (a.grad_b_gate_up)
      MOEKIT_CUDA_TRY(cudaMemsetAsync(a.grad_b_gate_up, 0, static_cast<size_t>(NU) * es, stream), "zeroing db_gu");
    if (a.grad_b_down)
      MOEKIT_CUDA_TRY(cudaMemsetAsync(a.grad_b_down, 0, static_cast<size_t>(H) * es, stream), "zeroing db_down");
    return MOEKIT_STATUS_SUCCESS;
  }
  WorkspaceCarver ws(workspace);
  const MlpBackwardLayout l = carve_backward(ws, c, T, a.u != nullptr);
  const bool need_du = a.grad_x || a.grad_w_gate_up || a.grad_b_gate_up || a.grad_w_down;
  if (need_du) {
    if (!a.u)
      MOEKIT_TRY(gemm(*handle, forward_gemm(c, CUDA_R_32F, T, H, NU, a.x, a.w_gate_up, l.u32, nullptr), l.lt, stream));
    MOEKIT_TRY(gemm(*handle, dgrad_gemm(c, CUDA_R_32F, T, I, H, a.grad_out, a.w_down, l.g), l.lt, stream));
    MOEKIT_CUDA_TRY(kx::launch_mlp_act_backward(dtype, spec.act, spec.interleaved, T, I, a.u, l.u32, a.b_gate_up,
                                                l.g, l.du, l.h, stream),
                    "launching the MLP activation backward");
  }
  if (a.grad_x)
    MOEKIT_TRY(gemm(*handle, dgrad_gemm(c, cuda_type(c.dtype), T, H, NU, l.du, a.w_gate_up, a.grad_x), l.lt, stream));
  if (a.grad_w_gate_up)
    MOEKIT_TRY(gemm(*handle, wgrad_gemm(c, T, H, NU, a.x, l.du, a.grad_w_gate_up), l.lt, stream));
  if (a.grad_w_down)
    MOEKIT_TRY(gemm(*handle, wgrad_gemm(c, T, I, H, l.h, a.grad_out, a.grad_w_down), l.lt, stream));
  if (a.grad_b_gate_up)
    MOEKIT_CUDA_TRY(kx::launch_column_sums(dtype, 1, nullptr, T, l.du, NU, nullptr, bias_splits(c, NU, T), l.partial,
                                           a.grad_b_gate_up, stream),
                    "launching the gate-up bias gradient");
  if (a.grad_b_down)
    MOEKIT_CUDA_TRY(kx::launch_column_sums(dtype, 1, nullptr, T, a.grad_out, H, nullptr, bias_splits(c, H, T),
                                           l.partial, a.grad_b_down, stream),
                    "launching the down bias gradient");
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit::experts
