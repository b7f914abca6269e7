"""moekit: CUDA kernels for Mixture-of-Experts layers, from Python.

A pure-Python binding (ctypes; no compiled extension) of libmoekit's C API. It takes torch tensors,
CuPy arrays (__cuda_array_interface__) or any DLPack producer, allocates the outputs and workspaces
a call needs from the same framework when they are not given, runs on the framework's current
stream unless told otherwise, and raises MoekitError subclasses that carry the library's message.

    import moekit
    cfg = moekit.RouterConfig.preset("deepseek_v3")
    out = moekit.router_forward(logits, cfg, correction_bias=bias)     # weights, indices, load, ...
    plan = moekit.plan_build(out.indices, moekit.PlanConfig(num_experts=256, top_k=8))
    xp, p = moekit.permute(x, plan, weights=out.weights)

torch.autograd.Functions live in moekit.autograd (imported on first use; needs torch). The library
is found at $MOEKIT_LIB, the repository's build directories, or by the dynamic loader (see _lib).
"""
from . import _capi
from ._config import (Activation, Dtype, DropPolicy, EpMode, GateUpLayout, GemmPath, GroupMask, GroupScore,
                      LayerStage, ScoreFunc, SoftmaxOrder, WeightLayout)
from ._lib import (CublasError, CudaError, InternalError, InvalidArgumentError, MisalignedError, MoekitError,
                   NcclError, NotAvailableError, OutOfMemoryError, UnsupportedError, WorkspaceTooSmallError,
                   last_error, library_path, status_string, version)
from ._tensor import DeviceArray
from .ep import EP, EpConfig, EpLayout, allreduce_aux_stats, allreduce_expert_load, nccl_version
from .layer import GRAD_NAMES as LAYER_GRAD_NAMES, PARAM_NAMES as LAYER_PARAM_NAMES, Layer, LayerConfig, LayerOutput
from .experts import (ExpertsConfig, ExpertsGrads, MlpConfig, MlpGrads, MlpHandle, experts_backward,
                      experts_forward, mlp_backward, mlp_forward, mlp_handle)
from .router import (PRESETS as ROUTER_PRESETS, RouterConfig, RouterOutput, aux_loss, bias_update, fake_gate,
                     preset_uses_correction_bias, router_backward, router_forward)
from .tokens import (PlanConfig, TokenPlan, combine, combine_backward, permute, permute_backward, plan_alloc,
                     plan_build)

__version__ = "%d.%d.%d" % (_capi.MOEKIT_VERSION_MAJOR, _capi.MOEKIT_VERSION_MINOR, _capi.MOEKIT_VERSION_PATCH)

# MOEKIT_VERSION of the headers this package mirrors; compare with moekit.version() (the library's).
HEADER_VERSION = _capi.MOEKIT_VERSION
MAX_TOP_K = _capi.MOEKIT_MAX_TOP_K


def __getattr__(name):
    # moekit.autograd imports torch: load it only when asked for.
    if name == "autograd":
        import importlib
        return importlib.import_module(".autograd", __name__)
    raise AttributeError("module 'moekit' has no attribute %r" % name)

__all__ = [
    # errors and the library
    "MoekitError", "InvalidArgumentError", "UnsupportedError", "WorkspaceTooSmallError", "MisalignedError",
    "CudaError", "CublasError", "NcclError", "NotAvailableError", "OutOfMemoryError", "InternalError",
    "version", "library_path", "status_string", "last_error", "HEADER_VERSION", "MAX_TOP_K", "DeviceArray",
    # enums
    "Dtype", "ScoreFunc", "SoftmaxOrder", "GroupScore", "GroupMask", "DropPolicy", "Activation", "GateUpLayout",
    "GemmPath", "WeightLayout", "EpMode", "LayerStage",
    # router
    "RouterConfig", "ROUTER_PRESETS", "preset_uses_correction_bias", "RouterOutput", "router_forward",
    "router_backward", "aux_loss", "bias_update", "fake_gate",
    # tokens
    "PlanConfig", "TokenPlan", "plan_alloc", "plan_build", "permute", "combine", "permute_backward",
    "combine_backward",
    # experts and the dense MLP
    "ExpertsConfig", "ExpertsGrads", "experts_forward", "experts_backward", "MlpConfig", "MlpGrads", "MlpHandle",
    "mlp_handle", "mlp_forward", "mlp_backward",
    # the layer
    "LayerConfig", "Layer", "LayerOutput", "LAYER_PARAM_NAMES", "LAYER_GRAD_NAMES",
    # expert parallelism
    "EpConfig", "EP", "EpLayout", "nccl_version", "allreduce_expert_load", "allreduce_aux_stats",
]
