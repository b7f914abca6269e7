// Fake balanced gate (NeMo FakeBalancedGate), A = E - skip experts take part.
//
//   noise == 0: w_tk = 1/K, idx_tk = ((t K + k) mod A) + skip.
//   noise  > 0: r_tk uniform [0,1) (kernels/router/philox.cuh, purpose kRandWeights),
//               w_tk = (1 - noise)/K + noise r_tk / sum_k r_tk   (sum in k order; 1/K if it is 0);
//               beta_e = N(0,1) * (noise * 0.1)                  (purpose kRandBias, token 0),
//               U_te uniform [0,1)                                (purpose kRandUniform),
//               idx_t = top-K over e of U_te + beta_e (ties to the lower e), plus skip.
// Shapes: weights, indices [T, K]; expert_load [E] (added to; loads count m_t). One warp per
// token; beta lives in shared memory per block, the token's keys in a per-warp row; the top-K is
// warp_select (kernels/router/common.cuh). Every value is a fixed sequence of rounded operations:
// deterministic, and reproduced bit for bit by the CPU reference.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/router/common.cuh"
#include "kernels/router/launch.hpp"
#include "kernels/router/philox.cuh"
#include "kernels/router/tuning.hpp"

namespace moekit::kernels::router {

namespace {

__device__ __forceinline__ int pad_word(int e) { return e + (e >> 5); }

// Shared memory (words): hist [E] + beta [A] + per warp (keys [A padded] + sel [32]).
constexpr size_t fake_gate_block_words(int32_t num_experts, int32_t active, bool noisy) {
  return static_cast<size_t>(num_experts) + (noisy ? static_cast<size_t>(active) : 0);
}
constexpr size_t fake_gate_warp_words(int32_t active, bool noisy) {
  return (noisy ? static_cast<size_t>(active) + active / 32 + 1 : 0) + 32;
}

__global__ void __launch_bounds__(kFakeGateWarps * 32) fake_gate_kernel(const FakeGateArgs a) {
  extern __shared__ uint32_t smem[];
  const int E = a.num_experts;
  const int A = E - a.skip_experts;
  const int K = a.top_k;
  const bool noisy = a.noise > 0.0f;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int* hist = reinterpret_cast<int*>(smem);
  float* beta = reinterpret_cast<float*>(smem + E);
  const size_t keys_words = noisy ? static_cast<size_t>(A) + A / 32 + 1 : 0;
  uint32_t* keys = smem + E + (noisy ? A : 0) + static_cast<size_t>(warp) * (keys_words + 32);
  int* sel = reinterpret_cast<int*>(keys + keys_words);

  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  const float noise_scale = __fmul_rn(a.noise, 0.1f);
  if (noisy) {
    for (int b = threadIdx.x; 4 * b < A; b += blockDim.x) {
      const Rand4 r = fake_gate_random(a.seed, a.offset, kRandBias, 0, static_cast<uint32_t>(b));
      float n[4];
      rand_normal2(r.x[0], r.x[1], &n[0], &n[1]);
      rand_normal2(r.x[2], r.x[3], &n[2], &n[3]);
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (4 * b + c < A) beta[4 * b + c] = __fmul_rn(n[c], noise_scale);
    }
  }
  __syncthreads();

  const int warps = blockDim.x >> 5;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * warps;
  const float base_weight = __fdiv_rn(__fsub_rn(1.0f, a.noise), static_cast<float>(K));
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps + warp; t < a.num_tokens; t += warps_total) {
    const bool m = a.token_mask == nullptr || __ldg(a.token_mask + t) != 0;
    int idx = 0;
    float w = 0.0f;
    if (!noisy) {
      if (lane < K) {
        idx = static_cast<int>((t * K + lane) % A) + a.skip_experts;
        w = __fdiv_rn(1.0f, static_cast<float>(K));
      }
    } else {
      for (int b = lane; 4 * b < A; b += 32) {
        const Rand4 r = fake_gate_random(a.seed, a.offset, kRandUniform, static_cast<uint64_t>(t),
                                         static_cast<uint32_t>(b));
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int e = 4 * b + c;
          if (e < A) keys[pad_word(e)] = float_key(__fadd_rn(uniform24(r.x[c]), beta[e]));
        }
      }
      __syncwarp();
      warp_select<kGenericCacheDepth>(
          A, K, [&](int i) { return keys[pad_word(i)]; },
          [&](int r, int item, uint32_t) {
            if (lane == 0) sel[r] = item;
          });
      __syncwarp();
      // Every lane draws all K r's and sums them in k order (the same value everywhere).
      float rsum = 0.0f, mine = 0.0f;
      for (int b = 0; 4 * b < K; ++b) {
        const Rand4 r = fake_gate_random(a.seed, a.offset, kRandWeights, static_cast<uint64_t>(t),
                                         static_cast<uint32_t>(b));
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int k = 4 * b + c;
          if (k < K) {
            const float u = uniform24(r.x[c]);
            rsum = __fadd_rn(rsum, u);
            if (k == lane) mine = u;
          }
        }
      }
      if (lane < K) {
        idx = sel[lane] + a.skip_experts;
        const float share = rsum > 0.0f ? __fdiv_rn(mine, rsum) : __fdiv_rn(1.0f, static_cast<float>(K));
        w = __fadd_rn(base_weight, __fmul_rn(a.noise, share));
      }
      __syncwarp();  // sel is rewritten by the next token
    }
    if (lane < K) {
      a.weights[t * K + lane] = w;
      a.indices[t * K + lane] = idx;
      if (a.expert_load != nullptr && m) atomicAdd(&hist[idx], 1);
    }
  }
  __syncthreads();
  if (a.expert_load != nullptr) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      const int v = hist[e];
      if (v != 0) atomicAdd(a.expert_load + e, v);
    }
  }
}

}  // namespace

void fake_gate_shape(int64_t num_tokens, int32_t num_experts, int32_t skip_experts, float noise,
                     int32_t* num_blocks, int32_t* warps_per_block, uint32_t* smem_bytes) {
  const int32_t active = num_experts - skip_experts;
  const bool noisy = noise > 0.0f;
  const size_t block_words = fake_gate_block_words(num_experts, active, noisy);
  const size_t warp_words = fake_gate_warp_words(active, noisy);
  int32_t warps = 1;
  while (warps < kFakeGateWarps && 4 * (block_words + (warps + 1) * warp_words) <= kGenericSmemBudget)
    ++warps;
  int64_t blocks = (num_tokens + warps - 1) / warps;
  if (blocks > kMaxBackwardBlocks) blocks = kMaxBackwardBlocks;
  if (blocks < 1) blocks = 1;
  *num_blocks = static_cast<int32_t>(blocks);
  *warps_per_block = warps;
  *smem_bytes = static_cast<uint32_t>(4 * (block_words + warps * warp_words));
}

cudaError_t launch_fake_gate(const FakeGateArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  if (a.smem_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(fake_gate_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(a.smem_bytes));
    if (e != cudaSuccess) return e;
  }
  fake_gate_kernel<<<a.num_blocks, a.warps_per_block * 32, a.smem_bytes, stream>>>(a);
  return cudaPeekAtLastError();
}

}  // namespace moekit::kernels::router
