// CPU reference of the grouped expert FFN and the dense MLP (moekit/experts.h), in double.
//
// Storage-dtype roundings sit where the library rounds (h, saved u, du, h' of the backward, the
// outputs), through a caller-given rounding function, so tests compare against the reference
// rounded exactly like the device; pass nullptr for an unrounded reference (finite-difference
// checks). Everything else is double.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace moekit::ref {

// Same values as moekit_activation_t.
enum Activation : int { kSwiglu = 0, kRelu2 = 1, kQuickGeglu = 2, kGeglu = 3, kSwigluOai = 4 };

struct ActSpec {
  int kind = kSwiglu;
  double alpha = 1.702;
  double limit = 0.0;
};

bool is_gated(int kind);

// Gated: act(g, v) and its partial derivatives (clamp gradients pass on the closed interval).
double act_gated(const ActSpec& spec, double g, double v);
void act_gated_grad(const ActSpec& spec, double g, double v, double* d_gate, double* d_up);
// relu2.
double act_relu2(double u);
double act_relu2_grad(double u);

using Rounder = std::function<double(double)>;

// One grouped-experts problem: every tensor as doubles (already representable in the storage
// dtype when the test feeds the device the same values).
struct ExpertsProblem {
  int num_experts = 0;  // E
  int hidden = 0;       // H
  int inter = 0;        // I
  ActSpec act;
  bool interleaved = false;        // gate/up column layout (gated activations)
  bool weight_after_down = false;
  int64_t max_rows = 0;            // R
  std::vector<int32_t> offsets;    // [E + 1]
  std::vector<double> xp;          // [R, H]
  std::vector<double> row_weights; // [R] or empty (p = 1)
  std::vector<double> w_gate_up;   // [E, H, NU]
  std::vector<double> b_gate_up;   // [E, NU] or empty
  std::vector<double> w_down;      // [E, I, H]
  std::vector<double> b_down;      // [E, H] or empty

  int nu() const { return is_gated(act.kind) ? 2 * inter : inter; }
  // Column of gate i / up i in u (gated activations).
  int gate_col(int i) const { return interleaved ? 2 * i : i; }
  int up_col(int i) const { return interleaved ? 2 * i + 1 : inter + i; }
};

// Outputs only for rows < offsets[E]; rows past the total stay at `unset` (NaN by default).
struct ExpertsForwardResult {
  std::vector<double> u;    // [R, NU] rounded (what u_out receives)
  std::vector<double> h;    // [R, I]  rounded
  std::vector<double> out;  // [R, H]  rounded
};

ExpertsForwardResult experts_forward(const ExpertsProblem& problem, const Rounder& round);

struct ExpertsBackwardResult {
  std::vector<double> grad_xp;          // [R, H]
  std::vector<double> grad_w_gate_up;   // [E, H, NU]
  std::vector<double> grad_b_gate_up;   // [E, NU]
  std::vector<double> grad_w_down;      // [E, I, H]
  std::vector<double> grad_b_down;      // [E, H]
  std::vector<double> grad_row_weights; // [R]
  std::vector<double> du;               // [R, NU] rounded (the device's intermediate)
};

// `u` is the saved pre-activation [R, NU] (the forward's rounded u, or unrounded for FD checks).
ExpertsBackwardResult experts_backward(const ExpertsProblem& problem, const std::vector<double>& u,
                                       const std::vector<double>& grad_out, const Rounder& round);

// The scalar sum_r <grad_out_r, out_r> over rows < total with no rounding (finite differences).
double experts_loss(const ExpertsProblem& problem, const std::vector<double>& grad_out);

// Transposes a row-major [rows, cols] matrix.
std::vector<double> transpose(const std::vector<double>& m, int64_t rows, int64_t cols);

}  // namespace moekit::ref
