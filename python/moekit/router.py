"""The router (moekit/router.h): forward, backward with the aux-loss term, the aux-loss value, the
aux-loss-free bias update and the fake balanced gate; RouterConfig and the model-table presets.

Shapes: logits z [T, E] (f32, f16 or bf16; rows may be strided, the last dimension contiguous),
correction_bias b [E] fp32, token_mask [T] uint8/bool, weights [T, K] fp32, indices [T, K] int32,
expert_load [E] int32, aux_score_sum [E] fp32, aux_token_count [1] int32.
"""
import collections
import ctypes
import dataclasses
from typing import Union

from . import _capi
from ._config import GroupMask, GroupScore, ScoreFunc, SoftmaxOrder, _StructConfig, as_c
from ._lib import call, invalid, size_query
from ._tensor import F32, FLOATS, I32, MOEKIT_DTYPE, U8, Call, ptr, result


@dataclasses.dataclass
class RouterConfig(_StructConfig):
    """moekit_router_config_t. Defaults are the library's (moekit_router_config_init)."""

    num_experts: int = 0
    top_k: int = 0
    score_func: Union[ScoreFunc, int, str] = ScoreFunc.SOFTMAX
    softmax_order: Union[SoftmaxOrder, int, str] = SoftmaxOrder.SOFTMAX_THEN_TOPK
    num_groups: int = 1
    num_groups_kept: int = 1
    group_score: Union[GroupScore, int, str] = GroupScore.AUTO
    group_score_topn: int = 2
    group_mask: Union[GroupMask, int, str] = GroupMask.ZERO
    normalize: bool = False
    weights_use_bias: bool = False
    accumulate_load: bool = False
    route_scale: float = 1.0

    _struct = _capi.RouterConfigStruct
    _init = "moekit_router_config_init"
    _check = "moekit_router_config_check"
    _enums = {"score_func": ScoreFunc, "softmax_order": SoftmaxOrder, "group_score": GroupScore,
              "group_mask": GroupMask}

    @classmethod
    def preset(cls, name, **overrides):
        """The router of a model in the model table (see PRESETS), with fields overridden."""
        return dataclasses.replace(PRESETS[_preset_key(name, "RouterConfig.preset")][0], **overrides)

    def forward_workspace_size(self, num_tokens):
        """moekit_router_forward_workspace_size (host only)."""
        return size_query("moekit_router_forward_workspace_size", ctypes.byref(self.to_c()), int(num_tokens))

    def backward_workspace_size(self, num_tokens):
        """moekit_router_backward_workspace_size (host only)."""
        return size_query("moekit_router_backward_workspace_size", ctypes.byref(self.to_c()), int(num_tokens))


# Model table (NeMo reference, section 6): name -> (router config, whether the model routes with an
# fp32 correction bias b). The layer sizes (H, I, shared experts) live with the layer presets.
PRESETS = {
    "deepseek_v3": (RouterConfig(num_experts=256, top_k=8, score_func=ScoreFunc.SIGMOID, num_groups=8,
                                 num_groups_kept=4, normalize=True, route_scale=2.5), True),
    "moonlight": (RouterConfig(num_experts=64, top_k=6, score_func=ScoreFunc.SIGMOID, normalize=True,
                               route_scale=2.446), False),
    "qwen3": (RouterConfig(num_experts=128, top_k=8, normalize=True), False),
    "gpt_oss": (RouterConfig(num_experts=128, top_k=4, softmax_order=SoftmaxOrder.TOPK_THEN_SOFTMAX), False),
    "glm45": (RouterConfig(num_experts=160, top_k=8, score_func=ScoreFunc.SIGMOID, normalize=True,
                           route_scale=2.5), True),
    "mixtral": (RouterConfig(num_experts=8, top_k=2, normalize=True), False),
    "nemotron": (RouterConfig(num_experts=128, top_k=6, score_func=ScoreFunc.SIGMOID, normalize=True,
                              route_scale=2.5), True),
}


def _preset_key(name, function):
    """The PRESETS key of a model name, ignoring case, "-", "_" and "." ("DeepSeek-V3", "glm-4.5")."""
    def norm(s):
        return "".join(ch for ch in s.lower() if ch not in "-_.")
    for key in PRESETS:
        if norm(key) == norm(str(name)):
            return key
    raise invalid(function, "name = %r is not one of %s", name, ", ".join(sorted(PRESETS)))


def preset_uses_correction_bias(name):
    """Whether the preset's model routes with an fp32 correction bias (DeepSeek-V3, GLM-4.5,
    Nemotron)."""
    return PRESETS[_preset_key(name, "moekit.preset_uses_correction_bias")][1]


RouterOutput = collections.namedtuple("RouterOutput",
                                      "weights indices expert_load aux_score_sum aux_token_count")


def _router_inputs(c, fname, cfg, logits, correction_bias, token_mask):
    z = c.input(logits, "logits", FLOATS, ndim=2, contiguous="rows")
    T, E = z.shape
    if E != cfg.num_experts:
        raise invalid(fname, "logits has %d columns; config.num_experts = %d", E, cfg.num_experts)
    b = c.input(correction_bias, "correction_bias", (F32,), shape=(E,))
    m = c.input(token_mask, "token_mask", (U8,), shape=(T,))
    return z, b, m


def router_forward(logits, config, *, correction_bias=None, token_mask=None, weights=None, indices=None,
                   expert_load=None, return_load=True, aux_score_sum=None, aux_token_count=None,
                   return_aux_stats=False, workspace=None, stream=None):
    """moekit_router_forward. Returns RouterOutput(weights, indices, expert_load, aux_score_sum,
    aux_token_count); outputs not given are allocated (expert_load when return_load, the aux
    statistics when return_aux_stats), the others are None. With config.accumulate_load the
    given expert_load is added to (a fresh one starts at zero)."""
    fname = "moekit.router_forward"
    cfg = as_c(config, RouterConfig, fname)
    objs = [logits, correction_bias, token_mask, weights, indices, expert_load, aux_score_sum, aux_token_count,
            workspace]
    with Call(fname, stream, objs) as c:
        z, b, m = _router_inputs(c, fname, cfg, logits, correction_bias, token_mask)
        T, E, K = z.shape[0], cfg.num_experts, cfg.top_k
        w = c.output(weights, "weights", F32, (T, K))
        idx = c.output(indices, "indices", I32, (T, K))
        load = None
        if expert_load is not None or return_load:
            load = c.output(expert_load, "expert_load", I32, (E,), zero=bool(cfg.accumulate_load))
        ssum = cnt = None
        if aux_score_sum is not None or aux_token_count is not None or return_aux_stats:
            ssum = c.output(aux_score_sum, "aux_score_sum", F32, (E,))
            cnt = c.output(aux_token_count, "aux_token_count", I32, (1,))
        need = size_query("moekit_router_forward_workspace_size", ctypes.byref(cfg), T)
        ws, ws_bytes = c.workspace(need, workspace)
        call("moekit_router_forward", ctypes.byref(cfg), T, MOEKIT_DTYPE[z.kind], ptr(z), z.row_stride(),
             ptr(b), ptr(m), ptr(w), ptr(idx), ptr(load), ptr(ssum), ptr(cnt), ptr(ws), ws_bytes, c.stream_arg)
        return RouterOutput(result(w, weights), result(idx, indices),
                            None if load is None else result(load, expert_load),
                            None if ssum is None else result(ssum, aux_score_sum),
                            None if cnt is None else result(cnt, aux_token_count))


def router_backward(logits, indices, config, grad_weights=None, *, correction_bias=None, token_mask=None,
                    aux_loss_coeff=0.0, expert_load=None, aux_token_count=None, grad_logits=None, workspace=None,
                    stream=None):
    """moekit_router_backward: dL/dlogits [T, E] (logits' dtype) from dL/dweights [T, K] (or None)
    plus aux_loss_coeff times the aux-loss gradient (needs the forward's expert_load and
    aux_token_count when nonzero). config, logits, correction_bias and token_mask as in the forward."""
    fname = "moekit.router_backward"
    cfg = as_c(config, RouterConfig, fname)
    objs = [logits, indices, grad_weights, correction_bias, token_mask, expert_load, aux_token_count, grad_logits,
            workspace]
    with Call(fname, stream, objs) as c:
        z, b, m = _router_inputs(c, fname, cfg, logits, correction_bias, token_mask)
        T, E, K = z.shape[0], cfg.num_experts, cfg.top_k
        idx = c.input(indices, "indices", (I32,), shape=(T, K))
        gw = c.input(grad_weights, "grad_weights", (F32,), shape=(T, K))
        load = c.input(expert_load, "expert_load", (I32,), shape=(E,))
        cnt = c.input(aux_token_count, "aux_token_count", (I32,), shape=(1,))
        gz = c.output(grad_logits, "grad_logits", z.kind, (T, E), contiguous="rows")
        need = size_query("moekit_router_backward_workspace_size", ctypes.byref(cfg), T)
        ws, ws_bytes = c.workspace(need, workspace)
        call("moekit_router_backward", ctypes.byref(cfg), T, MOEKIT_DTYPE[z.kind], ptr(z), z.row_stride(),
             ptr(b), ptr(m), ptr(idx), ptr(gw), float(aux_loss_coeff), ptr(load), ptr(cnt), ptr(gz),
             gz.row_stride(), ptr(ws), ws_bytes, c.stream_arg)
        return result(gz, grad_logits)


def aux_loss(expert_load, aux_score_sum, aux_token_count, top_k, *, out=None, stream=None):
    """moekit_aux_loss_forward: the aux-loss value [1] fp32 from the forward's statistics."""
    fname = "moekit.aux_loss"
    with Call(fname, stream, [expert_load, aux_score_sum, aux_token_count, out]) as c:
        load = c.input(expert_load, "expert_load", (I32,), ndim=1)
        E = load.shape[0]
        ssum = c.input(aux_score_sum, "aux_score_sum", (F32,), shape=(E,))
        cnt = c.input(aux_token_count, "aux_token_count", (I32,), shape=(1,))
        o = c.output(out, "out", F32, (1,))
        call("moekit_aux_loss_forward", E, int(top_k), ptr(load), ptr(ssum), ptr(cnt), ptr(o), c.stream_arg)
        return result(o, out)


def bias_update(correction_bias, expert_load, update_rate, *, recenter=False, reset_load=False, stream=None):
    """moekit_router_bias_update, in place: b += update_rate * sign(mean(L) - L) (then b -= mean(b)
    when recenter); expert_load is zeroed afterwards when reset_load."""
    fname = "moekit.bias_update"
    with Call(fname, stream, [correction_bias, expert_load]) as c:
        b = c.input(correction_bias, "correction_bias", (F32,), ndim=1)
        E = b.shape[0]
        load = c.input(expert_load, "expert_load", (I32,), shape=(E,))
        if b.readonly or load.readonly:
            raise invalid(fname, "correction_bias and expert_load are updated in place and must be writable")
        call("moekit_router_bias_update", E, float(update_rate), int(bool(recenter)), ptr(b), ptr(load),
             int(bool(reset_load)), c.stream_arg)


def fake_gate(num_tokens, num_experts, top_k, *, skip_experts=0, noise=0.0, seed=0, offset=0, token_mask=None,
              weights=None, indices=None, expert_load=None, return_load=True, accumulate_load=False, like=None,
              stream=None):
    """moekit_fake_gate_forward (NeMo FakeBalancedGate). Returns RouterOutput with the aux
    statistics None. Outputs are allocated from the framework of token_mask / the given outputs /
    `like` (a tensor), else torch when it is imported, else CuPy."""
    fname = "moekit.fake_gate"
    objs = [token_mask, weights, indices, expert_load, like]
    framework = None
    if all(o is None for o in objs):
        framework = _default_framework(fname)
    T, E, K = int(num_tokens), int(num_experts), int(top_k)
    with Call(fname, stream, objs, framework=framework) as c:
        m = c.input(token_mask, "token_mask", (U8,), shape=(T,))
        w = c.output(weights, "weights", F32, (T, K))
        idx = c.output(indices, "indices", I32, (T, K))
        load = None
        if expert_load is not None or return_load:
            load = c.output(expert_load, "expert_load", I32, (E,), zero=bool(accumulate_load))
        call("moekit_fake_gate_forward", T, E, K, int(skip_experts), float(noise), int(seed), int(offset), ptr(m),
             ptr(w), ptr(idx), ptr(load), int(bool(accumulate_load)), c.stream_arg)
        return RouterOutput(result(w, weights), result(idx, indices),
                            None if load is None else result(load, expert_load), None, None)


def _default_framework(fname):
    """torch when installed (imported here so that allocation can use it), else CuPy."""
    import importlib
    import importlib.util
    for name in ("torch", "cupy"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            return name
    raise invalid(fname, "no tensor argument and neither torch nor CuPy is installed: pass the outputs")
