#include "src/common/lt_gemm.hpp"

#include "src/common/error.hpp"

namespace moekit {
namespace {

moekit_status_t fail_cublas(cublasStatus_t status, const char* what) {
  return fail(MOEKIT_STATUS_CUBLAS_ERROR, "%s: cuBLASLt error %s (%s)", what, cublasLtGetStatusName(status),
              cublasLtGetStatusString(status));
}

#define MOEKIT_CUBLAS_TRY(expr, what)                                                         \
  do {                                                                                       \
    const cublasStatus_t moekit_cublas_status_ = (expr);                                      \
    if (moekit_cublas_status_ != CUBLAS_STATUS_SUCCESS) return fail_cublas(moekit_cublas_status_, what); \
  } while (0)

}  // namespace

cudaDataType_t cuda_type(int32_t dtype) {
  switch (dtype) {
    case MOEKIT_DTYPE_F16: return CUDA_R_16F;
    case MOEKIT_DTYPE_BF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

LtGemm::~LtGemm() {
  for (auto& kv : plans_) destroy_plan(kv.second);
  if (lt_) cublasLtDestroy(lt_);
}

moekit_status_t LtGemm::create() {
  MOEKIT_CUBLAS_TRY(cublasLtCreate(&lt_), "cublasLtCreate");
  return MOEKIT_STATUS_SUCCESS;
}

void LtGemm::destroy_plan(Plan& p) {
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  if (p.a) cublasLtMatrixLayoutDestroy(p.a);
  if (p.b) cublasLtMatrixLayoutDestroy(p.b);
  if (p.d) cublasLtMatrixLayoutDestroy(p.d);
  p = Plan{};
}

moekit_status_t LtGemm::make_plan(const Gemm& g, Plan* out) {
  Plan p;
  struct Guard {
    Plan* plan;
    cublasLtMatmulPreference_t pref = nullptr;
    bool keep = false;
    ~Guard() {
      if (pref) cublasLtMatmulPreferenceDestroy(pref);
      if (!keep) destroy_plan(*plan);
    }
  } guard{&p};
  const char* what = "creating a cuBLASLt matmul plan";
  // fp32 compute: fp32 inputs run as plain fp32 (never TF32), 16-bit inputs accumulate in fp32.
  MOEKIT_CUBLAS_TRY(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &g.op_a, sizeof(g.op_a)), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &g.op_b, sizeof(g.op_b)), what);
  if (g.bias) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const int32_t bias_type = g.out;
    MOEKIT_CUBLAS_TRY(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)), what);
    MOEKIT_CUBLAS_TRY(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)),
        what);
    MOEKIT_CUBLAS_TRY(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)), what);
  }
  const bool na = g.op_a == CUBLAS_OP_N, nb = g.op_b == CUBLAS_OP_N;
  MOEKIT_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p.a, g.in, na ? g.m : g.k, na ? g.k : g.m, g.lda), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p.b, g.in, nb ? g.k : g.n, nb ? g.n : g.k, g.ldb), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p.d, g.out, g.m, g.n, g.ldd), what);
  MOEKIT_CUBLAS_TRY(cublasLtMatmulPreferenceCreate(&guard.pref), what);
  const uint64_t ws = kLtWorkspaceBytes;
  // Split-K only with a separate, ordered reduction (never in place through atomics).
  const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
                           CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  const uint32_t align = 16;  // every operand is 16-byte aligned with 16-byte rows (the capi layers check)
  MOEKIT_CUBLAS_TRY(
      cublasLtMatmulPreferenceSetAttribute(guard.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
      what);
  MOEKIT_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(guard.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                        &schemes, sizeof(schemes)),
                   what);
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    MOEKIT_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(guard.pref, attr, &align, sizeof(align)), what);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  MOEKIT_CUBLAS_TRY(cublasLtMatmulAlgoGetHeuristic(lt_, p.desc, p.a, p.b, p.d, p.d, guard.pref, 1, &result, &found),
                   "finding a cuBLASLt algorithm");
  if (found < 1)
    return fail(MOEKIT_STATUS_CUBLAS_ERROR,
                "cuBLASLt has no algorithm for m = %lld, n = %lld, k = %lld (types %d -> %d)",
                static_cast<long long>(g.m), static_cast<long long>(g.n), static_cast<long long>(g.k),
                static_cast<int>(g.in), static_cast<int>(g.out));
  p.algo = result.algo;
  guard.keep = true;
  *out = p;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t LtGemm::run(const Gemm& g, void* lt_workspace, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Key key{static_cast<int>(g.in), static_cast<int>(g.out), static_cast<int>(g.op_a), static_cast<int>(g.op_b),
                g.m, g.n, g.k, g.lda, g.ldb, g.ldd, g.bias ? 1 : 0};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    Plan plan;
    MOEKIT_TRY(make_plan(g, &plan));
    it = plans_.emplace(key, plan).first;
  }
  Plan& p = it->second;
  if (g.bias)
    MOEKIT_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
                     "setting the bias pointer");
  const float one = 1.0f, zero = 0.0f;
  MOEKIT_CUBLAS_TRY(cublasLtMatmul(lt_, p.desc, &one, g.a, p.a, g.b, p.b, &zero, g.d, p.d, g.d, p.d, &p.algo,
                                  lt_workspace, kLtWorkspaceBytes, stream),
                   "running a cuBLASLt matmul");
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit
