// Host-side facts about moekit_dtype_t shared by every family.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moekit/status.h"

namespace moekit {

// Bytes of one element (the dtype is validated before this is asked).
inline size_t dtype_bytes(int32_t dtype) { return dtype == MOEKIT_DTYPE_F32 ? 4 : 2; }

}  // namespace moekit
