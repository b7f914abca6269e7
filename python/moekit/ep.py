"""Expert parallelism over NCCL (moekit/ep.h): layout, dispatch, combine, both backwards, and the
load / aux-statistics reductions.

moekit never creates a communicator: pass an ncclComm_t address as an int, e.g.
`cupy.cuda.nccl.NcclCommunicator(n, uid, rank).comm`, or the communicator of a torch
ProcessGroupNCCL where the torch build exposes it. Every rank calls the collectives in the same
order (see moekit/ep.h); the calling thread's current device must be the communicator's device.
"""
import collections
import ctypes
import dataclasses
from typing import Union

from . import _capi
from ._config import Dtype, EpMode, _StructConfig, as_c
from ._lib import OwnedHandle, call, invalid, size_query
from ._tensor import F32, I32, KIND_OF_DTYPE, U8, Call, ptr, result


def _layout_size(c_config):
    """(layout_bytes, host_layout_count) of an EP config struct: moekit_ep_layout_size."""
    nbytes, count = ctypes.c_size_t(), ctypes.c_size_t()
    call("moekit_ep_layout_size", ctypes.byref(c_config), ctypes.byref(nbytes), ctypes.byref(count))
    return nbytes.value, count.value


@dataclasses.dataclass
class EpConfig(_StructConfig):
    """moekit_ep_config_t. Defaults are the library's (moekit_ep_config_init)."""

    num_ranks: int = 0
    num_experts: int = 0
    top_k: int = 0
    dtype: Union[Dtype, int, str] = Dtype.BF16
    combine_dtype: Union[Dtype, int, str] = -1
    mode: Union[EpMode, int, str] = EpMode.EXACT
    num_chunks: int = 1
    hidden: int = 0
    max_tokens: int = 0
    capacity: int = 0

    _struct = _capi.EpConfigStruct
    _init = "moekit_ep_config_init"
    _check = "moekit_ep_config_check"
    _enums = {"mode": EpMode}
    _dtypes = ("dtype", "combine_dtype")

    def layout_size(self):
        """(layout_bytes, host_layout_count): moekit_ep_layout_size (host only)."""
        return _layout_size(self.to_c())

    def max_recv_rows(self):
        """moekit_ep_max_recv_rows (host only)."""
        rows = ctypes.c_int64()
        call("moekit_ep_max_recv_rows", ctypes.byref(self.to_c()), ctypes.byref(rows))
        return rows.value

    def workspace_size(self, layout=None):
        """moekit_ep_workspace_size: exact for an exact-mode EpLayout, the worst case with None."""
        host = layout.host_layout if layout is not None else None
        return size_query("moekit_ep_workspace_size", ctypes.byref(self.to_c()), host)


def nccl_version():
    """NCCL_VERSION_CODE of the NCCL moekit uses; raises NotAvailableError when built without it."""
    v = ctypes.c_int32()
    call("moekit_ep_nccl_version", ctypes.byref(v))
    return v.value


class EpLayout(object):
    """One layout: the device buffer, the host array (exact mode), the received row count and the
    dropped count (device, int32 [1]). Keep it until the last call that uses it."""

    def __init__(self, num_tokens, buffer, nbytes, host_layout, num_recv_rows, dropped):
        self.num_tokens = num_tokens
        self.buffer = buffer          # framework uint8 array of nbytes (or a DeviceArray)
        self._buffer = None           # its DeviceArray, set by EP.layout
        self.nbytes = nbytes
        self.host_layout = host_layout  # ctypes int64 array (exact mode) or None
        self.num_recv_rows = num_recv_rows
        self.dropped = dropped


Received = collections.namedtuple("Received", "x indices weights src_token mask")


class EP(OwnedHandle):
    """moekit_ep_handle_t over the caller's communicator. Use from one thread at a time."""

    def __init__(self, config, nccl_comm):
        fname = "moekit.EP"
        self.config = config if isinstance(config, EpConfig) else None
        self.c_config = as_c(config, EpConfig, fname)
        self._comm = ctypes.c_void_p(int(nccl_comm))
        self._open("moekit_ep_create", "moekit_ep_destroy", ctypes.byref(self.c_config), self._comm)
        cfg = self.c_config
        self.kind = KIND_OF_DTYPE[cfg.dtype]
        self.combine_kind = self.kind if cfg.combine_dtype < 0 else KIND_OF_DTYPE[cfg.combine_dtype]
        self.layout_bytes, self.host_layout_count = _layout_size(cfg)

    @property
    def handle(self):
        return self._live("moekit.EP", "the handle was closed")

    def layout(self, indices, *, token_mask=None, buffer=None, stream=None):
        """moekit_ep_layout (a collective in exact mode, with one host read). Returns an EpLayout."""
        fname = "moekit.EP.layout"
        cfg = self.c_config
        with Call(fname, stream, [indices, token_mask, buffer]) as c:
            idx = c.input(indices, "indices", (I32,), ndim=2)
            T, K = idx.shape
            if K != cfg.top_k:
                raise invalid(fname, "indices has %d columns; config.top_k = %d", K, cfg.top_k)
            m = c.input(token_mask, "token_mask", (U8,), shape=(T,))
            buf = c.output(buffer, "buffer", U8, (self.layout_bytes,))
            host = (ctypes.c_int64 * self.host_layout_count)() if cfg.mode == EpMode.EXACT else None
            rows = ctypes.c_int64()
            dropped = c.empty((1,), I32)
            call("moekit_ep_layout", self.handle, T, ptr(idx), ptr(m), ptr(buf), self.layout_bytes, host,
                 ctypes.byref(rows), ptr(dropped), c.stream_arg)
            lay = EpLayout(T, result(buf, buffer), self.layout_bytes, host, rows.value, dropped.owner)
            lay._buffer = buf
            return lay

    def layout_counts(self, layout):
        """(send_rows, recv_rows) per rank of an exact-mode layout (host arithmetic)."""
        n = self.c_config.num_ranks
        send, recv = (ctypes.c_int64 * n)(), (ctypes.c_int64 * n)()
        call("moekit_ep_layout_counts", self.handle, layout.host_layout, send, recv)
        return list(send), list(recv)

    def _workspace(self, c, layout, given):
        return c.workspace(size_query("moekit_ep_workspace_size", ctypes.byref(self.c_config), layout.host_layout),
                           given)

    def _check_layout(self, fname, layout, T):
        if not isinstance(layout, EpLayout):
            raise invalid(fname, "layout must be an EpLayout from EP.layout, got %s", type(layout).__name__)
        if layout.num_tokens != T:
            raise invalid(fname, "the layout was made for %d tokens, the call has %d", layout.num_tokens, T)

    def dispatch(self, x, indices, weights, layout, *, recv_x=None, recv_indices=None, recv_weights=None,
                 recv_src_token=None, recv_mask=None, workspace=None, stream=None):
        """moekit_ep_dispatch (collective). Returns Received(x, indices, weights, src_token, mask),
        each with layout.num_recv_rows rows."""
        fname = "moekit.EP.dispatch"
        cfg = self.c_config
        outs = [recv_x, recv_indices, recv_weights, recv_src_token, recv_mask]
        with Call(fname, stream, [x, indices, weights, layout.buffer, workspace] + outs) as c:
            xa = c.input(x, "x", (self.kind,), ndim=2)
            T, H = xa.shape
            self._check_layout(fname, layout, T)
            if H != cfg.hidden:
                raise invalid(fname, "x has %d columns; config.hidden = %d", H, cfg.hidden)
            K, R = cfg.top_k, layout.num_recv_rows
            idx = c.input(indices, "indices", (I32,), shape=(T, K))
            w = c.input(weights, "weights", (F32,), shape=(T, K))
            rx = c.output(recv_x, "recv_x", self.kind, (R, H))
            ri = c.output(recv_indices, "recv_indices", I32, (R, K))
            rw = c.output(recv_weights, "recv_weights", F32, (R, K))
            rs = c.output(recv_src_token, "recv_src_token", I32, (R,))
            rm = c.output(recv_mask, "recv_mask", U8, (R,))
            ws, nbytes = self._workspace(c, layout, workspace)
            call("moekit_ep_dispatch", self.handle, T, ptr(layout._buffer), layout.host_layout, ptr(xa), ptr(idx),
                 ptr(w), ptr(rx), ptr(ri), ptr(rw), ptr(rs), ptr(rm), ptr(ws), nbytes, c.stream_arg)
            return Received(result(rx, recv_x), result(ri, recv_indices), result(rw, recv_weights),
                            result(rs, recv_src_token), result(rm, recv_mask))

    def combine(self, partials, layout, *, out=None, workspace=None, stream=None):
        """moekit_ep_combine (collective): y [T, H] from the partial rows [num_recv_rows, H]."""
        fname = "moekit.EP.combine"
        cfg = self.c_config
        with Call(fname, stream, [partials, layout.buffer, out, workspace]) as c:
            p = c.input(partials, "partials", (self.combine_kind,), shape=(layout.num_recv_rows, cfg.hidden))
            T = layout.num_tokens
            y = c.output(out, "out", self.kind, (T, cfg.hidden))
            ws, nbytes = self._workspace(c, layout, workspace)
            call("moekit_ep_combine", self.handle, T, ptr(layout._buffer), layout.host_layout, ptr(p), ptr(y),
                 ptr(ws), nbytes, c.stream_arg)
            return result(y, out)

    def dispatch_backward(self, grad_recv_x, indices, layout, *, grad_recv_weights=None, grad_x=None,
                          grad_weights=None, workspace=None, stream=None):
        """moekit_ep_dispatch_backward (collective): grad_x [T, H], and grad_weights [T, K] when
        grad_recv_weights is given (every rank must then ask): (grad_x, grad_weights or None)."""
        fname = "moekit.EP.dispatch_backward"
        cfg = self.c_config
        with Call(fname, stream, [grad_recv_x, indices, grad_recv_weights, layout.buffer, grad_x,
                                  grad_weights, workspace]) as c:
            T, K, H, R = layout.num_tokens, cfg.top_k, cfg.hidden, layout.num_recv_rows
            g = c.input(grad_recv_x, "grad_recv_x", (self.kind,), shape=(R, H))
            idx = c.input(indices, "indices", (I32,), shape=(T, K))
            grw = c.input(grad_recv_weights, "grad_recv_weights", (F32,), shape=(R, K))
            gx = c.output(grad_x, "grad_x", self.kind, (T, H))
            gw = c.output(grad_weights, "grad_weights", F32, (T, K)) if (grw is not None or grad_weights is not None) else None
            ws, nbytes = self._workspace(c, layout, workspace)
            call("moekit_ep_dispatch_backward", self.handle, T, ptr(layout._buffer), layout.host_layout, ptr(idx),
                 ptr(g), ptr(grw), ptr(gx), ptr(gw), ptr(ws), nbytes, c.stream_arg)
            return result(gx, grad_x), (None if gw is None else result(gw, grad_weights))

    def combine_backward(self, grad_y, layout, *, grad_partials=None, workspace=None, stream=None):
        """moekit_ep_combine_backward (collective): grad_partials [num_recv_rows, H]."""
        fname = "moekit.EP.combine_backward"
        cfg = self.c_config
        with Call(fname, stream, [grad_y, layout.buffer, grad_partials, workspace]) as c:
            T = layout.num_tokens
            g = c.input(grad_y, "grad_y", (self.kind,), shape=(T, cfg.hidden))
            gp = c.output(grad_partials, "grad_partials", self.kind, (layout.num_recv_rows, cfg.hidden))
            ws, nbytes = self._workspace(c, layout, workspace)
            call("moekit_ep_combine_backward", self.handle, T, ptr(layout._buffer), layout.host_layout, ptr(g),
                 ptr(gp), ptr(ws), nbytes, c.stream_arg)
            return result(gp, grad_partials)


def allreduce_expert_load(nccl_comm, expert_load, *, stream=None):
    """moekit_ep_allreduce_expert_load: expert_load [E] int32 summed over the communicator, in place."""
    fname = "moekit.allreduce_expert_load"
    with Call(fname, stream, [expert_load]) as c:
        load = c.input(expert_load, "expert_load", (I32,), ndim=1)
        call("moekit_ep_allreduce_expert_load", ctypes.c_void_p(int(nccl_comm)), load.shape[0], ptr(load),
             c.stream_arg)


def allreduce_aux_stats(nccl_comm, aux_score_sum=None, aux_token_count=None, *, workspace=None, stream=None):
    """moekit_ep_allreduce_aux_stats: S [E] fp32 summed in rank order (bitwise equal on every rank)
    and N [1] int32 summed, in place; either may be None."""
    fname = "moekit.allreduce_aux_stats"
    comm = ctypes.c_void_p(int(nccl_comm))
    with Call(fname, stream, [aux_score_sum, aux_token_count, workspace]) as c:
        s = c.input(aux_score_sum, "aux_score_sum", (F32,), ndim=1)
        n = c.input(aux_token_count, "aux_token_count", (I32,), shape=(1,))
        E = s.shape[0] if s is not None else 1
        nbytes = size_query("moekit_ep_aux_stats_workspace_size", comm, E)
        ws, ws_bytes = c.workspace(nbytes if s is not None else 0, workspace)
        call("moekit_ep_allreduce_aux_stats", comm, E, ptr(s), ptr(n), ptr(ws), ws_bytes, c.stream_arg)
