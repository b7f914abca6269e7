// Fused epilogues of the grouped GEMMs, shared by every kernel family: each call takes the fp32
// accumulators of a pair of output columns of one row (see EpiKind in grouped_gemm.hpp for the
// maths) and does everything up to the one rounding to the storage dtype. Intermediate values
// (u, act(u), G) never reach memory in fp32.
//
// Pairs: a kernel calls
//   gate_up_pair2(row, i, g0, g1, v0, v1)  gate/up pairing: gate and up of h columns i, i + 1
//                                          (i even; concatenated layout)
//   gate_up_pair1(row, i, g, v)            interleaved layout: gate and up of h column i
//   plain_pair(row, c, a0, a1)             two adjacent output columns c, c + 1 (c even) of the
//                                          other kinds; kEpiBwdAct returns its dp contribution.
// Alignment: c and i even and every row stride a multiple of 8 elements make every paired store
// 4-byte (bf16/f16) or 8-byte (f32) aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/common/dtype.cuh"
#include "kernels/experts/activation.cuh"
#include "kernels/experts/grouped_gemm.hpp"

namespace moekit::kernels::experts {

template <class T>
__device__ __forceinline__ float2 load_pair(const T* p);
template <>
__device__ __forceinline__ float2 load_pair<float>(const float* p) {
  return *reinterpret_cast<const float2*>(p);
}
template <>
__device__ __forceinline__ float2 load_pair<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
template <>
__device__ __forceinline__ float2 load_pair<__half>(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}

// A pair of elements as raw bits (4 bytes for bf16/f16, 8 for fp32), so a kernel can keep loaded
// but not yet converted values in half the registers; unpack_pair_bits gives load_pair's float2.
template <class T>
struct PairBits {
  using type = uint32_t;
};
template <>
struct PairBits<float> {
  using type = uint2;
};
template <class T>
__device__ __forceinline__ typename PairBits<T>::type load_pair_bits(const T* p) {
  return *reinterpret_cast<const typename PairBits<T>::type*>(p);
}
template <class T>
__device__ __forceinline__ float2 unpack_pair_bits(typename PairBits<T>::type b);
template <>
__device__ __forceinline__ float2 unpack_pair_bits<float>(uint2 b) {
  return make_float2(__uint_as_float(b.x), __uint_as_float(b.y));
}
template <>
__device__ __forceinline__ float2 unpack_pair_bits<__nv_bfloat16>(uint32_t b) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&b));
}
template <>
__device__ __forceinline__ float2 unpack_pair_bits<__half>(uint32_t b) {
  return __half22float2(*reinterpret_cast<const __half2*>(&b));
}

// The other way (16-bit T): two values rounded to T (round to nearest even), as the raw bits of
// the pair; one value rounded as from_float, as its raw bits. The one rounding of every stored
// pair: store_pair below writes these bits to global memory, the staged and TMA-store epilogues
// into shared memory.
template <class T>
__device__ __forceinline__ uint32_t pack_pair_bits(float a, float b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}
template <class T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  } else {
    *reinterpret_cast<uint32_t*>(p) = pack_pair_bits<T>(a, b);
  }
}
template <class T>
__device__ __forceinline__ uint16_t pack_one_bits(float a) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(a));
  } else {
    return __half_as_ushort(__float2half_rn(a));
  }
}

// The saved u a kEpiBwdAct column pair needs (EpilogueRow::bwd_act_load): two raw pairs.
template <class T>
struct BwdActIn {
  typename PairBits<T>::type a, b;
};

// One row's view of the epilogue: the group's bias row and the row's routing weight.
template <class T>
struct EpilogueRow {
  const EpilogueParams& ep;
  const T* bias;  // group's bias row or nullptr
  int64_t row;    // global row (axis M) / output row m (axis K)
  float p;        // routing weight (1 when none)

  __device__ __forceinline__ float bias_at(int col) const {
    return bias ? to_float(bias[col]) : 0.0f;
  }

  // ---- kEpiGateUp / kEpiRelu2 values: one definition for the register-direct stores below and
  // the TMA-store epilogue of grouped_gemm_sm90.cuh, so both round the same expressions to T ----
  struct GateUp2 {
    float g0, g1, v0, v1;  // biased gate and up of h columns i, i + 1
  };
  __device__ __forceinline__ float h_scale() const { return ep.weight_after_down ? 1.0f : p; }
  __device__ __forceinline__ GateUp2 gate_up_biased2(int i, float g0, float g1, float v0, float v1) const {
    if (bias) {
      const float2 bg = load_pair(bias + i);
      const float2 bv = load_pair(bias + ep.inter + i);
      g0 += bg.x; g1 += bg.y; v0 += bv.x; v1 += bv.y;
    }
    return GateUp2{g0, g1, v0, v1};
  }
  // kAct >= 0: the activation kind the caller has checked ep.act.kind to be (act_gated_as).
  template <int kAct = -1>
  __device__ __forceinline__ float2 gate_up_h2(const GateUp2& x) const {
    const float s = h_scale();
    return make_float2(act_gated_as<kAct>(ep.act, x.g0, x.v0) * s, act_gated_as<kAct>(ep.act, x.g1, x.v1) * s);
  }
  // Interleaved: biased (gate, up) of h column i (u columns 2 i, 2 i + 1), and its h value.
  __device__ __forceinline__ float2 gate_up_biased1(int i, float g, float v) const {
    if (bias) {
      const float2 b = load_pair(bias + 2 * i);
      g += b.x; v += b.y;
    }
    return make_float2(g, v);
  }
  __device__ __forceinline__ float gate_up_h1(float2 gv) const { return act_gated(ep.act, gv.x, gv.y) * h_scale(); }
  // kEpiRelu2: biased u of columns c, c + 1, and their h values.
  __device__ __forceinline__ float2 relu2_biased(int c, float a0, float a1) const {
    if (bias) {
      const float2 b = load_pair(bias + c);
      a0 += b.x; a1 += b.y;
    }
    return make_float2(a0, a1);
  }
  __device__ __forceinline__ float2 relu2_h(float2 a) const {
    const float s = h_scale();
    return make_float2(act_relu2(a.x) * s, act_relu2(a.y) * s);
  }

  // ---- kEpiGateUp, concatenated: h columns i, i + 1 (kAct as in gate_up_h2) ----
  template <int kAct = -1>
  __device__ __forceinline__ void gate_up_pair2(int i, float g0, float g1, float v0, float v1) const {
    const GateUp2 x = gate_up_biased2(i, g0, g1, v0, v1);
    if (ep.u) {
      T* u = static_cast<T*>(ep.u) + row * ep.ldu;
      store_pair(u + i, x.g0, x.g1);
      store_pair(u + ep.inter + i, x.v0, x.v1);
    }
    if (ep.c) {
      const float2 o = gate_up_h2<kAct>(x);
      store_pair(static_cast<T*>(ep.c) + row * ep.ldc + i, o.x, o.y);
    }
  }

  // ---- kEpiGateUp, interleaved: h column i from u columns 2i (gate), 2i + 1 (up) ----
  __device__ __forceinline__ void gate_up_pair1(int i, float g, float v) const {
    const float2 gv = gate_up_biased1(i, g, v);
    if (ep.u) store_pair(static_cast<T*>(ep.u) + row * ep.ldu + 2 * i, gv.x, gv.y);
    if (ep.c) static_cast<T*>(ep.c)[row * ep.ldc + i] = from_float<T>(gate_up_h1(gv));
  }

  // ---- kEpiBwdAct, split in two so a kernel can issue the loads of several column pairs before
  // the stores of earlier ones (the compiler may not hoist a load of u above a store to du or h':
  // they could alias). bwd_act_load(c) reads the saved u of h columns c, c + 1 (raw bits: relu2 u
  // columns c, c + 1; interleaved gate/up of c and of c + 1; concatenated gate c, c + 1 and up
  // c, c + 1); bwd_act_apply(c, in, a0, a1) with a0, a1 = G at h columns c, c + 1 writes du and
  // h' and returns the dp contribution. apply(load) is the one code path of every kernel family.
  // The _as<kLayout, kKind> forms take the layout (kBwdRelu2 / kBwdInterleaved / kBwdConcat) and
  // the gated activation kind as compile-time constants (kKind = kBwdRuntimeKind: ep.act.kind at
  // run time), so a kernel can hoist that dispatch out of its column loop and the activation code
  // keeps only the chosen kind's operations (same operations in the same order: same values).
  static constexpr int kBwdRelu2 = 0, kBwdInterleaved = 1, kBwdConcat = 2;
  static constexpr int kBwdRuntimeKind = -1;
  static_assert(kBwdRuntimeKind == -1, "with_gated_kind passes -1 for the run-time kind");

  __device__ __forceinline__ int bwd_layout() const {
    return ep.act.kind == kActRelu2 ? kBwdRelu2 : (ep.interleaved ? kBwdInterleaved : kBwdConcat);
  }

  template <int kLayout>
  __device__ __forceinline__ BwdActIn<T> bwd_act_load_as(int c) const {
    const T* u = static_cast<const T*>(ep.u) + row * ep.ldu;
    BwdActIn<T> in;
    if constexpr (kLayout == kBwdRelu2) {
      in.a = load_pair_bits(u + c);
      in.b = in.a;
    } else if constexpr (kLayout == kBwdInterleaved) {
      in.a = load_pair_bits(u + 2 * c);      // gate c, up c
      in.b = load_pair_bits(u + 2 * c + 2);  // gate c + 1, up c + 1
    } else {
      in.a = load_pair_bits(u + c);             // gate c, c + 1
      in.b = load_pair_bits(u + ep.inter + c);  // up c, c + 1
    }
    return in;
  }

  template <int kLayout, int kKind>
  __device__ __forceinline__ float bwd_act_apply_as(int c, const BwdActIn<T>& in, float a0, float a1) const {
    T* du = static_cast<T*>(ep.c) + row * ep.ldc;
    const float pg0 = p * a0, pg1 = p * a1;
    const ActParams act = act_params_as<kKind>(ep.act);  // kBwdRuntimeKind = -1: as given
    float act0, act1;
    if constexpr (kLayout == kBwdRelu2) {
      const float2 uu = unpack_pair_bits<T>(in.a);
      act0 = act_relu2(uu.x);
      act1 = act_relu2(uu.y);
      store_pair(du + c, act_relu2_grad(uu.x) * pg0, act_relu2_grad(uu.y) * pg1);
    } else if constexpr (kLayout == kBwdInterleaved) {
      const float2 gv0 = unpack_pair_bits<T>(in.a);  // gate c, up c
      const float2 gv1 = unpack_pair_bits<T>(in.b);  // gate c + 1, up c + 1
      const GatedGrad d0 = act_gated_grad(act, gv0.x, gv0.y);
      const GatedGrad d1 = act_gated_grad(act, gv1.x, gv1.y);
      act0 = d0.act;
      act1 = d1.act;
      store_pair(du + 2 * c, d0.d_gate * pg0, d0.d_up * pg0);
      store_pair(du + 2 * c + 2, d1.d_gate * pg1, d1.d_up * pg1);
    } else {
      const int I = ep.inter;
      const float2 g = unpack_pair_bits<T>(in.a);
      const float2 v = unpack_pair_bits<T>(in.b);
      const GatedGrad d0 = act_gated_grad(act, g.x, v.x);
      const GatedGrad d1 = act_gated_grad(act, g.y, v.y);
      act0 = d0.act;
      act1 = d1.act;
      store_pair(du + c, d0.d_gate * pg0, d1.d_gate * pg1);
      store_pair(du + I + c, d0.d_up * pg0, d1.d_up * pg1);
    }
    store_pair(static_cast<T*>(ep.h) + row * ep.ldh + c, act0 * p, act1 * p);
    return a0 * act0 + a1 * act1;
  }

  __device__ __forceinline__ BwdActIn<T> bwd_act_load(int c) const {
    switch (bwd_layout()) {
      case kBwdRelu2: return bwd_act_load_as<kBwdRelu2>(c);
      case kBwdInterleaved: return bwd_act_load_as<kBwdInterleaved>(c);
      default: return bwd_act_load_as<kBwdConcat>(c);
    }
  }

  __device__ __forceinline__ float bwd_act_apply(int c, const BwdActIn<T>& in, float a0, float a1) const {
    switch (bwd_layout()) {
      case kBwdRelu2: return bwd_act_apply_as<kBwdRelu2, kBwdRuntimeKind>(c, in, a0, a1);
      case kBwdInterleaved: return bwd_act_apply_as<kBwdInterleaved, kBwdRuntimeKind>(c, in, a0, a1);
      default: return bwd_act_apply_as<kBwdConcat, kBwdRuntimeKind>(c, in, a0, a1);
    }
  }

  // ---- kEpiStore: the fp32 values of output columns c, c + 1 (rounded to T by the caller) ----
  // One definition for the register-direct store (plain_pair) and the TMA-store epilogue of
  // grouped_gemm_sm90.cuh, so both round the same expression (the same contraction) to T.
  __device__ __forceinline__ float2 store_values(int c, float a0, float a1) const {
    const float s = ep.weight_after_down ? p : 1.0f;
    float o0 = s * a0, o1 = s * a1;
    if (bias) {
      const float2 b = load_pair(bias + c);
      o0 += p * b.x;
      o1 += p * b.y;
    }
    return make_float2(o0, o1);
  }

  // ---- every other kind: output columns c, c + 1 ----
  template <int kKind>
  __device__ __forceinline__ float plain_pair(int c, float a0, float a1) const {
    if constexpr (kKind == kEpiRelu2) {
      const float2 a = relu2_biased(c, a0, a1);
      if (ep.u) store_pair(static_cast<T*>(ep.u) + row * ep.ldu + c, a.x, a.y);
      if (ep.c) {
        const float2 o = relu2_h(a);
        store_pair(static_cast<T*>(ep.c) + row * ep.ldc + c, o.x, o.y);
      }
      return 0.0f;
    } else if constexpr (kKind == kEpiStore) {
      const float2 o = store_values(c, a0, a1);
      store_pair(static_cast<T*>(ep.c) + row * ep.ldc + c, o.x, o.y);
      return 0.0f;
    } else if constexpr (kKind == kEpiBwdAct) {
      return bwd_act_apply(c, bwd_act_load(c), a0, a1);
    } else {
      static_assert(kKind == kEpiWgrad, "unknown epilogue");
      return 0.0f;  // kEpiWgrad is stored by the kernel (it knows the group and split)
    }
  }
};

// kEpiWgrad store of columns (n, n + 1) of row m of group g's C, or of its split partial.
template <class T>
__device__ __forceinline__ void wgrad_store_pair(const EpilogueParams& ep, int num_groups, int m_total,
                                                 int n_total, int g, int split, int splits, int m,
                                                 int n, float a0, float a1) {
  const int64_t idx = (static_cast<int64_t>(g) * m_total + m) * n_total + n;
  if (splits > 1) {
    const int64_t part = static_cast<int64_t>(split) * num_groups * m_total * n_total;
    *reinterpret_cast<float2*>(ep.split_out + part + idx) = make_float2(a0, a1);
  } else {
    store_pair(static_cast<T*>(ep.c) + idx, a0, a1);
  }
}

}  // namespace moekit::kernels::experts
