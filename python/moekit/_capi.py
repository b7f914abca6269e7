"""Mirrors of moekit's public C API (include/moekit/*.h) for ctypes: the integer constants and enum
values, every struct as a ctypes.Structure with the header's fields in order, and every MOEKIT_API
prototype (name, argument names and C types, result type).

This file is written by hand and kept equal to the headers by python/tests/test_capi_sync.py, which
parses the headers and compiles a C program printing sizeof/offsetof of every struct: adding a
function, a field or a constant to a header without mirroring it here fails that test.

Type rules: enums passed by value are C ints (c_int); a pointer to a moekit struct is
POINTER(<Struct>); every other pointer (device memory, host out-parameters, handles, streams) is
c_void_p, which takes an int address, None (NULL), ctypes.byref(...) or a ctypes buffer.
"""
import ctypes
from ctypes import POINTER, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_uint64, c_void_p

# ---- moekit/status.h
MOEKIT_VERSION_MAJOR = 0
MOEKIT_VERSION_MINOR = 1
MOEKIT_VERSION_PATCH = 0
MOEKIT_VERSION = MOEKIT_VERSION_MAJOR * 10000 + MOEKIT_VERSION_MINOR * 100 + MOEKIT_VERSION_PATCH

MOEKIT_STATUS_SUCCESS = 0
MOEKIT_STATUS_INVALID_ARGUMENT = 1
MOEKIT_STATUS_UNSUPPORTED = 2
MOEKIT_STATUS_WORKSPACE_TOO_SMALL = 3
MOEKIT_STATUS_MISALIGNED = 4
MOEKIT_STATUS_CUDA_ERROR = 5
MOEKIT_STATUS_CUBLAS_ERROR = 6
MOEKIT_STATUS_NCCL_ERROR = 7
MOEKIT_STATUS_NOT_AVAILABLE = 8
MOEKIT_STATUS_OUT_OF_MEMORY = 9
MOEKIT_STATUS_INTERNAL_ERROR = 10

MOEKIT_DTYPE_F32 = 0
MOEKIT_DTYPE_F16 = 1
MOEKIT_DTYPE_BF16 = 2

MOEKIT_MAX_TOP_K = 32
MOEKIT_WORKSPACE_ALIGNMENT = 256

# ---- moekit/router.h
MOEKIT_ROUTER_MAX_EXPERTS = 4096

MOEKIT_SCORE_SOFTMAX = 0
MOEKIT_SCORE_SIGMOID = 1
MOEKIT_SCORE_SQRT_SOFTPLUS = 2

MOEKIT_SOFTMAX_THEN_TOPK = 0
MOEKIT_TOPK_THEN_SOFTMAX = 1

MOEKIT_GROUP_SCORE_AUTO = 0
MOEKIT_GROUP_SCORE_MAX = 1
MOEKIT_GROUP_SCORE_TOP2_SUM = 2
MOEKIT_GROUP_SCORE_TOPN_SUM = 3

MOEKIT_GROUP_MASK_ZERO = 0
MOEKIT_GROUP_MASK_NEG_INF = 1

# ---- moekit/tokens.h
MOEKIT_PLAN_MAX_LOCAL_EXPERTS = 4096

MOEKIT_PLAN_TOTAL_ROWS = 0
MOEKIT_PLAN_TOTAL_DROPPED = 1
MOEKIT_PLAN_TOTAL_INVALID = 2
MOEKIT_PLAN_NUM_TOTALS = 3

MOEKIT_DROP_BY_POSITION = 0
MOEKIT_DROP_BY_WEIGHT = 1

# ---- moekit/experts.h
MOEKIT_EXPERTS_MAX_EXPERTS = 8192
MOEKIT_EXPERTS_TENSOR_ALIGNMENT = 16

MOEKIT_ACTIVATION_SWIGLU = 0
MOEKIT_ACTIVATION_RELU2 = 1
MOEKIT_ACTIVATION_QUICK_GEGLU = 2
MOEKIT_ACTIVATION_GEGLU = 3
MOEKIT_ACTIVATION_SWIGLU_OAI = 4

MOEKIT_GATE_UP_AUTO = 0
MOEKIT_GATE_UP_CONCATENATED = 1
MOEKIT_GATE_UP_INTERLEAVED = 2
MOEKIT_GEMM_PATH_AUTO = 0
MOEKIT_GEMM_PATH_SM80 = 1
MOEKIT_GEMM_PATH_SM90 = 2

MOEKIT_WEIGHT_IN_OUT = 0
MOEKIT_WEIGHT_OUT_IN = 1

# ---- moekit/layer.h
MOEKIT_LAYER_TENSOR_ALIGNMENT = 16

MOEKIT_LAYER_STAGE_PROJECTION = 0
MOEKIT_LAYER_STAGE_ROUTER = 1
MOEKIT_LAYER_STAGE_PLAN = 2
MOEKIT_LAYER_STAGE_PERMUTE = 3
MOEKIT_LAYER_STAGE_EXPERTS = 4
MOEKIT_LAYER_STAGE_COMBINE = 5
MOEKIT_LAYER_STAGE_SHARED = 6
MOEKIT_LAYER_STAGE_SHARED_BACKWARD = 7
MOEKIT_LAYER_STAGE_PERMUTE_RECOMPUTE = 8
MOEKIT_LAYER_STAGE_COMBINE_BACKWARD = 9
MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD = 10
MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD = 11
MOEKIT_LAYER_STAGE_ROUTER_BACKWARD = 12
MOEKIT_LAYER_STAGE_PROJECTION_BACKWARD = 13
MOEKIT_LAYER_NUM_STAGES = 14

# ---- moekit/ep.h
MOEKIT_EP_MAX_RANKS = 1024
MOEKIT_EP_MAX_EXPERTS = 65536
MOEKIT_EP_MAX_CHUNKS = 16

MOEKIT_EP_MODE_EXACT = 0
MOEKIT_EP_MODE_CAPACITY = 1
class RouterConfigStruct(ctypes.Structure):
    """moekit_router_config_t (moekit/router.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_experts", c_int32),
        ("top_k", c_int32),
        ("score_func", c_int32),
        ("softmax_order", c_int32),
        ("num_groups", c_int32),
        ("num_groups_kept", c_int32),
        ("group_score", c_int32),
        ("group_score_topn", c_int32),
        ("group_mask", c_int32),
        ("normalize", c_int32),
        ("weights_use_bias", c_int32),
        ("accumulate_load", c_int32),
        ("route_scale", c_float),
    ]


class PlanConfigStruct(ctypes.Structure):
    """moekit_plan_config_t (moekit/tokens.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_experts", c_int32),
        ("top_k", c_int32),
        ("local_expert_begin", c_int32),
        ("num_local_experts", c_int32),
        ("alignment", c_int32),
        ("capacity", c_int32),
        ("drop_policy", c_int32),
    ]


class TokenPlanStruct(ctypes.Structure):
    """moekit_token_plan_t (moekit/tokens.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("expert_counts", c_void_p),
        ("expert_offsets", c_void_p),
        ("row_of_slot", c_void_p),
        ("slot_of_row", c_void_p),
        ("totals", c_void_p),
    ]


class ExpertsConfigStruct(ctypes.Structure):
    """moekit_experts_config_t (moekit/experts.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_experts", c_int32),
        ("hidden", c_int32),
        ("inter", c_int32),
        ("dtype", c_int32),
        ("activation", c_int32),
        ("gate_up_layout", c_int32),
        ("weight_after_down", c_int32),
        ("act_alpha", c_float),
        ("act_limit", c_float),
        ("gemm_path", c_int32),
    ]


class MlpConfigStruct(ctypes.Structure):
    """moekit_mlp_config_t (moekit/experts.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("hidden", c_int32),
        ("inter", c_int32),
        ("dtype", c_int32),
        ("activation", c_int32),
        ("gate_up_layout", c_int32),
        ("weight_layout", c_int32),
        ("act_alpha", c_float),
        ("act_limit", c_float),
    ]


class LayerConfigStruct(ctypes.Structure):
    """moekit_layer_config_t (moekit/layer.h). router / experts / shared point to the family
    structs (ctypes.addressof)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("hidden", c_int32),
        ("dtype", c_int32),
        ("router", c_void_p),
        ("experts", c_void_p),
        ("shared", c_void_p),
        ("shared_gate", c_int32),
        ("router_bias", c_int32),
        ("expert_bias", c_int32),
        ("shared_bias", c_int32),
        ("router_fp32", c_int32),
        ("alignment", c_int32),
        ("capacity", c_int32),
        ("drop_policy", c_int32),
        ("recompute", c_int32),
        ("expert_parallel", c_void_p),
        ("ep_global_statistics", c_int32),
    ]


class LayerParamsStruct(ctypes.Structure):
    """moekit_layer_params_t (moekit/layer.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("router_weight", c_void_p),
        ("router_bias", c_void_p),
        ("correction_bias", c_void_p),
        ("w_gate_up", c_void_p),
        ("b_gate_up", c_void_p),
        ("w_down", c_void_p),
        ("b_down", c_void_p),
        ("shared_w_gate_up", c_void_p),
        ("shared_b_gate_up", c_void_p),
        ("shared_w_down", c_void_p),
        ("shared_b_down", c_void_p),
        ("shared_gate_weight", c_void_p),
    ]


class LayerGradsStruct(ctypes.Structure):
    """moekit_layer_grads_t (moekit/layer.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("router_weight", c_void_p),
        ("router_bias", c_void_p),
        ("w_gate_up", c_void_p),
        ("b_gate_up", c_void_p),
        ("w_down", c_void_p),
        ("b_down", c_void_p),
        ("shared_w_gate_up", c_void_p),
        ("shared_b_gate_up", c_void_p),
        ("shared_w_down", c_void_p),
        ("shared_b_down", c_void_p),
        ("shared_gate_weight", c_void_p),
    ]


class LayerSavedViewStruct(ctypes.Structure):
    """moekit_layer_saved_view_t (moekit/layer.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("max_rows", c_int64),
        ("logits_row_stride", c_int64),
        ("logits_dtype", c_int32),
        ("logits", c_void_p),
        ("weights", c_void_p),
        ("indices", c_void_p),
        ("expert_load", c_void_p),
        ("aux_score_sum", c_void_p),
        ("aux_token_count", c_void_p),
        ("expert_counts", c_void_p),
        ("expert_offsets", c_void_p),
        ("row_of_slot", c_void_p),
        ("slot_of_row", c_void_p),
        ("plan_totals", c_void_p),
        ("expert_u", c_void_p),
        ("shared_u", c_void_p),
        ("shared_gate_logit", c_void_p),
        ("shared_out", c_void_p),
        ("recv_rows", c_int64),
        ("ep_layout", c_void_p),
        ("recv_x", c_void_p),
        ("recv_indices", c_void_p),
        ("recv_weights", c_void_p),
        ("recv_mask", c_void_p),
        ("ep_dropped", c_void_p),
        ("expert_xp", c_void_p),
        ("expert_row_weights", c_void_p),
    ]


class EpConfigStruct(ctypes.Structure):
    """moekit_ep_config_t (moekit/ep.h)."""
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_ranks", c_int32),
        ("num_experts", c_int32),
        ("top_k", c_int32),
        ("dtype", c_int32),
        ("combine_dtype", c_int32),
        ("mode", c_int32),
        ("num_chunks", c_int32),
        ("hidden", c_int64),
        ("max_tokens", c_int64),
        ("capacity", c_int64),
    ]


# C struct typedef name -> its mirror.
STRUCTS = {
    "moekit_router_config_t": RouterConfigStruct,
    "moekit_plan_config_t": PlanConfigStruct,
    "moekit_token_plan_t": TokenPlanStruct,
    "moekit_experts_config_t": ExpertsConfigStruct,
    "moekit_mlp_config_t": MlpConfigStruct,
    "moekit_layer_config_t": LayerConfigStruct,
    "moekit_layer_params_t": LayerParamsStruct,
    "moekit_layer_grads_t": LayerGradsStruct,
    "moekit_layer_saved_view_t": LayerSavedViewStruct,
    "moekit_ep_config_t": EpConfigStruct,
}

# Opaque handle typedefs (pointers to incomplete structs): passed as c_void_p.
HANDLES = ("moekit_mlp_handle_t", "moekit_layer_t", "moekit_ep_handle_t")

# name -> (result type, [(argument name, argument type), ...]) for every MOEKIT_API function.
PROTOTYPES = {
    # moekit/status.h
    "moekit_status_string": (c_char_p, [
        ("status", c_int),
    ]),
    "moekit_get_last_error": (c_char_p, []),
    "moekit_copy_last_error": (c_size_t, [
        ("buffer", c_void_p),
        ("buffer_size", c_size_t),
    ]),
    "moekit_clear_last_error": (None, []),
    "moekit_get_version": (c_int32, []),
    "moekit_dtype_size": (c_size_t, [
        ("dtype", c_int),
    ]),
    # moekit/router.h
    "moekit_router_config_init": (c_int, [
        ("config", POINTER(RouterConfigStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_router_config_check": (c_int, [
        ("config", POINTER(RouterConfigStruct)),
    ]),
    "moekit_router_forward_workspace_size": (c_int, [
        ("config", POINTER(RouterConfigStruct)),
        ("num_tokens", c_int64),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_router_forward": (c_int, [
        ("config", POINTER(RouterConfigStruct)),
        ("num_tokens", c_int64),
        ("logits_dtype", c_int),
        ("logits", c_void_p),
        ("logits_row_stride", c_int64),
        ("correction_bias", c_void_p),
        ("token_mask", c_void_p),
        ("weights", c_void_p),
        ("indices", c_void_p),
        ("expert_load", c_void_p),
        ("aux_score_sum", c_void_p),
        ("aux_token_count", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_aux_loss_forward": (c_int, [
        ("num_experts", c_int32),
        ("top_k", c_int32),
        ("expert_load", c_void_p),
        ("aux_score_sum", c_void_p),
        ("aux_token_count", c_void_p),
        ("aux_loss", c_void_p),
        ("stream", c_void_p),
    ]),
    "moekit_router_backward_workspace_size": (c_int, [
        ("config", POINTER(RouterConfigStruct)),
        ("num_tokens", c_int64),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_router_backward": (c_int, [
        ("config", POINTER(RouterConfigStruct)),
        ("num_tokens", c_int64),
        ("logits_dtype", c_int),
        ("logits", c_void_p),
        ("logits_row_stride", c_int64),
        ("correction_bias", c_void_p),
        ("token_mask", c_void_p),
        ("indices", c_void_p),
        ("grad_weights", c_void_p),
        ("aux_loss_coeff", c_float),
        ("expert_load", c_void_p),
        ("aux_token_count", c_void_p),
        ("grad_logits", c_void_p),
        ("grad_logits_row_stride", c_int64),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_router_bias_update": (c_int, [
        ("num_experts", c_int32),
        ("update_rate", c_float),
        ("recenter", c_int32),
        ("correction_bias", c_void_p),
        ("expert_load", c_void_p),
        ("reset_load", c_int32),
        ("stream", c_void_p),
    ]),
    "moekit_fake_gate_forward": (c_int, [
        ("num_tokens", c_int64),
        ("num_experts", c_int32),
        ("top_k", c_int32),
        ("skip_experts", c_int32),
        ("noise", c_float),
        ("seed", c_uint64),
        ("offset", c_uint64),
        ("token_mask", c_void_p),
        ("weights", c_void_p),
        ("indices", c_void_p),
        ("expert_load", c_void_p),
        ("accumulate_load", c_int32),
        ("stream", c_void_p),
    ]),
    # moekit/tokens.h
    "moekit_plan_config_init": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_plan_config_check": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
    ]),
    "moekit_token_plan_init": (c_int, [
        ("plan", POINTER(TokenPlanStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_plan_max_rows": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("num_tokens", c_int64),
        ("max_rows", c_void_p),
    ]),
    "moekit_plan_workspace_size": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("num_tokens", c_int64),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_plan_buffer_size": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("num_tokens", c_int64),
        ("buffer_bytes", c_void_p),
    ]),
    "moekit_plan_bind": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("num_tokens", c_int64),
        ("buffer", c_void_p),
        ("buffer_bytes", c_size_t),
        ("plan", POINTER(TokenPlanStruct)),
    ]),
    "moekit_plan_build": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("num_tokens", c_int64),
        ("indices", c_void_p),
        ("weights", c_void_p),
        ("token_mask", c_void_p),
        ("plan", POINTER(TokenPlanStruct)),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_tokens_permute": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("plan", POINTER(TokenPlanStruct)),
        ("num_tokens", c_int64),
        ("hidden", c_int64),
        ("dtype", c_int),
        ("x", c_void_p),
        ("x_row_stride", c_int64),
        ("weights", c_void_p),
        ("xp", c_void_p),
        ("row_weights", c_void_p),
        ("stream", c_void_p),
    ]),
    "moekit_tokens_combine": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("plan", POINTER(TokenPlanStruct)),
        ("num_tokens", c_int64),
        ("hidden", c_int64),
        ("dtype", c_int),
        ("yp", c_void_p),
        ("weights", c_void_p),
        ("y", c_void_p),
        ("y_row_stride", c_int64),
        ("stream", c_void_p),
    ]),
    "moekit_tokens_permute_backward": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("plan", POINTER(TokenPlanStruct)),
        ("num_tokens", c_int64),
        ("hidden", c_int64),
        ("dtype", c_int),
        ("grad_xp", c_void_p),
        ("grad_row_weights", c_void_p),
        ("grad_x", c_void_p),
        ("grad_x_row_stride", c_int64),
        ("grad_weights", c_void_p),
        ("stream", c_void_p),
    ]),
    "moekit_tokens_combine_backward": (c_int, [
        ("config", POINTER(PlanConfigStruct)),
        ("plan", POINTER(TokenPlanStruct)),
        ("num_tokens", c_int64),
        ("hidden", c_int64),
        ("dtype", c_int),
        ("grad_y", c_void_p),
        ("grad_y_row_stride", c_int64),
        ("weights", c_void_p),
        ("yp", c_void_p),
        ("grad_yp", c_void_p),
        ("grad_weights", c_void_p),
        ("stream", c_void_p),
    ]),
    # moekit/experts.h
    "moekit_experts_config_init": (c_int, [
        ("config", POINTER(ExpertsConfigStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_experts_config_check": (c_int, [
        ("config", POINTER(ExpertsConfigStruct)),
    ]),
    "moekit_experts_forward_workspace_size": (c_int, [
        ("config", POINTER(ExpertsConfigStruct)),
        ("max_rows", c_int64),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_experts_forward": (c_int, [
        ("config", POINTER(ExpertsConfigStruct)),
        ("max_rows", c_int64),
        ("expert_offsets", c_void_p),
        ("xp", c_void_p),
        ("row_weights", c_void_p),
        ("w_gate_up", c_void_p),
        ("b_gate_up", c_void_p),
        ("w_down", c_void_p),
        ("b_down", c_void_p),
        ("u_out", c_void_p),
        ("out", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_experts_backward_workspace_size": (c_int, [
        ("config", POINTER(ExpertsConfigStruct)),
        ("max_rows", c_int64),
        ("has_saved_u", c_int32),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_experts_backward": (c_int, [
        ("config", POINTER(ExpertsConfigStruct)),
        ("max_rows", c_int64),
        ("expert_offsets", c_void_p),
        ("xp", c_void_p),
        ("row_weights", c_void_p),
        ("w_gate_up", c_void_p),
        ("b_gate_up", c_void_p),
        ("w_down", c_void_p),
        ("b_down", c_void_p),
        ("u", c_void_p),
        ("grad_out", c_void_p),
        ("grad_xp", c_void_p),
        ("grad_w_gate_up", c_void_p),
        ("grad_b_gate_up", c_void_p),
        ("grad_w_down", c_void_p),
        ("grad_b_down", c_void_p),
        ("grad_row_weights", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_mlp_handle_create": (c_int, [
        ("handle", c_void_p),
    ]),
    "moekit_mlp_handle_destroy": (c_int, [
        ("handle", c_void_p),
    ]),
    "moekit_mlp_config_init": (c_int, [
        ("config", POINTER(MlpConfigStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_mlp_config_check": (c_int, [
        ("config", POINTER(MlpConfigStruct)),
    ]),
    "moekit_mlp_forward_workspace_size": (c_int, [
        ("config", POINTER(MlpConfigStruct)),
        ("num_tokens", c_int64),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_mlp_forward": (c_int, [
        ("handle", c_void_p),
        ("config", POINTER(MlpConfigStruct)),
        ("num_tokens", c_int64),
        ("x", c_void_p),
        ("w_gate_up", c_void_p),
        ("b_gate_up", c_void_p),
        ("w_down", c_void_p),
        ("b_down", c_void_p),
        ("u_out", c_void_p),
        ("out", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_mlp_backward_workspace_size": (c_int, [
        ("config", POINTER(MlpConfigStruct)),
        ("num_tokens", c_int64),
        ("has_saved_u", c_int32),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_mlp_backward": (c_int, [
        ("handle", c_void_p),
        ("config", POINTER(MlpConfigStruct)),
        ("num_tokens", c_int64),
        ("x", c_void_p),
        ("w_gate_up", c_void_p),
        ("b_gate_up", c_void_p),
        ("w_down", c_void_p),
        ("b_down", c_void_p),
        ("u", c_void_p),
        ("grad_out", c_void_p),
        ("grad_x", c_void_p),
        ("grad_w_gate_up", c_void_p),
        ("grad_b_gate_up", c_void_p),
        ("grad_w_down", c_void_p),
        ("grad_b_down", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    # moekit/layer.h
    "moekit_layer_config_init": (c_int, [
        ("config", POINTER(LayerConfigStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_layer_params_init": (c_int, [
        ("params", POINTER(LayerParamsStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_layer_grads_init": (c_int, [
        ("grads", POINTER(LayerGradsStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_layer_config_check": (c_int, [
        ("config", POINTER(LayerConfigStruct)),
    ]),
    "moekit_layer_saved_size": (c_int, [
        ("config", POINTER(LayerConfigStruct)),
        ("num_tokens", c_int64),
        ("saved_bytes", c_void_p),
    ]),
    "moekit_layer_workspace_size": (c_int, [
        ("config", POINTER(LayerConfigStruct)),
        ("num_tokens", c_int64),
        ("forward_bytes", c_void_p),
        ("backward_bytes", c_void_p),
    ]),
    "moekit_layer_saved_view": (c_int, [
        ("config", POINTER(LayerConfigStruct)),
        ("num_tokens", c_int64),
        ("saved", c_void_p),
        ("saved_bytes", c_size_t),
        ("view", POINTER(LayerSavedViewStruct)),
    ]),
    "moekit_layer_create": (c_int, [
        ("config", POINTER(LayerConfigStruct)),
        ("layer", c_void_p),
    ]),
    "moekit_layer_destroy": (c_int, [
        ("layer", c_void_p),
    ]),
    "moekit_layer_forward": (c_int, [
        ("layer", c_void_p),
        ("num_tokens", c_int64),
        ("x", c_void_p),
        ("token_mask", c_void_p),
        ("params", POINTER(LayerParamsStruct)),
        ("y", c_void_p),
        ("expert_load", c_void_p),
        ("aux_loss", c_void_p),
        ("saved", c_void_p),
        ("saved_bytes", c_size_t),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_layer_backward": (c_int, [
        ("layer", c_void_p),
        ("num_tokens", c_int64),
        ("x", c_void_p),
        ("token_mask", c_void_p),
        ("params", POINTER(LayerParamsStruct)),
        ("saved", c_void_p),
        ("saved_bytes", c_size_t),
        ("grad_y", c_void_p),
        ("aux_loss_coeff", c_float),
        ("grad_x", c_void_p),
        ("grads", POINTER(LayerGradsStruct)),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_layer_set_stage_events": (c_int, [
        ("layer", c_void_p),
        ("events", c_void_p),
        ("num_events", c_int32),
    ]),
    # moekit/ep.h
    "moekit_ep_config_init": (c_int, [
        ("config", POINTER(EpConfigStruct)),
        ("struct_size", c_size_t),
    ]),
    "moekit_ep_config_check": (c_int, [
        ("config", POINTER(EpConfigStruct)),
    ]),
    "moekit_ep_nccl_version": (c_int, [
        ("version", c_void_p),
    ]),
    "moekit_ep_layout_size": (c_int, [
        ("config", POINTER(EpConfigStruct)),
        ("layout_bytes", c_void_p),
        ("host_layout_count", c_void_p),
    ]),
    "moekit_ep_max_recv_rows": (c_int, [
        ("config", POINTER(EpConfigStruct)),
        ("rows", c_void_p),
    ]),
    "moekit_ep_workspace_size": (c_int, [
        ("config", POINTER(EpConfigStruct)),
        ("host_layout", c_void_p),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_ep_create": (c_int, [
        ("config", POINTER(EpConfigStruct)),
        ("nccl_comm", c_void_p),
        ("handle", c_void_p),
    ]),
    "moekit_ep_destroy": (c_int, [
        ("handle", c_void_p),
    ]),
    "moekit_ep_layout": (c_int, [
        ("handle", c_void_p),
        ("num_tokens", c_int64),
        ("indices", c_void_p),
        ("token_mask", c_void_p),
        ("layout", c_void_p),
        ("layout_bytes", c_size_t),
        ("host_layout", c_void_p),
        ("num_recv_rows", c_void_p),
        ("dropped", c_void_p),
        ("stream", c_void_p),
    ]),
    "moekit_ep_layout_counts": (c_int, [
        ("handle", c_void_p),
        ("host_layout", c_void_p),
        ("send_rows", c_void_p),
        ("recv_rows", c_void_p),
    ]),
    "moekit_ep_dispatch": (c_int, [
        ("handle", c_void_p),
        ("num_tokens", c_int64),
        ("layout", c_void_p),
        ("host_layout", c_void_p),
        ("x", c_void_p),
        ("indices", c_void_p),
        ("weights", c_void_p),
        ("recv_x", c_void_p),
        ("recv_indices", c_void_p),
        ("recv_weights", c_void_p),
        ("recv_src_token", c_void_p),
        ("recv_mask", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_ep_combine": (c_int, [
        ("handle", c_void_p),
        ("num_tokens", c_int64),
        ("layout", c_void_p),
        ("host_layout", c_void_p),
        ("partials", c_void_p),
        ("y", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_ep_dispatch_backward": (c_int, [
        ("handle", c_void_p),
        ("num_tokens", c_int64),
        ("layout", c_void_p),
        ("host_layout", c_void_p),
        ("indices", c_void_p),
        ("grad_recv_x", c_void_p),
        ("grad_recv_weights", c_void_p),
        ("grad_x", c_void_p),
        ("grad_weights", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_ep_combine_backward": (c_int, [
        ("handle", c_void_p),
        ("num_tokens", c_int64),
        ("layout", c_void_p),
        ("host_layout", c_void_p),
        ("grad_y", c_void_p),
        ("grad_partials", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
    "moekit_ep_allreduce_expert_load": (c_int, [
        ("nccl_comm", c_void_p),
        ("num_experts", c_int32),
        ("expert_load", c_void_p),
        ("stream", c_void_p),
    ]),
    "moekit_ep_aux_stats_workspace_size": (c_int, [
        ("nccl_comm", c_void_p),
        ("num_experts", c_int32),
        ("workspace_bytes", c_void_p),
    ]),
    "moekit_ep_allreduce_aux_stats": (c_int, [
        ("nccl_comm", c_void_p),
        ("num_experts", c_int32),
        ("aux_score_sum", c_void_p),
        ("aux_token_count", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("stream", c_void_p),
    ]),
}
