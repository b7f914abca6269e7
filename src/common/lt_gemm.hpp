// Dense GEMMs on cuBLASLt, shared by the dense MLP (shared experts) and the layer's router
// projection: a cuBLASLt handle and a cache of matmul plans keyed by shape, so that after the first
// call of a shape a GEMM is one cublasLtMatmul on the caller's stream (host work only: capturable).
// Deterministic: fp32 compute (fp32 inputs never run as TF32), a fixed cuBLASLt workspace (so the
// algorithm, and therefore the bits, never depend on the caller's buffer), no in-place split-K
// reduction, one stream.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "moekit/status.h"

namespace moekit {

// cuBLASLt workspace every GEMM gets, carved from the caller's workspace.
constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;

// One column-major GEMM: D[m, n] = op(A) op(B) (+ bias[m] broadcast over n, bias of D's type).
struct Gemm {
  cudaDataType_t in;
  cudaDataType_t out;
  cublasOperation_t op_a;
  cublasOperation_t op_b;
  int64_t m, n, k, lda, ldb, ldd;
  const void* a;
  const void* b;
  void* d;
  const void* bias;
};

class LtGemm {
 public:
  LtGemm() = default;
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Creates the cuBLASLt handle (not graph-safe; once, before any run).
  moekit_status_t create();
  // Enqueues D = op(A) op(B) (+ bias) on stream; lt_workspace holds kLtWorkspaceBytes.
  moekit_status_t run(const Gemm& gemm, void* lt_workspace, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  // (in, out, op a, op b, m, n, k, lda, ldb, ldd, has bias)
  using Key = std::tuple<int, int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int>;
  moekit_status_t make_plan(const Gemm& gemm, Plan* plan);
  static void destroy_plan(Plan& plan);

  cublasLtHandle_t lt_ = nullptr;
  std::mutex mutex_;  // serialises plan lookups and the per-call bias pointer
  std::map<Key, Plan> plans_;
};

// cuBLASLt's type of a moekit_dtype_t value.
cudaDataType_t cuda_type(int32_t dtype);

}  // namespace moekit
