// Counter-based random numbers for the fake gate: Philox-4x32-10 (Salmon et al., SC'11; the
// Random123 definition, checked against its known-answer vectors by the CPU tests) and the
// transforms to uniform and normal floats.
//
// Stream layout (docs/router.md): key = seed; counter = {lo32(offset), hi32(offset), lo32(token),
// (hi32(token) & 0xffff) | block << 16 | purpose << 30}, where block (< 2^14) numbers groups of
// four values and purpose is kRandWeights (r, per token, over k), kRandBias (beta, token 0, over
// experts) or kRandUniform (U, per token, over experts). So every value depends only on
// (seed, offset, purpose, token, index): a recompute reproduces it bit for bit.
//
// Every float operation below is an explicitly rounded intrinsic (no FMA contraction, IEEE
// division and square root), and the logarithm, sine and cosine are short polynomials, so the CPU
// reference (tests/reference/router_ref.cpp) reproduces the values exactly.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moekit::kernels::router {

constexpr uint32_t kRandWeights = 0;
constexpr uint32_t kRandBias = 1;
constexpr uint32_t kRandUniform = 2;

struct Rand4 {
  uint32_t x[4];
};

__device__ __forceinline__ Rand4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                               uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t lo0 = 0xD2511F53u * c0;
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0);
    const uint32_t lo1 = 0xCD9E8D57u * c2;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Rand4{{c0, c1, c2, c3}};
}

__device__ __forceinline__ Rand4 fake_gate_random(uint64_t seed, uint64_t offset, uint32_t purpose,
                                                  uint64_t token, uint32_t block) {
  const uint32_t c3 = static_cast<uint32_t>((token >> 32) & 0xffffu) | ((block & 0x3fffu) << 16) |
                      (purpose << 30);
  return philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(token), c3, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// [0, 1) with 24 random bits (exact in fp32).
__device__ __forceinline__ float uniform24(uint32_t x) {
  return __fmul_rn(static_cast<float>(x >> 8), 5.9604644775390625e-8f);
}

// (0, 1]: never 0, so its logarithm is finite.
__device__ __forceinline__ float uniform24_open0(uint32_t x) {
  return __fmul_rn(static_cast<float>((x >> 8) + 1u), 5.9604644775390625e-8f);
}

// ln(u) for u in (0, 1]: u = f 2^e with f in [sqrt(1/2), sqrt(2)], ln f = 2 atanh((f-1)/(f+1)).
__device__ __forceinline__ float rand_log(float u) {
  const uint32_t bits = __float_as_uint(u);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  float f = __uint_as_float((bits & 0x7fffffu) | 0x3f800000u);
  if (f > 1.41421354f) {
    f = __fmul_rn(f, 0.5f);
    e += 1;
  }
  const float s = __fdiv_rn(__fsub_rn(f, 1.0f), __fadd_rn(f, 1.0f));
  const float s2 = __fmul_rn(s, s);
  float p = __fmaf_rn(s2, 0.111111112f, 0.142857149f);
  p = __fmaf_rn(s2, p, 0.2f);
  p = __fmaf_rn(s2, p, 0.333333343f);
  p = __fmaf_rn(s2, p, 1.0f);
  const float ln_f = __fmul_rn(__fmul_rn(2.0f, s), p);
  return __fmaf_rn(static_cast<float>(e), 0.693147182f, ln_f);
}

// (cos, sin) of 2 pi u for u in [0, 1): quadrant from 4u, Taylor polynomials on [0, pi/2).
__device__ __forceinline__ void rand_cos_sin(float u, float* c, float* s) {
  const float x = __fmul_rn(u, 4.0f);
  const int q = static_cast<int>(x);
  const float phi = __fmul_rn(__fsub_rn(x, static_cast<float>(q)), 1.57079637f);
  const float p2 = __fmul_rn(phi, phi);
  float sp = __fmaf_rn(p2, -2.50521079e-8f, 2.75573188e-6f);
  sp = __fmaf_rn(p2, sp, -1.98412701e-4f);
  sp = __fmaf_rn(p2, sp, 8.33333377e-3f);
  sp = __fmaf_rn(p2, sp, -0.166666672f);
  sp = __fmaf_rn(p2, sp, 1.0f);
  const float sin_phi = __fmul_rn(phi, sp);
  float cp = __fmaf_rn(p2, 2.08767559e-9f, -2.75573188e-7f);
  cp = __fmaf_rn(p2, cp, 2.48015876e-5f);
  cp = __fmaf_rn(p2, cp, -1.38888892e-3f);
  cp = __fmaf_rn(p2, cp, 4.16666679e-2f);
  cp = __fmaf_rn(p2, cp, -0.5f);
  const float cos_phi = __fmaf_rn(p2, cp, 1.0f);
  switch (q & 3) {
    case 0: *c = cos_phi; *s = sin_phi; break;
    case 1: *c = -sin_phi; *s = cos_phi; break;
    case 2: *c = -cos_phi; *s = -sin_phi; break;
    default: *c = sin_phi; *s = -cos_phi; break;
  }
}

// Two N(0, 1) values from two 32-bit random words (Box-Muller).
__device__ __forceinline__ void rand_normal2(uint32_t a, uint32_t b, float* n0, float* n1) {
  const float r = __fsqrt_rn(__fmul_rn(-2.0f, rand_log(uniform24_open0(a))));
  float c, s;
  rand_cos_sin(uniform24(b), &c, &s);
  *n0 = __fmul_rn(r, c);
  *n1 = __fmul_rn(r, s);
}

}  // namespace moekit::kernels::router
