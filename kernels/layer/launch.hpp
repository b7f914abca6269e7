// Launchers of the layer family's glue kernels (kernels/layer/glue.cu): plain C++ declarations so
// that the host tier (src/layer) can include them. Each launches on the given stream and returns
// cudaPeekAtLastError() (or cudaErrorInvalidValue for an unknown dtype). Arguments were validated
// by the caller: H is a multiple of 8 and every [.., H] pointer is 16-byte aligned.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/status.h"

namespace moekit::kernels::layer {

// Shared-expert add: y_t = round(y_t + g_t s_t), with g_t = sigmoid(x_t . w_g) (the dot product in
// fp32, written to gate_logit[t]) when gate_weight is given, g_t = 1 otherwise.
//   x [T, H], gate_weight [H] or nullptr, s [T, H], y [T, H] in/out, gate_logit [T] (with the gate).
cudaError_t launch_shared_add(moekit_dtype_t dtype, int64_t num_tokens, int32_t hidden, const void* x,
                              const void* gate_weight, const void* s, void* y, float* gate_logit,
                              cudaStream_t stream);

// Shared-gate backward: g = sigmoid(gate_logit[t]);
//   grad_s[t] = round(g dy_t)                         [T, H]
//   grad_gate_logit[t] = <dy_t, s_t> g (1 - g)         [T] fp32
cudaError_t launch_shared_gate_backward(moekit_dtype_t dtype, int64_t num_tokens, int32_t hidden,
                                        const void* grad_y, const void* s, const float* gate_logit,
                                        void* grad_s, float* grad_gate_logit, cudaStream_t stream);

// Column sums: out[c] = round(sum_r scale_r in[r, c]) over r < rows in ascending order within each
// of column_sum_splits(rows) contiguous row splits, the splits then summed in order (scale = 1 when
// row_scale is nullptr). in: [rows, ld] of in_dtype (cols <= ld); out: [cols] of out_dtype;
// partial: column_sum_partial_floats(rows, cols) fp32 (nullptr when that is 0).
cudaError_t launch_column_sum(moekit_dtype_t in_dtype, moekit_dtype_t out_dtype, int64_t rows, int32_t cols,
                              const void* in, int64_t ld, const float* row_scale, float* partial, void* out,
                              cudaStream_t stream);

// The sum into dx: dx = round(dx + dx_shared + grad_gate_logit[t] w_g + dx_router), each optional
// term skipped when its pointer is nullptr (grad_gate_logit and gate_weight come together).
//   dx [T, H] in/out, dx_shared [T, H], gate_weight [H], dx_router [T, H] fp32.
cudaError_t launch_dx_sum(moekit_dtype_t dtype, int64_t num_tokens, int32_t hidden, void* dx,
                          const void* dx_shared, const float* grad_gate_logit, const void* gate_weight,
                          const float* dx_router, cudaStream_t stream);

// dst[i] = round(src[i]) for i < n, between any two dtypes.
cudaError_t launch_convert(moekit_dtype_t src_dtype, moekit_dtype_t dst_dtype, int64_t n, const void* src,
                           void* dst, cudaStream_t stream);

// logits[t, e] += bias[e] for t < T, e < E (fp32 logits with row stride ld, bias of bias_dtype).
cudaError_t launch_add_row_bias(int64_t num_tokens, int32_t num_experts, int64_t ld, float* logits,
                                moekit_dtype_t bias_dtype, const void* bias, cudaStream_t stream);

// dst[i] += src[i] for i < n (int32; the load accumulation).
cudaError_t launch_add_int32(int32_t n, const int32_t* src, int32_t* dst, cudaStream_t stream);

}  // namespace moekit::kernels::layer
