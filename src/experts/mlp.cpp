#include "src/experts/mlp.hpp"

#include <cstring>
#include <new>

#include "kernels/experts/grouped_gemm.hpp"
#include "src/common/dtype.hpp"
#include "src/common/error.hpp"
#include "src/common/workspace.hpp"
#include "src/experts/experts_config.hpp"

namespace moekit::experts {
namespace {

namespace kx = moekit::kernels::experts;

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
  l.lt = ws.template take<unsigned char>(kLtWorkspaceBytes, "cublaslt");
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
  l.lt = ws.template take<unsigned char>(kLtWorkspaceBytes, "cublaslt");
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
  const moekit_status_t st = h->gemm.create();
  if (st != MOEKIT_STATUS_SUCCESS) {
    delete h;
    return st;
  }
  *handle = h;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t mlp_handle_destroy(moekit_mlp_handle_t handle) {
  if (!handle) return MOEKIT_STATUS_SUCCESS;
  delete handle;  // LtGemm's destructor releases the plans and the cuBLASLt handle
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
  MOEKIT_TRY(handle->gemm.run(forward_gemm(c, CUDA_R_32F, T, H, NU, a.x, a.w_gate_up, l.u32, nullptr), l.lt, stream));
  MOEKIT_CUDA_TRY(kx::launch_mlp_act_forward(dtype, spec.act, spec.interleaved, T, I, l.u32, a.b_gate_up, a.u_out,
                                             l.h, stream),
                  "launching the MLP activation");
  MOEKIT_TRY(handle->gemm.run(forward_gemm(c, cuda_type(c.dtype), T, I, H, l.h, a.w_down, a.out, a.b_down), l.lt, stream));
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
      MOEKIT_TRY(handle->gemm.run(forward_gemm(c, CUDA_R_32F, T, H, NU, a.x, a.w_gate_up, l.u32, nullptr), l.lt, stream));
    MOEKIT_TRY(handle->gemm.run(dgrad_gemm(c, CUDA_R_32F, T, I, H, a.grad_out, a.w_down, l.g), l.lt, stream));
    MOEKIT_CUDA_TRY(kx::launch_mlp_act_backward(dtype, spec.act, spec.interleaved, T, I, a.u, l.u32, a.b_gate_up,
                                                l.g, l.du, l.h, stream),
                    "launching the MLP activation backward");
  }
  if (a.grad_x)
    MOEKIT_TRY(handle->gemm.run(dgrad_gemm(c, cuda_type(c.dtype), T, H, NU, l.du, a.w_gate_up, a.grad_x), l.lt, stream));
  if (a.grad_w_gate_up)
    MOEKIT_TRY(handle->gemm.run(wgrad_gemm(c, T, H, NU, a.x, l.du, a.grad_w_gate_up), l.lt, stream));
  if (a.grad_w_down)
    MOEKIT_TRY(handle->gemm.run(wgrad_gemm(c, T, I, H, l.h, a.grad_out, a.grad_w_down), l.lt, stream));
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
