// Small kernels over expert statistics: the forward's finalize, the aux-loss value and the
// aux-loss-free bias update.
//
// finalize:   L_e = [L_e +] sum_b load_partial[b, e];  S_e = sum_b score_partial[b, e];
//             N = sum_b count_partial[b]. Block (kFinalizeExperts experts) x (kFinalizeChunks
//             chunks of blocks): thread (chunk c, expert e) sums blocks [c B/C, (c+1) B/C) in
//             order, then thread e sums the chunks in order: a fixed order, so S is bitwise
//             reproducible. Integer sums are order-free anyway. Launched as a programmatic
//             dependent of the forward on sm_90 (kernels/common/pdl.cuh), as the forward and
//             the backward are of their predecessors: it waits before reading.
// aux loss:   aux = (sum_e L_e S_e) E / (K N'^2), N' = max(N, 1); one block, each thread sums a
//             strided slice in order, then a fixed tree.
// bias update: b_e += rate * sign(sum L - E L_e) (exact in int64: sign(mean(L) - L_e)), then
//             optionally b -= mean(b) (fixed-order fp32 sum), then optionally L = 0; one block.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/pdl.cuh"
#include "kernels/router/launch.hpp"
#include "kernels/router/tuning.hpp"

namespace moekit::kernels::router {

namespace {

__global__ void __launch_bounds__(kFinalizeExperts * kFinalizeChunks)
    finalize_kernel(const FinalizeArgs a) {
  pdl_launch_dependents();  // a programmatic next kernel may be scheduled; it waits for this grid
  pdl_wait();               // the forward's partial rows (a no-op when launched plainly)
  __shared__ float s_part[kFinalizeChunks][kFinalizeExperts];
  __shared__ int l_part[kFinalizeChunks][kFinalizeExperts];
  constexpr int kWarps = kFinalizeExperts * kFinalizeChunks / 32;
  __shared__ int n_part[kWarps];
  const int el = threadIdx.x % kFinalizeExperts;
  const int c = threadIdx.x / kFinalizeExperts;
  const int e = blockIdx.x * kFinalizeExperts + el;
  const int B = a.num_blocks;
  const int per_chunk = (B + kFinalizeChunks - 1) / kFinalizeChunks;
  const int b0 = c * per_chunk;
  const int b1 = b0 + per_chunk < B ? b0 + per_chunk : B;
  float s = 0.0f;
  int l = 0;
  if (e < a.num_experts) {
    // In batches of kFinalizeBatch rows: every load of a batch is issued before the first add (one
    // L2 round trip per batch, not per row); the adds keep the row order.
    constexpr int kFinalizeBatch = 16;
    for (int b = b0; b < b1; b += kFinalizeBatch) {
      float sv[kFinalizeBatch];
      int lv[kFinalizeBatch];
#pragma unroll
      for (int i = 0; i < kFinalizeBatch; ++i) {
        const int64_t at = static_cast<int64_t>(b + i) * a.num_experts + e;
        const bool in = b + i < b1;
        sv[i] = (in && a.score_sum != nullptr) ? a.score_partial[at] : 0.0f;
        lv[i] = (in && a.expert_load != nullptr) ? a.load_partial[at] : 0;
      }
#pragma unroll
      for (int i = 0; i < kFinalizeBatch; ++i) {
        if (b + i < b1) {
          s += sv[i];
          l += lv[i];
        }
      }
    }
  }
  s_part[c][el] = s;
  l_part[c][el] = l;
  int n = 0;  // integer sums do not depend on their order
  if (blockIdx.x == 0 && a.token_count != nullptr)
    for (int b = threadIdx.x; b < B; b += blockDim.x) n += a.count_partial[b];
  for (int d = 16; d > 0; d >>= 1) n += __shfl_xor_sync(0xffffffffu, n, d);
  if ((threadIdx.x & 31) == 0) n_part[threadIdx.x >> 5] = n;
  __syncthreads();
  if (c == 0 && e < a.num_experts) {
    float total = 0.0f;
    int load = 0;
#pragma unroll
    for (int i = 0; i < kFinalizeChunks; ++i) {
      total += s_part[i][el];
      load += l_part[i][el];
    }
    if (a.score_sum != nullptr) a.score_sum[e] = total;
    if (a.expert_load != nullptr) a.expert_load[e] = (a.accumulate ? a.expert_load[e] : 0) + load;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0 && a.token_count != nullptr) {
    int total = 0;
    for (int i = 0; i < kWarps; ++i) total += n_part[i];
    a.token_count[0] = total;
  }
}

// Fixed-order block sum of one float per thread (blockDim.x == kSmallReduceThreads).
__device__ float block_sum_fixed(float v, float* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int width = kSmallReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) scratch[threadIdx.x] += scratch[threadIdx.x + width];
    __syncthreads();
  }
  const float total = scratch[0];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kSmallReduceThreads)
    aux_loss_kernel(int32_t num_experts, int32_t top_k, const int32_t* __restrict__ load,
                    const float* __restrict__ score_sum, const int32_t* __restrict__ count,
                    float* __restrict__ aux) {
  __shared__ float scratch[kSmallReduceThreads];
  float v = 0.0f;
  for (int e = threadIdx.x; e < num_experts; e += kSmallReduceThreads)
    v += static_cast<float>(load[e]) * score_sum[e];
  const float total = block_sum_fixed(v, scratch);
  if (threadIdx.x == 0) {
    const int32_t n = count[0];
    const float np = static_cast<float>(n > 1 ? n : 1);
    aux[0] = total * (static_cast<float>(num_experts) / (static_cast<float>(top_k) * np * np));
  }
}

__global__ void __launch_bounds__(kSmallReduceThreads)
    bias_update_kernel(int32_t num_experts, float rate, int32_t recenter, float* __restrict__ bias,
                       int32_t* __restrict__ load, int32_t reset_load) {
  __shared__ long long isum[kSmallReduceThreads];
  __shared__ float scratch[kSmallReduceThreads];
  long long mine = 0;
  for (int e = threadIdx.x; e < num_experts; e += kSmallReduceThreads) mine += load[e];
  isum[threadIdx.x] = mine;
  __syncthreads();
  for (int width = kSmallReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) isum[threadIdx.x] += isum[threadIdx.x + width];
    __syncthreads();
  }
  const long long total = isum[0];
  float part = 0.0f;
  for (int e = threadIdx.x; e < num_experts; e += kSmallReduceThreads) {
    // sign(mean(L) - L_e) = sign(sum L - E L_e), exactly.
    const long long d = total - static_cast<long long>(num_experts) * load[e];
    float b = bias[e];
    if (d > 0) b = b + rate;
    if (d < 0) b = b - rate;
    bias[e] = b;
    part += b;
  }
  if (recenter) {
    const float mean = block_sum_fixed(part, scratch) / static_cast<float>(num_experts);
    for (int e = threadIdx.x; e < num_experts; e += kSmallReduceThreads) bias[e] = bias[e] - mean;
  }
  if (reset_load) {
    // Every thread read its loads before the barrier inside the integer sum above.
    for (int e = threadIdx.x; e < num_experts; e += kSmallReduceThreads) load[e] = 0;
  }
}

}  // namespace

cudaError_t launch_router_finalize(const FinalizeArgs& a, bool programmatic, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((a.num_experts + kFinalizeExperts - 1) / kFinalizeExperts);
  return launch_programmatic(finalize_kernel, dim3(blocks), dim3(kFinalizeExperts * kFinalizeChunks), 0, stream,
                             programmatic, a);
}

cudaError_t launch_aux_loss(int32_t num_experts, int32_t top_k, const int32_t* expert_load,
                            const float* score_sum, const int32_t* token_count, float* aux_loss,
                            cudaStream_t stream) {
  aux_loss_kernel<<<1, kSmallReduceThreads, 0, stream>>>(num_experts, top_k, expert_load, score_sum,
                                                         token_count, aux_loss);
  return cudaPeekAtLastError();
}

cudaError_t launch_bias_update(int32_t num_experts, float rate, int32_t recenter, float* bias,
                               int32_t* expert_load, int32_t reset_load, cudaStream_t stream) {
  bias_update_kernel<<<1, kSmallReduceThreads, 0, stream>>>(num_experts, rate, recenter, bias,
                                                            expert_load, reset_load);
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels::router
