"""The whole MoE layer (moekit/layer.h): one forward and one backward call over router projection,
router, plan, permute, grouped experts, combine and the optional shared MLP with its gate.

Parameters are passed as a mapping (or any object with these attributes), each a device tensor of
the layer's dtype unless noted, None where the config has no such parameter:
    router_weight [E, H]            router_bias [E]          correction_bias [E] fp32 (no gradient)
    w_gate_up [E, H, NU]            b_gate_up [E, NU]        w_down [E, I, H]     b_down [E, H]
    shared_w_gate_up [H, NU_s] ([NU_s, H] with shared.weight_layout "out_in")
    shared_b_gate_up [NU_s]         shared_w_down [I_s, H] ([H, I_s])         shared_b_down [H]
    shared_gate_weight [H]
With expert parallelism (config.expert_parallel = the address of a moekit.EP handle) the expert
weights are this rank's E / n experts (experts.num_experts), and forward and backward are
collectives every rank calls; the saved view then also holds the received rows (recv_*).
The forward fills a "saved" buffer (Layer.saved_size bytes) that the backward reads; keep it (the
returned LayerOutput holds it) until the backward has run.
"""
import collections
import ctypes
import dataclasses
from typing import Optional, Union

from . import _capi
from ._config import Dtype, DropPolicy, WeightLayout, _StructConfig, as_c, dtype_value, enum_value
from ._lib import OwnedHandle, call, invalid, size_query
from ._tensor import F32, I32, ITEMSIZE, KIND_OF_DTYPE, U8, Call, DeviceArray, ptr, result
from .experts import ExpertsConfig, MlpConfig, _device_guard, _nu
from .router import RouterConfig

PARAM_NAMES = ("router_weight", "router_bias", "correction_bias", "w_gate_up", "b_gate_up", "w_down", "b_down",
               "shared_w_gate_up", "shared_b_gate_up", "shared_w_down", "shared_b_down", "shared_gate_weight")
GRAD_NAMES = tuple(n for n in PARAM_NAMES if n != "correction_bias")


@dataclasses.dataclass
class LayerConfig(_StructConfig):
    """moekit_layer_config_t; router / experts / shared are the family configs (dataclasses).
    Defaults are the library's (moekit_layer_config_init). LayerConfig.from_sizes builds a
    consistent one from a router config and the sizes."""

    hidden: int = 0
    dtype: Union[Dtype, int, str] = Dtype.BF16
    router: Optional[RouterConfig] = None
    experts: Optional[ExpertsConfig] = None
    shared: Optional[MlpConfig] = None
    shared_gate: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    shared_bias: bool = False
    router_fp32: bool = False
    alignment: int = 1
    capacity: int = 0
    drop_policy: Union[DropPolicy, int, str] = DropPolicy.BY_POSITION
    recompute: bool = False
    expert_parallel: Optional[int] = None  # address of a moekit_ep_handle_t (moekit.EP(...).handle.value), or None
    ep_global_statistics: bool = False  # load and aux statistics of the global batch (needs expert_parallel)

    _struct = _capi.LayerConfigStruct
    _init = "moekit_layer_config_init"
    _check = "moekit_layer_config_check"
    _enums = {"drop_policy": DropPolicy}
    _dtypes = ("dtype",)
    _nested = {"router": RouterConfig, "experts": ExpertsConfig, "shared": MlpConfig}

    @classmethod
    def from_sizes(cls, router, hidden, inter, *, dtype="bf16", activation="swiglu", shared_inter=0,
                   shared_activation=None, weight_after_down=False, act_alpha=1.702, act_limit=0.0, **options):
        """A layer config from a RouterConfig (e.g. RouterConfig.preset("deepseek_v3")), the hidden
        size, the expert width, and optionally a shared MLP of width shared_inter (NeMo fuses n
        shared experts into one of width n * I). options: the other LayerConfig fields."""
        if not isinstance(router, RouterConfig):
            raise invalid("LayerConfig.from_sizes", "router must be a RouterConfig, got %s", type(router).__name__)
        experts = ExpertsConfig(num_experts=router.num_experts, hidden=hidden, inter=inter, dtype=dtype,
                                activation=activation, weight_after_down=weight_after_down, act_alpha=act_alpha,
                                act_limit=act_limit)
        shared = None
        if shared_inter:
            shared = MlpConfig(hidden=hidden, inter=shared_inter, dtype=dtype,
                               activation=shared_activation if shared_activation is not None else activation,
                               act_alpha=act_alpha, act_limit=act_limit)
        return cls(hidden=hidden, dtype=dtype, router=router, experts=experts, shared=shared, **options)

    def saved_size(self, num_tokens):
        """moekit_layer_saved_size (host only)."""
        return _saved_size(self.to_c(), num_tokens)

    def workspace_size(self, num_tokens):
        """(forward bytes, backward bytes): moekit_layer_workspace_size (host only)."""
        return _workspace_size(self.to_c(), num_tokens)

    def saved_view(self, num_tokens, saved):
        """The pieces of a forward's saved buffer (host arithmetic): a SavedView of arrays of the
        buffer's framework (DeviceArrays for a raw buffer)."""
        fname = "moekit.LayerConfig.saved_view"
        d = _Dims(self, fname)
        T = int(num_tokens)
        c = Call(fname, None, [saved])
        buf = c.input(saved, "saved", (U8,), ndim=1)
        view = _capi.LayerSavedViewStruct()
        view.struct_size = ctypes.sizeof(view)
        call("moekit_layer_saved_view", ctypes.byref(self.to_c()), T, ptr(buf), buf.nbytes, ctypes.byref(view))
        R, Rr = view.max_rows, view.recv_rows
        # With expert parallelism the plan is over the received rows and this rank's experts.
        plan_tokens = Rr if Rr else T
        shapes = dict(logits=((T, view.logits_row_stride), KIND_OF_DTYPE[view.logits_dtype]),
                      weights=((T, d.K), F32), indices=((T, d.K), I32), expert_load=((d.E,), I32),
                      aux_score_sum=((d.E,), F32), aux_token_count=((1,), I32), expert_counts=((d.El,), I32),
                      expert_offsets=((d.El + 1,), I32), row_of_slot=((plan_tokens * d.K,), I32),
                      slot_of_row=((R,), I32), plan_totals=((_capi.MOEKIT_PLAN_NUM_TOTALS,), I32),
                      expert_u=((R, d.NU), d.kind), shared_u=((T, d.NU_s), d.kind), shared_gate_logit=((T,), F32),
                      shared_out=((T, d.H), d.kind), recv_x=((Rr, d.H), d.kind), recv_indices=((Rr, d.K), I32),
                      recv_weights=((Rr, d.K), F32), recv_mask=((Rr,), U8), ep_dropped=((1,), I32),
                      expert_xp=((R, d.H), d.kind), expert_row_weights=((R,), F32))
        out = {}
        for name, (shape, kind) in shapes.items():
            address = getattr(view, name)
            out[name] = None if not address else _typed_view(c, buf, address - buf.ptr, shape, kind)
        return SavedView(max_rows=R, logits_row_stride=view.logits_row_stride, recv_rows=Rr, **out)

    def to_c(self):
        """The C struct, pointing at C copies of the family configs (kept alive by the struct)."""
        s = self._struct()
        call(self._init, ctypes.byref(s), ctypes.sizeof(s))
        keep = []
        name = type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._nested:
                if value is None:
                    setattr(s, f.name, None)
                    continue
                nested = as_c(value, self._nested[f.name], "%s.%s" % (name, f.name))
                keep.append(nested)
                setattr(s, f.name, ctypes.addressof(nested))
                continue
            if f.name in self._dtypes:
                value = dtype_value(value, name, f.name)
            elif f.name in self._enums:
                value = enum_value(self._enums[f.name], value, name, f.name)
            elif isinstance(value, bool):
                value = int(value)
            setattr(s, f.name, value)
        s._keep = keep
        return s


class SavedView(collections.namedtuple("SavedView", (
        "max_rows logits_row_stride logits weights indices expert_load aux_score_sum aux_token_count expert_counts "
        "expert_offsets row_of_slot slot_of_row plan_totals expert_u shared_u shared_gate_logit shared_out "
        "recv_rows recv_x recv_indices recv_weights recv_mask ep_dropped expert_xp expert_row_weights"))):
    """What a forward put into its saved buffer (moekit_layer_saved_view), as arrays of the buffer's
    framework: logits [T, logits_row_stride], weights [T, K] fp32, indices [T, K], this call's
    expert_load [E], aux statistics, the plan, the saved pre-activations and the permuted tokens
    with their routing weights (None where the config keeps none)."""


LayerOutput = collections.namedtuple("LayerOutput", "y saved expert_load aux_loss")


def _saved_size(c_config, num_tokens):
    return size_query("moekit_layer_saved_size", ctypes.byref(c_config), int(num_tokens))


def _workspace_size(c_config, num_tokens):
    f, b = ctypes.c_size_t(), ctypes.c_size_t()
    call("moekit_layer_workspace_size", ctypes.byref(c_config), int(num_tokens), ctypes.byref(f), ctypes.byref(b))
    return f.value, b.value


class _Dims(object):
    """E, K, H, I, NU, I_s, NU_s, the dtype kind and the shared weights' layout of a LayerConfig."""

    def __init__(self, config, fname):
        r, e, sh = config.router, config.experts, config.shared
        if r is None or e is None:
            raise invalid(fname, "config.router and config.experts are required")
        self.kind = KIND_OF_DTYPE.get(dtype_value(config.dtype, fname, "dtype"))
        if self.kind is None:
            raise invalid(fname, "config.dtype = %r is not a moekit dtype", config.dtype)
        self.E, self.K, self.H = r.num_experts, r.top_k, config.hidden
        self.El = e.num_experts  # the experts held here: E, or E / n with expert parallelism
        self.I, self.NU = e.inter, _nu(e.activation, e.inter, fname)
        self.I_s = sh.inter if sh is not None else 0
        self.NU_s = _nu(sh.activation, sh.inter, fname) if sh is not None else 0
        self.shared_out_in = sh is not None and enum_value(WeightLayout, sh.weight_layout, fname,
                                                           "weight_layout") == WeightLayout.OUT_IN


def _param(params, name):
    if params is None:
        return None
    if isinstance(params, dict):
        return params.get(name)
    return getattr(params, name, None)


class Layer(OwnedHandle):
    """moekit_layer_t: the layer's configs and its cuBLASLt state on one device. Creating it is not
    graph-safe; forward and backward are (capture both into one CUDA graph)."""

    def __init__(self, config, device=None):
        fname = "moekit.Layer"
        if not isinstance(config, LayerConfig):
            raise invalid(fname, "config must be a LayerConfig, got %s", type(config).__name__)
        self.config = config
        self.c_config = config.to_c()
        call("moekit_layer_config_check", ctypes.byref(self.c_config))
        self.device = device
        with _device_guard(device):
            self._open("moekit_layer_create", "moekit_layer_destroy", ctypes.byref(self.c_config))
        self._events = None
        d = _Dims(config, fname)
        self.kind, self.E, self.K, self.H, self.I, self.NU = d.kind, d.E, d.K, d.H, d.I, d.NU
        self.El = d.El
        self.I_s, self.NU_s, self.shared_out_in = d.I_s, d.NU_s, d.shared_out_in

    # -- lifetime ----------------------------------------------------------------------------------

    @property
    def handle(self):
        return self._live("moekit.Layer", "the layer was closed")

    # -- sizes -------------------------------------------------------------------------------------

    def saved_size(self, num_tokens):
        return _saved_size(self.c_config, num_tokens)

    def workspace_size(self, num_tokens):
        return _workspace_size(self.c_config, num_tokens)

    def saved_view(self, num_tokens, saved):
        return self.config.saved_view(num_tokens, saved)

    # -- calls -------------------------------------------------------------------------------------

    def _params(self, c, params):
        E, H, NU, I, NU_s, I_s, k = self.E, self.H, self.NU, self.I, self.NU_s, self.I_s, self.kind
        El = self.El  # expert weights held here (E / n with expert parallelism)
        sh = (lambda a, b: (b, a)) if self.shared_out_in else (lambda a, b: (a, b))
        spec = dict(router_weight=((E, H), k), router_bias=((E,), k), correction_bias=((E,), F32),
                    w_gate_up=((El, H, NU), k), b_gate_up=((El, NU), k), w_down=((El, I, H), k), b_down=((El, H), k),
                    shared_w_gate_up=(sh(H, NU_s), k), shared_b_gate_up=((NU_s,), k),
                    shared_w_down=(sh(I_s, H), k), shared_b_down=((H,), k), shared_gate_weight=((H,), k))
        s = _capi.LayerParamsStruct()
        call("moekit_layer_params_init", ctypes.byref(s), ctypes.sizeof(s))
        arrays = {}
        for name in PARAM_NAMES:
            shape, kind = spec[name]
            a = c.input(_param(params, name), "params." + name, (kind,), shape=shape)
            arrays[name] = a
            setattr(s, name, a.ptr if a is not None else None)
        return s, arrays

    def forward(self, x, params, *, token_mask=None, y=None, expert_load=None, return_load=False, aux_loss=None,
                return_aux=False, saved=None, workspace=None, stream=None):
        """moekit_layer_forward. Returns LayerOutput(y [T, H], saved (uint8 buffer), expert_load [E]
        int32 or None, aux_loss [1] fp32 or None)."""
        fname = "moekit.Layer.forward"
        objs = [x, token_mask, y, expert_load, aux_loss, saved, workspace] + [_param(params, n) for n in PARAM_NAMES]
        with Call(fname, stream, objs) as c:
            xa = c.input(x, "x", (self.kind,), shape=(None, self.H))
            T = xa.shape[0]
            m = c.input(token_mask, "token_mask", (U8,), shape=(T,))
            p, _ = self._params(c, params)
            ya = c.output(y, "y", self.kind, (T, self.H))
            load = None
            if expert_load is not None or return_load:
                load = c.output(expert_load, "expert_load", I32, (self.E,), zero=bool(self.config.router.accumulate_load))
            aux = c.output(aux_loss, "aux_loss", F32, (1,)) if (aux_loss is not None or return_aux) else None
            need = self.saved_size(T)
            if saved is None:
                sv = c.empty((need,), U8)
            else:
                sv = c.output(saved, "saved", U8, (None,))
            fwd, _ = self.workspace_size(T)
            ws, ws_bytes = c.workspace(fwd, workspace)
            call("moekit_layer_forward", self.handle, T, ptr(xa), ptr(m), ctypes.byref(p), ptr(ya), ptr(load),
                 ptr(aux), ptr(sv), sv.nbytes, ptr(ws), ws_bytes, c.stream_arg)
            return LayerOutput(result(ya, y), result(sv, saved), None if load is None else result(load, expert_load),
                               None if aux is None else result(aux, aux_loss))

    def backward(self, x, params, saved, grad_y, *, token_mask=None, aux_loss_coeff=0.0, grad_x=None, grads=None,
                 needs=None, workspace=None, stream=None):
        """moekit_layer_backward. Returns (grad_x [T, H], {parameter name: gradient}). Gradients
        are computed for `needs` (default: every parameter the config has, correction_bias aside)
        plus any given in `grads` (a mapping of output buffers)."""
        fname = "moekit.Layer.backward"
        grads = dict(grads or {})
        unknown = set(grads) - set(GRAD_NAMES) | (set(needs or ()) - set(GRAD_NAMES))
        if unknown:
            raise invalid(fname, "unknown gradient names %s; choose from %s", sorted(unknown), ", ".join(GRAD_NAMES))
        objs = [x, token_mask, saved, grad_y, grad_x, workspace] + list(grads.values()) + \
            [_param(params, n) for n in PARAM_NAMES]
        with Call(fname, stream, objs) as c:
            xa = c.input(x, "x", (self.kind,), shape=(None, self.H))
            T = xa.shape[0]
            m = c.input(token_mask, "token_mask", (U8,), shape=(T,))
            p, arrays = self._params(c, params)
            sv = c.input(saved, "saved", (U8,), ndim=1)
            gy = c.input(grad_y, "grad_y", (self.kind,), shape=(T, self.H))
            gx = c.output(grad_x, "grad_x", self.kind, (T, self.H))
            wanted = set(needs) if needs is not None else {n for n in GRAD_NAMES if arrays[n] is not None}
            wanted |= set(grads)
            g = _capi.LayerGradsStruct()
            call("moekit_layer_grads_init", ctypes.byref(g), ctypes.sizeof(g))
            out = {}
            for name in GRAD_NAMES:
                if name not in wanted:
                    continue
                pa = arrays[name]
                if pa is None:
                    raise invalid(fname, "the gradient of %s is asked for but the layer has no such parameter", name)
                ga = c.output(grads.get(name), "grads." + name, pa.kind, pa.shape)
                setattr(g, name, ga.ptr or None)
                out[name] = result(ga, grads.get(name))
            _, bwd = self.workspace_size(T)
            ws, ws_bytes = c.workspace(bwd, workspace)
            call("moekit_layer_backward", self.handle, T, ptr(xa), ptr(m), ctypes.byref(p), ptr(sv), sv.nbytes,
                 ptr(gy), float(aux_loss_coeff), ptr(gx), ctypes.byref(g), ptr(ws), ws_bytes, c.stream_arg)
            return result(gx, grad_x), out

    def set_stage_events(self, events):
        """Per-stage timing (moekit_layer_set_stage_events): 2 * MOEKIT_LAYER_NUM_STAGES CUDA events
        (torch.cuda.Event(enable_timing=True), CuPy events, or cudaEvent_t ints): every later
        forward / backward records events[2 s] and events[2 s + 1] around stage s. None turns it
        off. The events must outlive their use; this object keeps them referenced."""
        if events is None:
            call("moekit_layer_set_stage_events", self.handle, None, 0)
            self._events = None
            return
        handles = []
        for e in events:
            if hasattr(e, "cuda_event"):
                if not e.cuda_event:
                    e.record()  # torch creates its CUDA event lazily, on the first record
                handles.append(int(e.cuda_event))
            elif hasattr(e, "ptr"):
                handles.append(int(e.ptr))
            else:
                handles.append(int(e))
        array = (ctypes.c_void_p * len(handles))(*handles)
        call("moekit_layer_set_stage_events", self.handle, array, len(handles))
        self._events = (list(events), array)


def _typed_view(c, buf, offset, shape, kind):
    """A view of `shape` elements of `kind` at byte offset into a uint8 buffer."""
    n = 1
    for s in shape:
        n *= s
    if c.framework is None:
        return DeviceArray.wrap(buf.ptr + offset, shape, kind, device=buf.device)
    sub = buf.owner[offset:offset + n * ITEMSIZE[kind]]
    if c.framework == "torch":
        import torch
        dt = {F32: torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, I32: torch.int32}[kind]
        return sub.view(dt).view(shape)
    import cupy
    if kind == "bf16":
        return sub.view(cupy.uint16).reshape(shape)  # CuPy has no bfloat16: the raw bits
    dt = {F32: cupy.float32, "f16": cupy.float16, I32: cupy.int32}[kind]
    return sub.view(dt).reshape(shape)
