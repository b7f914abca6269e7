"""The grouped expert FFN and the dense MLP (moekit/experts.h), forward and backward.

Grouped experts: xp [R, H] expert-major rows (segment e is rows [expert_offsets[e],
expert_offsets[e+1]), the plan of moekit.tokens), row_weights p [R] fp32 or None, W_gu [E, H, NU],
W_down [E, I, H], optional b_gu [E, NU], b_down [E, H]; NU = 2I for gated activations and I for
relu2. Rows at or past expert_offsets[E] are never read or written.

Dense MLP: x [T, H], W_gu [H, NU] / W_down [I, H] (weight_layout "in_out") or [NU, H] / [H, I]
("out_in", nn.Linear), optional b_gu [NU], b_down [H]; runs through cuBLASLt with a handle
(MlpHandle; one per device is created on first use, which is not graph-safe: call
mlp_handle(device) before capturing).

Every call returns the saved pre-activation u alongside the output when save_u (the backward then
skips recomputing it).
"""
import collections
import ctypes
import dataclasses
import threading
from typing import Union

from . import _capi
from ._config import Activation, Dtype, GateUpLayout, GemmPath, WeightLayout, _StructConfig, as_c, enum_value
from ._lib import OwnedHandle, call, invalid, size_query
from ._tensor import F32, FLOATS, I32, KIND_OF_DTYPE, Call, ptr, result


def _nu(activation, inter, function):
    gated = enum_value(Activation, activation, function, "activation") != Activation.RELU2
    return 2 * inter if gated else inter


@dataclasses.dataclass
class ExpertsConfig(_StructConfig):
    """moekit_experts_config_t. Defaults are the library's (moekit_experts_config_init)."""

    num_experts: int = 0
    hidden: int = 0
    inter: int = 0
    dtype: Union[Dtype, int, str] = Dtype.BF16
    activation: Union[Activation, int, str] = Activation.SWIGLU
    gate_up_layout: Union[GateUpLayout, int, str] = GateUpLayout.AUTO
    weight_after_down: bool = False
    act_alpha: float = 1.702
    act_limit: float = 0.0
    gemm_path: Union[GemmPath, int, str] = GemmPath.AUTO

    _struct = _capi.ExpertsConfigStruct
    _init = "moekit_experts_config_init"
    _check = "moekit_experts_config_check"
    _enums = {"activation": Activation, "gate_up_layout": GateUpLayout, "gemm_path": GemmPath}
    _dtypes = ("dtype",)

    @property
    def nu(self):
        """Columns of W_gu: 2 * inter for gated activations, inter for relu2."""
        return _nu(self.activation, self.inter, "ExpertsConfig")

    def forward_workspace_size(self, max_rows):
        return size_query("moekit_experts_forward_workspace_size", ctypes.byref(self.to_c()), int(max_rows))

    def backward_workspace_size(self, max_rows, has_saved_u=True):
        return size_query("moekit_experts_backward_workspace_size", ctypes.byref(self.to_c()), int(max_rows),
                          int(bool(has_saved_u)))


@dataclasses.dataclass
class MlpConfig(_StructConfig):
    """moekit_mlp_config_t. Defaults are the library's (moekit_mlp_config_init)."""

    hidden: int = 0
    inter: int = 0
    dtype: Union[Dtype, int, str] = Dtype.BF16
    activation: Union[Activation, int, str] = Activation.SWIGLU
    gate_up_layout: Union[GateUpLayout, int, str] = GateUpLayout.AUTO
    weight_layout: Union[WeightLayout, int, str] = WeightLayout.IN_OUT
    act_alpha: float = 1.702
    act_limit: float = 0.0

    _struct = _capi.MlpConfigStruct
    _init = "moekit_mlp_config_init"
    _check = "moekit_mlp_config_check"
    _enums = {"activation": Activation, "gate_up_layout": GateUpLayout, "weight_layout": WeightLayout}
    _dtypes = ("dtype",)

    @property
    def nu(self):
        return _nu(self.activation, self.inter, "MlpConfig")

    def forward_workspace_size(self, num_tokens):
        return size_query("moekit_mlp_forward_workspace_size", ctypes.byref(self.to_c()), int(num_tokens))

    def backward_workspace_size(self, num_tokens, has_saved_u=True):
        return size_query("moekit_mlp_backward_workspace_size", ctypes.byref(self.to_c()), int(num_tokens),
                          int(bool(has_saved_u)))


def _resolve_config(cls, config, overrides, infer, function):
    """config as given (checked against the shapes by the caller), or one inferred from the
    weights' shapes plus keyword overrides (activation=..., ...)."""
    if config is None:
        return cls(**dict(infer, **overrides))
    if overrides:
        if not isinstance(config, cls):
            raise invalid(function, "keyword options %s need a %s config, not a C struct",
                          ", ".join(sorted(overrides)), cls.__name__)
        return dataclasses.replace(config, **overrides)
    return config


def _config_kind(cfg, function):
    kind = KIND_OF_DTYPE.get(cfg.dtype)
    if kind is None:
        raise invalid(function, "config.dtype = %d is not a moekit dtype", cfg.dtype)
    return kind


# --------------------------------------------------------------------------------------------------
# Grouped experts

ExpertsGrads = collections.namedtuple(
    "ExpertsGrads", "grad_xp grad_w_gate_up grad_b_gate_up grad_w_down grad_b_down grad_row_weights")

_EXPERT_GRADS = ("xp", "w_gate_up", "b_gate_up", "w_down", "b_down", "row_weights")


class _ExpertsArgs(object):
    """The checked inputs shared by the experts forward and backward."""

    def __init__(self, c, function, config, overrides, xp, expert_offsets, w_gate_up, w_down, row_weights,
                 b_gate_up, b_down):
        wgu = c.input(w_gate_up, "w_gate_up", FLOATS, ndim=3)
        wd = c.input(w_down, "w_down", FLOATS, ndim=3)
        x = c.input(xp, "xp", FLOATS, ndim=2)
        infer = dict(num_experts=wgu.shape[0], hidden=wgu.shape[1], inter=wd.shape[1], dtype=x.kind)
        cfg_obj = _resolve_config(ExpertsConfig, config, overrides, infer, function)
        self.cfg = as_c(cfg_obj, ExpertsConfig, function)
        E, H, I = self.cfg.num_experts, self.cfg.hidden, self.cfg.inter
        self.kind = kind = _config_kind(self.cfg, function)
        NU = _nu(self.cfg.activation, I, function)
        self.E, self.H, self.I, self.NU = E, H, I, NU
        self.xp = c.input(xp, "xp", (kind,), shape=(None, H))
        self.R = self.xp.shape[0]
        self.offsets = c.input(expert_offsets, "expert_offsets", (I32,), shape=(E + 1,))
        self.w_gate_up = c.input(w_gate_up, "w_gate_up", (kind,), shape=(E, H, NU))
        self.w_down = c.input(w_down, "w_down", (kind,), shape=(E, I, H))
        self.row_weights = c.input(row_weights, "row_weights", (F32,), shape=(self.R,))
        self.b_gate_up = c.input(b_gate_up, "b_gate_up", (kind,), shape=(E, NU))
        self.b_down = c.input(b_down, "b_down", (kind,), shape=(E, H))


def experts_forward(xp, expert_offsets, w_gate_up, w_down, config=None, *, row_weights=None, b_gate_up=None,
                    b_down=None, save_u=True, u_out=None, out=None, zero=False, workspace=None, stream=None,
                    **options):
    """moekit_experts_forward. Returns (out [R, H], u [R, NU] or None). config: an ExpertsConfig,
    or None to take E, H, I and the dtype from the shapes, with options such as
    activation="relu2", weight_after_down=True as keywords. zero=True allocates zero-filled outputs
    (rows past the routed total stay zero)."""
    fname = "moekit.experts_forward"
    objs = [xp, expert_offsets, w_gate_up, w_down, row_weights, b_gate_up, b_down, u_out, out, workspace]
    with Call(fname, stream, objs) as c:
        a = _ExpertsArgs(c, fname, config, options, xp, expert_offsets, w_gate_up, w_down, row_weights,
                         b_gate_up, b_down)
        o = c.output(out, "out", a.kind, (a.R, a.H), zero=zero)
        u = c.output(u_out, "u_out", a.kind, (a.R, a.NU), zero=zero) if (save_u or u_out is not None) else None
        need = size_query("moekit_experts_forward_workspace_size", ctypes.byref(a.cfg), a.R)
        ws, ws_bytes = c.workspace(need, workspace)
        call("moekit_experts_forward", ctypes.byref(a.cfg), a.R, ptr(a.offsets), ptr(a.xp), ptr(a.row_weights),
             ptr(a.w_gate_up), ptr(a.b_gate_up), ptr(a.w_down), ptr(a.b_down), ptr(u), ptr(o), ptr(ws),
             ws_bytes, c.stream_arg)
        return result(o, out), (None if u is None else result(u, u_out))


def experts_backward(grad_out, xp, expert_offsets, w_gate_up, w_down, config=None, *, u=None, row_weights=None,
                     b_gate_up=None, b_down=None, needs=None, grad_xp=None, grad_w_gate_up=None,
                     grad_b_gate_up=None, grad_w_down=None, grad_b_down=None, grad_row_weights=None, zero=False,
                     workspace=None, stream=None, **options):
    """moekit_experts_backward. Returns ExpertsGrads (None for what was not computed). needs: names
    among "xp", "w_gate_up", "b_gate_up", "w_down", "b_down", "row_weights" (default: every one
    that applies: bias and row-weight gradients only when those inputs are given); a given output
    buffer is always filled. u: the forward's saved u, or None to recompute it."""
    fname = "moekit.experts_backward"
    objs = [grad_out, xp, expert_offsets, w_gate_up, w_down, u, row_weights, b_gate_up, b_down, grad_xp,
            grad_w_gate_up, grad_b_gate_up, grad_w_down, grad_b_down, grad_row_weights, workspace]
    with Call(fname, stream, objs) as c:
        a = _ExpertsArgs(c, fname, config, options, xp, expert_offsets, w_gate_up, w_down, row_weights,
                         b_gate_up, b_down)
        E, H, I, NU, R, kind = a.E, a.H, a.I, a.NU, a.R, a.kind
        g = c.input(grad_out, "grad_out", (kind,), shape=(R, H))
        ua = c.input(u, "u", (kind,), shape=(R, NU))
        given = dict(xp=grad_xp, w_gate_up=grad_w_gate_up, b_gate_up=grad_b_gate_up, w_down=grad_w_down,
                     b_down=grad_b_down, row_weights=grad_row_weights)
        wanted = _wanted(fname, needs, given, _EXPERT_GRADS,
                         dict(b_gate_up=a.b_gate_up, b_down=a.b_down, row_weights=a.row_weights))
        shapes = dict(xp=((R, H), kind), w_gate_up=((E, H, NU), kind), b_gate_up=((E, NU), kind),
                      w_down=((E, I, H), kind), b_down=((E, H), kind), row_weights=((R,), F32))
        outs = {n: (c.output(given[n], "grad_" + n, shapes[n][1], shapes[n][0], zero=zero and n in ("xp", "row_weights"))
                    if n in wanted else None) for n in _EXPERT_GRADS}
        need = size_query("moekit_experts_backward_workspace_size", ctypes.byref(a.cfg), R, int(ua is not None))
        ws, ws_bytes = c.workspace(need, workspace)
        call("moekit_experts_backward", ctypes.byref(a.cfg), R, ptr(a.offsets), ptr(a.xp), ptr(a.row_weights),
             ptr(a.w_gate_up), ptr(a.b_gate_up), ptr(a.w_down), ptr(a.b_down), ptr(ua), ptr(g),
             ptr(outs["xp"]), ptr(outs["w_gate_up"]), ptr(outs["b_gate_up"]), ptr(outs["w_down"]),
             ptr(outs["b_down"]), ptr(outs["row_weights"]), ptr(ws), ws_bytes, c.stream_arg)
        return ExpertsGrads(*[None if outs[n] is None else result(outs[n], given[n]) for n in _EXPERT_GRADS])


def _wanted(fname, needs, given, names, inputs_needed):
    """The set of gradients to compute: `needs` (or all), plus the ones with a given buffer; a
    gradient whose input (bias, row weights) is absent is never computed."""
    if needs is None:
        wanted = set(names)
    else:
        wanted = set(needs)
        unknown = wanted - set(names)
        if unknown:
            raise invalid(fname, "needs = %s names unknown gradients; choose from %s", sorted(unknown),
                          ", ".join(names))
    wanted |= {n for n, v in given.items() if v is not None}
    for n, inp in inputs_needed.items():
        if inp is None:
            if given.get(n) is not None or (needs is not None and n in needs):
                raise invalid(fname, "grad_%s is asked for but %s is not given", n, n)
            wanted.discard(n)
    return wanted


# --------------------------------------------------------------------------------------------------
# Dense MLP

class MlpHandle(OwnedHandle):
    """moekit_mlp_handle_t: cuBLASLt state on one device (the current one at creation). Creating
    it is not graph-safe; using it is. close() (or `with`) destroys it; so does garbage
    collection."""

    def __init__(self, device=None):
        self.device = device
        with _device_guard(device):
            self._open("moekit_mlp_handle_create", "moekit_mlp_handle_destroy")

    @property
    def value(self):
        return self._live("moekit.MlpHandle", "the handle was closed")


class _device_guard(object):
    """Makes CUDA device `device` current (through torch or CuPy, whichever is loaded)."""

    def __init__(self, device):
        self.device = device
        self.cm = None

    def __enter__(self):
        import sys
        if self.device is None:
            return self
        if "torch" in sys.modules:
            self.cm = sys.modules["torch"].cuda.device(self.device)
        elif "cupy" in sys.modules:
            self.cm = sys.modules["cupy"].cuda.Device(self.device)
        else:
            raise invalid("moekit.MlpHandle", "device = %r needs torch or CuPy to select it", self.device)
        self.cm.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cm is not None:
            self.cm.__exit__(*exc)
        return False


_handles = {}
_handles_lock = threading.Lock()


def mlp_handle(device=None):
    """The shared MlpHandle of a device (created on first use; thread-safe to share, as the C
    handle serialises calls). device None: the current device."""
    if device is None:
        device = _current_device()
    with _handles_lock:
        h = _handles.get(device)
        if h is None:
            h = _handles[device] = MlpHandle(device)
        return h


def _current_device():
    import sys
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        return sys.modules["torch"].cuda.current_device()
    if "cupy" in sys.modules:
        return sys.modules["cupy"].cuda.Device().id
    return None


MlpGrads = collections.namedtuple("MlpGrads", "grad_x grad_w_gate_up grad_b_gate_up grad_w_down grad_b_down")

_MLP_GRADS = ("x", "w_gate_up", "b_gate_up", "w_down", "b_down")


class _MlpArgs(object):
    def __init__(self, c, function, config, overrides, x, w_gate_up, w_down, b_gate_up, b_down):
        wgu = c.input(w_gate_up, "w_gate_up", FLOATS, ndim=2)
        wd = c.input(w_down, "w_down", FLOATS, ndim=2)
        xa = c.input(x, "x", FLOATS, ndim=2)
        layout = overrides.get("weight_layout", getattr(config, "weight_layout", WeightLayout.IN_OUT))
        out_in = enum_value(WeightLayout, layout, function, "weight_layout") == WeightLayout.OUT_IN
        infer = dict(hidden=wgu.shape[1] if out_in else wgu.shape[0], inter=wd.shape[1] if out_in else wd.shape[0],
                     dtype=xa.kind)
        cfg_obj = _resolve_config(MlpConfig, config, overrides, infer, function)
        self.cfg = as_c(cfg_obj, MlpConfig, function)
        H, I = self.cfg.hidden, self.cfg.inter
        NU = _nu(self.cfg.activation, I, function)
        out_in = self.cfg.weight_layout == WeightLayout.OUT_IN
        self.kind = kind = _config_kind(self.cfg, function)
        self.H, self.I, self.NU = H, I, NU
        self.x = c.input(x, "x", (kind,), shape=(None, H))
        self.T = self.x.shape[0]
        self.w_gate_up = c.input(w_gate_up, "w_gate_up", (kind,), shape=(NU, H) if out_in else (H, NU))
        self.w_down = c.input(w_down, "w_down", (kind,), shape=(H, I) if out_in else (I, H))
        self.b_gate_up = c.input(b_gate_up, "b_gate_up", (kind,), shape=(NU,))
        self.b_down = c.input(b_down, "b_down", (kind,), shape=(H,))
        self.wgu_shape, self.wd_shape = self.w_gate_up.shape, self.w_down.shape


def _handle_value(handle, c):
    if handle is None:
        handle = mlp_handle(c.device)
    return handle.value if isinstance(handle, MlpHandle) else ctypes.c_void_p(handle)


def mlp_forward(x, w_gate_up, w_down, config=None, *, b_gate_up=None, b_down=None, handle=None, save_u=True,
                u_out=None, out=None, workspace=None, stream=None, **options):
    """moekit_mlp_forward. Returns (y [T, H], u [T, NU] or None). config: an MlpConfig, or None to
    take H, I and the dtype from the shapes (weight_layout="out_in" for nn.Linear weights, and the
    activation options, as keywords)."""
    fname = "moekit.mlp_forward"
    with Call(fname, stream, [x, w_gate_up, w_down, b_gate_up, b_down, u_out, out, workspace]) as c:
        a = _MlpArgs(c, fname, config, options, x, w_gate_up, w_down, b_gate_up, b_down)
        o = c.output(out, "out", a.kind, (a.T, a.H))
        u = c.output(u_out, "u_out", a.kind, (a.T, a.NU)) if (save_u or u_out is not None) else None
        need = size_query("moekit_mlp_forward_workspace_size", ctypes.byref(a.cfg), a.T)
        ws, ws_bytes = c.workspace(need, workspace)
        call("moekit_mlp_forward", _handle_value(handle, c), ctypes.byref(a.cfg), a.T, ptr(a.x), ptr(a.w_gate_up),
             ptr(a.b_gate_up), ptr(a.w_down), ptr(a.b_down), ptr(u), ptr(o), ptr(ws), ws_bytes, c.stream_arg)
        return result(o, out), (None if u is None else result(u, u_out))


def mlp_backward(grad_out, x, w_gate_up, w_down, config=None, *, u=None, b_gate_up=None, b_down=None, needs=None,
                 grad_x=None, grad_w_gate_up=None, grad_b_gate_up=None, grad_w_down=None, grad_b_down=None,
                 handle=None, workspace=None, stream=None, **options):
    """moekit_mlp_backward. Returns MlpGrads (None for what was not computed); needs as for
    experts_backward, with "x" in place of "xp"."""
    fname = "moekit.mlp_backward"
    objs = [grad_out, x, w_gate_up, w_down, u, b_gate_up, b_down, grad_x, grad_w_gate_up, grad_b_gate_up,
            grad_w_down, grad_b_down, workspace]
    with Call(fname, stream, objs) as c:
        a = _MlpArgs(c, fname, config, options, x, w_gate_up, w_down, b_gate_up, b_down)
        T, H, NU, kind = a.T, a.H, a.NU, a.kind
        g = c.input(grad_out, "grad_out", (kind,), shape=(T, H))
        ua = c.input(u, "u", (kind,), shape=(T, NU))
        given = dict(x=grad_x, w_gate_up=grad_w_gate_up, b_gate_up=grad_b_gate_up, w_down=grad_w_down,
                     b_down=grad_b_down)
        wanted = _wanted(fname, needs, given, _MLP_GRADS, dict(b_gate_up=a.b_gate_up, b_down=a.b_down))
        shapes = dict(x=(T, H), w_gate_up=a.wgu_shape, b_gate_up=(NU,), w_down=a.wd_shape, b_down=(H,))
        outs = {n: (c.output(given[n], "grad_" + n, kind, shapes[n]) if n in wanted else None) for n in _MLP_GRADS}
        need = size_query("moekit_mlp_backward_workspace_size", ctypes.byref(a.cfg), T, int(ua is not None))
        ws, ws_bytes = c.workspace(need, workspace)
        call("moekit_mlp_backward", _handle_value(handle, c), ctypes.byref(a.cfg), T, ptr(a.x), ptr(a.w_gate_up),
             ptr(a.b_gate_up), ptr(a.w_down), ptr(a.b_down), ptr(ua), ptr(g), ptr(outs["x"]), ptr(outs["w_gate_up"]),
             ptr(outs["b_gate_up"]), ptr(outs["w_down"]), ptr(outs["b_down"]), ptr(ws), ws_bytes, c.stream_arg)
        return MlpGrads(*[None if outs[n] is None else result(outs[n], given[n]) for n in _MLP_GRADS])
