"""torch.autograd.Functions over moekit's forward and backward entry points (needs torch).

    route(logits, config, ...)            router: weights (differentiable), indices, expert_load,
                                          aux-loss value; backward adds aux_loss_coeff * d aux
    permute(x, plan, weights=None)        xp (and row_weights): differentiable in x and weights
    combine(yp, plan, weights=None)       y: differentiable in yp and weights
    grouped_experts(xp, offsets, ...)     the grouped expert FFN: in xp, row_weights, weights, biases
    mlp(x, w_gate_up, w_down, ...)        the dense MLP (shared experts)

The aux loss follows NeMo's MoEAuxLossAutoScaler: its gradient enters the router's backward with
the fixed coefficient aux_loss_coeff (alpha times your loss scale), whatever the main loss is; the
aux_loss value returned is for logging and carries no gradient (do not add it to the loss).

Buffers indexed by rows (xp, the experts' output and the row gradients) are allocated zero-filled
here, so rows past the routed total read as zeros for any torch op that touches them; the
functional API (moekit.tokens, moekit.experts) leaves them unwritten instead. Double backward is not
supported.
"""
import collections
import dataclasses

import torch
from torch.autograd.function import once_differentiable

from . import experts as _experts
from . import router as _router
from . import tokens as _tokens
from ._lib import invalid

RouteResult = collections.namedtuple("RouteResult", "weights indices expert_load aux_loss")


def _rows_dense(t):
    return t if t.dim() != 2 or t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


class RouterFunction(torch.autograd.Function):
    """(logits, correction_bias, token_mask, config, aux_loss_coeff, want_aux) ->
    (weights, indices, expert_load, aux_loss or None)."""

    @staticmethod
    def forward(ctx, logits, correction_bias, token_mask, config, aux_loss_coeff, want_aux):
        stats = want_aux or aux_loss_coeff != 0
        out = _router.router_forward(logits, config, correction_bias=correction_bias, token_mask=token_mask,
                                     return_load=True, return_aux_stats=stats)
        aux = None
        if stats:
            aux = _router.aux_loss(out.expert_load, out.aux_score_sum, out.aux_token_count, config.top_k)
        ctx.save_for_backward(logits, correction_bias, token_mask, out.indices, out.expert_load, out.aux_token_count)
        ctx.config = config
        ctx.coeff = float(aux_loss_coeff)
        ctx.mark_non_differentiable(*[t for t in (out.indices, out.expert_load, aux) if t is not None])
        return out.weights, out.indices, out.expert_load, aux

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, _grad_indices, _grad_load, _grad_aux):
        nones = (None,) * 5
        if not ctx.needs_input_grad[0] or (grad_weights is None and ctx.coeff == 0):
            return (None,) + nones
        logits, bias, mask, indices, load, count = ctx.saved_tensors
        g = None if grad_weights is None else grad_weights.float().contiguous()
        grad = _router.router_backward(logits, indices, ctx.config, g, correction_bias=bias, token_mask=mask,
                                       aux_loss_coeff=ctx.coeff, expert_load=load if ctx.coeff else None,
                                       aux_token_count=count if ctx.coeff else None)
        return (grad,) + nones


def route(logits, config, *, correction_bias=None, token_mask=None, aux_loss_coeff=0.0, return_aux=False,
          load_accumulator=None):
    """The router with autograd. Returns RouteResult(weights [T, K] fp32, indices [T, K] int32,
    expert_load [E] int32 of this call, aux_loss [1] fp32 or None). aux_loss is computed when
    return_aux or aux_loss_coeff != 0. load_accumulator ([E] int32), when given, gets this call's
    load added (for the bias update over micro-batches)."""
    cfg = config if isinstance(config, _router.RouterConfig) else None
    if cfg is None:
        raise invalid("moekit.autograd.route", "config must be a RouterConfig, got %s", type(config).__name__)
    # The saved load must be this call's own for the aux term: accumulation happens out here.
    if cfg.accumulate_load:
        cfg = dataclasses.replace(cfg, accumulate_load=False)
    out = RouteResult(*RouterFunction.apply(_rows_dense(logits), correction_bias, token_mask, cfg,
                                            float(aux_loss_coeff), bool(return_aux)))
    if load_accumulator is not None:
        load_accumulator.add_(out.expert_load)
    return out


class PermuteFunction(torch.autograd.Function):
    """(x, plan) -> xp."""

    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        return _tokens.permute(x, plan, zero=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_xp):
        if not ctx.needs_input_grad[0]:
            return None, None
        return _tokens.permute_backward(grad_xp.contiguous(), ctx.plan), None


class PermuteWeightedFunction(torch.autograd.Function):
    """(x, weights, plan) -> (xp, row_weights)."""

    @staticmethod
    def forward(ctx, x, weights, plan):
        ctx.plan = plan
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return _tokens.permute(x, plan, weights=weights, zero=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_xp, grad_row_weights):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_w):
            return None, None, None
        plan = ctx.plan
        if grad_xp is None:
            shape, dtype, device = ctx.x_meta
            grad_xp = torch.zeros((plan.max_rows, shape[1]), dtype=dtype, device=device)
        if need_w and grad_row_weights is not None:
            gx, gw = _tokens.permute_backward(grad_xp.contiguous(), plan,
                                              grad_row_weights=grad_row_weights.contiguous())
        else:
            gx, gw = _tokens.permute_backward(grad_xp.contiguous(), plan), None
        return (gx if need_x else None), (gw if need_w else None), None


def permute(x, plan, weights=None):
    """xp [max_rows, H] (and row_weights [max_rows] with weights): differentiable permute."""
    x = _rows_dense(x)
    if weights is None:
        return PermuteFunction.apply(x, plan)
    return PermuteWeightedFunction.apply(x, weights.contiguous(), plan)


class CombineFunction(torch.autograd.Function):
    """(yp, weights or None, plan) -> y."""

    @staticmethod
    def forward(ctx, yp, weights, plan):
        ctx.plan = plan
        ctx.save_for_backward(yp if (weights is not None and weights.requires_grad) else None, weights)
        return _tokens.combine(yp, plan, weights=weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        yp, weights = ctx.saved_tensors
        need_yp = ctx.needs_input_grad[0]
        need_w = weights is not None and ctx.needs_input_grad[1]
        if not (need_yp or need_w):
            return None, None, None
        g = _tokens.combine_backward(grad_y.contiguous(), ctx.plan, weights=weights, yp=yp if need_w else None,
                                     need_grad_yp=need_yp, need_grad_weights=need_w, zero=True)
        return g.grad_yp, g.grad_weights, None


def combine(yp, plan, weights=None):
    """y [T, H] = sum_k w[t, k] yp[row(t, k)] (unweighted without weights): differentiable."""
    return CombineFunction.apply(yp.contiguous(), None if weights is None else weights.contiguous(), plan)


_EXPERT_INPUTS = ("xp", "row_weights", "w_gate_up", "b_gate_up", "w_down", "b_down")


class ExpertsFunction(torch.autograd.Function):
    """(xp, row_weights, w_gate_up, b_gate_up, w_down, b_down, expert_offsets, config, save_u) -> out."""

    @staticmethod
    def forward(ctx, xp, row_weights, w_gate_up, b_gate_up, w_down, b_down, expert_offsets, config, save_u):
        out, u = _experts.experts_forward(xp, expert_offsets, w_gate_up, w_down, config, row_weights=row_weights,
                                          b_gate_up=b_gate_up, b_down=b_down, save_u=save_u, zero=True)
        ctx.config = config
        ctx.save_for_backward(xp, row_weights, w_gate_up, b_gate_up, w_down, b_down, expert_offsets, u)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        needs = [n for n, need in zip(_EXPERT_INPUTS, ctx.needs_input_grad[:6]) if need]
        if not needs:
            return (None,) * 9
        xp, rw, wgu, bgu, wd, bd, offsets, u = ctx.saved_tensors
        g = _experts.experts_backward(grad_out.contiguous(), xp, offsets, wgu, wd, ctx.config, u=u, row_weights=rw,
                                      b_gate_up=bgu, b_down=bd, needs=needs, zero=True)
        return (g.grad_xp, g.grad_row_weights, g.grad_w_gate_up, g.grad_b_gate_up, g.grad_w_down, g.grad_b_down,
                None, None, None)


def grouped_experts(xp, expert_offsets, w_gate_up, w_down, config=None, *, row_weights=None, b_gate_up=None,
                    b_down=None, save_u=True, **options):
    """The grouped expert FFN with autograd: out [R, H]. config as for moekit.experts_forward
    (None: from the shapes plus keyword options). save_u=False recomputes u in the backward
    instead of keeping [R, NU] alive."""
    if config is None or options:
        config = _experts._resolve_config(
            _experts.ExpertsConfig, config, options,
            dict(num_experts=w_gate_up.shape[0], hidden=w_gate_up.shape[1], inter=w_down.shape[1],
                 dtype=str(xp.dtype)), "moekit.autograd.grouped_experts")
    return ExpertsFunction.apply(xp.contiguous(), row_weights, w_gate_up, b_gate_up, w_down, b_down,
                                 expert_offsets, config, bool(save_u))


_MLP_INPUTS = ("x", "w_gate_up", "b_gate_up", "w_down", "b_down")


class MlpFunction(torch.autograd.Function):
    """(x, w_gate_up, b_gate_up, w_down, b_down, config, handle, save_u) -> y."""

    @staticmethod
    def forward(ctx, x, w_gate_up, b_gate_up, w_down, b_down, config, handle, save_u):
        y, u = _experts.mlp_forward(x, w_gate_up, w_down, config, b_gate_up=b_gate_up, b_down=b_down,
                                    handle=handle, save_u=save_u)
        ctx.config, ctx.handle = config, handle
        ctx.save_for_backward(x, w_gate_up, b_gate_up, w_down, b_down, u)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        needs = [n for n, need in zip(_MLP_INPUTS, ctx.needs_input_grad[:5]) if need]
        if not needs:
            return (None,) * 8
        x, wgu, bgu, wd, bd, u = ctx.saved_tensors
        g = _experts.mlp_backward(grad_y.contiguous(), x, wgu, wd, ctx.config, u=u, b_gate_up=bgu, b_down=bd,
                                  needs=needs, handle=ctx.handle)
        return g.grad_x, g.grad_w_gate_up, g.grad_b_gate_up, g.grad_w_down, g.grad_b_down, None, None, None


def mlp(x, w_gate_up, w_down, config=None, *, b_gate_up=None, b_down=None, handle=None, save_u=True, **options):
    """The dense MLP with autograd: y [T, H]. config as for moekit.mlp_forward (None: from the
    shapes; weight_layout="out_in" for nn.Linear weights)."""
    if config is None or options:
        layout = options.get("weight_layout", getattr(config, "weight_layout", "in_out"))
        out_in = _experts.enum_value(_experts.WeightLayout, layout, "moekit.autograd.mlp",
                                     "weight_layout") == _experts.WeightLayout.OUT_IN
        infer = dict(hidden=w_gate_up.shape[1] if out_in else w_gate_up.shape[0],
                     inter=w_down.shape[1] if out_in else w_down.shape[0], dtype=str(x.dtype))
        config = _experts._resolve_config(_experts.MlpConfig, config, options, infer, "moekit.autograd.mlp")
    return MlpFunction.apply(_rows_dense(x).contiguous(), w_gate_up, b_gate_up, w_down, b_down, config, handle,
                             bool(save_u))


# --------------------------------------------------------------------------------------------------
# The whole layer

class LayerFunction(torch.autograd.Function):
    """(x, token_mask, layer, aux_loss_coeff, expert_load_acc, *params in layer.PARAM_NAMES order) ->
    (y, expert_load, aux_loss). Differentiable in x and every parameter but correction_bias."""

    @staticmethod
    def forward(ctx, x, token_mask, layer, aux_loss_coeff, load_accumulator, *params):
        from .layer import PARAM_NAMES
        named = dict(zip(PARAM_NAMES, params))
        out = layer.forward(x, named, token_mask=token_mask, return_load=True, return_aux=True)
        if load_accumulator is not None:
            load_accumulator.add_(out.expert_load)
        ctx.layer, ctx.coeff = layer, float(aux_loss_coeff)
        ctx.moekit_saved = out.saved  # a uint8 buffer only the backward reads: no version tracking needed
        ctx.save_for_backward(x, token_mask, *params)
        ctx.mark_non_differentiable(out.expert_load, out.aux_loss)
        return out.y, out.expert_load, out.aux_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_load, _grad_aux):
        from .layer import PARAM_NAMES
        x, mask, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        needs = [n for n, need in zip(PARAM_NAMES, ctx.needs_input_grad[5:]) if need and n != "correction_bias"]
        if grad_y is None or not (need_x or needs):
            return (None,) * (5 + len(params))
        gx, grads = ctx.layer.backward(x, dict(zip(PARAM_NAMES, params)), ctx.moekit_saved, grad_y.contiguous(),
                                       token_mask=mask, aux_loss_coeff=ctx.coeff, needs=needs)
        ctx.moekit_saved = None
        return (gx if need_x else None, None, None, None, None) + tuple(grads.get(n) for n in PARAM_NAMES)


def layer(x, layer, params, *, token_mask=None, aux_loss_coeff=0.0, load_accumulator=None):
    """The whole MoE layer with autograd: (y [T, H], expert_load [E] int32, aux_loss [1] fp32).
    layer: a moekit.Layer; params: mapping of moekit.layer.PARAM_NAMES to tensors (None where the
    config has none). The aux term enters the backward with aux_loss_coeff (see the top of this
    module); load_accumulator ([E] int32) gets this call's load added."""
    from .layer import PARAM_NAMES
    get = params.get if isinstance(params, dict) else (lambda n: getattr(params, n, None))
    return LayerFunction.apply(x.contiguous(), token_mask, layer, float(aux_loss_coeff), load_accumulator,
                               *[get(n) for n in PARAM_NAMES])


class MoE(torch.nn.Module):
    """A MoE layer as a torch module over moekit's layer: parameters in moekit's layouts
    (router_weight [E, H], w_gate_up [E, H, NU], w_down [E, I, H], shared MLP in its config's
    layout), an fp32 correction_bias buffer when use_correction_bias, and an expert_load buffer that
    accumulates the load over micro-batches for update_bias().

        cfg = moekit.LayerConfig.from_sizes(moekit.RouterConfig.preset("qwen3"), 2048, 768)
        moe = moekit.autograd.MoE(cfg, device="cuda")
        y = moe(x)                      # x [..., H]; moe.aux_loss holds the last aux value
    """

    def __init__(self, config, *, device=None, init_std=0.02, aux_loss_coeff=0.0, use_correction_bias=False):
        super().__init__()
        from .layer import Layer
        device = torch.device(device if device is not None else "cuda")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.config = config
        self.aux_loss_coeff = float(aux_loss_coeff)
        self.moekit_layer = Layer(config, device=device.index)
        dtype = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}[self.moekit_layer.c_config.dtype]
        L = self.moekit_layer
        # expert weights: the experts held here (E / n with expert parallelism)
        shapes = dict(router_weight=(L.E, L.H), w_gate_up=(L.El, L.H, L.NU), w_down=(L.El, L.I, L.H))
        if config.router_bias:
            shapes["router_bias"] = (L.E,)
        if config.expert_bias:
            shapes.update(b_gate_up=(L.El, L.NU), b_down=(L.El, L.H))
        if config.shared is not None:
            swap = L.shared_out_in
            shapes["shared_w_gate_up"] = (L.NU_s, L.H) if swap else (L.H, L.NU_s)
            shapes["shared_w_down"] = (L.H, L.I_s) if swap else (L.I_s, L.H)
            if config.shared_bias:
                shapes.update(shared_b_gate_up=(L.NU_s,), shared_b_down=(L.H,))
            if config.shared_gate:
                shapes["shared_gate_weight"] = (L.H,)
        for name, shape in shapes.items():
            t = torch.empty(shape, device=device, dtype=dtype)
            if name.startswith("b_") or "_b_" in name or name == "router_bias":
                torch.nn.init.zeros_(t)
            else:
                torch.nn.init.normal_(t, std=init_std)
            self.register_parameter(name, torch.nn.Parameter(t))
        self.register_buffer("correction_bias", torch.zeros(L.E, device=device, dtype=torch.float32)
                             if use_correction_bias else None)
        self.register_buffer("expert_load", torch.zeros(L.E, device=device, dtype=torch.int32))
        self.aux_loss = None

    def forward(self, x, token_mask=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m = None if token_mask is None else token_mask.reshape(-1)
        y, _, aux = layer(x2, self.moekit_layer, self, token_mask=m, aux_loss_coeff=self.aux_loss_coeff,
                          load_accumulator=self.expert_load)
        self.aux_loss = aux
        return y.view(shape)

    @torch.no_grad()
    def update_bias(self, update_rate, *, recenter=False):
        """DeepSeek-V3's aux-loss-free balancing, once per optimiser step: correction_bias moves
        by update_rate * sign(mean(L) - L) over the load accumulated since the last call, which
        is then reset."""
        if self.correction_bias is None:
            raise invalid("moekit.autograd.MoE.update_bias", "the module was made with use_correction_bias=False")
        _router.bias_update(self.correction_bias, self.expert_load, update_rate, recenter=recenter, reset_load=True)
