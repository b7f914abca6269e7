// The index arithmetic of the plan kernels (kernels/tokens/plan.cu), as plain C++ for the host
// and the device: the kernels call these functions, and the CPU suite (tests/tokens/
// tokens_cpu_test.cpp, "the plan kernels' index arithmetic replayed on the host") runs the same
// functions in the kernels' block / tile / warp / step / lane order against the reference, so the
// arithmetic the device does is checked on a machine without a GPU.
//
// Vocabulary. Block b owns slots [b * slots_per_block, min(N, (b + 1) * slots_per_block)), a
// whole number of tiles of kPlanTileSlots. In a tile, warp w owns kPlanWarpSlots consecutive
// slots, walked in kPlanItersPerWarp steps of 32 (lane l of step i: slot
// tile + w * kPlanWarpSlots + 32 i + l). Every slot gets a label:
//   e in [0, E_local)   routed to local expert e
//   E_local             an invalid id in a real token (counted, never followed)
//   E_local + 1         no row for another reason (masked token, non-local expert, past the range)
// Labels fit in label_bits(E_local) bits, so a warp finds the lanes that share its label with
// that many ballots (one per bit): the vote of bit j keeps the lanes whose bit j equals ours.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>

#include "kernels/tokens/launch.hpp"
#include "kernels/tokens/tuning.hpp"

#if defined(__CUDACC__)
#define MOEKIT_PLAN_FN __host__ __device__ __forceinline__
#else
#define MOEKIT_PLAN_FN inline
#endif

namespace moekit::kernels::tokens {

constexpr int kNoRow = -1;

MOEKIT_PLAN_FN int label_invalid(int num_local) { return num_local; }
MOEKIT_PLAN_FN int label_none(int num_local) { return num_local + 1; }

// Bits that hold every label 0 .. E_local + 1 (E_local >= 1): 2 for E_local = 1 .. 2, 9 for
// 256 .. 510, 13 for 4096.
MOEKIT_PLAN_FN int label_bits(int num_local) {
  int bits = 0;
  for (unsigned v = static_cast<unsigned>(num_local) + 1u; v != 0u; v >>= 1) ++bits;
  return bits;
}

// The label of slot s (s < N). The id of a masked token is not read.
MOEKIT_PLAN_FN int slot_label(const PlanArgs& a, int64_t slot) {
  if (a.token_mask != nullptr) {
    const unsigned t = static_cast<unsigned>(slot) / static_cast<unsigned>(a.top_k);
    if (a.token_mask[t] == 0) return label_none(a.num_local);
  }
  const int id = a.indices[slot];
  if (id < 0 || id >= a.num_experts) return label_invalid(a.num_local);
  const unsigned rel = static_cast<unsigned>(id - a.expert_begin);  // both in [0, E): no overflow
  return rel < static_cast<unsigned>(a.num_local) ? static_cast<int>(rel) : label_none(a.num_local);
}

// Slot of lane `lane` in step `step` of warp `warp` of the tile starting at slot `tile`.
MOEKIT_PLAN_FN int64_t plan_slot(int64_t tile, int warp, int step, int lane) {
  return tile + static_cast<int64_t>(warp) * kPlanWarpSlots + step * 32 + lane;
}

// One ballot of the label match: `vote` has bit l set when lane l's label has bit `bit` set;
// the lanes kept in `peers` are those whose bit agrees with ours. After every bit of
// label_bits, peers = the lanes with our label (ourselves included).
MOEKIT_PLAN_FN unsigned fold_vote(unsigned peers, unsigned vote, int label, int bit) {
  return peers & (((static_cast<unsigned>(label) >> bit) & 1u) != 0u ? vote : ~vote);
}

// Whether the counting kernel aggregates equal labels of a step before its atomics: worth its
// ballots only when few labels make lanes collide (E_local <= 62: at most 6 label bits).
MOEKIT_PLAN_FN bool count_aggregates(int num_local) { return label_bits(num_local) <= kPlanCountAggregateBits; }

// The count table's entries are 16-bit when a block owns at most 65535 slots (every count of a
// block fits), as on every benchmark shape: every scatter block reads the whole table, B^2
// (E_local + 1) entries over the grid, so halving the entries halves that L2 traffic. The
// workspace keeps its int32 size; wider blocks keep int32 entries.
MOEKIT_PLAN_FN bool plan_table_is_narrow(int64_t slots_per_block) { return slots_per_block <= 0xffff; }

// Threads that share one column of the [blocks, E_local + 1] count table when a scatter block
// sums the columns of the local experts: with E_local >= kPlanThreads a thread owns whole columns
// (1); otherwise up to kPlanThreads / E_local threads split a column's rows, never more threads
// than rows.
MOEKIT_PLAN_FN int column_parts(int num_local, int blocks) {
  if (num_local >= kPlanThreads) return 1;
  const int parts = kPlanThreads / num_local;
  return parts < blocks ? parts : blocks;
}

// Rows a scatter block loads per table column in one batch (E_local >= kPlanThreads: a thread
// loads kPlanTableBatch / rows columns at once). Every load of a batch is issued before any is
// used, so a batch costs one round trip.
MOEKIT_PLAN_FN int table_rows_per_batch(int blocks) {
  return blocks <= kPlanTableBatch / 4 ? kPlanTableBatch / 4
                                       : (blocks <= kPlanTableBatch / 2 ? kPlanTableBatch / 2 : kPlanTableBatch);
}

MOEKIT_PLAN_FN int capacity_or_max(const PlanArgs& a) { return a.capacity > 0 ? a.capacity : INT_MAX; }

// roundup(kept, A) without int32 overflow in the intermediate (the result fits: it is bounded by
// max_rows, checked on the host).
MOEKIT_PLAN_FN int padded_size(int kept, int alignment) {
  return static_cast<int>((static_cast<int64_t>(kept) + alignment - 1) / alignment * alignment);
}

// An expert whose slots go through the selection kernel (drop by weight, over capacity).
MOEKIT_PLAN_FN bool listed(const PlanArgs& a, int n, int cap) { return a.drop_by_weight != 0 && n > cap; }

// Order-preserving key of a routing weight: a larger weight gives a larger key; -0 and +0 are
// equal; every NaN maps to 0, below -inf.
MOEKIT_PLAN_FN uint32_t weight_key(float w) {
#if defined(__CUDA_ARCH__)
  uint32_t u = __float_as_uint(w);
#else
  uint32_t u;
  std::memcpy(&u, &w, sizeof(u));
#endif
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// What the scatter kernel writes for a routed slot of rank `pos` (0-based, in slot order among
// all routed slots of its expert) when the expert has n routed slots, starts at row `offset`
// and, when listed, at entry `list_start` of the selection lists.
enum class Place : int { kRow = 0, kDropped = 1, kListed = 2 };
struct Placement {
  Place kind;
  int index;  // the row (kRow) or the list entry (kListed)
};
MOEKIT_PLAN_FN Placement place_slot(const PlanArgs& a, int pos, int n, int cap, int offset, int list_start) {
  if (listed(a, n, cap)) return Placement{Place::kListed, list_start + pos};
  if (pos < (n < cap ? n : cap)) return Placement{Place::kRow, offset + pos};
  return Placement{Place::kDropped, kNoRow};
}

}  // namespace moekit::kernels::tokens
