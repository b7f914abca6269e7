/*
 * moekit/router.h: the MoE router (NeMo `Gate`), its aux loss, the aux-loss-free bias update and
 * the fake balanced gate. Contract: docs/semantics.md sections 1-3.
 *
 * Notation: T tokens, E experts, K experts per token, G expert groups, G' groups kept,
 * z [T, E] router logits, b [E] fp32 correction bias, m_t in {0, 1} token mask (1 = real token).
 *
 * Forward, per token t (all arithmetic in fp32 whatever the logits dtype):
 *   s = score(z_t):   softmax over E | sigmoid | sqrt(softplus)           (elementwise but softmax)
 *   c = s + b                      selection scores (b = 0 when correction_bias is NULL);
 *       with MOEKIT_TOPK_THEN_SOFTMAX the selection scores are c = z_t + b instead.
 *   groups (G > 1): group score of each group from its c (max | top-2 sum | top-n sum), the G'
 *       best groups are kept, every expert of another group gets selection score 0 or -inf.
 *   idx = the K experts with the largest selection score, in descending score order; ties go to
 *       the lower expert index (lower group index for groups); NaN never wins (treated as -inf);
 *       indices are always in [0, E), also when a row is all NaN or -inf: such a row gets the
 *       lowest indices among its best candidates (0 .. K-1 without groups; with groups masked to
 *       0, the 0-masked experts of the first dropped groups outrank -inf).
 *   w_k = s[idx_k]              (c[idx_k] when weights_use_bias is set)
 *       with MOEKIT_TOPK_THEN_SOFTMAX: w = softmax over the K picked logits z[idx_k].
 *   normalise (normalize and K > 1): w_k <- w_k / (sum_k w_k + 1e-20)
 *   w_k <- route_scale * w_k
 * Aux-loss statistics (NeMo's per-micro-batch form), with p the full score row used by the aux loss:
 *   p = s (c when weights_use_bias), softmax(z) for both softmax orders, normalised like w
 *       (p_e <- p_e / (sum_e p_e + 1e-20)) when normalize and K > 1; never scaled by route_scale.
 *   expert_load L_i  = sum_t m_t [i in idx_t]        (int32; the mask changes counting, not routing)
 *   aux_score_sum S_i = sum_t m_t p_ti                (fp32, fixed-order reduction)
 *   aux_token_count N = sum_t m_t                     (int32)
 *   aux = sum_i f_i P_i with N' = max(N, 1), f_i = L_i E / (K N'), P_i = S_i / N'.
 * The [T, E] score matrix is never written to memory.
 *
 * Determinism: the same inputs give bitwise the same outputs on the same GPU and build. No
 * floating-point atomics; reductions over tokens use per-block partials in the workspace followed
 * by one ordered pass.
 * Graph safety: no call below synchronises, allocates or reads device data on the host; each can
 * be captured into a CUDA graph. T = 0 is a valid call (loads and statistics are still written).
 */
#ifndef MOEKIT_ROUTER_H
#define MOEKIT_ROUTER_H

#include "moekit/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest E any router call accepts. */
#define MOEKIT_ROUTER_MAX_EXPERTS 4096

typedef enum moekit_score_func {
    MOEKIT_SCORE_SOFTMAX = 0,
    MOEKIT_SCORE_SIGMOID = 1,
    MOEKIT_SCORE_SQRT_SOFTPLUS = 2
} moekit_score_func_t;

/* Only read when score_func is MOEKIT_SCORE_SOFTMAX. */
typedef enum moekit_softmax_order {
    /* softmax over all E, then pick K by score (Qwen3, Mixtral with normalize). */
    MOEKIT_SOFTMAX_THEN_TOPK = 0,
    /* pick K by logit, then softmax over the K picked logits (GPT-OSS). */
    MOEKIT_TOPK_THEN_SOFTMAX = 1
} moekit_softmax_order_t;

typedef enum moekit_group_score {
    /* top-2 sum when a correction bias is given, max otherwise (NeMo's default). */
    MOEKIT_GROUP_SCORE_AUTO = 0,
    MOEKIT_GROUP_SCORE_MAX = 1,
    MOEKIT_GROUP_SCORE_TOP2_SUM = 2,
    /* sum of the group_score_topn largest selection scores of the group. */
    MOEKIT_GROUP_SCORE_TOPN_SUM = 3
} moekit_group_score_t;

typedef enum moekit_group_mask {
    /* experts of dropped groups get selection score 0 (NeMo `sigmoid`, `softmax_with_bias`). */
    MOEKIT_GROUP_MASK_ZERO = 0,
    /* experts of dropped groups get selection score -inf (NeMo `sigmoid_with_bias`). */
    MOEKIT_GROUP_MASK_NEG_INF = 1
} moekit_group_mask_t;

/* Router options. Extensible: struct_size comes first; fill it with moekit_router_config_init,
 * then set fields. The library reads min(struct_size, its own sizeof) bytes and defaults the rest. */
typedef struct moekit_router_config {
    size_t struct_size;       /* sizeof(moekit_router_config_t) as the caller compiled it */
    int32_t num_experts;      /* E, 1 .. MOEKIT_ROUTER_MAX_EXPERTS. Default 0 (must be set). */
    int32_t top_k;            /* K, 1 .. min(E, MOEKIT_MAX_TOP_K). Default 0 (must be set). */
    int32_t score_func;       /* moekit_score_func_t. Default MOEKIT_SCORE_SOFTMAX. */
    int32_t softmax_order;    /* moekit_softmax_order_t. Default MOEKIT_SOFTMAX_THEN_TOPK. */
    int32_t num_groups;       /* G >= 1, divides E. Default 1 (no groups). */
    int32_t num_groups_kept;  /* G', 1 .. G, and G' * (E / G) >= K. Default 1. */
    int32_t group_score;      /* moekit_group_score_t. Default MOEKIT_GROUP_SCORE_AUTO. */
    int32_t group_score_topn; /* n for MOEKIT_GROUP_SCORE_TOPN_SUM, 1 .. E / G. Default 2. */
    int32_t group_mask;       /* moekit_group_mask_t. Default MOEKIT_GROUP_MASK_ZERO. */
    int32_t normalize;        /* nonzero: renormalise weights (and p) when K > 1. Default 0. */
    int32_t weights_use_bias; /* nonzero: weights and p use c = s + b. Default 0. Not with
                                 MOEKIT_TOPK_THEN_SOFTMAX. */
    int32_t accumulate_load;  /* nonzero: expert_load += this call's counts (micro-batch
                                 accumulation for the bias update). Default 0: overwrite. */
    float route_scale;        /* rho, multiplies the weights last. Default 1. */
} moekit_router_config_t;

/* Fills *config with the defaults above and sets config->struct_size = struct_size.
 * struct_size: sizeof(moekit_router_config_t) as the caller compiled it.
 * Returns INVALID_ARGUMENT when config is NULL or struct_size is smaller than the 0.1 struct.
 * Since 0.1. */
MOEKIT_API moekit_status_t moekit_router_config_init(moekit_router_config_t* config,
                                                     size_t struct_size);

/* Checks a configuration without running anything (the same checks every call makes).
 * Returns SUCCESS, INVALID_ARGUMENT or UNSUPPORTED with a message naming the field. Since 0.1. */
MOEKIT_API moekit_status_t moekit_router_config_check(const moekit_router_config_t* config);

/* Workspace bytes moekit_router_forward needs for these arguments; depends only on them.
 * Returns INVALID_ARGUMENT for a bad config, num_tokens < 0 or workspace_bytes NULL. Since 0.1. */
MOEKIT_API moekit_status_t moekit_router_forward_workspace_size(
    const moekit_router_config_t* config, int64_t num_tokens, size_t* workspace_bytes);

/*
 * Router forward (see the top of this header for the formulas).
 *   config            [in, host]    router options.
 *   num_tokens        T >= 0.
 *   logits_dtype      F32, F16 or BF16.
 *   logits            [in, device]  z [T, E] of logits_dtype, row r at logits + r * logits_row_stride
 *                                   elements; may be NULL when T = 0.
 *   logits_row_stride >= E, in elements.
 *   correction_bias   [in, device]  b [E] fp32, or NULL for none.
 *   token_mask        [in, device]  m [T] uint8 (nonzero = real token), or NULL for all real.
 *   weights           [out, device] w [T, K] fp32, row-major.
 *   indices           [out, device] idx [T, K] int32, row-major, in selection order.
 *   expert_load       [in/out, device] L [E] int32, or NULL. Overwritten, or added to when
 *                                   config->accumulate_load is set.
 *   aux_score_sum     [out, device] S [E] fp32, or NULL; given together with aux_token_count.
 *   aux_token_count   [out, device] N [1] int32, or NULL.
 *   workspace         [in, device]  moekit_router_forward_workspace_size bytes, 256-byte aligned;
 *                                   may be NULL when that size is 0. Its content is scratch: no
 *                                   state is kept between calls, any memory will do.
 *   stream            cudaStream_t.
 * No output may overlap an input or another output (checked on the address ranges). Every
 * pointer is aligned to its element size. With T = 0 only expert_load (zeroed unless
 * accumulate_load), aux_score_sum (zeros) and aux_token_count (0) are written.
 * Returns SUCCESS; INVALID_ARGUMENT (NULL where not allowed, bad config, T < 0, stride < E or
 * T * stride overflowing 64-bit byte offsets, only one of aux_score_sum / aux_token_count,
 * overlapping buffers); UNSUPPORTED (dtype; weights_use_bias with MOEKIT_TOPK_THEN_SOFTMAX);
 * WORKSPACE_TOO_SMALL; MISALIGNED (workspace, or a pointer not aligned to its element);
 * CUDA_ERROR (launch failed). Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_router_forward(
    const moekit_router_config_t* config, int64_t num_tokens, moekit_dtype_t logits_dtype,
    const void* logits, int64_t logits_row_stride, const float* correction_bias,
    const uint8_t* token_mask, float* weights, int32_t* indices, int32_t* expert_load,
    float* aux_score_sum, int32_t* aux_token_count, void* workspace, size_t workspace_bytes,
    void* stream);

/*
 * Aux-loss value from the statistics of moekit_router_forward (possibly summed over
 * context-parallel ranks first):  aux = sum_i (L_i E / (K N')) (S_i / N'),  N' = max(N, 1).
 *   expert_load [in, device] L [E] int32; aux_score_sum [in, device] S [E] fp32;
 *   aux_token_count [in, device] N [1] int32; aux_loss [out, device] [1] fp32.
 * Summed in a fixed order in fp32. 1.0 under perfectly uniform routing. num_experts E,
 * 1 .. MOEKIT_ROUTER_MAX_EXPERTS; top_k 1 .. min(E, MOEKIT_MAX_TOP_K); aux_loss must not overlap
 * an input.
 * Returns SUCCESS, INVALID_ARGUMENT, MISALIGNED, CUDA_ERROR. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_aux_loss_forward(int32_t num_experts, int32_t top_k,
                                                   const int32_t* expert_load,
                                                   const float* aux_score_sum,
                                                   const int32_t* aux_token_count,
                                                   float* aux_loss, void* stream);

/* Workspace bytes moekit_router_backward needs; depends only on the arguments. Since 0.1. */
MOEKIT_API moekit_status_t moekit_router_backward_workspace_size(
    const moekit_router_config_t* config, int64_t num_tokens, size_t* workspace_bytes);

/*
 * Router backward: dlogits = d/dz [ sum_{t,k} grad_weights_tk w_tk + aux_loss_coeff * aux ].
 * The gradient flows through route scale, normalisation, the gather at the given indices and
 * the score function (for softmax, to every expert of the row); selection (top-k, group masking)
 * is piecewise constant and passes none, so an expert that was not picked gets gradient only
 * through the softmax and the aux term, as in NeMo. The aux term flows only through P (f is
 * treated as a constant): d aux / d S_i = L_i E / (K N'^2), and d S_i / d p_ti = m_t. Saved
 * state is O(T K): the forward's indices; everything else is recomputed from the logits.
 * Indices outside [0, E) contribute nothing; repeated indices (no moekit forward produces them)
 * add up.
 *   config, num_tokens, logits_dtype, logits, logits_row_stride, correction_bias, token_mask:
 *                     exactly as given to the forward.
 *   indices           [in, device]  idx [T, K] int32 from the forward.
 *   grad_weights      [in, device]  dL/dw [T, K] fp32, or NULL (only the aux term).
 *   aux_loss_coeff    alpha times the caller's loss scale (finite); 0 disables the aux term.
 *   expert_load       [in, device]  L [E] int32 as used for the aux value; required when
 *                                   aux_loss_coeff != 0, ignored when it is 0.
 *   aux_token_count   [in, device]  N [1] int32 as used for the aux value; as expert_load.
 *   grad_logits       [out, device] dL/dz [T, E] of logits_dtype, rows at grad_logits_row_stride
 *                                   (>= E); must not overlap any input.
 *   workspace         as for the forward, sized by moekit_router_backward_workspace_size.
 * Returns as moekit_router_forward. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_router_backward(
    const moekit_router_config_t* config, int64_t num_tokens, moekit_dtype_t logits_dtype,
    const void* logits, int64_t logits_row_stride, const float* correction_bias,
    const uint8_t* token_mask, const int32_t* indices, const float* grad_weights,
    float aux_loss_coeff, const int32_t* expert_load, const int32_t* aux_token_count,
    void* grad_logits, int64_t grad_logits_row_stride, void* workspace, size_t workspace_bytes,
    void* stream);

/*
 * Aux-loss-free balancing (DeepSeek-V3), once per optimiser step:
 *   b_i <- b_i + update_rate * sign(mean(L) - L_i)      (sign(0) = 0, decided exactly in integers)
 *   then, when recenter is nonzero, b <- b - mean(b) (fixed-order fp32 mean).
 *   num_experts      E, 1 .. MOEKIT_ROUTER_MAX_EXPERTS.
 *   update_rate      gamma (finite).
 *   correction_bias  [in/out, device] b [E] fp32.
 *   expert_load      [in/out, device] L [E] int32, summed over micro-batches (accumulate_load) and
 *                    over data/context-parallel ranks by the caller; set to 0 after the update
 *                    when reset_load is nonzero, ready for the next step's accumulation.
 * correction_bias and expert_load must not overlap.
 * Returns SUCCESS, INVALID_ARGUMENT, MISALIGNED, CUDA_ERROR. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_router_bias_update(int32_t num_experts, float update_rate,
                                                     int32_t recenter, float* correction_bias,
                                                     int32_t* expert_load, int32_t reset_load,
                                                     void* stream);

/*
 * Fake balanced gate (NeMo FakeBalancedGate) for load-imbalance experiments. A = E - skip_experts.
 *   noise == 0: w_tk = 1/K, idx_tk = ((t K + k) mod A) + skip_experts, exactly.
 *   noise  > 0: w = (1 - noise)/K + noise * r_hat (r uniform [0,1)^{T x K}, r_hat = r / sum_k r),
 *               idx = top-K over e of (U_te + beta_e) + skip_experts, with U uniform [0,1)^{T x A}
 *               and beta_e = N(0,1) * noise * 0.1 a per-expert popularity bias.
 *   Ties in top-K go to the lower expert index. The random numbers come from Philox-4x32-10
 *   with key = seed and a counter holding (offset, token, purpose, index) (docs/router.md), so
 *   a recompute with the same (seed, offset) reproduces them bit for bit whatever T or the
 *   device (they do not match PyTorch's stream); advance offset between independent calls.
 *   num_tokens T, 0 .. 2^48 - 1; num_experts E, 1 .. MOEKIT_ROUTER_MAX_EXPERTS; top_k
 *   1 .. min(A, MOEKIT_MAX_TOP_K); skip_experts 0 .. E - 1; noise in [0, 1].
 *   token_mask  [in, device]  m [T] uint8 or NULL; only changes expert_load.
 *   weights     [out, device] [T, K] fp32;  indices [out, device] [T, K] int32.
 *   expert_load [in/out, device] [E] int32 or NULL; overwritten, or added to when
 *               accumulate_load is nonzero.
 * No output may overlap another or the mask.
 * Returns SUCCESS, INVALID_ARGUMENT, MISALIGNED, CUDA_ERROR. Since 0.1.
 */
MOEKIT_API moekit_status_t moekit_fake_gate_forward(int64_t num_tokens, int32_t num_experts,
                                                    int32_t top_k, int32_t skip_experts,
                                                    float noise, uint64_t seed, uint64_t offset,
                                                    const uint8_t* token_mask, float* weights,
                                                    int32_t* indices, int32_t* expert_load,
                                                    int32_t accumulate_load, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* MOEKIT_ROUTER_H */
