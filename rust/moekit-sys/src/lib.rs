//! Raw FFI declarations of libmoekit's C API (`include/moekit/*.h`), written by hand.
//!
//! Every `MOEKIT_API` function, struct, enum constant and integer `#define` of the headers is
//! declared here with the same names; `tests/header_sync.rs` parses the headers and this file and
//! fails when they differ (a new function, field or constant in a header must be mirrored here),
//! and compares every struct's size and field offsets with what a C compiler reports.
//!
//! C enums are `c_int` type aliases with their constants; opaque handles are pointers to
//! zero-sized `#[repr(C)]` structs. Streams are `*mut c_void` holding a `cudaStream_t`. The
//! contract of each function (formula, memory spaces, statuses) is in its header; the safe wrapper
//! is the `moekit` crate.
//!
//! Linking (`build.rs`): the directory in `MOEKIT_LIB_DIR` when set, else what
//! `pkg-config --libs moekit` says, else the repository's `build/` directory; an rpath to that
//! directory is added to this crate's tests (and, through `DEP_MOEKIT_LIB_DIR`, to dependents that
//! ask for it, as the `moekit` crate does).
#![allow(non_camel_case_types)]
#![no_std]

pub use core::ffi::{c_char, c_int, c_void};

// ---- moekit/status.h
pub const MOEKIT_VERSION_MAJOR: i32 = 0;
pub const MOEKIT_VERSION_MINOR: i32 = 1;
pub const MOEKIT_VERSION_PATCH: i32 = 0;
pub const MOEKIT_MAX_TOP_K: i32 = 32;
pub const MOEKIT_WORKSPACE_ALIGNMENT: i32 = 256;
pub const MOEKIT_VERSION: i32 = MOEKIT_VERSION_MAJOR * 10000 + MOEKIT_VERSION_MINOR * 100 + MOEKIT_VERSION_PATCH;

pub type moekit_status_t = c_int;
pub const MOEKIT_STATUS_SUCCESS: moekit_status_t = 0;
pub const MOEKIT_STATUS_INVALID_ARGUMENT: moekit_status_t = 1;
pub const MOEKIT_STATUS_UNSUPPORTED: moekit_status_t = 2;
pub const MOEKIT_STATUS_WORKSPACE_TOO_SMALL: moekit_status_t = 3;
pub const MOEKIT_STATUS_MISALIGNED: moekit_status_t = 4;
pub const MOEKIT_STATUS_CUDA_ERROR: moekit_status_t = 5;
pub const MOEKIT_STATUS_CUBLAS_ERROR: moekit_status_t = 6;
pub const MOEKIT_STATUS_NCCL_ERROR: moekit_status_t = 7;
pub const MOEKIT_STATUS_NOT_AVAILABLE: moekit_status_t = 8;
pub const MOEKIT_STATUS_OUT_OF_MEMORY: moekit_status_t = 9;
pub const MOEKIT_STATUS_INTERNAL_ERROR: moekit_status_t = 10;

pub type moekit_dtype_t = c_int;
pub const MOEKIT_DTYPE_F32: moekit_dtype_t = 0;
pub const MOEKIT_DTYPE_F16: moekit_dtype_t = 1;
pub const MOEKIT_DTYPE_BF16: moekit_dtype_t = 2;

extern "C" {
    pub fn moekit_status_string(status: moekit_status_t) -> *const c_char;
    pub fn moekit_get_last_error() -> *const c_char;
    pub fn moekit_copy_last_error(buffer: *mut c_char, buffer_size: usize) -> usize;
    pub fn moekit_clear_last_error();
    pub fn moekit_get_version() -> i32;
    pub fn moekit_dtype_size(dtype: moekit_dtype_t) -> usize;
}

// ---- moekit/router.h
pub const MOEKIT_ROUTER_MAX_EXPERTS: i32 = 4096;

pub type moekit_score_func_t = c_int;
pub const MOEKIT_SCORE_SOFTMAX: moekit_score_func_t = 0;
pub const MOEKIT_SCORE_SIGMOID: moekit_score_func_t = 1;
pub const MOEKIT_SCORE_SQRT_SOFTPLUS: moekit_score_func_t = 2;

pub type moekit_softmax_order_t = c_int;
pub const MOEKIT_SOFTMAX_THEN_TOPK: moekit_softmax_order_t = 0;
pub const MOEKIT_TOPK_THEN_SOFTMAX: moekit_softmax_order_t = 1;

pub type moekit_group_score_t = c_int;
pub const MOEKIT_GROUP_SCORE_AUTO: moekit_group_score_t = 0;
pub const MOEKIT_GROUP_SCORE_MAX: moekit_group_score_t = 1;
pub const MOEKIT_GROUP_SCORE_TOP2_SUM: moekit_group_score_t = 2;
pub const MOEKIT_GROUP_SCORE_TOPN_SUM: moekit_group_score_t = 3;

pub type moekit_group_mask_t = c_int;
pub const MOEKIT_GROUP_MASK_ZERO: moekit_group_mask_t = 0;
pub const MOEKIT_GROUP_MASK_NEG_INF: moekit_group_mask_t = 1;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_router_config_t {
    pub struct_size: usize,
    pub num_experts: i32,
    pub top_k: i32,
    pub score_func: i32,
    pub softmax_order: i32,
    pub num_groups: i32,
    pub num_groups_kept: i32,
    pub group_score: i32,
    pub group_score_topn: i32,
    pub group_mask: i32,
    pub normalize: i32,
    pub weights_use_bias: i32,
    pub accumulate_load: i32,
    pub route_scale: f32,
}

extern "C" {
    pub fn moekit_router_config_init(config: *mut moekit_router_config_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_router_config_check(config: *const moekit_router_config_t) -> moekit_status_t;
    pub fn moekit_router_forward_workspace_size(
        config: *const moekit_router_config_t, num_tokens: i64, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_router_forward(
        config: *const moekit_router_config_t, num_tokens: i64, logits_dtype: moekit_dtype_t, logits: *const c_void,
        logits_row_stride: i64, correction_bias: *const f32, token_mask: *const u8, weights: *mut f32,
        indices: *mut i32, expert_load: *mut i32, aux_score_sum: *mut f32, aux_token_count: *mut i32,
        workspace: *mut c_void, workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_aux_loss_forward(
        num_experts: i32, top_k: i32, expert_load: *const i32, aux_score_sum: *const f32, aux_token_count: *const i32,
        aux_loss: *mut f32, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_router_backward_workspace_size(
        config: *const moekit_router_config_t, num_tokens: i64, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_router_backward(
        config: *const moekit_router_config_t, num_tokens: i64, logits_dtype: moekit_dtype_t, logits: *const c_void,
        logits_row_stride: i64, correction_bias: *const f32, token_mask: *const u8, indices: *const i32,
        grad_weights: *const f32, aux_loss_coeff: f32, expert_load: *const i32, aux_token_count: *const i32,
        grad_logits: *mut c_void, grad_logits_row_stride: i64, workspace: *mut c_void, workspace_bytes: usize,
        stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_router_bias_update(
        num_experts: i32, update_rate: f32, recenter: i32, correction_bias: *mut f32, expert_load: *mut i32,
        reset_load: i32, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_fake_gate_forward(
        num_tokens: i64, num_experts: i32, top_k: i32, skip_experts: i32, noise: f32, seed: u64, offset: u64,
        token_mask: *const u8, weights: *mut f32, indices: *mut i32, expert_load: *mut i32, accumulate_load: i32,
        stream: *mut c_void,
    ) -> moekit_status_t;
}

// ---- moekit/tokens.h
pub const MOEKIT_PLAN_MAX_LOCAL_EXPERTS: i32 = 4096;
pub const MOEKIT_PLAN_TOTAL_ROWS: i32 = 0;
pub const MOEKIT_PLAN_TOTAL_DROPPED: i32 = 1;
pub const MOEKIT_PLAN_TOTAL_INVALID: i32 = 2;
pub const MOEKIT_PLAN_NUM_TOTALS: i32 = 3;

pub type moekit_drop_policy_t = c_int;
pub const MOEKIT_DROP_BY_POSITION: moekit_drop_policy_t = 0;
pub const MOEKIT_DROP_BY_WEIGHT: moekit_drop_policy_t = 1;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_plan_config_t {
    pub struct_size: usize,
    pub num_experts: i32,
    pub top_k: i32,
    pub local_expert_begin: i32,
    pub num_local_experts: i32,
    pub alignment: i32,
    pub capacity: i32,
    pub drop_policy: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_token_plan_t {
    pub struct_size: usize,
    pub expert_counts: *mut i32,
    pub expert_offsets: *mut i32,
    pub row_of_slot: *mut i32,
    pub slot_of_row: *mut i32,
    pub totals: *mut i32,
}

extern "C" {
    pub fn moekit_plan_config_init(config: *mut moekit_plan_config_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_plan_config_check(config: *const moekit_plan_config_t) -> moekit_status_t;
    pub fn moekit_token_plan_init(plan: *mut moekit_token_plan_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_plan_max_rows(
        config: *const moekit_plan_config_t, num_tokens: i64, max_rows: *mut i64,
    ) -> moekit_status_t;
    pub fn moekit_plan_workspace_size(
        config: *const moekit_plan_config_t, num_tokens: i64, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_plan_buffer_size(
        config: *const moekit_plan_config_t, num_tokens: i64, buffer_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_plan_bind(
        config: *const moekit_plan_config_t, num_tokens: i64, buffer: *mut c_void, buffer_bytes: usize,
        plan: *mut moekit_token_plan_t,
    ) -> moekit_status_t;
    pub fn moekit_plan_build(
        config: *const moekit_plan_config_t, num_tokens: i64, indices: *const i32, weights: *const f32,
        token_mask: *const u8, plan: *const moekit_token_plan_t, workspace: *mut c_void, workspace_bytes: usize,
        stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_tokens_permute(
        config: *const moekit_plan_config_t, plan: *const moekit_token_plan_t, num_tokens: i64, hidden: i64,
        dtype: moekit_dtype_t, x: *const c_void, x_row_stride: i64, weights: *const f32, xp: *mut c_void,
        row_weights: *mut f32, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_tokens_combine(
        config: *const moekit_plan_config_t, plan: *const moekit_token_plan_t, num_tokens: i64, hidden: i64,
        dtype: moekit_dtype_t, yp: *const c_void, weights: *const f32, y: *mut c_void, y_row_stride: i64,
        stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_tokens_permute_backward(
        config: *const moekit_plan_config_t, plan: *const moekit_token_plan_t, num_tokens: i64, hidden: i64,
        dtype: moekit_dtype_t, grad_xp: *const c_void, grad_row_weights: *const f32, grad_x: *mut c_void,
        grad_x_row_stride: i64, grad_weights: *mut f32, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_tokens_combine_backward(
        config: *const moekit_plan_config_t, plan: *const moekit_token_plan_t, num_tokens: i64, hidden: i64,
        dtype: moekit_dtype_t, grad_y: *const c_void, grad_y_row_stride: i64, weights: *const f32, yp: *const c_void,
        grad_yp: *mut c_void, grad_weights: *mut f32, stream: *mut c_void,
    ) -> moekit_status_t;
}

// ---- moekit/experts.h
pub const MOEKIT_EXPERTS_MAX_EXPERTS: i32 = 8192;
pub const MOEKIT_EXPERTS_TENSOR_ALIGNMENT: i32 = 16;

pub type moekit_activation_t = c_int;
pub const MOEKIT_ACTIVATION_SWIGLU: moekit_activation_t = 0;
pub const MOEKIT_ACTIVATION_RELU2: moekit_activation_t = 1;
pub const MOEKIT_ACTIVATION_QUICK_GEGLU: moekit_activation_t = 2;
pub const MOEKIT_ACTIVATION_GEGLU: moekit_activation_t = 3;
pub const MOEKIT_ACTIVATION_SWIGLU_OAI: moekit_activation_t = 4;

pub type moekit_gate_up_layout_t = c_int;
pub const MOEKIT_GATE_UP_AUTO: moekit_gate_up_layout_t = 0;
pub const MOEKIT_GATE_UP_CONCATENATED: moekit_gate_up_layout_t = 1;
pub const MOEKIT_GATE_UP_INTERLEAVED: moekit_gate_up_layout_t = 2;

pub type moekit_gemm_path_t = c_int;
pub const MOEKIT_GEMM_PATH_AUTO: moekit_gemm_path_t = 0;
pub const MOEKIT_GEMM_PATH_SM80: moekit_gemm_path_t = 1;
pub const MOEKIT_GEMM_PATH_SM90: moekit_gemm_path_t = 2;

pub type moekit_weight_layout_t = c_int;
pub const MOEKIT_WEIGHT_IN_OUT: moekit_weight_layout_t = 0;
pub const MOEKIT_WEIGHT_OUT_IN: moekit_weight_layout_t = 1;

/// Opaque; only ever used through `moekit_mlp_handle_t`.
#[repr(C)]
pub struct moekit_mlp_handle {
    _private: [u8; 0],
}
pub type moekit_mlp_handle_t = *mut moekit_mlp_handle;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_experts_config_t {
    pub struct_size: usize,
    pub num_experts: i32,
    pub hidden: i32,
    pub inter: i32,
    pub dtype: i32,
    pub activation: i32,
    pub gate_up_layout: i32,
    pub weight_after_down: i32,
    pub act_alpha: f32,
    pub act_limit: f32,
    pub gemm_path: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_mlp_config_t {
    pub struct_size: usize,
    pub hidden: i32,
    pub inter: i32,
    pub dtype: i32,
    pub activation: i32,
    pub gate_up_layout: i32,
    pub weight_layout: i32,
    pub act_alpha: f32,
    pub act_limit: f32,
}

extern "C" {
    pub fn moekit_experts_config_init(config: *mut moekit_experts_config_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_experts_config_check(config: *const moekit_experts_config_t) -> moekit_status_t;
    pub fn moekit_experts_forward_workspace_size(
        config: *const moekit_experts_config_t, max_rows: i64, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_experts_forward(
        config: *const moekit_experts_config_t, max_rows: i64, expert_offsets: *const i32, xp: *const c_void,
        row_weights: *const f32, w_gate_up: *const c_void, b_gate_up: *const c_void, w_down: *const c_void,
        b_down: *const c_void, u_out: *mut c_void, out: *mut c_void, workspace: *mut c_void, workspace_bytes: usize,
        stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_experts_backward_workspace_size(
        config: *const moekit_experts_config_t, max_rows: i64, has_saved_u: i32, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_experts_backward(
        config: *const moekit_experts_config_t, max_rows: i64, expert_offsets: *const i32, xp: *const c_void,
        row_weights: *const f32, w_gate_up: *const c_void, b_gate_up: *const c_void, w_down: *const c_void,
        b_down: *const c_void, u: *const c_void, grad_out: *const c_void, grad_xp: *mut c_void,
        grad_w_gate_up: *mut c_void, grad_b_gate_up: *mut c_void, grad_w_down: *mut c_void, grad_b_down: *mut c_void,
        grad_row_weights: *mut f32, workspace: *mut c_void, workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_mlp_handle_create(handle: *mut moekit_mlp_handle_t) -> moekit_status_t;
    pub fn moekit_mlp_handle_destroy(handle: moekit_mlp_handle_t) -> moekit_status_t;
    pub fn moekit_mlp_config_init(config: *mut moekit_mlp_config_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_mlp_config_check(config: *const moekit_mlp_config_t) -> moekit_status_t;
    pub fn moekit_mlp_forward_workspace_size(
        config: *const moekit_mlp_config_t, num_tokens: i64, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_mlp_forward(
        handle: moekit_mlp_handle_t, config: *const moekit_mlp_config_t, num_tokens: i64, x: *const c_void,
        w_gate_up: *const c_void, b_gate_up: *const c_void, w_down: *const c_void, b_down: *const c_void,
        u_out: *mut c_void, out: *mut c_void, workspace: *mut c_void, workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_mlp_backward_workspace_size(
        config: *const moekit_mlp_config_t, num_tokens: i64, has_saved_u: i32, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_mlp_backward(
        handle: moekit_mlp_handle_t, config: *const moekit_mlp_config_t, num_tokens: i64, x: *const c_void,
        w_gate_up: *const c_void, b_gate_up: *const c_void, w_down: *const c_void, b_down: *const c_void,
        u: *const c_void, grad_out: *const c_void, grad_x: *mut c_void, grad_w_gate_up: *mut c_void,
        grad_b_gate_up: *mut c_void, grad_w_down: *mut c_void, grad_b_down: *mut c_void, workspace: *mut c_void,
        workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
}

// ---- moekit/layer.h
pub const MOEKIT_LAYER_TENSOR_ALIGNMENT: i32 = 16;
pub const MOEKIT_LAYER_NUM_STAGES: i32 = 14;

pub type moekit_layer_stage_t = c_int;
pub const MOEKIT_LAYER_STAGE_PROJECTION: moekit_layer_stage_t = 0;
pub const MOEKIT_LAYER_STAGE_ROUTER: moekit_layer_stage_t = 1;
pub const MOEKIT_LAYER_STAGE_PLAN: moekit_layer_stage_t = 2;
pub const MOEKIT_LAYER_STAGE_PERMUTE: moekit_layer_stage_t = 3;
pub const MOEKIT_LAYER_STAGE_EXPERTS: moekit_layer_stage_t = 4;
pub const MOEKIT_LAYER_STAGE_COMBINE: moekit_layer_stage_t = 5;
pub const MOEKIT_LAYER_STAGE_SHARED: moekit_layer_stage_t = 6;
pub const MOEKIT_LAYER_STAGE_SHARED_BACKWARD: moekit_layer_stage_t = 7;
pub const MOEKIT_LAYER_STAGE_PERMUTE_RECOMPUTE: moekit_layer_stage_t = 8;
pub const MOEKIT_LAYER_STAGE_COMBINE_BACKWARD: moekit_layer_stage_t = 9;
pub const MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD: moekit_layer_stage_t = 10;
pub const MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD: moekit_layer_stage_t = 11;
pub const MOEKIT_LAYER_STAGE_ROUTER_BACKWARD: moekit_layer_stage_t = 12;
pub const MOEKIT_LAYER_STAGE_PROJECTION_BACKWARD: moekit_layer_stage_t = 13;

/// Opaque; only ever used through `moekit_layer_t`.
#[repr(C)]
pub struct moekit_layer {
    _private: [u8; 0],
}
pub type moekit_layer_t = *mut moekit_layer;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_layer_config_t {
    pub struct_size: usize,
    pub hidden: i32,
    pub dtype: i32,
    pub router: *const moekit_router_config_t,
    pub experts: *const moekit_experts_config_t,
    pub shared: *const moekit_mlp_config_t,
    pub shared_gate: i32,
    pub router_bias: i32,
    pub expert_bias: i32,
    pub shared_bias: i32,
    pub router_fp32: i32,
    pub alignment: i32,
    pub capacity: i32,
    pub drop_policy: i32,
    pub recompute: i32,
    pub expert_parallel: *mut c_void,
    pub ep_global_statistics: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_layer_params_t {
    pub struct_size: usize,
    pub router_weight: *const c_void,
    pub router_bias: *const c_void,
    pub correction_bias: *const f32,
    pub w_gate_up: *const c_void,
    pub b_gate_up: *const c_void,
    pub w_down: *const c_void,
    pub b_down: *const c_void,
    pub shared_w_gate_up: *const c_void,
    pub shared_b_gate_up: *const c_void,
    pub shared_w_down: *const c_void,
    pub shared_b_down: *const c_void,
    pub shared_gate_weight: *const c_void,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_layer_grads_t {
    pub struct_size: usize,
    pub router_weight: *mut c_void,
    pub router_bias: *mut c_void,
    pub w_gate_up: *mut c_void,
    pub b_gate_up: *mut c_void,
    pub w_down: *mut c_void,
    pub b_down: *mut c_void,
    pub shared_w_gate_up: *mut c_void,
    pub shared_b_gate_up: *mut c_void,
    pub shared_w_down: *mut c_void,
    pub shared_b_down: *mut c_void,
    pub shared_gate_weight: *mut c_void,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_layer_saved_view_t {
    pub struct_size: usize,
    pub max_rows: i64,
    pub logits_row_stride: i64,
    pub logits_dtype: i32,
    pub logits: *mut c_void,
    pub weights: *mut f32,
    pub indices: *mut i32,
    pub expert_load: *mut i32,
    pub aux_score_sum: *mut f32,
    pub aux_token_count: *mut i32,
    pub expert_counts: *mut i32,
    pub expert_offsets: *mut i32,
    pub row_of_slot: *mut i32,
    pub slot_of_row: *mut i32,
    pub plan_totals: *mut i32,
    pub expert_u: *mut c_void,
    pub shared_u: *mut c_void,
    pub shared_gate_logit: *mut f32,
    pub shared_out: *mut c_void,
    pub recv_rows: i64,
    pub ep_layout: *mut c_void,
    pub recv_x: *mut c_void,
    pub recv_indices: *mut i32,
    pub recv_weights: *mut f32,
    pub recv_mask: *mut u8,
    pub ep_dropped: *mut i32,
    pub expert_xp: *mut c_void,
    pub expert_row_weights: *mut f32,
}

extern "C" {
    pub fn moekit_layer_config_init(config: *mut moekit_layer_config_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_layer_params_init(params: *mut moekit_layer_params_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_layer_grads_init(grads: *mut moekit_layer_grads_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_layer_config_check(config: *const moekit_layer_config_t) -> moekit_status_t;
    pub fn moekit_layer_saved_size(
        config: *const moekit_layer_config_t, num_tokens: i64, saved_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_layer_workspace_size(
        config: *const moekit_layer_config_t, num_tokens: i64, forward_bytes: *mut usize, backward_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_layer_saved_view(
        config: *const moekit_layer_config_t, num_tokens: i64, saved: *mut c_void, saved_bytes: usize,
        view: *mut moekit_layer_saved_view_t,
    ) -> moekit_status_t;
    pub fn moekit_layer_create(config: *const moekit_layer_config_t, layer: *mut moekit_layer_t) -> moekit_status_t;
    pub fn moekit_layer_destroy(layer: moekit_layer_t) -> moekit_status_t;
    pub fn moekit_layer_forward(
        layer: moekit_layer_t, num_tokens: i64, x: *const c_void, token_mask: *const u8,
        params: *const moekit_layer_params_t, y: *mut c_void, expert_load: *mut i32, aux_loss: *mut f32,
        saved: *mut c_void, saved_bytes: usize, workspace: *mut c_void, workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_layer_backward(
        layer: moekit_layer_t, num_tokens: i64, x: *const c_void, token_mask: *const u8,
        params: *const moekit_layer_params_t, saved: *const c_void, saved_bytes: usize, grad_y: *const c_void,
        aux_loss_coeff: f32, grad_x: *mut c_void, grads: *const moekit_layer_grads_t, workspace: *mut c_void,
        workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_layer_set_stage_events(
        layer: moekit_layer_t, events: *const *mut c_void, num_events: i32,
    ) -> moekit_status_t;
}

// ---- moekit/ep.h
pub const MOEKIT_EP_MAX_RANKS: i32 = 1024;
pub const MOEKIT_EP_MAX_EXPERTS: i32 = 65536;
pub const MOEKIT_EP_MAX_CHUNKS: i32 = 16;

pub type moekit_ep_mode_t = c_int;
pub const MOEKIT_EP_MODE_EXACT: moekit_ep_mode_t = 0;
pub const MOEKIT_EP_MODE_CAPACITY: moekit_ep_mode_t = 1;

/// Opaque; only ever used through `moekit_ep_handle_t`.
#[repr(C)]
pub struct moekit_ep {
    _private: [u8; 0],
}
pub type moekit_ep_handle_t = *mut moekit_ep;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moekit_ep_config_t {
    pub struct_size: usize,
    pub num_ranks: i32,
    pub num_experts: i32,
    pub top_k: i32,
    pub dtype: i32,
    pub combine_dtype: i32,
    pub mode: i32,
    pub num_chunks: i32,
    pub hidden: i64,
    pub max_tokens: i64,
    pub capacity: i64,
}

extern "C" {
    pub fn moekit_ep_config_init(config: *mut moekit_ep_config_t, struct_size: usize) -> moekit_status_t;
    pub fn moekit_ep_config_check(config: *const moekit_ep_config_t) -> moekit_status_t;
    pub fn moekit_ep_nccl_version(version: *mut i32) -> moekit_status_t;
    pub fn moekit_ep_layout_size(
        config: *const moekit_ep_config_t, layout_bytes: *mut usize, host_layout_count: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_ep_max_recv_rows(config: *const moekit_ep_config_t, rows: *mut i64) -> moekit_status_t;
    pub fn moekit_ep_workspace_size(
        config: *const moekit_ep_config_t, host_layout: *const i64, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_ep_create(
        config: *const moekit_ep_config_t, nccl_comm: *mut c_void, handle: *mut moekit_ep_handle_t,
    ) -> moekit_status_t;
    pub fn moekit_ep_destroy(handle: moekit_ep_handle_t) -> moekit_status_t;
    pub fn moekit_ep_layout(
        handle: moekit_ep_handle_t, num_tokens: i64, indices: *const i32, token_mask: *const u8, layout: *mut c_void,
        layout_bytes: usize, host_layout: *mut i64, num_recv_rows: *mut i64, dropped: *mut i32, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_ep_layout_counts(
        handle: moekit_ep_handle_t, host_layout: *const i64, send_rows: *mut i64, recv_rows: *mut i64,
    ) -> moekit_status_t;
    pub fn moekit_ep_dispatch(
        handle: moekit_ep_handle_t, num_tokens: i64, layout: *const c_void, host_layout: *const i64, x: *const c_void,
        indices: *const i32, weights: *const f32, recv_x: *mut c_void, recv_indices: *mut i32, recv_weights: *mut f32,
        recv_src_token: *mut i32, recv_mask: *mut u8, workspace: *mut c_void, workspace_bytes: usize,
        stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_ep_combine(
        handle: moekit_ep_handle_t, num_tokens: i64, layout: *const c_void, host_layout: *const i64,
        partials: *const c_void, y: *mut c_void, workspace: *mut c_void, workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_ep_dispatch_backward(
        handle: moekit_ep_handle_t, num_tokens: i64, layout: *const c_void, host_layout: *const i64,
        indices: *const i32, grad_recv_x: *const c_void, grad_recv_weights: *const f32, grad_x: *mut c_void,
        grad_weights: *mut f32, workspace: *mut c_void, workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_ep_combine_backward(
        handle: moekit_ep_handle_t, num_tokens: i64, layout: *const c_void, host_layout: *const i64,
        grad_y: *const c_void, grad_partials: *mut c_void, workspace: *mut c_void, workspace_bytes: usize,
        stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_ep_allreduce_expert_load(
        nccl_comm: *mut c_void, num_experts: i32, expert_load: *mut i32, stream: *mut c_void,
    ) -> moekit_status_t;
    pub fn moekit_ep_aux_stats_workspace_size(
        nccl_comm: *mut c_void, num_experts: i32, workspace_bytes: *mut usize,
    ) -> moekit_status_t;
    pub fn moekit_ep_allreduce_aux_stats(
        nccl_comm: *mut c_void, num_experts: i32, aux_score_sum: *mut f32, aux_token_count: *mut i32,
        workspace: *mut c_void, workspace_bytes: usize, stream: *mut c_void,
    ) -> moekit_status_t;
}
