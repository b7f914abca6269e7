// Host-side dtype helpers shared by tests, benchmarks and the demo: rounding to the storage
// dtype exactly as the device does (round-to-nearest-even), packing into byte buffers, and the
// per-dtype tolerances every comparison uses.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moekit/status.h"

namespace moekit::test {

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: value = man * 2^-24
      float f = std::ldexp(static_cast<float>(man), -24);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf (>= 65520)
  if (abs < 0x38800000u) {                        // subnormal or zero in half
    float a;
    std::memcpy(&a, &abs, 4);
    const float scaled = a * 16777216.0f;  // a / 2^-24, exact
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));  // round-half-even (default)
  }
  uint32_t mant = abs + 0xc8000fffu + ((abs >> 13) & 1u);  // rebias exponent (-112 << 23), RNE
  return sign | static_cast<uint16_t>(mant >> 13);
}

// Rounds a float to what `dtype` can hold.
inline float round_to(moekit_dtype_t dtype, float x) {
  switch (dtype) {
    case MOEKIT_DTYPE_BF16: return bf16_bits_to_float(float_to_bf16_bits(x));
    case MOEKIT_DTYPE_F16: return half_bits_to_float(float_to_half_bits(x));
    default: return x;
  }
}

inline size_t dtype_bytes(moekit_dtype_t dtype) { return dtype == MOEKIT_DTYPE_F32 ? 4 : 2; }

// The dtype's short name for test messages: f32, f16, bf16.
inline const char* dtype_name(moekit_dtype_t d) {
  return d == MOEKIT_DTYPE_F32 ? "f32" : d == MOEKIT_DTYPE_F16 ? "f16" : "bf16";
}

// Packs floats (already representable, or rounded here) into a buffer of `dtype`.
inline std::vector<uint8_t> pack(moekit_dtype_t dtype, const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * dtype_bytes(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == MOEKIT_DTYPE_F32) {
      std::memcpy(&out[4 * i], &v[i], 4);
    } else {
      const uint16_t b = dtype == MOEKIT_DTYPE_BF16 ? float_to_bf16_bits(v[i]) : float_to_half_bits(v[i]);
      std::memcpy(&out[2 * i], &b, 2);
    }
  }
  return out;
}

inline std::vector<float> unpack(moekit_dtype_t dtype, const std::vector<uint8_t>& bytes) {
  const size_t n = bytes.size() / dtype_bytes(dtype);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (dtype == MOEKIT_DTYPE_F32) {
      std::memcpy(&v[i], &bytes[4 * i], 4);
    } else {
      uint16_t b;
      std::memcpy(&b, &bytes[2 * i], 2);
      v[i] = dtype == MOEKIT_DTYPE_BF16 ? bf16_bits_to_float(b) : half_bits_to_float(b);
    }
  }
  return v;
}

// Rounds every element to `dtype` (to build inputs that are exact in the storage type).
inline std::vector<float> rounded(moekit_dtype_t dtype, std::vector<float> v) {
  for (auto& x : v) x = round_to(dtype, x);
  return v;
}

// Tolerances, defined once: |got - ref| <= atol + rtol * |ref|, with ref the double reference
// rounded to the output dtype first.
struct Tolerance {
  double rtol;
  double atol;
};

inline Tolerance tolerance_for(moekit_dtype_t dtype) {
  switch (dtype) {
    case MOEKIT_DTYPE_BF16: return {1e-2, 1e-2};
    case MOEKIT_DTYPE_F16: return {2e-3, 2e-3};
    default: return {1e-5, 1e-6};
  }
}

inline bool close(double got, double ref, Tolerance tol) {
  if (std::isnan(ref)) return std::isnan(got);
  if (std::isinf(ref)) return got == ref;
  return std::fabs(got - ref) <= tol.atol + tol.rtol * std::fabs(ref);
}

}  // namespace moekit::test
