// The layer's glue kernels: what sits between the families' calls in moekit_layer_forward and
// moekit_layer_backward. All memory-bound, all deterministic.
//
// Maths (T tokens, H hidden, dtype storage T_, every sum in fp32, round() = RNE to the dtype):
//   shared add        y_t = round(y_t + g_t s_t),  g_t = sigmoid(z_t), z_t = sum_h x_th w_g,h
//                     (g = 1 without a gate); z_t is written to gate_logit[t].
//   gate backward     ds_t = round(g_t dy_t);  dz_t = (sum_h dy_th s_th) g_t (1 - g_t)
//                     with 1 - g computed as sigmoid(-z) (no cancellation where g saturates).
//   column sum        out_c = round(sum_r scale_r in_rc)
//   dx sum            dx = round(dx_r + dx_s + dz_t w_g + dx_router)
//   convert           dst = round(src);  row bias: logits_te += b_e (fp32);  int add: dst += src
//
// Shapes: [T, H] tensors are contiguous rows of H elements, H a multiple of 8, pointers 16-byte
// aligned (checked by capi/layer): every [.., H] access moves 8 elements at once (16 bytes for
// 16-bit types, two 16-byte halves for fp32). 64-bit element offsets throughout.
//
// Determinism: the warp-per-token dot products sum each lane's 8-element chunks in ascending order
// and then reduce with a fixed xor butterfly (a + b == b + a in IEEE, so every lane ends with the
// same bits); column sums run each split's rows in ascending order and the splits in order; the
// number of splits depends only on the row count. No atomics anywhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/common/dtype.cuh"
#include "kernels/layer/launch.hpp"
#include "kernels/layer/tuning.hpp"

namespace moekit::kernels::layer {
namespace {

// 8-element vectors: load8 / store8 (kernels/common/dtype.cuh).

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

int32_t clamp_blocks(int64_t blocks, int32_t max_blocks) {
  if (blocks < 1) return 1;
  return static_cast<int32_t>(blocks < max_blocks ? blocks : max_blocks);
}

// ---- shared add -------------------------------------------------------------------------------
// One warp per token (warp-uniform loop bounds, so the butterfly always has all 32 lanes).
template <class T, bool kGated>
__global__ void __launch_bounds__(kTokenThreads)
    shared_add_kernel(int64_t num_tokens, int32_t hidden, const T* __restrict__ x, const T* __restrict__ gate_weight,
                      const T* __restrict__ s, T* __restrict__ y, float* __restrict__ gate_logit) {
  const int lane = threadIdx.x & 31;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTokenWarpsPerBlock + threadIdx.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTokenWarpsPerBlock;
  const int chunks = hidden / 8;
  for (int64_t t = first; t < num_tokens; t += stride) {
    const int64_t row = t * hidden;
    float g = 1.0f;
    if (kGated) {
      float acc = 0.0f;
      for (int c = lane; c < chunks; c += 32) {
        float xv[8], wv[8];
        load8(x + row + 8 * c, xv);
        load8(gate_weight + 8 * c, wv);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc = fmaf(xv[j], wv[j], acc);
      }
      acc = warp_sum(acc);
      if (lane == 0) gate_logit[t] = acc;
      g = sigmoid(acc);
    }
    for (int c = lane; c < chunks; c += 32) {
      float yv[8], sv[8];
      load8(y + row + 8 * c, yv);
      load8(s + row + 8 * c, sv);
#pragma unroll
      for (int j = 0; j < 8; ++j) yv[j] = kGated ? fmaf(g, sv[j], yv[j]) : yv[j] + sv[j];
      store8(y + row + 8 * c, yv);
    }
  }
}

// ---- gate backward ----------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kTokenThreads)
    gate_backward_kernel(int64_t num_tokens, int32_t hidden, const T* __restrict__ dy, const T* __restrict__ s,
                         const float* __restrict__ gate_logit, T* __restrict__ ds, float* __restrict__ dz) {
  const int lane = threadIdx.x & 31;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTokenWarpsPerBlock + threadIdx.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTokenWarpsPerBlock;
  const int chunks = hidden / 8;
  for (int64_t t = first; t < num_tokens; t += stride) {
    const int64_t row = t * hidden;
    const float z = gate_logit[t];
    const float g = sigmoid(z);
    float acc = 0.0f;
    for (int c = lane; c < chunks; c += 32) {
      float dv[8], sv[8];
      load8(dy + row + 8 * c, dv);
      load8(s + row + 8 * c, sv);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        acc = fmaf(dv[j], sv[j], acc);
        dv[j] *= g;
      }
      store8(ds + row + 8 * c, dv);
    }
    acc = warp_sum(acc);
    if (lane == 0) dz[t] = acc * g * sigmoid(-z);
  }
}

// ---- column sums ------------------------------------------------------------------------------
template <class Tin, class Tout>
__global__ void __launch_bounds__(kColumnThreads)
    column_sum_kernel(int64_t rows, int32_t cols, const Tin* __restrict__ in, int64_t ld,
                      const float* __restrict__ row_scale, int64_t rows_per_split, float* __restrict__ partial,
                      Tout* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (c >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
  float acc = 0.0f;
  if (row_scale != nullptr) {
    for (int64_t r = r0; r < r1; ++r) acc = fmaf(row_scale[r], to_float(in[r * ld + c]), acc);
  } else {
    for (int64_t r = r0; r < r1; ++r) acc += to_float(in[r * ld + c]);
  }
  if (gridDim.y == 1) {
    out[c] = from_float<Tout>(acc);
  } else {
    partial[static_cast<int64_t>(blockIdx.y) * cols + c] = acc;
  }
}

template <class Tout>
__global__ void __launch_bounds__(kColumnThreads)
    column_sum_finish_kernel(int32_t cols, int32_t splits, const float* __restrict__ partial, Tout* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (c >= cols) return;
  float acc = 0.0f;
  for (int32_t s = 0; s < splits; ++s) acc += partial[static_cast<int64_t>(s) * cols + c];
  out[c] = from_float<Tout>(acc);
}

// ---- dx sum -----------------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kElementThreads)
    dx_sum_kernel(int64_t num_tokens, int32_t hidden, T* __restrict__ dx, const T* __restrict__ dx_shared,
                  const float* __restrict__ dz, const T* __restrict__ gate_weight,
                  const float* __restrict__ dx_router) {
  const int64_t chunks_per_row = hidden / 8;
  const int64_t total = num_tokens * chunks_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElementThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kElementThreads) {
    const int64_t t = i / chunks_per_row;
    const int64_t c = i - t * chunks_per_row;
    const int64_t off = t * hidden + 8 * c;
    float acc[8];
    load8(dx + off, acc);
    if (dx_shared != nullptr) {
      float v[8];
      load8(dx_shared + off, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += v[j];
    }
    if (dz != nullptr) {
      const float g = dz[t];
      float w[8];
      load8(gate_weight + 8 * c, w);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = fmaf(g, w[j], acc[j]);
    }
    if (dx_router != nullptr) {
      float v[8];
      load8(dx_router + off, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += v[j];
    }
    store8(dx + off, acc);
  }
}

// ---- small elementwise kernels ----------------------------------------------------------------
template <class Tin, class Tout>
__global__ void __launch_bounds__(kElementThreads)
    convert_kernel(int64_t n, const Tin* __restrict__ src, Tout* __restrict__ dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElementThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kElementThreads)
    dst[i] = from_float<Tout>(to_float(src[i]));
}

template <class Tb>
__global__ void __launch_bounds__(kElementThreads)
    add_row_bias_kernel(int64_t num_tokens, int32_t num_experts, int64_t ld, float* __restrict__ logits,
                        const Tb* __restrict__ bias) {
  const int64_t n = num_tokens * num_experts;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElementThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kElementThreads) {
    const int64_t t = i / num_experts;
    const int64_t e = i - t * num_experts;
    logits[t * ld + e] += to_float(bias[e]);
  }
}

__global__ void __launch_bounds__(kElementThreads)
    add_int32_kernel(int32_t n, const int32_t* __restrict__ src, int32_t* __restrict__ dst) {
  for (int32_t i = blockIdx.x * kElementThreads + threadIdx.x; i < n; i += gridDim.x * kElementThreads)
    dst[i] += src[i];
}

int32_t element_blocks(int64_t n) {
  return clamp_blocks((n + kElementThreads - 1) / kElementThreads, kMaxElementBlocks);
}

int32_t token_blocks(int64_t num_tokens) {
  return clamp_blocks((num_tokens + kTokenWarpsPerBlock - 1) / kTokenWarpsPerBlock, kMaxTokenBlocks);
}

}  // namespace

cudaError_t launch_shared_add(moekit_dtype_t dtype, int64_t num_tokens, int32_t hidden, const void* x,
                              const void* gate_weight, const void* s, void* y, float* gate_logit,
                              cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (gate_weight != nullptr) {
      shared_add_kernel<T, true><<<token_blocks(num_tokens), kTokenThreads, 0, stream>>>(
          num_tokens, hidden, static_cast<const T*>(x), static_cast<const T*>(gate_weight), static_cast<const T*>(s),
          static_cast<T*>(y), gate_logit);
    } else {
      shared_add_kernel<T, false><<<token_blocks(num_tokens), kTokenThreads, 0, stream>>>(
          num_tokens, hidden, static_cast<const T*>(x), nullptr, static_cast<const T*>(s), static_cast<T*>(y),
          nullptr);
    }
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_shared_gate_backward(moekit_dtype_t dtype, int64_t num_tokens, int32_t hidden,
                                        const void* grad_y, const void* s, const float* gate_logit,
                                        void* grad_s, float* grad_gate_logit, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    gate_backward_kernel<T><<<token_blocks(num_tokens), kTokenThreads, 0, stream>>>(
        num_tokens, hidden, static_cast<const T*>(grad_y), static_cast<const T*>(s), gate_logit,
        static_cast<T*>(grad_s), grad_gate_logit);
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_column_sum(moekit_dtype_t in_dtype, moekit_dtype_t out_dtype, int64_t rows, int32_t cols,
                              const void* in, int64_t ld, const float* row_scale, float* partial, void* out,
                              cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  const int splits = column_sum_splits(rows);
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>((cols + kColumnThreads - 1) / kColumnThreads), static_cast<unsigned>(splits));
  return dispatch_dtype(in_dtype, [&](auto in_tag) {
    using Tin = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using Tout = decltype(out_tag);
      column_sum_kernel<Tin, Tout><<<grid, kColumnThreads, 0, stream>>>(
          rows, cols, static_cast<const Tin*>(in), ld, row_scale, rows_per_split, partial, static_cast<Tout*>(out));
      if (splits > 1) {
        const cudaError_t e = cudaPeekAtLastError();
        if (e != cudaSuccess) return e;
        column_sum_finish_kernel<Tout><<<grid.x, kColumnThreads, 0, stream>>>(cols, splits, partial,
                                                                               static_cast<Tout*>(out));
      }
      return cudaPeekAtLastError();
    });
  });
}

cudaError_t launch_dx_sum(moekit_dtype_t dtype, int64_t num_tokens, int32_t hidden, void* dx,
                          const void* dx_shared, const float* grad_gate_logit, const void* gate_weight,
                          const float* dx_router, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int64_t chunks = num_tokens * (hidden / 8);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dx_sum_kernel<T><<<element_blocks(chunks), kElementThreads, 0, stream>>>(
        num_tokens, hidden, static_cast<T*>(dx), static_cast<const T*>(dx_shared), grad_gate_logit,
        static_cast<const T*>(gate_weight), dx_router);
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_convert(moekit_dtype_t src_dtype, moekit_dtype_t dst_dtype, int64_t n, const void* src,
                           void* dst, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(src_dtype, [&](auto src_tag) {
    using Tin = decltype(src_tag);
    return dispatch_dtype(dst_dtype, [&](auto dst_tag) {
      using Tout = decltype(dst_tag);
      convert_kernel<Tin, Tout><<<element_blocks(n), kElementThreads, 0, stream>>>(
          n, static_cast<const Tin*>(src), static_cast<Tout*>(dst));
      return cudaPeekAtLastError();
    });
  });
}

cudaError_t launch_add_row_bias(int64_t num_tokens, int32_t num_experts, int64_t ld, float* logits,
                                moekit_dtype_t bias_dtype, const void* bias, cudaStream_t stream) {
  const int64_t n = num_tokens * num_experts;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(bias_dtype, [&](auto tag) {
    using Tb = decltype(tag);
    add_row_bias_kernel<Tb><<<element_blocks(n), kElementThreads, 0, stream>>>(
        num_tokens, num_experts, ld, logits, static_cast<const Tb*>(bias));
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_add_int32(int32_t n, const int32_t* src, int32_t* dst, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  add_int32_kernel<<<element_blocks(n), kElementThreads, 0, stream>>>(n, src, dst);
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels::layer
