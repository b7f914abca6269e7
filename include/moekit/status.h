/*
 * moekit/status.h: status codes, the thread-local last-error message, versions and dtypes.
 *
 * Every moekit function returns moekit_status_t. 0 is success; the values below are explicit,
 * append-only and never reused. When a call fails it leaves a message on the calling thread that
 * names the function, the parameter and the value, for example
 *   "moekit_router_forward: top_k = 40 exceeds num_experts = 32".
 * Every entry point other than the ones in this header clears that message on entry, so after a
 * successful call moekit_get_last_error() returns "".
 *
 * A call that fails argument validation writes nothing to any output and enqueues no work.
 *
 * This header is self-contained C99 and includes no CUDA header: streams are passed as void*
 * holding a cudaStream_t (NULL is the legacy default stream).
 */
#ifndef MOEKIT_STATUS_H
#define MOEKIT_STATUS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define MOEKIT_API
#else
#define MOEKIT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Version of these headers. MOEKIT_VERSION = MAJOR * 10000 + MINOR * 100 + PATCH. */
#define MOEKIT_VERSION_MAJOR 0
#define MOEKIT_VERSION_MINOR 1
#define MOEKIT_VERSION_PATCH 0
#define MOEKIT_VERSION \
    (MOEKIT_VERSION_MAJOR * 10000 + MOEKIT_VERSION_MINOR * 100 + MOEKIT_VERSION_PATCH)

typedef enum moekit_status {
    MOEKIT_STATUS_SUCCESS = 0,
    /* An argument is NULL where it may not be, or a value is out of its documented range. */
    MOEKIT_STATUS_INVALID_ARGUMENT = 1,
    /* The arguments are valid but this combination is not implemented (e.g. a dtype). */
    MOEKIT_STATUS_UNSUPPORTED = 2,
    /* workspace_bytes is smaller than the size query returned. */
    MOEKIT_STATUS_WORKSPACE_TOO_SMALL = 3,
    /* A pointer does not have the documented alignment (workspaces: 256 bytes). */
    MOEKIT_STATUS_MISALIGNED = 4,
    /* The CUDA runtime reported an error (launch failure, invalid device pointer, ...). */
    MOEKIT_STATUS_CUDA_ERROR = 5,
    /* cuBLAS / cuBLASLt reported an error. */
    MOEKIT_STATUS_CUBLAS_ERROR = 6,
    /* NCCL reported an error. */
    MOEKIT_STATUS_NCCL_ERROR = 7,
    /* The feature was not built into this library or the device cannot run it. */
    MOEKIT_STATUS_NOT_AVAILABLE = 8,
    /* A host allocation failed (moekit never allocates device memory). */
    MOEKIT_STATUS_OUT_OF_MEMORY = 9,
    /* A bug in moekit: please report the message. */
    MOEKIT_STATUS_INTERNAL_ERROR = 10
} moekit_status_t;

/* Element types of activations, logits and weights. Indices are always int32, routing
 * weights always fp32. */
typedef enum moekit_dtype {
    MOEKIT_DTYPE_F32 = 0,
    MOEKIT_DTYPE_F16 = 1,
    MOEKIT_DTYPE_BF16 = 2
} moekit_dtype_t;

/* Largest K (experts per token) any call accepts. */
#define MOEKIT_MAX_TOP_K 32

/* Required alignment of every workspace pointer, in bytes (cudaMalloc gives 256). */
#define MOEKIT_WORKSPACE_ALIGNMENT 256

/* A short constant English description of a status ("invalid argument"). Never NULL; unknown
 * values give "unknown moekit status". Since 0.1. */
MOEKIT_API const char* moekit_status_string(moekit_status_t status);

/* The message of the last failed moekit call on this thread, or "" if the last call succeeded.
 * The pointer is valid until the next moekit call on this thread; never NULL. Since 0.1. */
MOEKIT_API const char* moekit_get_last_error(void);

/* Copies the last-error message into buffer[0 .. buffer_size) (truncated, always NUL-terminated
 * when buffer_size > 0) and returns its full length without the NUL. buffer may be NULL when
 * buffer_size is 0 (to query the length). For FFI callers that cannot hold a borrowed pointer.
 * Since 0.1. */
MOEKIT_API size_t moekit_copy_last_error(char* buffer, size_t buffer_size);

/* Clears the last-error message of this thread. Since 0.1. */
MOEKIT_API void moekit_clear_last_error(void);

/* MOEKIT_VERSION of the library that is loaded (compare with the header's). Since 0.1. */
MOEKIT_API int32_t moekit_get_version(void);

/* Size in bytes of one element of dtype, or 0 for an unknown value. Since 0.1. */
MOEKIT_API size_t moekit_dtype_size(moekit_dtype_t dtype);

#ifdef __cplusplus
}
#endif

#endif /* MOEKIT_STATUS_H */
