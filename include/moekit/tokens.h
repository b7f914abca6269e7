/*
 * moekit/tokens.h: dropless token movement. A routing plan built on the device from the router's
 * indices, the expert-major permute of tokens into rows, the weighted combine back into tokens,
 * and both backwards. Contract: docs/semantics.md section 4; decisions in docs/tokens.md.
 *
 * Notation: T tokens, H hidden size, K experts per token, E experts (global), the local range
 * [e0, e0 + E_local) (expert parallelism; the whole range by default), A alignment, C capacity
 * (0 = dropless), slot s = t K + k (the k-th choice of token t), m_t the token mask.
 *
 * The plan (moekit_plan_build). A slot is "routed" when its token is real (m_t != 0) and its
 * expert id is local. Routed slots are grouped by local expert e = id - e0 in expert order; inside
 * an expert they keep ascending slot order (t, then k): a stable counting sort, deterministic by
 * construction (no sort of floats, no atomics that pick an order).
 *   n_e      = number of routed slots of expert e
 *   kept_e   = min(n_e, C) (n_e when C = 0). With a capacity, the pairs past it are dropped:
 *              MOEKIT_DROP_BY_POSITION keeps the first C pairs in slot order; MOEKIT_DROP_BY_WEIGHT
 *              keeps the C pairs with the largest routing weight (equal weights: the lower slot
 *              wins; -0 == +0; NaN ranks below every number) and lists the kept rows in slot order.
 *   size_e   = kept_e rounded up to a multiple of A (0 for an expert with no rows)
 *   offset_e = size_0 + ... + size_{e-1};  expert e owns rows [offset_e, offset_e + size_e):
 *              its kept pairs in rows [offset_e, offset_e + kept_e), then size_e - kept_e padding
 *              rows. total = offset_{E_local}.
 * Sentinels: row_of_slot[s] = -1 for a slot with no row (masked token, non-local expert, dropped,
 * invalid id); slot_of_row[r] = -1 for a padding row. Rows r >= total are never written by any
 * call in this header (their content is whatever the caller's buffer held).
 * Invalid ids: an expert id outside [0, E) in a real token is never followed: the slot gets no
 * row and is counted in totals[MOEKIT_PLAN_TOTAL_INVALID]. Ids of masked tokens are not read.
 *
 * Movement (each row r < total with slot s = slot_of_row[r] >= 0, token t = s / K):
 *   permute:          xp[r] = x[t];  row_weights[r] = w[s];  padding rows: 0
 *   combine:          y[t] = sum over k in 0..K-1 with row_of_slot[t K + k] = r >= 0 of w[t K + k] yp[r]
 *                     accumulated in fp32 in ascending k, rounded once; w = 1 when weights is NULL;
 *                     a token with no rows gets 0.
 *   permute backward: dx[t] = sum_k dxp[row(t, k)] (a combine without weights);
 *                     dw[t K + k] = d_row_weights[row(t, k)] (0 for a slot with no row).
 *   combine backward: dyp[row(t, k)] = w[t K + k] dy[t] (rounded once; padding rows 0);
 *                     dw[t K + k] = <dy[t], yp[row(t, k)]> in fp32 (0 for a slot with no row).
 * Every output element is written by exactly one thread with a fixed sequence of operations:
 * outputs are bitwise reproducible run to run on the same GPU and build.
 *
 * Graph safety: no call below synchronises, allocates or reads device data on the host. Launch
 * sizes depend only on the arguments (the worst case moekit_plan_max_rows returns); the routed
 * total lives on the device. Each call can be captured into a CUDA graph.
 *
 * Sizes: T K and moekit_plan_max_rows must fit in int32 (row indices are int32).
 */
#ifndef MOEKIT_TOKENS_H
#define MOEKIT_TOKENS_H

#include "moekit/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* K is limited by MOEKIT_MAX_TOP_K (moekit/status.h), as in every family. */
/* Largest E_local a plan accepts. The global E may be larger (expert parallelism). */
#define MOEKIT_PLAN_MAX_LOCAL_EXPERTS 4096

/* Entries of moekit_token_plan_t::totals. */
#define MOEKIT_PLAN_TOTAL_ROWS 0    /* total rows, padding included (= expert_offsets[E_local]) */
#define MOEKIT_PLAN_TOTAL_DROPPED 1 /* routed pairs dropped by the capacity */
#define MOEKIT_PLAN_TOTAL_INVALID 2 /* slots of real tokens with an expert id outside [0, E) */
#define MOEKIT_PLAN_NUM_TOTALS 3

/* Which pairs a capacity keeps. */
typedef enum moekit_drop_policy {
    /* The first C pairs of each expert in slot order (GShard / Switch). */
    MOEKIT_DROP_BY_POSITION = 0,
    /* The C pairs with the largest routing weight (needs the weights at plan time). */
    MOEKIT_DROP_BY_WEIGHT = 1
} moekit_drop_policy_t;

/* Plan options. Extensible: struct_size comes first; fill it with moekit_plan_config_init, then
 * set fields. The library reads min(struct_size, its own sizeof) bytes and defaults the rest. */
typedef struct moekit_plan_config {
    size_t struct_size;         /* sizeof(moekit_plan_config_t) as the caller compiled it */
    int32_t num_experts;        /* E >= 1, the global expert count: ids outside [0, E) are invalid.
                                   Default 0 (must be set). */
    int32_t top_k;              /* K, 1 .. min(E, MOEKIT_MAX_TOP_K). Default 0 (must be set). */
    int32_t local_expert_begin; /* e0, 0 .. E - 1: first expert of this rank. Default 0. */
    int32_t num_local_experts;  /* E_local, 1 .. MOEKIT_PLAN_MAX_LOCAL_EXPERTS with
                                   e0 + E_local <= E; 0 means E - e0 (all remaining). Default 0. */
    int32_t alignment;          /* A >= 1: every expert segment starts at a multiple of A rows
                                   (padding rows are zeros). Default 1. */
    int32_t capacity;           /* C >= 0: at most C rows per expert; 0 = dropless. Default 0. */
    int32_t drop_policy;        /* moekit_drop_policy_t, read when C > 0. Default BY_POSITION. */
} moekit_plan_config_t;

/* The plan: five caller-owned device arrays (see the top of this header for their meaning).
 * Extensible like the configs: set struct_size (moekit_token_plan_init does). Sizes come from the
 * config and T; moekit_plan_buffer_size / moekit_plan_bind carve all five from one buffer. */
typedef struct moekit_token_plan {
    size_t struct_size;      /* sizeof(moekit_token_plan_t) as the caller compiled it */
    int32_t* expert_counts;  /* [E_local]: kept_e, the real (non-padding) rows of each expert */
    int32_t* expert_offsets; /* [E_local + 1]: offset_e, multiples of A; [E_local] = total */
    int32_t* row_of_slot;    /* [T K]: row of slot s, or -1 */
    int32_t* slot_of_row;    /* [max_rows]: the slot s of row r (its token is s / K, its choice
                                s % K), -1 for padding; entries >= total untouched */
    int32_t* totals;         /* [MOEKIT_PLAN_NUM_TOTALS]: rows, dropped, invalid */
} moekit_token_plan_t;

/* Fills *config with the defaults above and sets config->struct_size = struct_size.
 * Returns INVALID_ARGUMENT when config is NULL or struct_size is smaller than the 0.1 struct.
 * Since 0.1. */
MOEKIT_API moekit_status_t moekit_plan_config_init(moekit_plan_config_t* config,
                                                   size_t struct_size);

/* Checks a configuration without running anything (the same checks every call makes).
 * Returns SUCCESS or INVALID_ARGUMENT with a message naming the field. Since 0.1. */
MOEKIT_API moekit_status_t moekit_plan_config_check(const moekit_plan_config_t* config);

/* Sets every pointer of *plan to NULL and plan->struct_size = struct_size.
 * Returns INVALID_ARGUMENT when plan is NULL or struct_size is smaller than the 0.1 struct.
 * Since 0.1. */
MOEKIT_API moekit_status_t moekit_token_plan_init(moekit_token_plan_t* plan, size_t struct_size);

/* The worst-case number of rows of a plan for num_tokens tokens, which sizes slot_of_row and every
 * row-indexed buffer (xp, yp, row_weights, ...). With N = T K:
 *   dropless:      N + min(E_local, N) (A - 1)
 *   capacity C:    min(dropless, min(N, E_local C) + min(E_local, N) (A - 1), E_local roundup(C, A))
 * Depends only on the arguments. Returns INVALID_ARGUMENT for a bad config, num_tokens < 0,
 * max_rows NULL, or sizes past int32 (T K or the result above INT32_MAX). Since 0.1. */
MOEKIT_API moekit_status_t moekit_plan_max_rows(const moekit_plan_config_t* config,
                                                int64_t num_tokens, int64_t* max_rows);

/* Workspace bytes moekit_plan_build needs; depends only on the arguments.
 * Returns as moekit_plan_max_rows. Since 0.1. */
MOEKIT_API moekit_status_t moekit_plan_workspace_size(const moekit_plan_config_t* config,
                                                      int64_t num_tokens,
                                                      size_t* workspace_bytes);

/* Bytes of one device buffer that holds all five plan arrays for num_tokens tokens (each array
 * 256-byte aligned inside it). Returns as moekit_plan_max_rows. Since 0.1. */
MOEKIT_API moekit_status_t moekit_plan_buffer_size(const moekit_plan_config_t* config,
                                                   int64_t num_tokens, size_t* buffer_bytes);

/* Points the arrays of *plan into buffer (host arithmetic only; nothing is read or written on the
 * device). plan->struct_size must be set (moekit_token_plan_init).
 *   buffer        [in, device] moekit_plan_buffer_size bytes, 4-byte aligned (256 recommended).
 * Returns SUCCESS; INVALID_ARGUMENT (bad config, num_tokens, NULL, buffer_bytes too small,
 * struct_size); MISALIGNED (buffer not 4-byte aligned). Since 0.1. */
MOEKIT_API moekit_status_t moekit_plan_bind(const moekit_plan_config_t* config, int64_t num_tokens,
                                            void* buffer, size_t buffer_bytes,
                                            moekit_token_plan_t* plan);

/*
 * Builds the plan (see the top of this header).
 *   config        [in, host]    plan options.
 *   num_tokens    T >= 0. T = 0 still writes expert_counts, expert_offsets and totals (zeros).
 *   indices       [in, device]  [T, K] int32 row-major expert ids (the router's output); NULL
 *                               only when T = 0.
 *   weights       [in, device]  [T, K] fp32 routing weights; read only with a capacity and
 *                               MOEKIT_DROP_BY_WEIGHT (then required when T > 0), else may be NULL.
 *   token_mask    [in, device]  [T] uint8, nonzero = real token; NULL = all real.
 *   plan          [in, host]    the output arrays, all [out, device]: expert_counts,
 *                               expert_offsets, totals always; row_of_slot and slot_of_row when
 *                               T > 0 (sizes: T K and moekit_plan_max_rows). slot_of_row entries
 *                               >= total are not written.
 *   workspace     [in, device]  moekit_plan_workspace_size bytes, 256-byte aligned; NULL only
 *                               when that size is 0. Its content need not be preserved.
 *   stream        cudaStream_t.
 * No output may overlap an input, another output or the workspace.
 * Returns SUCCESS; INVALID_ARGUMENT (NULL where not allowed, bad config, T < 0, sizes past int32,
 * bad plan->struct_size); WORKSPACE_TOO_SMALL; MISALIGNED (workspace); CUDA_ERROR. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_plan_build(const moekit_plan_config_t* config,
                                             int64_t num_tokens, const int32_t* indices,
                                             const float* weights, const uint8_t* token_mask,
                                             const moekit_token_plan_t* plan, void* workspace,
                                             size_t workspace_bytes, void* stream);

/*
 * Permute: xp[r] = x[t(r)] for every row r < total with a slot, zeros for padding rows; rows
 * >= total untouched. Each token is read once and written to each of its rows.
 *   config, num_tokens  exactly as given to moekit_plan_build for this plan.
 *   plan         [in, host]    reads row_of_slot, and expert_counts / expert_offsets when A > 1.
 *   hidden       H, 1 .. INT32_MAX.
 *   dtype        F32, F16 or BF16: the element type of x and xp.
 *   x            [in, device]  [T, H], row t at x + t * x_row_stride elements (>= H).
 *   weights      [in, device]  [T, K] fp32 routing weights, or NULL; given iff row_weights is.
 *   xp           [out, device] [max_rows, H] contiguous.
 *   row_weights  [out, device] [max_rows] fp32: w of each row's slot, 0 for padding; or NULL.
 * 16-byte loads and stores are used when H * element size, x_row_stride * element size and the
 * pointers are multiples of 16; any other H, stride or alignment takes a scalar path.
 * No output may overlap an input. Returns SUCCESS; INVALID_ARGUMENT (NULL where not allowed, bad
 * config, T < 0, H outside [1, INT32_MAX], stride < H, weights without row_weights or the reverse,
 * sizes past int32); UNSUPPORTED (dtype); CUDA_ERROR. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_tokens_permute(const moekit_plan_config_t* config,
                                                 const moekit_token_plan_t* plan,
                                                 int64_t num_tokens, int64_t hidden,
                                                 moekit_dtype_t dtype, const void* x,
                                                 int64_t x_row_stride, const float* weights,
                                                 void* xp, float* row_weights, void* stream);

/*
 * Combine (unpermute): y[t] = sum_k w[t K + k] yp[row(t, k)] over the slots of t that have a row,
 * in ascending k, accumulated in fp32 from +0 (acc = fmaf(w, yp, acc)) and rounded once to dtype;
 * +0 for a token with no rows (masked, all slots dropped or non-local), and +0 where every term
 * is a zero of either sign (as torch.zeros().index_add_() gives). NaN and inf propagate.
 *   plan         [in, host]    reads row_of_slot.
 *   yp           [in, device]  [max_rows, H] contiguous (rows without a slot are not read).
 *   weights      [in, device]  [T, K] fp32, or NULL for the unweighted sum (the weight was
 *                              applied inside the expert).
 *   y            [out, device] [T, H], row t at y + t * y_row_stride elements (>= H).
 * Vector path as for permute (y_row_stride in place of x_row_stride). No output may overlap an
 * input. Returns as moekit_tokens_permute. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_tokens_combine(const moekit_plan_config_t* config,
                                                 const moekit_token_plan_t* plan,
                                                 int64_t num_tokens, int64_t hidden,
                                                 moekit_dtype_t dtype, const void* yp,
                                                 const float* weights, void* y,
                                                 int64_t y_row_stride, void* stream);

/*
 * Backward of permute:
 *   grad_x[t] = sum_k grad_xp[row(t, k)] in ascending k, fp32 from +0, rounded once (+0 for no
 *               rows), exactly as the unweighted combine;
 *   grad_weights[t K + k] = grad_row_weights[row(t, k)] (0 for a slot with no row).
 *   plan              [in, host]    reads row_of_slot.
 *   grad_xp           [in, device]  [max_rows, H] contiguous.
 *   grad_row_weights  [in, device]  [max_rows] fp32, or NULL; given iff grad_weights is.
 *   grad_x            [out, device] [T, H], rows at grad_x_row_stride elements (>= H).
 *   grad_weights      [out, device] [T, K] fp32, or NULL.
 * Returns as moekit_tokens_permute. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_tokens_permute_backward(
    const moekit_plan_config_t* config, const moekit_token_plan_t* plan, int64_t num_tokens,
    int64_t hidden, moekit_dtype_t dtype, const void* grad_xp, const float* grad_row_weights,
    void* grad_x, int64_t grad_x_row_stride, float* grad_weights, void* stream);

/*
 * Backward of combine:
 *   grad_yp[row(t, k)] = w[t K + k] grad_y[t] computed in fp32, rounded once (w = 1 when weights
 *                        is NULL); padding rows 0; rows >= total untouched;
 *   grad_weights[t K + k] = <grad_y[t], yp[row(t, k)]> over H in fp32 (0 for a slot with no row).
 *   plan          [in, host]    reads row_of_slot, and expert_counts / expert_offsets when
 *                               grad_yp is given and A > 1.
 *   grad_y        [in, device]  [T, H], rows at grad_y_row_stride elements (>= H).
 *   weights       [in, device]  [T, K] fp32, or NULL (unweighted combine).
 *   yp            [in, device]  [max_rows, H] contiguous, the combine's input; required when
 *                               grad_weights is given (not read otherwise).
 *   grad_yp       [out, device] [max_rows, H] contiguous, or NULL.
 *   grad_weights  [out, device] [T, K] fp32, or NULL. At least one of grad_yp, grad_weights.
 * Returns as moekit_tokens_permute. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_tokens_combine_backward(
    const moekit_plan_config_t* config, const moekit_token_plan_t* plan, int64_t num_tokens,
    int64_t hidden, moekit_dtype_t dtype, const void* grad_y, int64_t grad_y_row_stride,
    const float* weights, const void* yp, void* grad_yp, float* grad_weights, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* MOEKIT_TOKENS_H */
