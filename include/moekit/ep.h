/*
 * moekit/ep.h: expert parallelism over NCCL. Dispatch sends tokens to the ranks that own their
 * experts, combine brings the partial expert outputs back and sums them; both backwards.
 * Contract: docs/semantics.md section 7; decisions (modes, buffer sizing, ordering, determinism,
 * graph safety, measured numbers) in docs/ep.md.
 *
 * Notation: n ranks in the EP communicator, this rank r ("me"), E experts split evenly (rank d owns
 * experts [d E/n, (d+1) E/n)), K experts per token, T tokens on this rank (may differ per rank),
 * H hidden size, C chunks (num_chunks), m_t the token mask.
 *
 * Routing. The destinations of token t are the distinct ranks owning at least one of its valid
 * expert ids (ids outside [0, E) are ignored; a masked token has none), in ascending rank order:
 * dest(t) = sorted { floor(idx_tk / (E/n)) : 0 <= idx_tk < E }. Each token is sent once to each
 * destination (deduplicated, not K copies), including this rank itself (a local copy, no NCCL),
 * and carries all K of its expert ids (global ids), all K fp32 weights and its source token index:
 * the receiver builds its local plan with moekit_plan_build over the received ids with
 * local_expert_begin = r E/n, num_local_experts = E/n (non-local ids produce no row), and permutes
 * with moekit_tokens_permute (moekit/tokens.h).
 *
 * Chunks. This rank's tokens are split into C contiguous chunks of L = ceil(T / C) tokens (chunk c
 * holds tokens [c L, min((c+1) L, T))); chunk c of every rank moves in one NCCL group while the
 * next chunk is packed (the pipeline of docs/ep.md).
 *
 * Received rows, in a fixed order: by source rank, then by source token (ascending).
 *  - MOEKIT_EP_MODE_EXACT: rows are dense. Source s's rows start at sum_{s' < s} R_s' (R_s = rows
 *    s sends here) in token order. num_recv_rows = sum_s R_s.
 *  - MOEKIT_EP_MODE_CAPACITY: every (source s, chunk c) pair owns a fixed block of
 *    cc = ceil(capacity / C) rows starting at row (s C + c) cc; the first min(count, cc) rows of
 *    the block hold the chunk's tokens for this rank in token order, the rest are gaps
 *    (recv_src_token = -1, recv_mask = 0, ids -1, weights 0, hidden values unspecified).
 *    num_recv_rows = n C cc. A token past the block's capacity is dropped for that destination
 *    (counted in `dropped`); with capacity >= max_tokens nothing can ever be dropped.
 * Combine: y_t = sum over d in dest(t), ascending, of partial_d[row of t at d] accumulated in fp32
 * (starting from +0.0f) and rounded once to dtype; a destination where t was dropped contributes
 * nothing; a token with no destination gets 0. partial rows are indexed like the received rows:
 * the receiver computes them with moekit_tokens_combine over its plan (the weighted sum of its
 * local experts' outputs for that token).
 * Backward: dispatch's backward is a combine (grad_x_t = rank-ordered fp32 sum of grad_recv_x over
 * t's rows; grad_weights_tk = grad_recv_weights[row of t at the owner of idx_tk][k], the one rank
 * that uses w_tk), combine's backward is a dispatch (grad_partial[row of t at d] = grad_y_t).
 *
 * Determinism: moved rows are copied bit for bit; every sum has a fixed order (ascending rank);
 * no floating-point atomics. The same inputs give bitwise the same outputs run after run.
 * Graph safety: capacity mode never reads device data on the host and never synchronises: every
 * call below can be captured into a CUDA graph (NCCL operations capture). Exact mode reads the
 * exchanged counts on the host exactly once, in moekit_ep_layout (not capturable); its
 * dispatch/combine/backward calls are capturable but bake that layout's sizes into the graph.
 * Collectives: moekit_ep_layout (exact mode), dispatch, combine and both backwards must be called
 * by every rank of the communicator, in the same order, also by a rank with T = 0. What a call
 * sends and receives depends only on the configuration, the layouts and the call, never on a
 * pointer being NULL on one rank: a rank whose T (or received row count) is 0 may pass NULL for
 * the arrays that are empty there while its peers pass arrays. The caller's choices that must agree
 * across ranks: weight gradients in moekit_ep_dispatch_backward (every rank asks for them or none)
 * and which of the two arrays moekit_ep_allreduce_aux_stats reduces.
 * One process driving several GPUs (a thread per rank): cudaMalloc, cudaFree, cudaMallocHost and
 * cudaFreeHost, and so moekit_ep_create and moekit_ep_destroy (pinned staging), may wait for every
 * GPU with peer access to this one. A thread must not make such a call while a peer may be waiting
 * in a collective for this thread's side (NCCL's rule): allocate before the collectives, or between
 * them behind a host barrier of all ranks (docs/ep.md, "Hangs").
 * Streams: every call takes the caller's stream; with num_chunks > 1 the handle forks a second
 * stream of its own for the pipeline and joins it back before the call returns (in stream order).
 * The calling thread's current device must be the communicator's device.
 */
#ifndef MOEKIT_EP_H
#define MOEKIT_EP_H

#include "moekit/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* K is limited by MOEKIT_MAX_TOP_K (moekit/status.h), as in every family. */
/* Largest number of EP ranks. */
#define MOEKIT_EP_MAX_RANKS 1024
/* Largest E an EP configuration accepts. */
#define MOEKIT_EP_MAX_EXPERTS 65536
/* Largest num_chunks. */
#define MOEKIT_EP_MAX_CHUNKS 16

typedef enum moekit_ep_mode {
    /* Exact sizes: moekit_ep_layout exchanges the counts and reads them on the host once; rows
     * are dense and only what is routed moves. */
    MOEKIT_EP_MODE_EXACT = 0,
    /* Graph-safe: fixed blocks of capacity rows per (source, destination) pair; sizes stay on
     * the device, overflow is dropped and counted, never written out of bounds. */
    MOEKIT_EP_MODE_CAPACITY = 1
} moekit_ep_mode_t;

/* EP options; identical on every rank of the communicator (a mismatch is detected by the exact
 * mode's count exchange; in capacity mode it is the caller's duty). Extensible: struct_size comes
 * first; fill it with moekit_ep_config_init, then set fields. */
typedef struct moekit_ep_config {
    size_t struct_size;     /* sizeof(moekit_ep_config_t) as the caller compiled it */
    int32_t num_ranks;      /* n, 1 .. MOEKIT_EP_MAX_RANKS; must equal the communicator's size.
                               Default 0 (must be set). */
    int32_t num_experts;    /* E, n .. MOEKIT_EP_MAX_EXPERTS, a multiple of n. Default 0. */
    int32_t top_k;          /* K, 1 .. min(E, MOEKIT_MAX_TOP_K). Default 0. */
    int32_t dtype;          /* moekit_dtype_t of x, recv_x, y and the gradients. Default BF16. */
    int32_t combine_dtype;  /* moekit_dtype_t of the combine partials, or -1 = dtype. Default -1. */
    int32_t mode;           /* moekit_ep_mode_t. Default MOEKIT_EP_MODE_EXACT. */
    int32_t num_chunks;     /* C, 1 .. MOEKIT_EP_MAX_CHUNKS: pipeline depth (1 = no pipeline, no
                               second stream). Default 1 (pipelining measured slower on NVLink). */
    int64_t hidden;         /* H >= 1 (any H; multiples of 8 take the 16-byte paths). Default 0. */
    int64_t max_tokens;     /* largest T any call on this rank passes, >= 0. Default 0. */
    int64_t capacity;       /* capacity mode: rows per (source, destination) pair, >= 0;
                               0 = max_tokens (never drops). Ignored in exact mode. Default 0. */
} moekit_ep_config_t;

/* An EP handle: the configuration, the caller's communicator, this rank, and (num_chunks > 1) a
 * second stream and events for the pipeline. Use it from one thread at a time. */
typedef struct moekit_ep* moekit_ep_handle_t;

/* Fills *config with the defaults above and sets config->struct_size = struct_size.
 * Returns INVALID_ARGUMENT when config is NULL or struct_size is smaller than the 0.1 struct.
 * Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_config_init(moekit_ep_config_t* config, size_t struct_size);

/* Checks a configuration without running anything (the same checks every call makes).
 * Returns SUCCESS or INVALID_ARGUMENT / UNSUPPORTED with a message naming the field. Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_config_check(const moekit_ep_config_t* config);

/* NCCL_VERSION_CODE of the NCCL library moekit uses (ncclGetVersion; 22809 for 2.28.9).
 *   version [out, host] int32.
 * Returns SUCCESS; INVALID_ARGUMENT (version NULL); NOT_AVAILABLE (built without NCCL: every call
 * below that needs a communicator returns NOT_AVAILABLE too). Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_nccl_version(int32_t* version);

/* Sizes of the per-layout state, from the configuration alone:
 *   layout_bytes      [out, host] bytes of the device layout buffer (256-byte aligned buffer).
 *   host_layout_count [out, host] int64 elements of the host layout array (exact mode; 0 in
 *                     capacity mode, which has none).
 * Either output may be NULL. Returns SUCCESS or INVALID_ARGUMENT (bad config). Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_layout_size(const moekit_ep_config_t* config,
                                                 size_t* layout_bytes, size_t* host_layout_count);

/* The most rows any layout can receive, which sizes recv_x, partials and the other row arrays when
 * they are allocated once: exact mode n * max_tokens; capacity mode n * C * ceil(capacity / C).
 *   rows [out, host]. Returns SUCCESS or INVALID_ARGUMENT. Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_max_recv_rows(const moekit_ep_config_t* config,
                                                   int64_t* rows);

/* Workspace bytes that dispatch, combine and both backwards need (one workspace serves them all).
 *   host_layout [in, host] exact mode: the array a moekit_ep_layout call filled, giving the exact
 *               size for that layout; NULL gives the worst case of the configuration (and is
 *               what capacity mode, whose size never changes, passes).
 *   workspace_bytes [out, host].
 * Returns SUCCESS or INVALID_ARGUMENT (bad config, host_layout not filled by moekit_ep_layout for
 * this configuration, or given in capacity mode). Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_workspace_size(const moekit_ep_config_t* config,
                                                    const int64_t* host_layout,
                                                    size_t* workspace_bytes);

/* Creates a handle on the caller's communicator. Not a collective: it reads the communicator's
 * size, rank and device (host calls), creates the pipeline stream and events on that device and
 * allocates a small pinned staging buffer (cudaMallocHost: see "One process driving several GPUs"
 * at the top).
 *   config    [in, host]  every rank passes the same values.
 *   nccl_comm [in, host]  an ncclComm_t; moekit never creates, splits or destroys it. It must
 *                         outlive the handle.
 *   handle    [out, host].
 * Returns SUCCESS; INVALID_ARGUMENT (NULL, bad config, config->num_ranks differs from the
 * communicator's size); NCCL_ERROR; CUDA_ERROR; OUT_OF_MEMORY; NOT_AVAILABLE (no NCCL). Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_create(const moekit_ep_config_t* config, void* nccl_comm,
                                            moekit_ep_handle_t* handle);

/* Destroys a handle (NULL is a no-op). Waits for nothing itself, but frees pinned memory
 * (cudaFreeHost, which CUDA may synchronise); the caller must not have work using it in flight.
 * Returns SUCCESS. Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_destroy(moekit_ep_handle_t handle);

/*
 * Layout: from this rank's routing, the destinations of every token, each token's row at each
 * destination, and the counts (see the top of this header). Exact mode: a collective count
 * exchange over the communicator followed by the one host read of the counts (the calling thread
 * waits for the exchange); capacity mode: local, graph-safe, no NCCL.
 *   handle        [in, host].
 *   num_tokens    T, 0 .. config->max_tokens.
 *   indices       [in, device]  [T, K] int32 global expert ids; NULL only when T = 0.
 *   token_mask    [in, device]  [T] uint8, nonzero = real token; NULL = all real. Masked tokens
 *                               go nowhere (combine gives them 0).
 *   layout        [out, device] moekit_ep_layout_size bytes, 256-byte aligned; kept by the caller
 *                               until the last dispatch/combine/backward of this layout.
 *   layout_bytes  its size.
 *   host_layout   [out, host]   exact mode: int64 [host_layout_count], kept with `layout`;
 *                               capacity mode: must be NULL.
 *   num_recv_rows [out, host]   int64 rows this rank receives (exact) or n C cc (capacity); or NULL.
 *   dropped       [out, device] int32 [1]: (token, destination) pairs this rank dropped by the
 *                               capacity (always 0 in exact mode); or NULL.
 *   stream        cudaStream_t of the communicator's device.
 * Returns SUCCESS; INVALID_ARGUMENT (NULL where not allowed, T out of range, layout_bytes too
 * small, host_layout given or missing for the mode, exact mode on a capturing stream, another rank
 * created with a different configuration, wrong current device); MISALIGNED (layout);
 * CUDA_ERROR; NCCL_ERROR; NOT_AVAILABLE. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_ep_layout(moekit_ep_handle_t handle, int64_t num_tokens,
                                            const int32_t* indices, const uint8_t* token_mask,
                                            void* layout, size_t layout_bytes,
                                            int64_t* host_layout, int64_t* num_recv_rows,
                                            int32_t* dropped, void* stream);

/* Exact mode: rows this rank sends to and receives from every rank in a layout (itself included:
 * send_rows[r] = recv_rows[r] are the rows that stay local). Host arithmetic only.
 *   host_layout [in, host] filled by moekit_ep_layout; send_rows, recv_rows [out, host] int64 [n]
 *   (either may be NULL).
 * Returns SUCCESS or INVALID_ARGUMENT (NULL handle/host_layout, capacity mode, host_layout not
 * filled by a layout of this handle). Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_layout_counts(moekit_ep_handle_t handle,
                                                   const int64_t* host_layout, int64_t* send_rows,
                                                   int64_t* recv_rows);

/*
 * Dispatch (collective): sends every token to its destinations (see the top of this header).
 *   handle, num_tokens, layout, host_layout  as given to (and filled by) moekit_ep_layout.
 *   x              [in, device]  [T, H] of config->dtype, contiguous; NULL only when T = 0.
 *   indices        [in, device]  [T, K] int32, the same ids the layout saw.
 *   weights        [in, device]  [T, K] fp32 routing weights; NULL only when T = 0.
 *   recv_x         [out, device] [num_recv_rows, H] of config->dtype, contiguous (+0 in gaps).
 *   recv_indices   [out, device] [num_recv_rows, K] int32 global ids (-1 in gaps).
 *   recv_weights   [out, device] [num_recv_rows, K] fp32 (0 in gaps).
 *   recv_src_token [out, device] [num_recv_rows] int32 token index at the source (-1 in gaps),
 *                                or NULL.
 *   recv_mask      [out, device] [num_recv_rows] uint8, 1 for a row that holds a token, 0 for a
 *                                gap (all 1 in exact mode); pass it as the plan's token_mask.
 *                                Or NULL.
 *   workspace      [in, device]  moekit_ep_workspace_size bytes, 256-byte aligned; its content
 *                                need not be preserved.
 * The recv_* pointers may be NULL only when num_recv_rows = 0. No output may overlap an input,
 * another output or the workspace.
 * Returns SUCCESS; INVALID_ARGUMENT (NULL where not allowed, T different from the layout's, bad
 * host_layout, wrong current device); WORKSPACE_TOO_SMALL; MISALIGNED (workspace); CUDA_ERROR;
 * NCCL_ERROR; NOT_AVAILABLE. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_ep_dispatch(
    moekit_ep_handle_t handle, int64_t num_tokens, const void* layout, const int64_t* host_layout,
    const void* x, const int32_t* indices, const float* weights, void* recv_x,
    int32_t* recv_indices, float* recv_weights, int32_t* recv_src_token, uint8_t* recv_mask,
    void* workspace, size_t workspace_bytes, void* stream);

/*
 * Combine (collective): y_t = sum over the destinations d of t, in ascending rank order, of
 * partials_d[row of t at d], in fp32 from +0.0f, rounded once to config->dtype (see the top).
 *   partials   [in, device]  [num_recv_rows, H] of config->combine_dtype, contiguous, indexed like
 *                            the received rows (gap rows are sent but never summed).
 *   y          [out, device] [T, H] of config->dtype, contiguous; NULL only when T = 0.
 *   other arguments as for moekit_ep_dispatch.
 * Returns as moekit_ep_dispatch. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_ep_combine(moekit_ep_handle_t handle, int64_t num_tokens,
                                             const void* layout, const int64_t* host_layout,
                                             const void* partials, void* y, void* workspace,
                                             size_t workspace_bytes, void* stream);

/*
 * Dispatch backward (collective; a combine):
 *   grad_x_t = sum over d in dest(t), ascending, of grad_recv_x_d[row of t at d] (fp32, rounded
 *   once to config->dtype; 0 for a token with no destination);
 *   grad_weights_tk = grad_recv_weights_o[row of t at o][k] with o the owner of idx_tk (0 for an
 *   invalid id, a masked token or a pair dropped by the capacity).
 *   indices           [in, device]  [T, K] int32 as given to the layout.
 *   grad_recv_x       [in, device]  [num_recv_rows, H] of config->dtype.
 *   grad_recv_weights [in, device]  [num_recv_rows, K] fp32, or NULL. Weight gradients move when
 *                                   it or grad_weights is given; then every rank must ask for them,
 *                                   and each of the two may be NULL only where its row count is 0.
 *   grad_x            [out, device] [T, H] of config->dtype.
 *   grad_weights      [out, device] [T, K] fp32, or NULL.
 * Returns as moekit_ep_dispatch. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_ep_dispatch_backward(
    moekit_ep_handle_t handle, int64_t num_tokens, const void* layout, const int64_t* host_layout,
    const int32_t* indices, const void* grad_recv_x, const float* grad_recv_weights, void* grad_x,
    float* grad_weights, void* workspace, size_t workspace_bytes, void* stream);

/*
 * Combine backward (collective; a dispatch without ids or weights):
 *   grad_partials[row of t at d] = grad_y_t, bit for bit, for every destination d of t that kept
 *   t; gap rows are +0.
 *   grad_y        [in, device]  [T, H] of config->dtype.
 *   grad_partials [out, device] [num_recv_rows, H] of config->dtype.
 * Returns as moekit_ep_dispatch. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_ep_combine_backward(
    moekit_ep_handle_t handle, int64_t num_tokens, const void* layout, const int64_t* host_layout,
    const void* grad_y, void* grad_partials, void* workspace, size_t workspace_bytes,
    void* stream);

/*
 * Expert load summed over a communicator (collective; e.g. the data-parallel group before the bias
 * update): load_i <- sum over ranks of load_i, an in-place int32 NCCL all-reduce (exact).
 *   nccl_comm [in, host] any ncclComm_t (not necessarily the EP one).
 *   num_experts E >= 1.  expert_load [in/out, device] int32 [E].
 * Returns SUCCESS; INVALID_ARGUMENT; NCCL_ERROR; NOT_AVAILABLE. Graph-safe. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_ep_allreduce_expert_load(void* nccl_comm, int32_t num_experts,
                                                           int32_t* expert_load, void* stream);

/* Workspace bytes of moekit_ep_allreduce_aux_stats: n E fp32 (n = the communicator's size).
 * Returns SUCCESS; INVALID_ARGUMENT; NCCL_ERROR; NOT_AVAILABLE. Since 0.1. */
MOEKIT_API moekit_status_t moekit_ep_aux_stats_workspace_size(void* nccl_comm, int32_t num_experts,
                                                              size_t* workspace_bytes);

/*
 * Aux-loss statistics summed over a communicator (collective; e.g. the context-parallel group):
 *   S_i <- (((0 + S_i^(0)) + S_i^(1)) + ... + S_i^(n-1)) in fp32, in rank order: an all-gather
 *          followed by an ordered sum, so every rank gets bitwise the same S, run after run;
 *   N   <- sum over ranks of N (int32 all-reduce, exact).
 *   aux_score_sum   [in/out, device] S fp32 [E], or NULL.
 *   aux_token_count [in/out, device] N int32 [1], or NULL. At least one of the two, and the same
 *                   choice on every rank (each array is its own NCCL collective).
 *   workspace       [in, device] moekit_ep_aux_stats_workspace_size bytes, 256-byte aligned
 *                   (may be NULL when aux_score_sum is).
 * Returns SUCCESS; INVALID_ARGUMENT; WORKSPACE_TOO_SMALL; MISALIGNED; CUDA_ERROR; NCCL_ERROR;
 * NOT_AVAILABLE. Graph-safe. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_ep_allreduce_aux_stats(void* nccl_comm, int32_t num_experts,
                                                         float* aux_score_sum,
                                                         int32_t* aux_token_count,
                                                         void* workspace, size_t workspace_bytes,
                                                         void* stream);

#ifdef __cplusplus
}
#endif

#endif /* MOEKIT_EP_H */
