// What the sm_90a epilogue and tile tests and their benchmarks share: the compute capability 9.0
// check (SKIP otherwise) and the axis-M problem over contiguous operands.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/experts/grouped_gemm.hpp"

namespace moekit::test::sm90 {

// Exits 77 (SKIP, naming `what`) unless the current device is compute capability 9.0.
inline void require_sm90(const char* what) {
  static const bool ok = [] {
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
      return false;
    return major == 9 && minor == 0;
  }();
  if (!ok) {
    std::printf("SKIP: %s need a compute capability 9.0 device\n", what);
    std::fflush(stdout);
    std::_Exit(77);
  }
}

// C[R, n] = A[R, k] B_g over `groups` groups (axis M, offsets on the device): A row-major with
// lda = k, B KN [groups][k][n] or (b_nk) NK [groups][n][k], contiguous; no gate/up pairing.
inline kernels::experts::GroupedGemmProblem axis_m_problem(int groups, const int32_t* offsets, int64_t rows, int n,
                                                           int k, const void* a, const void* b, bool b_nk) {
  kernels::experts::GroupedGemmProblem p{};
  p.axis = kernels::experts::kAxisM;
  p.num_groups = groups;
  p.offsets = offsets;
  p.max_rows = rows;
  p.n = n;
  p.k = k;
  p.a = a;
  p.lda = k;
  p.b = b;
  p.ldb = b_nk ? k : n;
  p.b_group_stride = static_cast<int64_t>(k) * n;
  p.b_nk = b_nk ? 1 : 0;
  p.gate_up_half = 0;
  p.splits = 1;
  return p;
}

// A [R][ld] 16-bit output poisoned with 0xffff before a launch, whose groups own rows
// [0, rows_owned) x columns [0, cols): `unwritten` counts owned elements that are NaN as bf16 (the
// poison, or any NaN), `touched` the other elements no longer holding the poison.
struct PoisonCheck {
  int64_t unwritten = 0;
  int64_t touched = 0;
};
inline PoisonCheck check_poison(const std::vector<uint16_t>& out, int64_t R, int64_t rows_owned, int64_t cols,
                                int64_t ld) {
  PoisonCheck p;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      const uint16_t bits = out[static_cast<size_t>(r * ld + c)];
      if (r < rows_owned && c < cols)
        p.unwritten += (bits & 0x7f80u) == 0x7f80u && (bits & 0x7fu) != 0 ? 1 : 0;
      else
        p.touched += bits != 0xffffu ? 1 : 0;
    }
  return p;
}

}  // namespace moekit::test::sm90
