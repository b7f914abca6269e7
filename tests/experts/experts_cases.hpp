// Problem builders shared by the experts CPU and GPU suites: random problems (values already
// representable in the storage dtype) and small-integer problems whose every product and sum is
// exact in fp32, so a device result can be compared bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "moekit/experts.h"
#include "tests/reference/experts_ref.hpp"
#include "tests/support/numeric.hpp"

namespace moekit::test::experts {

struct Spec {
  int hidden = 16;
  int inter = 8;
  int activation = MOEKIT_ACTIVATION_SWIGLU;
  double alpha = 1.702;
  double limit = 0.0;
  bool interleaved = false;
  bool weight_after_down = false;
  bool bias_gate_up = false;
  bool bias_down = false;
  bool row_weights = true;
  std::vector<int> counts{3, 0, 4};  // rows per expert; E = counts.size()
  int64_t tail_rows = 2;             // rows past the total (max_rows - total)

  int num_experts() const { return static_cast<int>(counts.size()); }
  int nu() const { return activation == MOEKIT_ACTIVATION_RELU2 ? inter : 2 * inter; }
  std::string describe() const {
    std::string s = "E=" + std::to_string(num_experts()) + " H=" + std::to_string(hidden) +
                    " I=" + std::to_string(inter) + " act=" + std::to_string(activation) +
                    " limit=" + std::to_string(limit) + (interleaved ? " interleaved" : " concatenated") +
                    (weight_after_down ? " weight_after_down" : "") + (bias_gate_up ? " b_gu" : "") +
                    (bias_down ? " b_down" : "") + (row_weights ? " p" : " p=1") + " counts=";
    for (int c : counts) s += std::to_string(c) + ",";
    return s + " tail=" + std::to_string(tail_rows);
  }
};

inline ref::ExpertsProblem skeleton(const Spec& s) {
  ref::ExpertsProblem p;
  p.num_experts = s.num_experts();
  p.hidden = s.hidden;
  p.inter = s.inter;
  p.act.kind = s.activation;
  p.act.alpha = static_cast<double>(static_cast<float>(s.alpha));  // the device sees fp32
  p.act.limit = static_cast<double>(static_cast<float>(s.limit));
  p.interleaved = s.interleaved;
  p.weight_after_down = s.weight_after_down;
  p.offsets.assign(1, 0);
  for (int c : s.counts) p.offsets.push_back(p.offsets.back() + c);
  p.max_rows = p.offsets.back() + s.tail_rows;
  return p;
}

inline std::vector<double> normal_vec(std::mt19937_64& rng, size_t n, double sd, moekit_dtype_t dtype) {
  std::normal_distribution<double> d(0.0, sd);
  std::vector<double> v(n);
  for (auto& x : v) x = round_to(dtype, static_cast<float>(d(rng)));
  return v;
}

// Random problem: x ~ N(0, 1), W_gu ~ N(0, 1/H), W_down ~ N(0, 1/I), biases ~ N(0, 0.1^2),
// p ~ U(0.1, 1) (fp32), every tensor rounded to `dtype`. Rows past the total hold values too
// (they must never be read).
inline ref::ExpertsProblem make_random(const Spec& s, std::mt19937_64& rng, moekit_dtype_t dtype) {
  ref::ExpertsProblem p = skeleton(s);
  const size_t E = s.num_experts(), H = s.hidden, I = s.inter, NU = s.nu(), R = p.max_rows;
  p.xp = normal_vec(rng, R * H, 1.0, dtype);
  p.w_gate_up = normal_vec(rng, E * H * NU, 1.0 / std::sqrt(double(H)), dtype);
  p.w_down = normal_vec(rng, E * I * H, 1.0 / std::sqrt(double(I)), dtype);
  if (s.bias_gate_up) p.b_gate_up = normal_vec(rng, E * NU, 0.1, dtype);
  if (s.bias_down) p.b_down = normal_vec(rng, E * H, 0.1, dtype);
  if (s.row_weights) {
    std::uniform_real_distribution<float> u(0.1f, 1.0f);
    p.row_weights.resize(R);
    for (auto& w : p.row_weights) w = u(rng);
  }
  return p;
}

inline std::vector<double> int_vec(std::mt19937_64& rng, size_t n, int lo, int hi) {
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Small integers (x, W in {-1, 0, 1}, biases in {-2..2}) and power-of-two routing weights: with
// relu2 every product and partial sum of the forward and backward is a multiple of 1/4 (an
// integer for u, G and dp), so fp32 arithmetic is exact, and device results equal the rounded
// reference bit for bit, while every sum stays below 2^24 times its quantum. The per-row sums do
// by construction; sums over a whole segment (weight and bias gradients) depend on the data, so
// the GPU suite checks the bound on every exact problem it runs (require_exact_sums).
inline ref::ExpertsProblem make_integer(const Spec& s, std::mt19937_64& rng) {
  ref::ExpertsProblem p = skeleton(s);
  const size_t E = s.num_experts(), H = s.hidden, I = s.inter, NU = s.nu(), R = p.max_rows;
  p.xp = int_vec(rng, R * H, -1, 1);
  p.w_gate_up = int_vec(rng, E * H * NU, -1, 1);
  p.w_down = int_vec(rng, E * I * H, -1, 1);
  if (s.bias_gate_up) p.b_gate_up = int_vec(rng, E * NU, -2, 2);
  if (s.bias_down) p.b_down = int_vec(rng, E * H, -2, 2);
  if (s.row_weights) {
    const double choices[4] = {0.25, 0.5, 1.0, 2.0};
    std::uniform_int_distribution<int> d(0, 3);
    p.row_weights.resize(R);
    for (auto& w : p.row_weights) w = choices[d(rng)];
  }
  return p;
}

}  // namespace moekit::test::experts
