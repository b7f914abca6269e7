// Random inputs for tests: a fresh seed per run (printed by main, overridable with
// MOEKIT_TEST_SEED) mixed with a per-case salt, plus fixed seeds for regressions.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

namespace moekit::test {

inline uint64_t session_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* s = std::getenv("MOEKIT_TEST_SEED")) return std::strtoull(s, nullptr, 0);
    return static_cast<uint64_t>(std::random_device{}()) << 32 | std::random_device{}();
  }();
  return seed;
}

// A generator for one test case: fresh (session seed ^ salt) or fixed (`fixed_seed`).
inline std::mt19937_64 make_rng(uint64_t salt) { return std::mt19937_64(session_seed() ^ salt); }

inline std::vector<float> uniform(std::mt19937_64& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline std::vector<float> normal(std::mt19937_64& rng, size_t n, float mean, float stddev) {
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

}  // namespace moekit::test
