"""Token movement (moekit/tokens.h): the routing plan, permute, combine and both backwards.

Shapes: x [T, H] (rows may be strided), indices [T, K] int32, weights [T, K] fp32, token_mask [T],
xp / yp [max_rows, H] contiguous, row_weights [max_rows] fp32, with max_rows the host-known worst
case (TokenPlan.max_rows); the true row count lives on the device (plan.totals[0]). Rows at or past
it are never written by these calls: buffers allocated here for them hold whatever the framework's
allocator gave (use zero=True where a consumer might read them).
"""
import collections
import ctypes
import dataclasses
from typing import Union

from . import _capi
from ._config import DropPolicy, _StructConfig, as_c
from ._lib import call, invalid, size_query
from ._tensor import F32, FLOATS, I32, MOEKIT_DTYPE, U8, Call, DeviceArray, ptr, result


@dataclasses.dataclass
class PlanConfig(_StructConfig):
    """moekit_plan_config_t. Defaults are the library's (moekit_plan_config_init)."""

    num_experts: int = 0
    top_k: int = 0
    local_expert_begin: int = 0
    num_local_experts: int = 0
    alignment: int = 1
    capacity: int = 0
    drop_policy: Union[DropPolicy, int, str] = DropPolicy.BY_POSITION

    _struct = _capi.PlanConfigStruct
    _init = "moekit_plan_config_init"
    _check = "moekit_plan_config_check"
    _enums = {"drop_policy": DropPolicy}

    @property
    def local_experts(self):
        """E_local: num_local_experts, or E - local_expert_begin when that is 0."""
        return self.num_local_experts or (self.num_experts - self.local_expert_begin)

    def max_rows(self, num_tokens):
        """moekit_plan_max_rows: the worst-case row count for num_tokens tokens (host only)."""
        return _query_i64("moekit_plan_max_rows", self.to_c(), num_tokens)

    def workspace_size(self, num_tokens):
        """moekit_plan_workspace_size (host only)."""
        return _query_size("moekit_plan_workspace_size", self.to_c(), num_tokens)

    def buffer_size(self, num_tokens):
        """moekit_plan_buffer_size: bytes of one buffer holding the five plan arrays (host only)."""
        return _query_size("moekit_plan_buffer_size", self.to_c(), num_tokens)


def _query_size(name, cfg, num_tokens):
    return size_query(name, ctypes.byref(cfg), int(num_tokens))


def _query_i64(name, cfg, num_tokens):
    n = ctypes.c_int64()
    call(name, ctypes.byref(cfg), int(num_tokens), ctypes.byref(n))
    return n.value


class TokenPlan(object):
    """A plan's device arrays for a fixed (config, num_tokens), carved from one buffer.

    expert_counts [E_local], expert_offsets [E_local + 1], row_of_slot [T K], slot_of_row [max_rows]
    and totals [3] (rows, dropped, invalid) are int32 arrays of the buffer's framework (views of
    the buffer; DeviceArrays when the buffer is a raw DeviceArray). A plan can be rebuilt in place
    by plan_build(..., plan=plan), e.g. inside a captured CUDA graph.
    """

    _ARRAYS = ("expert_counts", "expert_offsets", "row_of_slot", "slot_of_row", "totals")

    def __init__(self, config, num_tokens, buffer=None, call_=None):
        fname = "moekit.TokenPlan"
        self.config = config if isinstance(config, PlanConfig) else None
        self.c_config = as_c(config, PlanConfig, fname)
        self.num_tokens = int(num_tokens)
        self.max_rows = _query_i64("moekit_plan_max_rows", self.c_config, self.num_tokens)
        nbytes = _query_size("moekit_plan_buffer_size", self.c_config, self.num_tokens)
        c = call_
        if buffer is None:
            if c is None:
                raise invalid(fname, "pass a buffer (plan_buffer_size bytes) or build the plan with plan_build")
            self._buffer = c.empty((nbytes,), U8)
            self.buffer = self._buffer.owner
        else:
            c = c or Call(fname, None, [buffer])
            self._buffer = c.input(buffer, "buffer", (U8,), ndim=1)
            self.buffer = buffer
            if self._buffer.nbytes < nbytes:
                raise invalid(fname, "buffer has %d bytes; the plan needs %d", self._buffer.nbytes, nbytes)
        self.framework, self.device = self._buffer.framework, self._buffer.device
        self.c_plan = _capi.TokenPlanStruct()
        call("moekit_token_plan_init", ctypes.byref(self.c_plan), ctypes.sizeof(self.c_plan))
        call("moekit_plan_bind", ctypes.byref(self.c_config), self.num_tokens, ptr(self._buffer),
             self._buffer.nbytes, ctypes.byref(self.c_plan))
        cfg = self.c_config
        e_local = cfg.num_local_experts or (cfg.num_experts - cfg.local_expert_begin)
        self.num_local_experts = e_local
        counts = {"expert_counts": e_local, "expert_offsets": e_local + 1,
                  "row_of_slot": self.num_tokens * cfg.top_k, "slot_of_row": self.max_rows,
                  "totals": _capi.MOEKIT_PLAN_NUM_TOTALS}
        for name in self._ARRAYS:
            address = getattr(self.c_plan, name) or 0
            n = counts[name]
            if self.framework is None:
                view = DeviceArray.wrap(address, (n,), I32, device=self.device)
            elif n == 0:
                view = c.empty((0,), I32).owner
            else:
                view = c.view_i32(self._buffer, address - self._buffer.ptr, n)
            setattr(self, name, view)

    def __repr__(self):
        return "TokenPlan(num_tokens=%d, max_rows=%d, local_experts=%d)" % (
            self.num_tokens, self.max_rows, self.num_local_experts)


def plan_alloc(config, num_tokens, *, like=None, buffer=None, stream=None):
    """A TokenPlan for (config, num_tokens) with its buffer allocated from like's framework (or
    given as a uint8 buffer of config.buffer_size(num_tokens) bytes); nothing is built yet."""
    with Call("moekit.plan_alloc", stream, [like, buffer]) as c:
        return TokenPlan(config, num_tokens, buffer=buffer, call_=c)


def plan_build(indices, config, *, weights=None, token_mask=None, plan=None, workspace=None, stream=None):
    """moekit_plan_build from the router's indices [T, K]. Returns the TokenPlan (plan, when given,
    is rebuilt in place; it must have been made for the same config and T)."""
    fname = "moekit.plan_build"
    cfg = as_c(config, PlanConfig, fname) if plan is None else plan.c_config
    objs = [indices, weights, token_mask, workspace, plan.buffer if plan is not None else None]
    with Call(fname, stream, objs) as c:
        idx = c.input(indices, "indices", (I32,), ndim=2)
        T, K = idx.shape
        if K != cfg.top_k:
            raise invalid(fname, "indices has %d columns; config.top_k = %d", K, cfg.top_k)
        w = c.input(weights, "weights", (F32,), shape=(T, K))
        m = c.input(token_mask, "token_mask", (U8,), shape=(T,))
        if plan is None:
            plan = TokenPlan(config, T, call_=c)
        elif plan.num_tokens != T:
            raise invalid(fname, "plan was made for %d tokens; indices has %d", plan.num_tokens, T)
        ws, ws_bytes = c.workspace(_query_size("moekit_plan_workspace_size", cfg, T), workspace)
        call("moekit_plan_build", ctypes.byref(cfg), T, ptr(idx), ptr(w), ptr(m), ctypes.byref(plan.c_plan),
             ptr(ws), ws_bytes, c.stream_arg)
        return plan


def _tokens_call(fname, plan, stream, objs):
    if not isinstance(plan, TokenPlan):
        raise invalid(fname, "plan must be a TokenPlan (from plan_build), got %s", type(plan).__name__)
    return Call(fname, stream, list(objs) + [plan.buffer])


def permute(x, plan, *, weights=None, out=None, row_weights=None, zero=False, stream=None):
    """moekit_tokens_permute: xp [max_rows, H] with xp[r] = x[token(r)]. With weights [T, K] also
    returns row_weights [max_rows] fp32: (xp, row_weights). zero=True allocates zero-filled outputs
    (rows past the routed total stay zero)."""
    fname = "moekit.permute"
    with _tokens_call(fname, plan, stream, [x, weights, out, row_weights]) as c:
        xa = c.input(x, "x", FLOATS, ndim=2, contiguous="rows")
        T, H = xa.shape
        if T != plan.num_tokens:
            raise invalid(fname, "x has %d rows; the plan was built for %d tokens", T, plan.num_tokens)
        K = plan.c_config.top_k
        w = c.input(weights, "weights", (F32,), shape=(T, K))
        if row_weights is not None and w is None:
            raise invalid(fname, "row_weights is given without weights")
        xp = c.output(out, "out", xa.kind, (plan.max_rows, H), zero=zero)
        rw = c.output(row_weights, "row_weights", F32, (plan.max_rows,), zero=zero) if w is not None else None
        call("moekit_tokens_permute", ctypes.byref(plan.c_config), ctypes.byref(plan.c_plan), T, H,
             MOEKIT_DTYPE[xa.kind], ptr(xa), xa.row_stride(), ptr(w), ptr(xp), ptr(rw), c.stream_arg)
        if w is None:
            return result(xp, out)
        return result(xp, out), result(rw, row_weights)


def combine(yp, plan, *, weights=None, out=None, stream=None):
    """moekit_tokens_combine: y [T, H] with y[t] = sum_k w[t, k] yp[row(t, k)] (unweighted when
    weights is None), accumulated in fp32 in k order."""
    fname = "moekit.combine"
    with _tokens_call(fname, plan, stream, [yp, weights, out]) as c:
        ypa = c.input(yp, "yp", FLOATS, ndim=2)
        R, H = ypa.shape
        if R != plan.max_rows:
            raise invalid(fname, "yp has %d rows; the plan's max_rows is %d", R, plan.max_rows)
        T, K = plan.num_tokens, plan.c_config.top_k
        w = c.input(weights, "weights", (F32,), shape=(T, K))
        y = c.output(out, "out", ypa.kind, (T, H), contiguous="rows")
        call("moekit_tokens_combine", ctypes.byref(plan.c_config), ctypes.byref(plan.c_plan), T, H,
             MOEKIT_DTYPE[ypa.kind], ptr(ypa), ptr(w), ptr(y), y.row_stride(), c.stream_arg)
        return result(y, out)


def permute_backward(grad_xp, plan, *, grad_row_weights=None, grad_x=None, grad_weights=None, stream=None):
    """moekit_tokens_permute_backward: grad_x [T, H] (and grad_weights [T, K] fp32 from
    grad_row_weights [max_rows] when given: returns (grad_x, grad_weights))."""
    fname = "moekit.permute_backward"
    with _tokens_call(fname, plan, stream, [grad_xp, grad_row_weights, grad_x, grad_weights]) as c:
        g = c.input(grad_xp, "grad_xp", FLOATS, ndim=2)
        R, H = g.shape
        if R != plan.max_rows:
            raise invalid(fname, "grad_xp has %d rows; the plan's max_rows is %d", R, plan.max_rows)
        T, K = plan.num_tokens, plan.c_config.top_k
        grw = c.input(grad_row_weights, "grad_row_weights", (F32,), shape=(R,))
        if grad_weights is not None and grw is None:
            raise invalid(fname, "grad_weights is given without grad_row_weights")
        gx = c.output(grad_x, "grad_x", g.kind, (T, H), contiguous="rows")
        gw = c.output(grad_weights, "grad_weights", F32, (T, K)) if grw is not None else None
        call("moekit_tokens_permute_backward", ctypes.byref(plan.c_config), ctypes.byref(plan.c_plan), T, H,
             MOEKIT_DTYPE[g.kind], ptr(g), ptr(grw), ptr(gx), gx.row_stride(), ptr(gw), c.stream_arg)
        if grw is None:
            return result(gx, grad_x)
        return result(gx, grad_x), result(gw, grad_weights)


CombineGrads = collections.namedtuple("CombineGrads", "grad_yp grad_weights")


def combine_backward(grad_y, plan, *, weights=None, yp=None, grad_yp=None, grad_weights=None,
                     need_grad_yp=True, need_grad_weights=None, zero=False, stream=None):
    """moekit_tokens_combine_backward. Returns CombineGrads(grad_yp [max_rows, H] or None,
    grad_weights [T, K] fp32 or None). grad_weights is computed when need_grad_weights (default:
    when yp is given), and needs yp, the combine's input."""
    fname = "moekit.combine_backward"
    with _tokens_call(fname, plan, stream, [grad_y, weights, yp, grad_yp, grad_weights]) as c:
        gy = c.input(grad_y, "grad_y", FLOATS, ndim=2, contiguous="rows")
        T, H = gy.shape
        if T != plan.num_tokens:
            raise invalid(fname, "grad_y has %d rows; the plan was built for %d tokens", T, plan.num_tokens)
        K, R = plan.c_config.top_k, plan.max_rows
        w = c.input(weights, "weights", (F32,), shape=(T, K))
        ypa = c.input(yp, "yp", (gy.kind,), shape=(R, H))
        if need_grad_weights is None:
            need_grad_weights = ypa is not None or grad_weights is not None
        if need_grad_weights and ypa is None:
            raise invalid(fname, "grad_weights needs yp (the combine's input)")
        gyp = c.output(grad_yp, "grad_yp", gy.kind, (R, H), zero=zero) if (need_grad_yp or grad_yp is not None) else None
        gw = c.output(grad_weights, "grad_weights", F32, (T, K)) if need_grad_weights else None
        if gyp is None and gw is None:
            raise invalid(fname, "nothing to compute: need_grad_yp and need_grad_weights are both off")
        if all(a is None or a.numel == 0 for a in (gyp, gw)):
            # T = 0: nothing to write (and empty outputs would reach the library as two NULLs).
            return CombineGrads(None if gyp is None else result(gyp, grad_yp),
                                None if gw is None else result(gw, grad_weights))
        call("moekit_tokens_combine_backward", ctypes.byref(plan.c_config), ctypes.byref(plan.c_plan), T, H,
             MOEKIT_DTYPE[gy.kind], ptr(gy), gy.row_stride(), ptr(w), ptr(ypa), ptr(gyp), ptr(gw), c.stream_arg)
        return CombineGrads(None if gyp is None else result(gyp, grad_yp),
                            None if gw is None else result(gw, grad_weights))
