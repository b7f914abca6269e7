// Workspace carving: one bump allocator whose count-only mode (base == nullptr) is the same code
// path as the real run, so a size query and the layout used at run time cannot drift apart.
//
//   template <class Carver> Layout carve_layout(Carver& ws, args...) { l.partials = ws.take<float>(n, "partials"); ... }
//   size query:  WorkspaceCarver c(nullptr); carve_layout(c, ...); return c.bytes();
//   run:         WorkspaceCarver c(workspace); auto l = carve_layout(c, ...);  (bytes() <= size checked first)
#pragma once

#include <cstddef>
#include <cstdint>

#include "moekit/status.h"

namespace moekit {

class WorkspaceCarver {
 public:
  static constexpr size_t kAlignment = MOEKIT_WORKSPACE_ALIGNMENT;

  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}

  // Reserves `count` elements of T, aligned to kAlignment. Returns nullptr in count-only mode.
  // `name` documents the piece (and shows up in a debugger); it is not stored.
  template <class T>
  T* take(size_t count, const char* name) {
    (void)name;
    offset_ = align_up(offset_);
    T* piece = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(T);
    return piece;
  }

  size_t bytes() const { return align_up(offset_); }

  static size_t align_up(size_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// Checks a caller's workspace against the bytes a layout needs: NULL only when nothing is needed,
// enough bytes, 256-byte alignment. Reports with the parameter names of the public API.
moekit_status_t check_workspace(const void* workspace, size_t workspace_bytes, size_t needed);

}  // namespace moekit
