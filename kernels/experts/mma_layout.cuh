// Fragment layout of mma.sync.m16n8k16 (row.col, 16-bit inputs, fp32 accumulators) and the
// shared-memory address every lane hands to ldmatrix.x4 to fill it, for the four ways the grouped
// GEMM keeps its operands in shared memory. Host- and device-callable: the CPU tests replay
// ldmatrix and mma on these addresses and compare with a plain matrix product.
//
// PTX fragment ownership (g = lane / 4, q = lane % 4):
//   A (16 x 16, row-major): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B (16 x 8, k x n):      b0 = (k 2q..2q+1, n g), b1 = (k 2q+8..2q+9, n g)
//   C (16 x 8, fp32):       c0, c1 = (g, 2q..2q+1), c2, c3 = (g+8, 2q..2q+1)
// ldmatrix.x4: lanes 8i .. 8i+7 give the row addresses of 8x8 matrix i; register i of lane t gets
// row t/4, columns 2(t%4), 2(t%4)+1 of matrix i (with .trans: rows 2(t%4), 2(t%4)+1 of column t/4).
// Offsets below are in elements from the start of the stage buffer; `pitch` is its row pitch.
#pragma once

#include <cuda_runtime.h>

namespace moekit::kernels::experts {

// A stored [m][k] (k contiguous), plain ldmatrix: matrices (m 0-7, k 0-7), (m 8-15, k 0-7),
// (m 0-7, k 8-15), (m 8-15, k 8-15) -> a0..a3.
__host__ __device__ inline int ldsm_offset_a_mk(int lane, int m_base, int k_base, int pitch) {
  return (m_base + (lane & 15)) * pitch + k_base + (lane >> 4) * 8;
}

// A stored [k][m] (m contiguous), ldmatrix.trans: matrix j = lane / 8 covers
// k rows k_base + 8 (j / 2) .. + 7 at m offset 8 (j % 2): the same a0..a3.
__host__ __device__ inline int ldsm_offset_a_km(int lane, int m_base, int k_base, int pitch) {
  const int j = lane >> 3, r = lane & 7;
  return (k_base + r + (j >> 1) * 8) * pitch + m_base + (j & 1) * 8;
}

// B stored [n][k] (k contiguous), plain ldmatrix over two n8 blocks: matrices (n 0-7, k 0-7),
// (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) -> b0, b1 of block 0, b0, b1 of block 1.
__host__ __device__ inline int ldsm_offset_b_nk(int lane, int n_base, int k_base, int pitch) {
  const int j = lane >> 3, r = lane & 7;
  return (n_base + r + (j >> 1) * 8) * pitch + k_base + (j & 1) * 8;
}

// B stored [k][n] (n contiguous), ldmatrix.trans: matrix j covers k rows k_base + 8 (j % 2) ..
// at n offset 8 (j / 2): the same register order as ldsm_offset_b_nk.
__host__ __device__ inline int ldsm_offset_b_kn(int lane, int n_base, int k_base, int pitch) {
  const int j = lane >> 3, r = lane & 7;
  return (k_base + r + (j & 1) * 8) * pitch + n_base + (j >> 1) * 8;
}

// cp.async partition of one operand tile stored [rows][cols + pad] in shared memory (cols
// contiguous, cpr = cols / 8 chunks of 16 bytes per row) among `threads` threads: chunk i of thread
// tid sits at row copy_row(tid, i, cpr, threads) and element column copy_col(tid, cpr). A thread's
// column is the same for all its chunks and its rows step by threads / cpr, so the kernel keeps one
// global address per operand and adds a fixed stride per chunk.
//   cpr >= 8 (the k-major [k][m] and [k][n] tiles, pitches of 17 and 33 bank groups): consecutive
//     threads take consecutive chunks of a row; the 8 chunks of every 8-thread phase of the
//     shared-memory write are 8 consecutive bank groups.
//   cpr == 4 (the k-contiguous [m][k] and [n][k] tiles of BK = 32, pitch 40 elements = 5 bank
//     groups): a warp covers 8 whole rows (so global reads stay whole 32-byte sectors: lanes 2j,
//     2j + 1 read the two halves of one sector), arranged so that each 8-thread phase writes rows
//     {0, 2, 4, 6} or {1, 3, 5, 7} at one pair of chunks: bank groups 5 r + c mod 8 are then all 8
//     distinct (row-major order would put chunks (0, 0) and (1, 3) in the same group).
// The CPU tests replay both: every chunk exactly once, conflict-free phases, whole sectors.
__host__ __device__ inline int copy_row(int tid, int i, int cpr, int threads) {
  if (cpr == 4) {
    const int lane = tid & 31, warp = tid >> 5;
    return warp * 8 + ((lane >> 1) & 3) * 2 + (lane >> 4) + i * (threads / 4);
  }
  return tid / cpr + i * (threads / cpr);
}
__host__ __device__ inline int copy_col(int tid, int cpr) {
  if (cpr == 4) {
    const int lane = tid & 31;
    return ((lane & 1) | ((lane >> 2) & 2)) * 8;
  }
  return (tid % cpr) * 8;
}

// Row and column (within the 16 x 8 tile) of accumulator element e (0..3) of a lane.
__host__ __device__ inline int acc_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
__host__ __device__ inline int acc_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

}  // namespace moekit::kernels::experts
