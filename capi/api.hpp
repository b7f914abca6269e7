// The fence between the C ABI and the C++ inside: every exported function runs its body through
// guarded(), which names the entry point for error messages, clears the last error, and turns any
// C++ exception into a status (an exception must never cross an extern "C" boundary).
// Argument validation lives here in capi/, before anything is enqueued, so that a rejected call
// writes nothing.
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <vector>

#include "src/common/error.hpp"
#include "moekit/status.h"

namespace moekit::capi {

template <class Body>
moekit_status_t guarded(const char* api_name, Body&& body) noexcept {
  ApiScope scope(api_name);
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return fail(MOEKIT_STATUS_OUT_OF_MEMORY, "host allocation failed");
  } catch (const std::exception& e) {
    return fail(MOEKIT_STATUS_INTERNAL_ERROR, "internal error: %s", e.what());
  } catch (...) {
    return fail(MOEKIT_STATUS_INTERNAL_ERROR, "internal error: unknown exception");
  }
}

// Copies a caller's extensible config (struct_size first) into a full-size local: defaults first,
// then min(struct_size, sizeof) bytes of the caller's. `min_size` is the size of the first
// released version of the struct.
template <class Config, class SetDefaults>
moekit_status_t read_config(const Config* user, const char* name, size_t min_size,
                            SetDefaults set_defaults, Config* out) {
  if (user == nullptr) return fail(MOEKIT_STATUS_INVALID_ARGUMENT, "%s is NULL", name);
  if (user->struct_size < min_size)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                "%s->struct_size = %zu is smaller than the smallest known size %zu (fill it with "
                "the matching _init function)",
                name, user->struct_size, min_size);
  set_defaults(out);
  const size_t n = user->struct_size < sizeof(Config) ? user->struct_size : sizeof(Config);
  std::memcpy(static_cast<void*>(out), static_cast<const void*>(user), n);
  out->struct_size = sizeof(Config);
  return MOEKIT_STATUS_SUCCESS;
}

// A pointer argument with the bytes a call touches through it (0 when unused).
struct Span {
  const void* ptr;
  uint64_t bytes;
  const char* name;
};

inline bool intersect(const Span& a, const Span& b) {
  if (a.ptr == nullptr || b.ptr == nullptr || a.bytes == 0 || b.bytes == 0) return false;
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a.ptr), b0 = reinterpret_cast<uintptr_t>(b.ptr);
  return a0 < b0 + b.bytes && b0 < a0 + a.bytes;
}

// No output overlaps an input or another output.
inline moekit_status_t check_disjoint(const std::vector<Span>& outputs, const std::vector<Span>& inputs) {
  for (size_t o = 0; o < outputs.size(); ++o) {
    for (const Span& i : inputs)
      if (intersect(outputs[o], i))
        return fail(MOEKIT_STATUS_INVALID_ARGUMENT, "%s = %p overlaps %s = %p", outputs[o].name,
                    outputs[o].ptr, i.name, i.ptr);
    for (size_t q = o + 1; q < outputs.size(); ++q)
      if (intersect(outputs[o], outputs[q]))
        return fail(MOEKIT_STATUS_INVALID_ARGUMENT, "%s = %p overlaps %s = %p", outputs[o].name,
                    outputs[o].ptr, outputs[q].name, outputs[q].ptr);
  }
  return MOEKIT_STATUS_SUCCESS;
}

// MISALIGNED unless p (NULL passes) is a multiple of `alignment` bytes.
inline moekit_status_t check_aligned(const void* p, size_t alignment, const char* name) {
  if (p != nullptr && reinterpret_cast<uintptr_t>(p) % alignment != 0)
    return fail(MOEKIT_STATUS_MISALIGNED, "%s = %p is not aligned to %zu bytes", name, p, alignment);
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit::capi

// Validation helpers for capi bodies; the message gets the entry point's name as prefix.
#define MOEKIT_CHECK_ARG(cond, ...)                                              \
  do {                                                                           \
    if (!(cond)) return ::moekit::fail(MOEKIT_STATUS_INVALID_ARGUMENT, __VA_ARGS__); \
  } while (0)

#define MOEKIT_CHECK_SUPPORTED(cond, ...)                                        \
  do {                                                                           \
    if (!(cond)) return ::moekit::fail(MOEKIT_STATUS_UNSUPPORTED, __VA_ARGS__);  \
  } while (0)

#define MOEKIT_CHECK_NOT_NULL(ptr) MOEKIT_CHECK_ARG((ptr) != nullptr, "%s is NULL", #ptr)
