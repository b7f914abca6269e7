// Which memory accesses move a lane's span of a logits / gradient row on the fast paths. Plain
// C++ (host and device): the kernels (kernels/router/common.cuh, load_span / store_span) and the
// CPU suite (tests/router/router_cpu_test.cpp, "span accesses ...") run this one function, so the
// host replays exactly the accesses the device makes.
//
// A lane owns elements [base, base + V) of a row of E elements (row start aligned to vec_bytes,
// the widest access the pointer and the row stride allow: 16, 8, 4 or 2 bytes, at least the
// element size). rem = E - base is how many of them exist (rem <= 0: the lane lies past E).
// visit_span calls access(j, Bytes<W>{}) for accesses of W bytes starting at span element j:
//   rem >= V (the whole span is in the row): V * size / vec_bytes accesses of vec_bytes;
//   otherwise, per 16-byte chunk c: a chunk inside the row moves as vec_bytes accesses, the chunk
//   that straddles E element by element (only its elements < rem), chunks past E not at all.
// So every access lies in [base, E) of its row (never past the row, whatever the stride, and so
// never past the allocation, whose last row may end at E), is aligned to its size, and every
// element below E is moved exactly once; the caller gives the elements past E their padding value.
//
// Written with direct comparisons against rem only (no clamped count compared for equality):
// ptxas 13.0 for sm_90 fused `n = clamp(E - base, 0, V); if (n == V)` into a VIMNMX with a
// predicate output and took the whole-span branch for n < V (docs/router.md, "Toolchain").
#pragma once

#include <type_traits>

#if defined(__CUDACC__)
#define MOEKIT_SPAN_FN __host__ __device__ __forceinline__
#else
#define MOEKIT_SPAN_FN inline
#endif
#if defined(__CUDA_ARCH__)
#define MOEKIT_SPAN_UNROLL _Pragma("unroll")
#else
#define MOEKIT_SPAN_UNROLL
#endif

namespace moekit::kernels::router {

template <int W>
using Bytes = std::integral_constant<int, W>;

// Accesses of W bytes covering span elements [first, first + count) in row order.
template <int W, int kElemBytes, int kCount, class Access>
MOEKIT_SPAN_FN void visit_run(int first, Access& access) {
  constexpr int kStep = W / kElemBytes;
MOEKIT_SPAN_UNROLL
  for (int j = 0; j < kCount; j += kStep) access(first + j, Bytes<W>{});
}

// `count` elements from `first` (a multiple of 16 bytes of elements) with the widest access
// vec_bytes allows.
template <int kElemBytes, int kCount, class Access>
MOEKIT_SPAN_FN void visit_aligned(int first, int vec_bytes, Access& access) {
  if (vec_bytes >= 16) {
    visit_run<16, kElemBytes, kCount>(first, access);
  } else if (vec_bytes >= 8) {
    visit_run<8, kElemBytes, kCount>(first, access);
  } else if constexpr (kElemBytes == 4) {
    visit_run<4, kElemBytes, kCount>(first, access);
  } else if (vec_bytes >= 4) {
    visit_run<4, kElemBytes, kCount>(first, access);
  } else {  // 16-bit elements at a 2-byte boundary
    visit_run<2, kElemBytes, kCount>(first, access);
  }
}

template <int V, int kElemBytes, class Access>
MOEKIT_SPAN_FN void visit_span(int rem, int vec_bytes, Access access) {
  static_assert(kElemBytes == 2 || kElemBytes == 4, "16- or 32-bit elements");
  static_assert(V * kElemBytes % 16 == 0, "a lane's span must be whole 16-byte chunks");
  constexpr int kChunkElems = 16 / kElemBytes;
  constexpr int kChunks = V / kChunkElems;
  if (rem >= V) {  // the common case: one branch, then the span's vector accesses
    visit_aligned<kElemBytes, V>(0, vec_bytes, access);
    return;
  }
MOEKIT_SPAN_UNROLL
  for (int c = 0; c < kChunks; ++c) {
    const int first = c * kChunkElems;
    if (rem >= first + kChunkElems) {
      visit_aligned<kElemBytes, kChunkElems>(first, vec_bytes, access);
    } else {
MOEKIT_SPAN_UNROLL
      for (int j = 0; j < kChunkElems; ++j)
        if (first + j < rem) access(first + j, Bytes<kElemBytes>{});
    }
  }
}

}  // namespace moekit::kernels::router
