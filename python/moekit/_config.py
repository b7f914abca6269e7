"""Enums and the mapping of Python config dataclasses onto moekit's extensible C structs.

Every config dataclass has exactly the fields of its C struct (struct_size aside) with the same
names and the same defaults as the C `_init` function (python/tests checks both), and `to_c()`
fills the struct through the C init function first, so a field that a newer library adds keeps its
library default.

Enum-valued fields take the IntEnum member, its integer value, or its name as a string
(case-insensitive, "-" or "_": score_func="sigmoid", softmax_order="topk_then_softmax"). Unknown
names raise InvalidArgumentError here; out-of-range integers reach the library, whose message names
the field.
"""
import ctypes
import dataclasses
import enum

from . import _capi
from ._lib import call, invalid


class Dtype(enum.IntEnum):
    F32 = _capi.MOEKIT_DTYPE_F32
    F16 = _capi.MOEKIT_DTYPE_F16
    BF16 = _capi.MOEKIT_DTYPE_BF16


class ScoreFunc(enum.IntEnum):
    SOFTMAX = _capi.MOEKIT_SCORE_SOFTMAX
    SIGMOID = _capi.MOEKIT_SCORE_SIGMOID
    SQRT_SOFTPLUS = _capi.MOEKIT_SCORE_SQRT_SOFTPLUS


class SoftmaxOrder(enum.IntEnum):
    SOFTMAX_THEN_TOPK = _capi.MOEKIT_SOFTMAX_THEN_TOPK
    TOPK_THEN_SOFTMAX = _capi.MOEKIT_TOPK_THEN_SOFTMAX


class GroupScore(enum.IntEnum):
    AUTO = _capi.MOEKIT_GROUP_SCORE_AUTO
    MAX = _capi.MOEKIT_GROUP_SCORE_MAX
    TOP2_SUM = _capi.MOEKIT_GROUP_SCORE_TOP2_SUM
    TOPN_SUM = _capi.MOEKIT_GROUP_SCORE_TOPN_SUM


class GroupMask(enum.IntEnum):
    ZERO = _capi.MOEKIT_GROUP_MASK_ZERO
    NEG_INF = _capi.MOEKIT_GROUP_MASK_NEG_INF


class DropPolicy(enum.IntEnum):
    BY_POSITION = _capi.MOEKIT_DROP_BY_POSITION
    BY_WEIGHT = _capi.MOEKIT_DROP_BY_WEIGHT


class Activation(enum.IntEnum):
    SWIGLU = _capi.MOEKIT_ACTIVATION_SWIGLU
    RELU2 = _capi.MOEKIT_ACTIVATION_RELU2
    QUICK_GEGLU = _capi.MOEKIT_ACTIVATION_QUICK_GEGLU
    GEGLU = _capi.MOEKIT_ACTIVATION_GEGLU
    SWIGLU_OAI = _capi.MOEKIT_ACTIVATION_SWIGLU_OAI


class GateUpLayout(enum.IntEnum):
    AUTO = _capi.MOEKIT_GATE_UP_AUTO
    CONCATENATED = _capi.MOEKIT_GATE_UP_CONCATENATED
    INTERLEAVED = _capi.MOEKIT_GATE_UP_INTERLEAVED


class GemmPath(enum.IntEnum):
    AUTO = _capi.MOEKIT_GEMM_PATH_AUTO
    SM80 = _capi.MOEKIT_GEMM_PATH_SM80
    SM90 = _capi.MOEKIT_GEMM_PATH_SM90


class WeightLayout(enum.IntEnum):
    IN_OUT = _capi.MOEKIT_WEIGHT_IN_OUT
    OUT_IN = _capi.MOEKIT_WEIGHT_OUT_IN


class LayerStage(enum.IntEnum):
    PROJECTION = _capi.MOEKIT_LAYER_STAGE_PROJECTION
    ROUTER = _capi.MOEKIT_LAYER_STAGE_ROUTER
    PLAN = _capi.MOEKIT_LAYER_STAGE_PLAN
    PERMUTE = _capi.MOEKIT_LAYER_STAGE_PERMUTE
    EXPERTS = _capi.MOEKIT_LAYER_STAGE_EXPERTS
    COMBINE = _capi.MOEKIT_LAYER_STAGE_COMBINE
    SHARED = _capi.MOEKIT_LAYER_STAGE_SHARED
    SHARED_BACKWARD = _capi.MOEKIT_LAYER_STAGE_SHARED_BACKWARD
    PERMUTE_RECOMPUTE = _capi.MOEKIT_LAYER_STAGE_PERMUTE_RECOMPUTE
    COMBINE_BACKWARD = _capi.MOEKIT_LAYER_STAGE_COMBINE_BACKWARD
    EXPERTS_BACKWARD = _capi.MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD
    PERMUTE_BACKWARD = _capi.MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD
    ROUTER_BACKWARD = _capi.MOEKIT_LAYER_STAGE_ROUTER_BACKWARD
    PROJECTION_BACKWARD = _capi.MOEKIT_LAYER_STAGE_PROJECTION_BACKWARD


class EpMode(enum.IntEnum):
    EXACT = _capi.MOEKIT_EP_MODE_EXACT
    CAPACITY = _capi.MOEKIT_EP_MODE_CAPACITY


_DTYPE_NAMES = {
    "f32": Dtype.F32, "float32": Dtype.F32, "float": Dtype.F32, "fp32": Dtype.F32,
    "f16": Dtype.F16, "float16": Dtype.F16, "half": Dtype.F16, "fp16": Dtype.F16,
    "bf16": Dtype.BF16, "bfloat16": Dtype.BF16,
}


def dtype_value(value, function="moekit", field="dtype"):
    """A moekit_dtype_t from a Dtype, an int, a name ("bf16", "float16", ...) or a torch / NumPy /
    CuPy dtype."""
    if isinstance(value, bool):
        raise invalid(function, "%s = %r is not a dtype", field, value)
    if isinstance(value, int):
        return int(value)
    name = getattr(value, "name", None) if not isinstance(value, str) else value
    if name is None:
        name = str(value)
    key = name.lower().replace("torch.", "")
    if key in _DTYPE_NAMES:
        return int(_DTYPE_NAMES[key])
    raise invalid(function, "%s = %r is not one of %s", field, value, ", ".join(sorted(_DTYPE_NAMES)))


def enum_value(enum_cls, value, function, field):
    """The integer of an enum-valued field given as member, int or name."""
    if isinstance(value, int):  # bool included: True / False are 1 / 0, as before
        return int(value)
    if isinstance(value, str):
        key = value.strip().upper().replace("-", "_")
        if key in enum_cls.__members__:
            return int(enum_cls.__members__[key])
        raise invalid(function, "%s = %r is not one of %s", field, value,
                      ", ".join(m.lower() for m in enum_cls.__members__))
    raise invalid(function, "%s = %r is not a %s", field, value, enum_cls.__name__)


class _StructConfig(object):
    """Base of the config dataclasses: `_struct` is the ctypes mirror, `_init` the C init function,
    `_enums` maps enum-valued fields to their IntEnum (dtype fields use dtype_value)."""

    _struct = None
    _init = None
    _check = None
    _enums = {}
    _dtypes = ()

    def to_c(self):
        """The C struct: the library's defaults (its init function), then every field of self."""
        s = self._struct()
        call(self._init, ctypes.byref(s), ctypes.sizeof(s))
        name = type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._dtypes:
                value = dtype_value(value, name, f.name)
            elif f.name in self._enums:
                value = enum_value(self._enums[f.name], value, name, f.name)
            elif isinstance(value, bool):
                value = int(value)
            try:
                setattr(s, f.name, value)
            except TypeError:
                raise invalid(name, "%s = %r has the wrong type", f.name, value)
        return s

    def check(self):
        """Runs the library's checks on this config (no device needed); raises with its message."""
        s = self.to_c()
        call(self._check, ctypes.byref(s))
        return self

    def replace(self, **changes):
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def as_c(config, cls, function):
    """A C struct from a config dataclass of `cls` (or an already-built struct of its mirror)."""
    if isinstance(config, cls):
        return config.to_c()
    if isinstance(config, cls._struct):
        return config
    raise invalid(function, "config must be a %s, got %s", cls.__name__, type(config).__name__)
