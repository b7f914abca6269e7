#include "src/common/workspace.hpp"

#include "src/common/error.hpp"

namespace moekit {

moekit_status_t check_workspace(const void* workspace, size_t workspace_bytes, size_t needed) {
  if (needed == 0) return MOEKIT_STATUS_SUCCESS;
  if (workspace_bytes < needed)
    return fail(MOEKIT_STATUS_WORKSPACE_TOO_SMALL,
                "workspace_bytes = %zu is smaller than the %zu bytes the size query returns",
                workspace_bytes, needed);
  if (workspace == nullptr)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT, "workspace is NULL but %zu bytes are needed",
                needed);
  if (reinterpret_cast<uintptr_t>(workspace) % WorkspaceCarver::kAlignment != 0)
    return fail(MOEKIT_STATUS_MISALIGNED, "workspace = %p is not aligned to %zu bytes", workspace,
                WorkspaceCarver::kAlignment);
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit
