// The EP combine reduction (combine, dispatch backward), one chunk of tokens at a time:
//   out[t] = sum over j = 0 .. D-1 with route_slot[t][j] >= 0, in route order (ascending rank), of
//            rows(j)[route_slot[t][j]],  rows(j) = self_rows (recv space) when route_dest[t][j] is
//            this rank, else peer_rows (send space, where NCCL put what rank d sent back);
// accumulated in fp32 starting from +0.0f and rounded once to the output dtype. A token with no
// row gets +0. Shapes: rows [*, H] of Tin, out [T, H] of Tout, contiguous.
// One warp per token; each lane owns VEC consecutive elements per step (VEC = 8: 16-byte loads of
// bf16/f16, two of fp32; VEC = 1: any H and alignment). The order of the additions is fixed by the
// route, so the result is bitwise reproducible and identical to the CPU reference's loop.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/common/dtype.cuh"
#include "kernels/ep/launch.hpp"
#include "kernels/ep/tuning.hpp"

namespace moekit::kernels::ep {

template <class T, int VEC>
struct VecIO;

template <class T>
struct VecIO<T, 1> {
  static __device__ __forceinline__ void load(const T* p, float (&v)[1]) { v[0] = to_float(p[0]); }
  static __device__ __forceinline__ void store(T* p, const float (&v)[1]) {
    p[0] = from_float<T>(v[0]);
  }
};

template <class T>
struct VecIO<T, 8> {  // 16-byte accesses (kernels/common/dtype.cuh)
  static __device__ __forceinline__ void load(const T* p, float (&v)[8]) { load8(p, v); }
  static __device__ __forceinline__ void store(T* p, const float (&v)[8]) { store8(p, v); }
};

template <class Tin, class Tout, int VEC>
__global__ void __launch_bounds__(kMoveThreads) reduce_kernel(ReduceArgs a) {
  constexpr unsigned kFullMask = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kMoveWarpsPerBlock;
  const int64_t H = a.hidden;
  const int D = a.max_dests;
  for (int64_t t = a.token_begin + static_cast<int64_t>(blockIdx.x) * kMoveWarpsPerBlock +
                   threadIdx.x / 32;
       t < a.token_end; t += warps) {
    int d = -1, s = -1;
    if (lane < D) {
      d = a.route_dest[t * D + lane];
      s = a.route_slot[t * D + lane];
    }
    const bool live = d >= 0 && s >= 0;
    const unsigned live_mask = __ballot_sync(kFullMask, live);
    unsigned long long src = 0;
    if (live)
      src = reinterpret_cast<unsigned long long>(
          static_cast<const Tin*>(d == a.rank ? a.self_rows : a.peer_rows) +
          static_cast<int64_t>(s) * H);
    Tout* out = static_cast<Tout*>(a.out) + t * H;
    // Warp-uniform loop (the shuffles need every lane).
    for (int64_t base = 0; base < H; base += static_cast<int64_t>(32) * VEC * kMoveUnroll) {
      float acc[kMoveUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kMoveUnroll; ++u)
#pragma unroll
        for (int q = 0; q < VEC; ++q) acc[u][q] = 0.0f;
      unsigned m = live_mask;
      while (m != 0) {
        const int j = __ffs(m) - 1;
        m &= m - 1;
        const Tin* row = reinterpret_cast<const Tin*>(__shfl_sync(kFullMask, src, j));
#pragma unroll
        for (int u = 0; u < kMoveUnroll; ++u) {
          const int64_t e = base + (static_cast<int64_t>(u) * 32 + lane) * VEC;
          if (e < H) {
            float v[VEC];
            VecIO<Tin, VEC>::load(row + e, v);
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[u][q] += v[q];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kMoveUnroll; ++u) {
        const int64_t e = base + (static_cast<int64_t>(u) * 32 + lane) * VEC;
        if (e < H) VecIO<Tout, VEC>::store(out + e, acc[u]);
      }
    }
  }
}

// Launches reduce_kernel<Tin, Tout, VEC> for every Tin (one translation unit per Tout).
template <class Tout>
cudaError_t launch_reduce_to(moekit_dtype_t in_dtype, bool vectorized, const ReduceArgs& a,
                             int max_blocks, cudaStream_t stream) {
  const int64_t tokens = a.token_end - a.token_begin;
  if (tokens <= 0) return cudaSuccess;
  int64_t blocks = (tokens + kMoveWarpsPerBlock - 1) / kMoveWarpsPerBlock;
  if (blocks > max_blocks) blocks = max_blocks;
  const dim3 grid(static_cast<unsigned>(blocks > 0 ? blocks : 1));
  return dispatch_dtype(in_dtype, [&](auto in_tag) -> cudaError_t {
    using Tin = decltype(in_tag);
    if (vectorized)
      reduce_kernel<Tin, Tout, 8><<<grid, kMoveThreads, 0, stream>>>(a);
    else
      reduce_kernel<Tin, Tout, 1><<<grid, kMoveThreads, 0, stream>>>(a);
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_reduce_to_f32(moekit_dtype_t in_dtype, bool vectorized, const ReduceArgs& a,
                                 int max_blocks, cudaStream_t stream);
cudaError_t launch_reduce_to_f16(moekit_dtype_t in_dtype, bool vectorized, const ReduceArgs& a,
                                 int max_blocks, cudaStream_t stream);
cudaError_t launch_reduce_to_bf16(moekit_dtype_t in_dtype, bool vectorized, const ReduceArgs& a,
                                  int max_blocks, cudaStream_t stream);

}  // namespace moekit::kernels::ep
