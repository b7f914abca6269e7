// What the sm_90a epilogue and tile tests and their benchmarks share: the compute capability 9.0
// check (SKIP otherwise) and the axis-M problem over contiguous operands.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

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

}  // namespace moekit::test::sm90
