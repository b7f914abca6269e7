// Pieces of the thread-per-token forward (kernels/router/forward_thread.cuh) that decide bits:
// plain C++ (host and device), so the CPU suite (tests/router/router_cpu_test.cpp, "thread
// forward ...") replays exactly what the kernel runs.
//
// 1. The fast path's team sums in one thread. team_sum<TPT> (kernels/router/common.cuh) is an
//    xor butterfly with distances TPT/2, TPT/4, ..., 1; fp32 addition is commutative, so every
//    lane ends with the same bits: a fixed binary tree whose first level pairs lanes l and
//    l + TPT/2. Visiting the lanes in bit-reversed order m -> l = bitrev(m) turns that tree into
//    the plain pairwise tree over m (first level (0,1), (2,3), ...), which a binary counter with
//    one partial per level computes while the lane partials stream in (push m = 0, 1, ...).
//    So the thread path reproduces the fast path's softmax denominator, picked-softmax sum and
//    weight normalisation bit for bit, given the same lane partials (each a sequential sum from
//    0.0f over the lane's values in slot order).
// 2. The top-K list: keys (float_key of the sanitised selection value: unsigned order = value
//    order, no NaN) visited in ascending expert order, kept sorted descending; a key enters with a
//    strict > so an equal key already in the list (a lower index) stays ahead: "ties to the lower
//    index". Slots past K are harmless (the list holds the KMAX best; the first K are the top K).
#pragma once

#include <cstdint>

#include "kernels/router/span.hpp"  // MOEKIT_SPAN_FN, MOEKIT_SPAN_UNROLL

namespace moekit::kernels::router {

// log2 of a power of two 1..32.
MOEKIT_SPAN_FN int log2_pow2(int tpt) {
  int l = 0;
  while ((1 << l) < tpt) ++l;
  return l;
}

// Lane visited at step m of the bit-reversed order over 2^log_tpt lanes.
MOEKIT_SPAN_FN int bitrev_lane(int m, int log_tpt) {
#if defined(__CUDA_ARCH__)
  return log_tpt == 0 ? 0 : static_cast<int>(__brev(static_cast<unsigned>(m)) >> (32 - log_tpt));
#endif
  int r = 0;
  for (int b = 0; b < log_tpt; ++b) r |= ((m >> b) & 1) << (log_tpt - 1 - b);
  return r;
}

// Pairwise tree over pushes m = 0, 1, ...: level `lev` holds the sum of the last complete block
// of 2^lev pushes. After 2^L pushes the total is level L (tree_result).
struct TreeSum {
  float level[6];
};

MOEKIT_SPAN_FN void tree_push(TreeSum& t, int m, float v) {
  bool placed = false;
  MOEKIT_SPAN_UNROLL
  for (int lev = 0; lev < 6; ++lev) {
    if (!placed) {
      if ((m >> lev) & 1) {
        v = t.level[lev] + v;  // commutative: the order of the operands does not change the bits
      } else {
        t.level[lev] = v;
        placed = true;
      }
    }
  }
}

MOEKIT_SPAN_FN float tree_result(const TreeSum& t, int log_tpt) {
  float r = t.level[0];
  MOEKIT_SPAN_UNROLL
  for (int lev = 1; lev < 6; ++lev)
    if (lev == log_tpt) r = t.level[lev];
  return r;
}

// Top-KMAX list of (key, index), descending by key, ties in insertion order. Key 0 = empty (below
// every real key: float_key(-inf) = 0x007fffff).
template <int KMAX>
struct TopList {
  uint32_t key[KMAX];
  int32_t idx[KMAX];
};

template <int KMAX>
MOEKIT_SPAN_FN void toplist_init(TopList<KMAX>& l) {
  MOEKIT_SPAN_UNROLL
  for (int i = 0; i < KMAX; ++i) {
    l.key[i] = 0u;
    l.idx[i] = 0;
  }
}

// Inserts (k, e) where it belongs (after every key >= k). Each slot is decided from the old
// values of itself and the slot above (the loop runs downwards), all in registers.
template <int KMAX>
MOEKIT_SPAN_FN void toplist_insert(TopList<KMAX>& l, uint32_t k, int32_t e) {
  MOEKIT_SPAN_UNROLL
  for (int i = KMAX - 1; i > 0; --i) {
    const bool above = k > l.key[i - 1];  // the new key goes to slot i - 1 or higher
    const bool here = !above && k > l.key[i];
    l.key[i] = above ? l.key[i - 1] : (here ? k : l.key[i]);
    l.idx[i] = above ? l.idx[i - 1] : (here ? e : l.idx[i]);
  }
  if (k > l.key[0]) {
    l.key[0] = k;
    l.idx[0] = e;
  }
}

// Key of slot k - 1 (the current K-th best; 0 while fewer than K keys are in): a key enters the
// top K only if it is strictly greater.
template <int KMAX>
MOEKIT_SPAN_FN uint32_t toplist_threshold(const TopList<KMAX>& l, int k) {
  uint32_t t = l.key[0];
  MOEKIT_SPAN_UNROLL
  for (int i = 1; i < KMAX; ++i)
    if (i == k - 1) t = l.key[i];
  return t;
}

// Rank of group g among G group keys (descending, ties to the lower group index).
template <class KeyAt>
MOEKIT_SPAN_FN int group_rank(int g, int num_groups, KeyAt key_at) {
  const uint32_t mine = key_at(g);
  int rank = 0;
  for (int h = 0; h < num_groups; ++h) {
    const uint32_t other = key_at(h);
    rank += static_cast<int>((other > mine) || (other == mine && h < g));
  }
  return rank;
}

// Lanes of the fast path's team sum over its output ranks (lane l holds ranks l, l + TPT, ...):
// while K <= TPT / 2 the upper half of the lanes hold nothing, each first-level node of the
// butterfly is a lower lane's partial plus +0 (that partial's own bits: a partial starts at +0.0f,
// so it is never -0, and a NaN stays a NaN), and the rest of the tree is team_sum<TPT / 2>. So the
// sum over TPT lanes is bitwise the sum over rank_lanes(TPT, K) lanes, each holding one rank
// (K <= rank_lanes) or, below, the ranks l, l + TPT, ... as before (then rank_lanes = TPT).
MOEKIT_SPAN_FN int rank_lanes(int tpt, int k) {
  while (tpt > 1 && 2 * k <= tpt) tpt /= 2;
  return tpt;
}

// The block's staging walk (forward_thread.cuh): item c of row r (n items a row) as a flat index
// r n + c, advanced by step = q n + rm (q = step / n, rm = step % n, computed once) with one
// carry: no division per item.
MOEKIT_SPAN_FN void flat_advance(int& r, int& c, int q, int rm, int n) {
  r += q;
  c += rm;
  if (c >= n) {
    c -= n;
    ++r;
  }
}

// The list size compiled for K (kernels are instantiated for these four).
inline constexpr int thread_kmax(int top_k) { return top_k <= 2 ? 2 : top_k <= 4 ? 4 : top_k <= 8 ? 8 : 10; }
constexpr int kThreadMaxK = 10;

}  // namespace moekit::kernels::router
