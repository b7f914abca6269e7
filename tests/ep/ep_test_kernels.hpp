// Device helpers of the EP GPU suite: the stand-in "expert" of the end-to-end check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/status.h"

namespace moekit::test::ep {

// The per-expert op of the end-to-end check, on the rows of a token plan (moekit/tokens.h):
//   out[r] = (indices[slot_of_row[r]] + 1) * in[r]   for r < totals[0] with a slot (fp32, rounded
//   once to dtype); padding rows get 0; rows >= totals[0] are not written.
// Linear in `in`, so the same call is its own backward.
cudaError_t scale_rows_by_expert(moekit_dtype_t dtype, int64_t max_rows, int64_t hidden,
                                 const int32_t* slot_of_row, const int32_t* totals,
                                 const int32_t* indices, const void* in, void* out,
                                 cudaStream_t stream);

}  // namespace moekit::test::ep
