#include "tests/ep/ep_test_kernels.hpp"

#include "kernels/common/dtype.cuh"

namespace moekit::test::ep {
namespace {

template <class T>
__global__ void scale_rows_kernel(int64_t max_rows, int64_t hidden, const int32_t* slot_of_row,
                                  const int32_t* totals, const int32_t* indices, const T* in,
                                  T* out) {
  const int64_t total = totals[0];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < max_rows * hidden; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / hidden;
    if (r >= total) continue;
    const int32_t slot = slot_of_row[r];
    const float scale = slot >= 0 ? static_cast<float>(indices[slot] + 1) : 0.0f;
    out[i] = moekit::kernels::from_float<T>(scale * moekit::kernels::to_float(in[i]));
  }
}

}  // namespace

cudaError_t scale_rows_by_expert(moekit_dtype_t dtype, int64_t max_rows, int64_t hidden,
                                 const int32_t* slot_of_row, const int32_t* totals,
                                 const int32_t* indices, const void* in, void* out,
                                 cudaStream_t stream) {
  if (max_rows * hidden == 0) return cudaSuccess;
  return moekit::kernels::dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    scale_rows_kernel<T><<<1024, 256, 0, stream>>>(max_rows, hidden, slot_of_row, totals, indices,
                                                  static_cast<const T*>(in), static_cast<T*>(out));
    return cudaPeekAtLastError();
  });
}

}  // namespace moekit::test::ep
