// The small kernels around the grouped GEMMs and the dense MLP's cuBLASLt calls:
//   dp finish      grad_row_weights[r] = sum_t dp_partial[r, t] + <dout_r, b_down[e(r)]>
//   column sums    out[g, c] = round(sum_{r in segment g} s_r x[r, c])  (bias gradients)
//   split sum      out[i] = round(sum_s in[s, i])                      (split weight gradients)
//   MLP activation forward / backward (elementwise, from the fp32 or saved pre-activation)
// Every reduction has a fixed order: lane-strided partial sums then a fixed xor tree (dp finish),
// rows in order per thread then row lanes in order (column sums), splits in order (split sum).
// Rows outside every segment are neither read nor written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/dtype.cuh"
#include "kernels/experts/activation.cuh"
#include "kernels/experts/epilogue.cuh"
#include "kernels/experts/grouped_gemm.hpp"
#include "kernels/experts/grouped_problem.cuh"

namespace moekit::kernels::experts {
namespace {

constexpr int kBlock = 256;

int grid_for(int64_t items, int per_block, int64_t cap = 65535) {
  int64_t g = (items + per_block - 1) / per_block;
  if (g < 1) g = 1;
  return static_cast<int>(g < cap ? g : cap);
}

// Group of row r (monotone offsets), or -1 when r lies in no segment.
__device__ __forceinline__ int group_of_row(const int32_t* offsets, int num_groups, int64_t max_rows, int64_t r) {
  int lo = 0, hi = num_groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    int64_t b = offsets[mid];
    b = b < 0 ? 0 : (b > max_rows ? max_rows : b);
    if (b <= r) lo = mid; else hi = mid - 1;
  }
  int64_t gb, ge;
  group_rows(offsets, lo, max_rows, &gb, &ge);
  return (r >= gb && r < ge) ? lo : -1;
}

template <class T>
__global__ void __launch_bounds__(kBlock) dp_finish_kernel(int num_groups, const int32_t* __restrict__ offsets,
                                                           int64_t max_rows, const float* __restrict__ partial,
                                                           int tiles, const T* __restrict__ grad_out,
                                                           const T* __restrict__ b_down, int hidden,
                                                           float* __restrict__ grad_row_weights) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kBlock / 32);
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) >> 5; r < max_rows; r += warps) {
    const int g = group_of_row(offsets, num_groups, max_rows, r);
    if (g < 0) continue;  // uniform over the warp
    float s = 0.0f;
    for (int t = lane; t < tiles; t += 32) s += partial[r * tiles + t];
    if (b_down) {
      const T* dy = grad_out + r * hidden;
      const T* b = b_down + static_cast<int64_t>(g) * hidden;
      for (int c = 2 * lane; c < hidden; c += 64) {
        const float2 y = load_pair(dy + c);
        const float2 bb = load_pair(b + c);
        s += y.x * bb.x + y.y * bb.y;
      }
    }
#pragma unroll
    for (int d = 16; d >= 1; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
    if (lane == 0) grad_row_weights[r] = s;
  }
}

// Block (64 columns x 8 row lanes) over one column strip of one split of one group.
template <class T>
__global__ void __launch_bounds__(kBlock) column_sums_kernel(int num_groups, const int32_t* __restrict__ offsets,
                                                             int64_t num_rows, const T* __restrict__ x, int n,
                                                             const float* __restrict__ scale, int splits,
                                                             float* __restrict__ partial, T* __restrict__ out) {
  __shared__ float2 red[8][32];
  const int cx = threadIdx.x & 31, ry = threadIdx.x >> 5;
  const int c = blockIdx.x * 64 + 2 * cx;
  const int g = blockIdx.y, split = blockIdx.z;
  int64_t gb = 0, ge = num_rows, sb, se;
  if (offsets) group_rows(offsets, g, num_rows, &gb, &ge);
  split_rows(gb, ge, split, splits, &sb, &se);
  float2 acc = make_float2(0.0f, 0.0f);
  if (c < n) {
    for (int64_t r = sb + ry; r < se; r += 8) {
      const float s = scale ? scale[r] : 1.0f;
      const float2 v = load_pair(x + r * n + c);
      acc.x += s * v.x;
      acc.y += s * v.y;
    }
  }
  red[ry][cx] = acc;
  __syncthreads();
  if (ry == 0 && c < n) {
    float2 t = red[0][cx];
#pragma unroll
    for (int k = 1; k < 8; ++k) {
      t.x += red[k][cx].x;
      t.y += red[k][cx].y;
    }
    const int64_t idx = static_cast<int64_t>(g) * n + c;
    if (splits == 1)
      store_pair(out + idx, t.x, t.y);
    else
      *reinterpret_cast<float2*>(partial + static_cast<int64_t>(split) * num_groups * n + idx) = t;
  }
}

template <class T>
__global__ void __launch_bounds__(kBlock) split_sum_kernel(const float* __restrict__ in, int splits, int64_t count,
                                                           T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * kBlock) {
    float s = 0.0f;
    for (int k = 0; k < splits; ++k) s += in[k * count + i];
    out[i] = from_float<T>(s);
  }
}

// One thread per (row, pair of h columns i, i + 1).
template <class T>
__global__ void __launch_bounds__(kBlock) mlp_act_forward_kernel(ActParams act, int interleaved, int64_t rows,
                                                                 int inter, const float* __restrict__ u32,
                                                                 const T* __restrict__ bias, T* __restrict__ u_out,
                                                                 T* __restrict__ h) {
  const int pairs = inter / 2;
  const bool gated = act_is_gated(act.kind);
  const int nu = gated ? 2 * inter : inter;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; idx < rows * pairs;
       idx += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t r = idx / pairs;
    const int i = 2 * static_cast<int>(idx - r * pairs);
    const float* u = u32 + r * nu;
    float a0, a1;
    if (!gated) {
      float2 v = *reinterpret_cast<const float2*>(u + i);
      if (bias) { const float2 b = load_pair(bias + i); v.x += b.x; v.y += b.y; }
      if (u_out) store_pair(u_out + r * nu + i, v.x, v.y);
      a0 = act_relu2(v.x);
      a1 = act_relu2(v.y);
    } else if (interleaved) {
      float4 v = *reinterpret_cast<const float4*>(u + 2 * i);  // g_i, v_i, g_i+1, v_i+1
      if (bias) {
        const float2 b0 = load_pair(bias + 2 * i), b1 = load_pair(bias + 2 * i + 2);
        v.x += b0.x; v.y += b0.y; v.z += b1.x; v.w += b1.y;
      }
      if (u_out) {
        store_pair(u_out + r * nu + 2 * i, v.x, v.y);
        store_pair(u_out + r * nu + 2 * i + 2, v.z, v.w);
      }
      a0 = act_gated(act, v.x, v.y);
      a1 = act_gated(act, v.z, v.w);
    } else {
      float2 g = *reinterpret_cast<const float2*>(u + i);
      float2 v = *reinterpret_cast<const float2*>(u + inter + i);
      if (bias) {
        const float2 bg = load_pair(bias + i), bv = load_pair(bias + inter + i);
        g.x += bg.x; g.y += bg.y; v.x += bv.x; v.y += bv.y;
      }
      if (u_out) {
        store_pair(u_out + r * nu + i, g.x, g.y);
        store_pair(u_out + r * nu + inter + i, v.x, v.y);
      }
      a0 = act_gated(act, g.x, v.x);
      a1 = act_gated(act, g.y, v.y);
    }
    store_pair(h + r * inter + i, a0, a1);
  }
}

// u pair at columns (c, c + 1) of row r: saved (dtype) or fp32 + bias rounded to the dtype.
template <class T>
__device__ __forceinline__ float2 mlp_u_pair(const T* u_saved, const float* u32, const T* bias, int64_t r, int nu,
                                             int c) {
  if (u_saved) return load_pair(u_saved + r * nu + c);
  float2 v = *reinterpret_cast<const float2*>(u32 + r * nu + c);
  if (bias) { const float2 b = load_pair(bias + c); v.x += b.x; v.y += b.y; }
  return make_float2(to_float(from_float<T>(v.x)), to_float(from_float<T>(v.y)));
}

template <class T>
__global__ void __launch_bounds__(kBlock) mlp_act_backward_kernel(ActParams act, int interleaved, int64_t rows,
                                                                  int inter, const T* __restrict__ u_saved,
                                                                  const float* __restrict__ u32,
                                                                  const T* __restrict__ bias,
                                                                  const float* __restrict__ grad_h,
                                                                  T* __restrict__ du, T* __restrict__ h) {
  const int pairs = inter / 2;
  const bool gated = act_is_gated(act.kind);
  const int nu = gated ? 2 * inter : inter;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; idx < rows * pairs;
       idx += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t r = idx / pairs;
    const int i = 2 * static_cast<int>(idx - r * pairs);
    const float2 G = *reinterpret_cast<const float2*>(grad_h + r * inter + i);
    T* d = du + r * nu;
    float a0, a1;
    if (!gated) {
      const float2 u = mlp_u_pair(u_saved, u32, bias, r, nu, i);
      a0 = act_relu2(u.x);
      a1 = act_relu2(u.y);
      store_pair(d + i, act_relu2_grad(u.x) * G.x, act_relu2_grad(u.y) * G.y);
    } else if (interleaved) {
      const float2 gv0 = mlp_u_pair(u_saved, u32, bias, r, nu, 2 * i);
      const float2 gv1 = mlp_u_pair(u_saved, u32, bias, r, nu, 2 * i + 2);
      const GatedGrad d0 = act_gated_grad(act, gv0.x, gv0.y);
      const GatedGrad d1 = act_gated_grad(act, gv1.x, gv1.y);
      a0 = d0.act;
      a1 = d1.act;
      store_pair(d + 2 * i, d0.d_gate * G.x, d0.d_up * G.x);
      store_pair(d + 2 * i + 2, d1.d_gate * G.y, d1.d_up * G.y);
    } else {
      const float2 g = mlp_u_pair(u_saved, u32, bias, r, nu, i);
      const float2 v = mlp_u_pair(u_saved, u32, bias, r, nu, inter + i);
      const GatedGrad d0 = act_gated_grad(act, g.x, v.x);
      const GatedGrad d1 = act_gated_grad(act, g.y, v.y);
      a0 = d0.act;
      a1 = d1.act;
      store_pair(d + i, d0.d_gate * G.x, d1.d_gate * G.y);
      store_pair(d + inter + i, d0.d_up * G.x, d1.d_up * G.y);
    }
    store_pair(h + r * inter + i, a0, a1);
  }
}

}  // namespace

cudaError_t launch_dp_finish(moekit_dtype_t dtype, int num_groups, const int32_t* offsets, int64_t max_rows,
                             const float* dp_partial, int tiles, const void* grad_out, const void* b_down,
                             int hidden, float* grad_row_weights, cudaStream_t stream) {
  if (max_rows <= 0) return cudaSuccess;
  const int grid = grid_for(max_rows, kBlock / 32, 8192);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dp_finish_kernel<T><<<grid, kBlock, 0, stream>>>(num_groups, offsets, max_rows, dp_partial, tiles,
                                                      static_cast<const T*>(grad_out), static_cast<const T*>(b_down),
                                                      hidden, grad_row_weights);
    return cudaPeekAtLastError();
  });
}

int column_sum_splits(int num_groups, int n, int64_t num_rows) {
  // Enough blocks to fill the GPU (about 1024), each split at least 128 rows on average.
  const int64_t blocks = static_cast<int64_t>((n + 63) / 64) * num_groups;
  int64_t splits = (1024 + blocks - 1) / blocks;
  const int64_t by_rows = num_rows / (static_cast<int64_t>(num_groups) * 128);
  if (splits > by_rows) splits = by_rows;
  if (splits > 32) splits = 32;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

cudaError_t launch_column_sums(moekit_dtype_t dtype, int num_groups, const int32_t* offsets, int64_t num_rows,
                               const void* x, int n, const float* scale, int splits, float* partial, void* out,
                               cudaStream_t stream) {
  if (num_groups <= 0 || n <= 0) return cudaSuccess;
  const dim3 grid((n + 63) / 64, num_groups, splits);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    column_sums_kernel<T><<<grid, kBlock, 0, stream>>>(num_groups, offsets, num_rows, static_cast<const T*>(x), n,
                                                        scale, splits, partial, static_cast<T*>(out));
    cudaError_t err = cudaPeekAtLastError();
    if (err != cudaSuccess || splits == 1) return err;
    const int64_t count = static_cast<int64_t>(num_groups) * n;
    split_sum_kernel<T><<<grid_for(count, kBlock, 4096), kBlock, 0, stream>>>(partial, splits, count,
                                                                             static_cast<T*>(out));
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_split_sum(moekit_dtype_t dtype, const float* in, int splits, int64_t count, void* out,
                             cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    split_sum_kernel<T><<<grid_for(count, kBlock, 4096), kBlock, 0, stream>>>(in, splits, count,
                                                                             static_cast<T*>(out));
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_mlp_act_forward(moekit_dtype_t dtype, const ActParams& act, int interleaved, int64_t rows,
                                   int inter, const float* u32, const void* bias, void* u_out, void* h,
                                   cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  const int grid = grid_for(rows * (inter / 2), kBlock, 16384);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    mlp_act_forward_kernel<T><<<grid, kBlock, 0, stream>>>(act, interleaved, rows, inter, u32,
                                                            static_cast<const T*>(bias), static_cast<T*>(u_out),
                                                            static_cast<T*>(h));
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_mlp_act_backward(moekit_dtype_t dtype, const ActParams& act, int interleaved, int64_t rows,
                                    int inter, const void* u_saved, const float* u32, const void* bias,
                                    const float* grad_h, void* du, void* h, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  const int grid = grid_for(rows * (inter / 2), kBlock, 16384);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    mlp_act_backward_kernel<T><<<grid, kBlock, 0, stream>>>(
        act, interleaved, rows, inter, static_cast<const T*>(u_saved), u32, static_cast<const T*>(bias), grad_h,
        static_cast<T*>(du), static_cast<T*>(h));
    return cudaPeekAtLastError();
  });
}

}  // namespace moekit::kernels::experts
