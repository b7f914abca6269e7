/*
 * moekit/layer.h: the whole MoE layer (NeMo `MoE`) in one forward and one backward call: router
 * projection, router, routing plan, permute, grouped experts, combine, shared MLP with its
 * optional sigmoid gate, and the backward of all of it (aux-loss term included). Contract:
 * docs/semantics.md section 6 (the pieces: sections 1, 4, 5); decisions in docs/layer.md.
 *
 * Notation: T tokens, H hidden size, E experts, K experts per token, I expert FFN width,
 * NU = 2I for gated activations (I for relu2), I_s / NU_s the same for the shared MLP,
 * R = moekit_plan_max_rows (the worst-case number of expert rows), m_t the token mask.
 *
 * Forward (y has x's shape [T, H] and dtype; all accumulation in fp32):
 *   z      = round_L(x W_r^T + b_r)          router logits [T, E]; W_r [E, H] (nn.Linear layout),
 *                                            b_r [E] optional (GPT-OSS); L = dtype, or fp32 with
 *                                            router_fp32 (NeMo gate_precision = fp32). cuBLASLt.
 *   w, idx, load, S, N = router(z, b_c, m)   moekit_router_forward with the config's router options
 *                                            and the fp32 correction bias b_c (selection only)
 *   plan   = moekit_plan_build(idx, m)       padding tokens (m_t = 0) are routed but get no row
 *   xp, p  = permute(x), row weights w        (moekit_tokens_permute)
 *   yp     = experts(xp, p)                   moekit_experts_forward: the routing weight is applied
 *                                            inside the expert (before the down projection, or after
 *                                            it with experts->weight_after_down)
 *   y_r    = round(sum_k yp[row(t, k)])       unweighted combine (moekit_tokens_combine)
 *   s      = shared_mlp(x)                    moekit_mlp_forward on every token (when configured)
 *   g_t    = sigmoid(x_t . w_g)               fp32 (when shared_gate; w_g [H] = Linear(H, 1).weight)
 *   y_t    = round(y_r,t + g_t s_t)           g = 1 without the gate; y = y_r without a shared MLP
 * Backward, from dy [T, H] and aux_loss_coeff (alpha times the caller's loss scale):
 *   ds = round(g dy); dg_t = <dy_t, s_t> g_t (1 - g_t); dw_g = sum_t dg_t x_t
 *   shared MLP backward (dx_s, shared weight gradients); experts backward from dyp[row] = dy[t]
 *   (dxp, expert weight gradients, dp per row); permute backward (dx_r, dw [T, K]); router backward
 *   (dz [T, E], aux term included: moekit_router_backward); dW_r = dz^T x, db_r = sum_t dz_t;
 *   dx = round(dx_r + dx_s + dg w_g + dz W_r)   (the four terms summed in fp32, rounded once).
 * With router_fp32 and a 16-bit dtype the two projection-backward GEMMs run in fp32 on fp32 copies
 * of x and W_r (as NeMo's fp32 gate does); their results are rounded to dtype once.
 *
 * Saved state. The forward writes what the backward needs into a caller-owned "saved" buffer
 * (moekit_layer_saved_size bytes; layout in moekit_layer_saved_view): the logits, the router's
 * weights and indices, this call's load and aux statistics, the plan, and, unless the config asks
 * to recompute them, the pre-activations u of the experts [R, NU] and of the shared MLP [T, NU_s];
 * with a shared gate also g's logit [T] and the shared output [T, H]; and, unless recompute and
 * without expert parallelism, the permuted tokens xp [R, H] with their routing weights p [R],
 * which the backward then reads instead of permuting x again. With recompute (or expert
 * parallelism) the backward permutes x (the received rows) again.
 *
 * Determinism: the same inputs give bitwise the same outputs on the same GPU and build (every piece
 * is deterministic; cuBLASLt runs with a fixed workspace and no in-place split-K reduction).
 * Graph safety: forward and backward enqueue everything on the caller's stream, in order, never
 * synchronise, allocate or read device data on the host: a whole forward + backward can be captured
 * into one CUDA graph. The layer never forks a second stream. Create and destroy are not graph-safe.
 * T = 0 is a valid call (the forward still writes the load, aux statistics and aux value; the
 * backward writes zero weight gradients).
 * Memory: every tensor pointer is 16-byte aligned (cudaMalloc gives 256); saved and workspace
 * buffers are 256-byte aligned. No output may overlap an input, another output, the saved buffer
 * (except as documented) or the workspace. Tensors are contiguous, row-major.
 *
 * Expert parallelism (config->expert_parallel, a moekit_ep_handle_t of moekit/ep.h). Each of the
 * n ranks of the handle's communicator creates its own layer with the same configuration, except
 * that config->experts->num_experts = E / n: rank r holds experts [r E/n, (r+1) E/n) (params
 * w_gate_up [E/n, H, NU], b_gate_up [E/n, NU], w_down [E/n, I, H], b_down [E/n, H], and their
 * gradients likewise); the router weight, correction bias and shared MLP are replicated. Every rank
 * passes its own T tokens (0 .. the handle's max_tokens; T may differ between ranks, and may be 0).
 * The router, its load and aux statistics, the projection and the shared MLP run on this rank's
 * tokens; after routing, each token is dispatched once to every rank owning one of its experts
 * (moekit_ep_dispatch), each rank runs its experts over the rows it received (its own plan with
 * config->alignment / capacity / drop_policy over its experts), sums each received row's expert
 * outputs (unweighted, in fp32, rounded once) and the EP combine adds those partial rows back at
 * the token's rank in ascending rank order (fp32, rounded once). The backward is the transpose:
 * dy goes to the rows' ranks, dx and the routing-weight gradients come back the same way.
 * What differs from one GPU running the whole batch: y rounds each rank's partial sum before the
 * cross-rank sum (with one owning rank per token nothing differs); the expert load, aux statistics
 * and aux loss are those of this rank's tokens unless config->ep_global_statistics sums them over
 * the communicator (then they, and each token's aux gradient, are the global batch's); the router
 * gradients (dW_r, db_r) and shared MLP gradients are this rank's contributions (reduce them as
 * data-parallel gradients). Expert weight gradients are complete: they cover every token that
 * reached this rank's experts.
 * Forward and backward are collectives over the communicator: every rank calls them, in the same
 * order. The handle's mode decides graph safety: MOEKIT_EP_MODE_CAPACITY never reads the device
 * from the host (capturable); MOEKIT_EP_MODE_EXACT exchanges the counts in every forward and reads
 * them on the host once (not capturable: the forward refuses a capturing stream; its backward is
 * capturable). In exact mode the layer keeps each forward's counts, keyed by the saved buffer's
 * address, for that buffer's backward (the 256 most recently used saved buffers; a backward must
 * pass its forward's T). A call refused on one rank only (bad arguments) leaves its peers waiting
 * in the collective: check arguments identically on every rank. An expert-parallel layer, like
 * its EP handle, is used from one thread at a time. Capacity overflow of the EP handle is dropped
 * (never written out of bounds) and counted in the saved buffer (moekit_layer_saved_view's
 * ep_dropped). The EP handle must outlive the layer; its combine_dtype
 * must be the layer's dtype. The saved buffer also keeps the EP layout and the received rows
 * (recv_x, their ids, weights and mask), so the backward permutes them again without a second
 * dispatch; buffers are sized for the handle's worst case (moekit_ep_max_recv_rows rows received).
 */
#ifndef MOEKIT_LAYER_H
#define MOEKIT_LAYER_H

#include "moekit/status.h"
#include "moekit/router.h"
#include "moekit/tokens.h"
#include "moekit/experts.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Required alignment of every tensor pointer of this header, in bytes. */
#define MOEKIT_LAYER_TENSOR_ALIGNMENT 16

/* The layer: copies of the configs, cuBLASLt state for the router projection, and a dense-MLP
 * handle for the shared expert. Opaque. */
typedef struct moekit_layer* moekit_layer_t;

/* Layer options. Extensible: struct_size first; fill with moekit_layer_config_init, then set
 * fields. The library reads min(struct_size, its own sizeof) bytes and defaults the rest. The
 * three family configs are pointed to (they are extensible themselves) and copied by
 * moekit_layer_create; the caller's structs need not outlive that call. */
typedef struct moekit_layer_config {
    size_t struct_size;                     /* sizeof(moekit_layer_config_t) as compiled */
    int32_t hidden;                         /* H > 0, a multiple of 8. Default 0 (must be set). */
    int32_t dtype;                          /* moekit_dtype_t of x, y, every parameter and every
                                               gradient. Default BF16. */
    const moekit_router_config_t* router;   /* required. accumulate_load applies to the forward's
                                               expert_load output only (see moekit_layer_forward). */
    const moekit_experts_config_t* experts; /* required; num_experts = router->num_experts,
                                               hidden = H, dtype = dtype. */
    const moekit_mlp_config_t* shared;      /* the shared expert(s) as one dense MLP (NeMo fuses
                                               n_shared of them into width n_shared * I), or NULL
                                               for none; hidden = H, dtype = dtype. */
    int32_t shared_gate;                    /* nonzero: the shared output is scaled per token by
                                               sigmoid(x . w_g) (Qwen3-Next). Needs shared. Default 0. */
    int32_t router_bias;                    /* nonzero: the router projection has a learned bias b_r [E]
                                               (GPT-OSS). Default 0. */
    int32_t expert_bias;                    /* nonzero: the routed experts have b_gate_up [E, NU] and
                                               b_down [E, H] (NeMo expert_bias). Default 0. */
    int32_t shared_bias;                    /* nonzero: the shared MLP has b_gate_up [NU_s] and b_down [H].
                                               Needs shared. Default 0. */
    int32_t router_fp32;                    /* nonzero: logits in fp32 (NeMo gate_precision = fp32);
                                               0: logits in dtype (NeMo's default). Default 0. */
    int32_t alignment;                      /* A >= 1: every expert segment starts at a multiple of A rows
                                               (moekit_plan_config_t::alignment). Default 1. */
    int32_t capacity;                       /* C >= 0 rows per expert, 0 = dropless. Default 0. */
    int32_t drop_policy;                    /* moekit_drop_policy_t, read when C > 0. Default BY_POSITION. */
    int32_t recompute;                      /* nonzero: the backward recomputes the experts' and the shared
                                               MLP's pre-activations and permutes x again instead of
                                               saving them (saved buffer smaller by R (NU + H) es + 4 R
                                               + T NU_s es bytes; two more GEMMs and a permute in the
                                               backward). Default 0. */
    void* expert_parallel;                  /* a moekit_ep_handle_t (moekit/ep.h) to run expert-parallel
                                               over its communicator (see the top of this header), whose
                                               num_experts, top_k, dtype and hidden are this layer's; or
                                               NULL: every expert on this GPU. Default NULL. */
    int32_t ep_global_statistics;           /* nonzero (needs expert_parallel): the forward sums the
                                               expert load (exact int32) and the aux statistics (S in
                                               rank order, N) over the EP communicator right after the
                                               router, so expert_load, aux_loss and the backward's aux
                                               term are those of the global batch, identical on every
                                               rank (the bias update then agrees across ranks). 0: this
                                               rank's tokens only. Must be the same on every rank (it
                                               adds collectives). Default 0. */
} moekit_layer_config_t;

/* The parameters (and the correction-bias buffer) of one layer: device pointers, all of dtype except
 * correction_bias. A pointer whose parameter the config does not have must be NULL. */
typedef struct moekit_layer_params {
    size_t struct_size;              /* sizeof(moekit_layer_params_t) as compiled */
    const void* router_weight;       /* W_r [E, H] (nn.Linear weight). Required. */
    const void* router_bias;         /* b_r [E], iff config->router_bias. */
    const float* correction_bias;    /* b_c [E] fp32, or NULL: selection only (router.h); no gradient. */
    const void* w_gate_up;           /* [E, H, NU] (x @ W layout, experts.h). Required. */
    const void* b_gate_up;           /* [E, NU], iff config->expert_bias. */
    const void* w_down;              /* [E, I, H]. Required. */
    const void* b_down;              /* [E, H], iff config->expert_bias. */
    const void* shared_w_gate_up;    /* [H, NU_s] or [NU_s, H] per shared->weight_layout, iff shared. */
    const void* shared_b_gate_up;    /* [NU_s], iff config->shared_bias. */
    const void* shared_w_down;       /* [I_s, H] or [H, I_s], iff shared. */
    const void* shared_b_down;       /* [H], iff config->shared_bias. */
    const void* shared_gate_weight;  /* w_g [H] (Linear(H, 1).weight), iff config->shared_gate. */
} moekit_layer_params_t;

/* Parameter gradients, each [out, device] with its parameter's shape and dtype, overwritten (never
 * accumulated into). NULL skips that gradient; a gradient of a parameter the config does not have
 * must be NULL. */
typedef struct moekit_layer_grads {
    size_t struct_size;          /* sizeof(moekit_layer_grads_t) as compiled */
    void* router_weight;
    void* router_bias;
    void* w_gate_up;
    void* b_gate_up;
    void* w_down;
    void* b_down;
    void* shared_w_gate_up;
    void* shared_b_gate_up;
    void* shared_w_down;
    void* shared_b_down;
    void* shared_gate_weight;
} moekit_layer_grads_t;

/* Where the forward put each piece of the saved buffer (host arithmetic: moekit_layer_saved_view).
 * Entries the config does not need are NULL. Every array is 256-byte aligned inside the buffer. */
typedef struct moekit_layer_saved_view {
    size_t struct_size;          /* sizeof(moekit_layer_saved_view_t) as compiled */
    int64_t max_rows;            /* R = moekit_plan_max_rows for this T */
    int64_t logits_row_stride;   /* E rounded up to a multiple of 8 (16-byte rows for cuBLASLt) */
    int32_t logits_dtype;        /* dtype, or F32 with router_fp32 */
    void* logits;                /* z [T, logits_row_stride] */
    float* weights;              /* w [T, K] fp32 (route scale included) */
    int32_t* indices;            /* idx [T, K] */
    int32_t* expert_load;        /* L [E] of this call (never accumulated) */
    float* aux_score_sum;        /* S [E] */
    int32_t* aux_token_count;    /* N [1] */
    int32_t* expert_counts;      /* the plan (moekit/tokens.h): [E] */
    int32_t* expert_offsets;     /* [E + 1] */
    int32_t* row_of_slot;        /* [T K] */
    int32_t* slot_of_row;        /* [R] */
    int32_t* plan_totals;        /* [MOEKIT_PLAN_NUM_TOTALS]: rows, dropped, invalid */
    void* expert_u;              /* [R, NU] of dtype, NULL with recompute */
    void* shared_u;              /* [T, NU_s] of dtype, NULL without shared MLP or with recompute */
    float* shared_gate_logit;    /* [T] fp32 (x . w_g), NULL without shared_gate */
    void* shared_out;            /* s [T, H] of dtype, NULL without shared_gate */
    /* Expert parallelism (all NULL / 0 without it). The plan above is then over the received
     * rows and this rank's E / n experts: expert_counts [E / n], expert_offsets [E / n + 1],
     * row_of_slot [recv_rows K], and max_rows is its worst case (exact mode plans over the rows
     * that came, their count known to the host from the layout). */
    int64_t recv_rows;           /* the most rows a dispatch brings (moekit_ep_max_recv_rows) */
    void* ep_layout;             /* the forward's moekit_ep_layout device layout */
    void* recv_x;                /* [recv_rows, H] of dtype: the dispatched tokens */
    int32_t* recv_indices;       /* [recv_rows, K] global expert ids (-1 in gaps) */
    float* recv_weights;         /* [recv_rows, K] fp32 routing weights */
    uint8_t* recv_mask;          /* [recv_rows] 1 for a received token, 0 for a gap */
    int32_t* ep_dropped;         /* [1] (token, destination rank) pairs this rank's forward dropped
                                    by the EP handle's capacity (capacity mode; 0 in exact mode) */
    void* expert_xp;             /* [R, H] of dtype: the permuted tokens, NULL with recompute or
                                    expert parallelism */
    float* expert_row_weights;   /* [R] fp32 routing weight of each permuted row, as expert_xp */
} moekit_layer_saved_view_t;

/* Stages of the forward (0 .. 6) and backward (7 .. 13), for moekit_layer_set_stage_events. With
 * expert parallelism PLAN also holds the EP layout and the dispatch, COMBINE the EP combine,
 * COMBINE_BACKWARD the EP combine's backward and PERMUTE_BACKWARD the dispatch's backward. */
typedef enum moekit_layer_stage {
    MOEKIT_LAYER_STAGE_PROJECTION = 0,           /* z = x W_r^T + b_r */
    MOEKIT_LAYER_STAGE_ROUTER = 1,               /* router, load output, aux value */
    MOEKIT_LAYER_STAGE_PLAN = 2,
    MOEKIT_LAYER_STAGE_PERMUTE = 3,
    MOEKIT_LAYER_STAGE_EXPERTS = 4,
    MOEKIT_LAYER_STAGE_COMBINE = 5,
    MOEKIT_LAYER_STAGE_SHARED = 6,               /* shared MLP, gate, y += g s */
    MOEKIT_LAYER_STAGE_SHARED_BACKWARD = 7,      /* gate backward, shared MLP backward, dw_g */
    MOEKIT_LAYER_STAGE_PERMUTE_RECOMPUTE = 8,    /* xp and p again (empty unless recompute or EP) */
    MOEKIT_LAYER_STAGE_COMBINE_BACKWARD = 9,
    MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD = 10,
    MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD = 11,
    MOEKIT_LAYER_STAGE_ROUTER_BACKWARD = 12,
    MOEKIT_LAYER_STAGE_PROJECTION_BACKWARD = 13  /* dW_r, db_r, dz W_r and the sum into dx */
} moekit_layer_stage_t;
#define MOEKIT_LAYER_NUM_STAGES 14

/* Fills *config with the defaults above and sets config->struct_size = struct_size.
 * Returns INVALID_ARGUMENT when config is NULL or struct_size is smaller than the 0.1 struct.
 * Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_config_init(moekit_layer_config_t* config, size_t struct_size);

/* Sets every pointer of *params to NULL and params->struct_size = struct_size. Returns
 * INVALID_ARGUMENT when params is NULL or struct_size is too small. Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_params_init(moekit_layer_params_t* params, size_t struct_size);

/* Sets every pointer of *grads to NULL and grads->struct_size = struct_size. As params_init.
 * Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_grads_init(moekit_layer_grads_t* grads, size_t struct_size);

/* Checks a configuration and the three family configs it points to, without touching the device
 * (the same checks moekit_layer_create makes). Returns SUCCESS, INVALID_ARGUMENT or UNSUPPORTED
 * with a message naming the field, e.g. "config->experts->num_experts = 64 differs from
 * config->router->num_experts = 128". Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_config_check(const moekit_layer_config_t* config);

/* Bytes of the saved buffer for num_tokens tokens; depends only on the arguments.
 * Returns SUCCESS; INVALID_ARGUMENT (bad config, num_tokens < 0 or sizes past int32 (T K and R must
 * fit), saved_bytes NULL). Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_saved_size(const moekit_layer_config_t* config,
                                                   int64_t num_tokens, size_t* saved_bytes);

/* Workspace bytes of moekit_layer_forward and moekit_layer_backward for num_tokens tokens; depend
 * only on the arguments (one buffer of the larger size serves both). Either pointer may be NULL,
 * not both. Returns as moekit_layer_saved_size. Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_workspace_size(const moekit_layer_config_t* config,
                                                       int64_t num_tokens, size_t* forward_bytes,
                                                       size_t* backward_bytes);

/* The pieces of a saved buffer (see moekit_layer_saved_view_t); host arithmetic only.
 *   saved  [in, device] a buffer of at least moekit_layer_saved_size bytes, 256-byte aligned.
 *   view   [out, host]  view->struct_size must be set (sizeof).
 * Returns SUCCESS; INVALID_ARGUMENT (bad config or num_tokens, NULL, saved_bytes too small,
 * view->struct_size too small); MISALIGNED. Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_saved_view(const moekit_layer_config_t* config,
                                                   int64_t num_tokens, void* saved, size_t saved_bytes,
                                                   moekit_layer_saved_view_t* view);

/* Creates a layer on the current device: checks and copies the configs, creates cuBLASLt state and
 * (with a shared MLP) a moekit_mlp_handle_t. Not graph-safe (call it before capturing).
 *   layer [out, host] the new handle (NULL on failure).
 * Returns SUCCESS; INVALID_ARGUMENT / UNSUPPORTED (as moekit_layer_config_check); NOT_AVAILABLE
 * (the current device cannot run the grouped experts' kernels); CUDA_ERROR; CUBLAS_ERROR;
 * OUT_OF_MEMORY. Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_create(const moekit_layer_config_t* config, moekit_layer_t* layer);

/* Destroys a layer (NULL is a no-op). No call may still be running on it on the host; work it
 * enqueued may still be in flight (it owns no device memory). Since 0.1. */
MOEKIT_API moekit_status_t moekit_layer_destroy(moekit_layer_t layer);

/*
 * Layer forward (formulas at the top of this header).
 *   layer          [in, host]    from moekit_layer_create; the current device must be its device.
 *   num_tokens     T >= 0.
 *   x              [in, device]  [T, H] of dtype; NULL only when T = 0.
 *   token_mask     [in, device]  m [T] uint8 (nonzero = real token), or NULL for all real.
 *   params         [in, host]    the parameters (device pointers), see moekit_layer_params_t.
 *   y              [out, device] [T, H] of dtype; NULL only when T = 0.
 *   expert_load    [in/out, device] [E] int32, or NULL: this call's load L, written, or added to
 *                                when config->router->accumulate_load is set (micro-batch
 *                                accumulation for moekit_router_bias_update).
 *   aux_loss       [out, device] [1] fp32, or NULL: the aux-loss value of this call (router.h).
 *   saved          [out, device] moekit_layer_saved_size bytes, 256-byte aligned: what the backward
 *                                reads; keep it until then. Needed for inference too (use recompute
 *                                to keep it small).
 *   workspace      [in, device]  moekit_layer_workspace_size (forward) bytes, 256-byte aligned, or
 *                                NULL when that is 0. Scratch: no state is kept between calls.
 *   stream         cudaStream_t; every piece of work goes on it, in order.
 * Returns SUCCESS; INVALID_ARGUMENT (NULL where not allowed, T < 0 or sizes past int32, a parameter
 * pointer given or missing against the config, overlapping buffers, bad params->struct_size, the
 * handle's device not current; expert parallelism: T past the EP handle's max_tokens, a capturing
 * stream in exact mode); WORKSPACE_TOO_SMALL (workspace or saved buffer too small); MISALIGNED;
 * NOT_AVAILABLE; CUDA_ERROR; CUBLAS_ERROR; NCCL_ERROR (expert parallelism). Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_layer_forward(moekit_layer_t layer, int64_t num_tokens, const void* x,
                                                const uint8_t* token_mask,
                                                const moekit_layer_params_t* params, void* y,
                                                int32_t* expert_load, float* aux_loss, void* saved,
                                                size_t saved_bytes, void* workspace,
                                                size_t workspace_bytes, void* stream);

/*
 * Layer backward (formulas at the top of this header).
 *   layer, num_tokens, x, token_mask, params: exactly as given to the forward.
 *   saved          [in, device]  the forward's saved buffer (not modified).
 *   grad_y         [in, device]  dy [T, H] of dtype; NULL only when T = 0.
 *   aux_loss_coeff alpha times the caller's loss scale (finite); 0 disables the aux term. The aux
 *                  term uses the forward's own load and token count (saved).
 *   grad_x         [out, device] dx [T, H] of dtype; NULL only when T = 0.
 *   grads          [in, host]    the parameter gradients (device pointers), or NULL for none.
 *   workspace      moekit_layer_workspace_size (backward) bytes, 256-byte aligned.
 *   stream         cudaStream_t.
 * Returns as moekit_layer_forward; in exact expert-parallel mode also INVALID_ARGUMENT when saved
 * was not written by a forward of this layer. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_layer_backward(moekit_layer_t layer, int64_t num_tokens, const void* x,
                                                 const uint8_t* token_mask,
                                                 const moekit_layer_params_t* params, const void* saved,
                                                 size_t saved_bytes, const void* grad_y,
                                                 float aux_loss_coeff, void* grad_x,
                                                 const moekit_layer_grads_t* grads, void* workspace,
                                                 size_t workspace_bytes, void* stream);

/*
 * Diagnostics: per-stage timing. events: an array of 2 * MOEKIT_LAYER_NUM_STAGES cudaEvent_t (as
 * void*); from now on every forward and backward on this layer records events[2 s] when stage s
 * starts and events[2 s + 1] when it ends, on the call's stream (stages that do not run record
 * nothing). NULL turns it off. The layer keeps the pointer (the array must live until it is turned
 * off); not to be changed while another thread calls the layer. Recording adds a few microseconds.
 * Returns SUCCESS or INVALID_ARGUMENT (layer NULL, num_events != 2 * MOEKIT_LAYER_NUM_STAGES with
 * events given, or a NULL event). Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_layer_set_stage_events(moekit_layer_t layer, void* const* events,
                                                         int32_t num_events);

#ifdef __cplusplus
}
#endif

#endif /* MOEKIT_LAYER_H */
