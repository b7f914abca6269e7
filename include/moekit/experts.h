/*
 * moekit/experts.h: the grouped expert FFN (NeMo `GroupedExperts`) and the dense MLP (NeMo `MLP`,
 * shared experts), forward and backward. Contract: ../shared/spec/semantics.md section 5; layouts,
 * epilogue maths, determinism and tile choices in docs/experts.md.
 *
 * Notation: E experts on this rank (E_local), H hidden size, I expert FFN width, NU = 2I for gated
 * activations and I for relu2, R = max_rows (the host-known worst-case row count).
 *
 * Grouped experts. The input xp [R, H] is expert-major: segment e is rows
 * [expert_offsets[e], expert_offsets[e + 1]) (the plan of moekit/tokens.h; padding rows are zero
 * rows whose routing weight is 0). Rows at or past expert_offsets[E] are never written and never
 * change a result (the Hopper path's tile loads may read them, inside [0, R), for row tiles that
 * run past a segment's end; any values there, NaN included, are harmless). For every row r of segment e, with p_r its routing weight (fp32; 1 when row_weights is
 * NULL) and all arithmetic in fp32:
 *   u_r   = xp_r W_gu[e] (+ b_gu[e])                      [NU]  (fp32 accumulator, never rounded)
 *   a_r   = act(u_r)                                      [I]
 *   default:            h_r = round(a_r * p_r)            [I]   one rounding to the dtype
 *                       out_r = round(h_r W_down[e] + p_r * b_down[e])
 *   weight_after_down:  h_r = round(a_r)
 *                       out_r = round(p_r * (h_r W_down[e] + b_down[e]))
 * Weights use NeMo's layout, x @ W: W_gu [E, H, NU], W_down [E, I, H]; gate_up columns are either
 * concatenated ([0, I) gate, [I, 2I) up) or interleaved (even columns gate, odd columns up, GPT-OSS);
 * b_gu [E, NU] follows the same column layout.
 *
 * Activations (g the gate column, v the up column, L = act_limit, alpha = act_alpha):
 *   SWIGLU       silu(g) * v; when L > 0 (DeepSeek-V4 swiglu_limit): g <- min(g, L),
 *                v <- clamp(v, -L, L) first.
 *   RELU2        relu(u)^2 over the single projection (NU = I; no gate/up split).
 *   QUICK_GEGLU  g <- min(g, L), v <- clamp(v, -L, L) (always; L > 0 required, NeMo default 7),
 *                then g * sigmoid(alpha g) * (v + 1) (GPT-OSS; interleaved by default).
 *   GEGLU        gelu_tanh(g) * v (Gemma).
 *   SWIGLU_OAI   as QUICK_GEGLU but clamped only when L > 0 and concatenated by default
 *                (NeMo `swigluoai`, MiniMax-M3).
 * Clamps pass gradient where the input lies inside the closed interval (as torch.clamp does).
 *
 * Backward (the same for both weight placements, up to where the roundings sit):
 *   G_r   = dout_r W_down[e]^T                            [I] fp32
 *   dp_r  = <G_r, a_r> + <dout_r, b_down[e]>
 *   du_r  = act'(u_r) (p_r G_r)                            rounded once to the dtype
 *   dxp_r = du_r W_gu[e]^T;  dW_gu[e] = xp_e^T du_e;  db_gu[e] = sum_r du_r
 *   dW_down[e] = h'_e^T dout_e with h'_r = round(a_r p_r);  db_down[e] = sum_r p_r dout_r
 * u in the backward is the saved (rounded) pre-activation of the forward, or the same value
 * recomputed. Weight and bias gradients are overwritten, never accumulated into; experts without
 * rows get exactly zero.
 *
 * Determinism: the same inputs give bitwise the same outputs on the same GPU and build. No
 * floating-point atomics; every sum over rows (weight gradients, bias gradients, dp) runs in a fixed
 * order, and split reductions are summed in a second ordered pass. On the sm_90a path a GEMM whose
 * last wave of tiles is nearly empty runs its last two waves cut along k (the stream-K tail,
 * docs/experts.md): a cut tile adds the fp32 sum of its second part to that of its first, in that
 * order, at a cut that depends on the routing and the SM count.
 * Graph safety: no call below synchronises, allocates device memory or reads device data on the
 * host. Group sizes live only on the device; buffers are sized with max_rows. max_rows = 0 is a
 * valid call (weight and bias gradients are still written, as zeros).
 *
 * Memory: every tensor pointer is 16-byte aligned (cudaMalloc gives 256); workspaces 256-byte
 * aligned. No output may overlap an input or another output.
 */
#ifndef MOEKIT_EXPERTS_H
#define MOEKIT_EXPERTS_H

#include "moekit/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest E_local any experts call accepts. */
#define MOEKIT_EXPERTS_MAX_EXPERTS 8192
/* Required alignment of every tensor pointer of this header, in bytes. */
#define MOEKIT_EXPERTS_TENSOR_ALIGNMENT 16

typedef enum moekit_activation {
    MOEKIT_ACTIVATION_SWIGLU = 0,
    MOEKIT_ACTIVATION_RELU2 = 1,
    MOEKIT_ACTIVATION_QUICK_GEGLU = 2,
    MOEKIT_ACTIVATION_GEGLU = 3,
    MOEKIT_ACTIVATION_SWIGLU_OAI = 4
} moekit_activation_t;

typedef enum moekit_gate_up_layout {
    /* INTERLEAVED for QUICK_GEGLU, CONCATENATED otherwise (what NeMo uses). */
    MOEKIT_GATE_UP_AUTO = 0,
    /* columns [0, I) are the gate, [I, 2I) the up projection. */
    MOEKIT_GATE_UP_CONCATENATED = 1,
    /* column 2i is gate i, column 2i + 1 is up i (HF GPT-OSS gate_up_proj). */
    MOEKIT_GATE_UP_INTERLEAVED = 2
} moekit_gate_up_layout_t;

/* Which grouped-GEMM kernels the bf16/f16 grouped experts run on (fp32 always runs the SIMT kernels).
 * AUTO takes the sm_90a path where it may run (compute capability 9.0, a build with the sm_90a
 * objects, its shared memory fits the device) and the sm_80 path elsewhere; docs/experts.md
 * records the measurement behind the choice. */
typedef enum moekit_gemm_path {
    MOEKIT_GEMM_PATH_AUTO = 0,
    /* mma.sync + cp.async kernels (compute capability 8.0 and newer). */
    MOEKIT_GEMM_PATH_SM80 = 1,
    /* TMA + wgmma warp-specialised kernels (compute capability 9.0 exactly, a build with the
     * sm_90a objects: gpu_archs containing 90) for the grouped GEMMs of the forward and the
     * backward; what they cannot take (max_rows = 0, strides the tensor-memory accelerator
     * cannot read) stays on the sm_80 kernels. A call on another device or build returns
     * UNSUPPORTED. */
    MOEKIT_GEMM_PATH_SM90 = 2
} moekit_gemm_path_t;

/* Grouped experts options. Extensible: struct_size first; fill with moekit_experts_config_init,
 * then set fields. The library reads min(struct_size, its own sizeof) bytes and defaults the rest. */
typedef struct moekit_experts_config {
    size_t struct_size;        /* sizeof(moekit_experts_config_t) as the caller compiled it */
    int32_t num_experts;       /* E_local, 1 .. MOEKIT_EXPERTS_MAX_EXPERTS. Default 0 (must be set). */
    int32_t hidden;            /* H > 0, a multiple of 8. Default 0 (must be set). */
    int32_t inter;             /* I > 0, a multiple of 8. Default 0 (must be set). */
    int32_t dtype;             /* moekit_dtype_t of activations, weights, biases. Default BF16. */
    int32_t activation;        /* moekit_activation_t. Default SWIGLU. */
    int32_t gate_up_layout;    /* moekit_gate_up_layout_t; ignored for RELU2. Default AUTO. */
    int32_t weight_after_down; /* nonzero: out = p * (act(u) W_down + b_down) (GLM-4.5, Kimi).
                                  Default 0. */
    float act_alpha;           /* alpha of QUICK_GEGLU and SWIGLU_OAI, finite. Default 1.702. */
    float act_limit;           /* L >= 0 (see the activations above). Default 0. */
    int32_t gemm_path;         /* moekit_gemm_path_t. Default AUTO. Appended after the first
                                  release of this struct: a struct_size ending before it reads
                                  as AUTO. */
} moekit_experts_config_t;

/* Fills *config with the defaults above and sets config->struct_size = struct_size.
 * Returns INVALID_ARGUMENT when config is NULL or struct_size is smaller than the 0.1 struct.
 * Since 0.1. */
MOEKIT_API moekit_status_t moekit_experts_config_init(moekit_experts_config_t* config,
                                                      size_t struct_size);

/* Checks a configuration without running anything (the same checks every call makes).
 * Returns SUCCESS, INVALID_ARGUMENT or UNSUPPORTED with a message naming the field. Since 0.1. */
MOEKIT_API moekit_status_t moekit_experts_config_check(const moekit_experts_config_t* config);

/* Workspace bytes moekit_experts_forward needs; depends only on the arguments: h [R, I] between
 * the two GEMMs and, for bf16 / f16 with a GEMM of at least 40 k tiles of 64 (H or I >= 2497), the
 * stream-K tail's partial tiles (up to 132 of 128 KB).
 * Returns INVALID_ARGUMENT for a bad config, max_rows < 0 or workspace_bytes NULL. Since 0.1. */
MOEKIT_API moekit_status_t moekit_experts_forward_workspace_size(
    const moekit_experts_config_t* config, int64_t max_rows, size_t* workspace_bytes);

/*
 * Grouped expert FFN forward (formulas at the top of this header).
 *   config          [in, host]    options.
 *   max_rows        R >= 0: rows of xp, out and u_out (the worst case; the true total lives in
 *                                 expert_offsets[E] on the device).
 *   expert_offsets  [in, device]  int32 [E + 1], non-decreasing, expert_offsets[E] <= R. Values
 *                                 outside [0, R] are clamped, so nothing outside the buffers is
 *                                 ever touched whatever the array holds.
 *   xp              [in, device]  [R, H] of dtype, expert-major rows; may be NULL when R = 0.
 *   row_weights     [in, device]  p [R] fp32, or NULL (p = 1).
 *   w_gate_up       [in, device]  W_gu [E, H, NU] of dtype.
 *   b_gate_up       [in, device]  b_gu [E, NU] of dtype, or NULL.
 *   w_down          [in, device]  W_down [E, I, H] of dtype.
 *   b_down          [in, device]  b_down [E, H] of dtype, or NULL.
 *   u_out           [out, device] [R, NU] of dtype: round(u) saved for the backward, or NULL.
 *   out             [out, device] [R, H] of dtype.
 *   workspace       [in, device]  moekit_experts_forward_workspace_size bytes, 256-byte aligned.
 *   stream          cudaStream_t.
 * Returns SUCCESS; INVALID_ARGUMENT (NULL where not allowed, bad config, R < 0); UNSUPPORTED
 * (config->gemm_path = SM90 on a device that is not compute capability 9.0, or in a build without
 * the sm_90a kernels); WORKSPACE_TOO_SMALL; MISALIGNED (a tensor not 16-byte aligned, the workspace not 256-byte
 * aligned); CUDA_ERROR (launch failed). Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_experts_forward(
    const moekit_experts_config_t* config, int64_t max_rows, const int32_t* expert_offsets,
    const void* xp, const float* row_weights, const void* w_gate_up, const void* b_gate_up,
    const void* w_down, const void* b_down, void* u_out, void* out, void* workspace,
    size_t workspace_bytes, void* stream);

/* Workspace bytes moekit_experts_backward needs; depends only on the arguments. has_saved_u:
 * nonzero when the backward will be given u (otherwise it recomputes u into the workspace).
 * Since 0.1. */
MOEKIT_API moekit_status_t moekit_experts_backward_workspace_size(
    const moekit_experts_config_t* config, int64_t max_rows, int32_t has_saved_u,
    size_t* workspace_bytes);

/*
 * Grouped expert FFN backward (formulas at the top of this header).
 *   config, max_rows, expert_offsets, xp, row_weights, w_gate_up, b_gate_up, w_down, b_down:
 *                      exactly as given to the forward.
 *   u                 [in, device]  [R, NU] the forward's u_out, or NULL to recompute it (then
 *                                   the workspace query needs has_saved_u = 0).
 *   grad_out          [in, device]  dL/dout [R, H] of dtype.
 *   grad_xp           [out, device] [R, H] of dtype, or NULL.
 *   grad_w_gate_up    [out, device] [E, H, NU] of dtype, or NULL.
 *   grad_b_gate_up    [out, device] [E, NU] of dtype, or NULL; needs b_gate_up.
 *   grad_w_down       [out, device] [E, I, H] of dtype, or NULL.
 *   grad_b_down       [out, device] [E, H] of dtype, or NULL; needs b_down.
 *   grad_row_weights  [out, device] dL/dp [R] fp32, or NULL; needs row_weights.
 *   workspace         moekit_experts_backward_workspace_size bytes, 256-byte aligned.
 * Returns as moekit_experts_forward. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_experts_backward(
    const moekit_experts_config_t* config, int64_t max_rows, const int32_t* expert_offsets,
    const void* xp, const float* row_weights, const void* w_gate_up, const void* b_gate_up,
    const void* w_down, const void* b_down, const void* u, const void* grad_out, void* grad_xp,
    void* grad_w_gate_up, void* grad_b_gate_up, void* grad_w_down, void* grad_b_down,
    float* grad_row_weights, void* workspace, size_t workspace_bytes, void* stream);

/*
 * Dense MLP (NeMo `MLP`, shared experts) over T tokens with the same activations and the same
 * rounding points as the grouped path (p = 1):
 *   u = x W_gu (+ b_gu)     [T, NU] fp32 (workspace; u_out receives round(u))
 *   h = round(act(u))       [T, I]
 *   y = round(h W_down + b_down)
 * Backward, from the saved (rounded) u: G = dy W_down^T (fp32); du = round(act'(u) G);
 *   dx = du W_gu^T; dW_gu = x^T du; db_gu = sum_t du_t; dW_down = h'^T dy with h' = round(act(u));
 *   db_down = sum_t dy_t.
 * GEMMs run through cuBLASLt (fp32 accumulation; fp32 inputs use plain fp32, never TF32);
 * algorithms that reduce in place are excluded, so results are deterministic; bias gradients are
 * fixed-order column sums.
 * cuBLASLt state (the library handle and a cache of matmul plans) lives in a caller-owned handle,
 * created and destroyed outside any graph capture; the forward and backward calls are graph-safe.
 * A handle may be used from several threads (calls are serialised on it), on the device that was
 * current when it was created.
 */
typedef struct moekit_mlp_handle* moekit_mlp_handle_t;

typedef enum moekit_weight_layout {
    /* W_gu [H, NU], W_down [I, H]: x @ W (NeMo experts layout). */
    MOEKIT_WEIGHT_IN_OUT = 0,
    /* W_gu [NU, H], W_down [H, I]: x @ W^T (nn.Linear; gate rows [0, I), up rows [I, 2I) when
     * concatenated, as torch.cat([gate_proj.weight, up_proj.weight])). */
    MOEKIT_WEIGHT_OUT_IN = 1
} moekit_weight_layout_t;

typedef struct moekit_mlp_config {
    size_t struct_size;      /* sizeof(moekit_mlp_config_t) as the caller compiled it */
    int32_t hidden;          /* H > 0, a multiple of 8. Default 0 (must be set). */
    int32_t inter;           /* I > 0, a multiple of 8. Default 0 (must be set). */
    int32_t dtype;           /* moekit_dtype_t. Default BF16. */
    int32_t activation;      /* moekit_activation_t. Default SWIGLU. */
    int32_t gate_up_layout;  /* moekit_gate_up_layout_t (columns of u). Default AUTO. */
    int32_t weight_layout;   /* moekit_weight_layout_t. Default MOEKIT_WEIGHT_IN_OUT. */
    float act_alpha;         /* Default 1.702. */
    float act_limit;         /* Default 0. */
} moekit_mlp_config_t;

/* Creates cuBLASLt state on the current device. Not graph-safe (call it before capturing).
 * Returns SUCCESS, INVALID_ARGUMENT (handle NULL), CUBLAS_ERROR, OUT_OF_MEMORY. Since 0.1. */
MOEKIT_API moekit_status_t moekit_mlp_handle_create(moekit_mlp_handle_t* handle);

/* Destroys a handle (NULL is a no-op). No call using it may still be running on the host; work it
 * enqueued may still be in flight (it owns no device memory). Since 0.1. */
MOEKIT_API moekit_status_t moekit_mlp_handle_destroy(moekit_mlp_handle_t handle);

/* Defaults as documented in moekit_mlp_config_t. Since 0.1. */
MOEKIT_API moekit_status_t moekit_mlp_config_init(moekit_mlp_config_t* config, size_t struct_size);

/* Validates a configuration. Since 0.1. */
MOEKIT_API moekit_status_t moekit_mlp_config_check(const moekit_mlp_config_t* config);

/* Workspace bytes moekit_mlp_forward needs; depends only on the arguments. Since 0.1. */
MOEKIT_API moekit_status_t moekit_mlp_forward_workspace_size(const moekit_mlp_config_t* config,
                                                             int64_t num_tokens,
                                                             size_t* workspace_bytes);

/*
 * Dense MLP forward.
 *   handle      [in, host]    from moekit_mlp_handle_create.
 *   num_tokens  T >= 0 (T = 0 enqueues nothing).
 *   x           [in, device]  [T, H] of dtype.
 *   w_gate_up   [in, device]  [H, NU] (IN_OUT) or [NU, H] (OUT_IN) of dtype.
 *   b_gate_up   [in, device]  [NU] of dtype, or NULL.
 *   w_down      [in, device]  [I, H] (IN_OUT) or [H, I] (OUT_IN) of dtype.
 *   b_down      [in, device]  [H] of dtype, or NULL.
 *   u_out       [out, device] [T, NU] of dtype (saved for the backward), or NULL.
 *   out         [out, device] y [T, H] of dtype.
 *   workspace   moekit_mlp_forward_workspace_size bytes, 256-byte aligned.
 * Returns SUCCESS, INVALID_ARGUMENT, UNSUPPORTED, WORKSPACE_TOO_SMALL, MISALIGNED, CUDA_ERROR,
 * CUBLAS_ERROR. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_mlp_forward(moekit_mlp_handle_t handle,
                                              const moekit_mlp_config_t* config,
                                              int64_t num_tokens, const void* x,
                                              const void* w_gate_up, const void* b_gate_up,
                                              const void* w_down, const void* b_down, void* u_out,
                                              void* out, void* workspace, size_t workspace_bytes,
                                              void* stream);

/* Workspace bytes moekit_mlp_backward needs (has_saved_u as for the experts). Since 0.1. */
MOEKIT_API moekit_status_t moekit_mlp_backward_workspace_size(const moekit_mlp_config_t* config,
                                                              int64_t num_tokens,
                                                              int32_t has_saved_u,
                                                              size_t* workspace_bytes);

/*
 * Dense MLP backward. Arguments as the forward, plus:
 *   u             [in, device]  the forward's u_out [T, NU], or NULL to recompute it.
 *   grad_out      [in, device]  dy [T, H] of dtype.
 *   grad_x        [out, device] [T, H], or NULL.
 *   grad_w_gate_up, grad_w_down [out, device] in the layout of the weights, or NULL.
 *   grad_b_gate_up [NU], grad_b_down [H] [out, device], or NULL (each needs its bias).
 * Every gradient is overwritten; T = 0 writes zero weight and bias gradients.
 * Returns as moekit_mlp_forward. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_mlp_backward(
    moekit_mlp_handle_t handle, const moekit_mlp_config_t* config, int64_t num_tokens,
    const void* x, const void* w_gate_up, const void* b_gate_up, const void* w_down,
    const void* b_down, const void* u, const void* grad_out, void* grad_x, void* grad_w_gate_up,
    void* grad_b_gate_up, void* grad_w_down, void* grad_b_down, void* workspace,
    size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* MOEKIT_EXPERTS_H */
