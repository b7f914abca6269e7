#!/usr/bin/env python3
"""moekit token movement next to the PyTorch way, on the same tensors, in the same run.

For each shape of issue 3 (bf16): moekit's plan + permute + combine (through ctypes on torch
tensors) against
  permute: stable argsort of the flat expert ids + index_select of the token rows,
  combine: index_add_ of the weighted rows in fp32, cast back to bf16,
eager and under torch.compile. moekit's outputs are checked against PyTorch's first (the permuted
rows must be identical: both are the stable expert-major order; the combine within bf16
tolerance). The floor is each input read once and each output written once over the measured
device-to-device copy bandwidth. Every timed call, moekit's and PyTorch's alike, reads its inputs
from DRAM: calls rotate over copies of the routing (indices, weights, plan, sort order) and of
the token/row tensors, enough that one round touches at least twice the L2 (the plan's inputs are
well under a megabyte, so they need many copies; the large tensors at least 2).

    python3 bench/tokens/compare_torch.py --out=bench/results/tokens-h100.json
    python3 bench/tokens/compare_torch.py --shapes=deepseek --repeats=100

The library is $MOEKIT_LIB, else build/libmoekit.so under the repository root.
"""
import argparse
import ctypes
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
import torchbench as tb  # noqa: E402
import torch  # noqa: E402

SHAPES = {
    "deepseek": dict(tokens=4096, hidden=7168, top_k=8, experts=256),
    "wide": dict(tokens=16384, hidden=2048, top_k=8, experts=128),
    "mixtral": dict(tokens=8192, hidden=4096, top_k=2, experts=8),
}


class PlanConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("num_experts", ctypes.c_int32),
                ("top_k", ctypes.c_int32), ("local_expert_begin", ctypes.c_int32),
                ("num_local_experts", ctypes.c_int32), ("alignment", ctypes.c_int32),
                ("capacity", ctypes.c_int32), ("drop_policy", ctypes.c_int32)]


class TokenPlan(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("expert_counts", ctypes.c_void_p),
                ("expert_offsets", ctypes.c_void_p), ("row_of_slot", ctypes.c_void_p),
                ("slot_of_row", ctypes.c_void_p), ("totals", ctypes.c_void_p)]


P = ctypes.POINTER
c_void_p, c_int32, c_int64, c_size_t = tb.c_void_p, tb.c_int32, tb.c_int64, tb.c_size_t


def api():
    return dict(
        config_init=tb.declare("moekit_plan_config_init", [P(PlanConfig), c_size_t]),
        plan_init=tb.declare("moekit_token_plan_init", [P(TokenPlan), c_size_t]),
        max_rows=tb.declare("moekit_plan_max_rows", [P(PlanConfig), c_int64, P(c_int64)]),
        workspace_size=tb.declare("moekit_plan_workspace_size", [P(PlanConfig), c_int64, P(c_size_t)]),
        buffer_size=tb.declare("moekit_plan_buffer_size", [P(PlanConfig), c_int64, P(c_size_t)]),
        bind=tb.declare("moekit_plan_bind", [P(PlanConfig), c_int64, c_void_p, c_size_t, P(TokenPlan)]),
        build=tb.declare("moekit_plan_build", [P(PlanConfig), c_int64, c_void_p, c_void_p, c_void_p,
                                               P(TokenPlan), c_void_p, c_size_t, c_void_p]),
        permute=tb.declare("moekit_tokens_permute", [P(PlanConfig), P(TokenPlan), c_int64, c_int64, c_int32,
                                                     c_void_p, c_int64, c_void_p, c_void_p, c_void_p, c_void_p]),
        combine=tb.declare("moekit_tokens_combine", [P(PlanConfig), P(TokenPlan), c_int64, c_int64, c_int32,
                                                     c_void_p, c_void_p, c_void_p, c_int64, c_void_p]),
    )


class Moekit:
    """A plan for T tokens with its device buffers (all torch tensors), and the three calls."""

    def __init__(self, fns, tokens, top_k, experts, workspace=None):
        self.f = fns
        self.T, self.K = tokens, top_k
        self.cfg = PlanConfig()
        tb.check(self.f["config_init"](ctypes.byref(self.cfg), ctypes.sizeof(PlanConfig)))
        self.cfg.num_experts, self.cfg.top_k = experts, top_k
        rows, ws, buf = c_int64(), c_size_t(), c_size_t()
        tb.check(self.f["max_rows"](ctypes.byref(self.cfg), tokens, ctypes.byref(rows)))
        tb.check(self.f["workspace_size"](ctypes.byref(self.cfg), tokens, ctypes.byref(ws)))
        tb.check(self.f["buffer_size"](ctypes.byref(self.cfg), tokens, ctypes.byref(buf)))
        self.max_rows = rows.value
        # The caching allocator hands out 512-byte aligned blocks: fine for the 256-byte rule.
        # Plans of the same shape may share one workspace (its content does not survive a call).
        if workspace is None or workspace.numel() < ws.value:
            workspace = torch.empty(max(ws.value, 1), dtype=torch.uint8, device="cuda")
        self.workspace = workspace
        self.buffer = torch.empty(max(buf.value, 1), dtype=torch.uint8, device="cuda")
        self.plan = TokenPlan()
        tb.check(self.f["plan_init"](ctypes.byref(self.plan), ctypes.sizeof(TokenPlan)))
        tb.check(self.f["bind"](ctypes.byref(self.cfg), tokens, tb.ptr(self.buffer), buf.value,
                                ctypes.byref(self.plan)))

    def build(self, indices):
        tb.check(self.f["build"](ctypes.byref(self.cfg), self.T, tb.ptr(indices), None, None,
                                 ctypes.byref(self.plan), tb.ptr(self.workspace), self.workspace.numel(),
                                 tb.stream_ptr()))

    def plan_bytes(self):
        return self.buffer.numel()

    def permute(self, x, weights, xp, row_weights):
        tb.check(self.f["permute"](ctypes.byref(self.cfg), ctypes.byref(self.plan), self.T, x.shape[1],
                                   tb.DTYPE[x.dtype], tb.ptr(x), x.stride(0), tb.ptr(weights), tb.ptr(xp),
                                   tb.ptr(row_weights), tb.stream_ptr()))

    def combine(self, yp, weights, y):
        tb.check(self.f["combine"](ctypes.byref(self.cfg), ctypes.byref(self.plan), self.T, y.shape[1],
                                   tb.DTYPE[y.dtype], tb.ptr(yp), tb.ptr(weights), tb.ptr(y), y.stride(0),
                                   tb.stream_ptr()))

    def totals(self):
        base = self.plan.totals - self.buffer.data_ptr()
        return self.buffer[base:base + 12].view(torch.int32).tolist()


def torch_permute(x, indices):
    """The PyTorch way: stable argsort of the expert ids, then gather the token rows."""
    order = torch.argsort(indices.reshape(-1), stable=True)
    return x.index_select(0, order // indices.shape[1]), order


def torch_combine(yp, weights, order, tokens):
    """The PyTorch way: weighted rows added into fp32 tokens with index_add_, cast once."""
    top_k = weights.shape[1]
    w = weights.reshape(-1).index_select(0, order)
    y = torch.zeros(tokens, yp.shape[1], dtype=torch.float32, device=yp.device)
    y.index_add_(0, order // top_k, yp.float() * w.unsqueeze(1))
    return y.to(yp.dtype)


def rotation_copies(per_call, set_bytes, budget):
    """Copies to rotate over so that one round of calls (each touching per_call bytes) is at least
    twice the L2: at least 2, fewer only when budget (for all copies of set_bytes each) runs
    short, never below 1, at most 4096."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    n = max(2, -(-2 * l2 // max(per_call, 1)) + 1)
    return int(max(1, min(n, budget // max(set_bytes, 1), 4096)))


def run_shape(name, shape, fns, copy_bw, args):
    T, H, K, E = shape["tokens"], shape["hidden"], shape["top_k"], shape["experts"]
    torch.manual_seed(args.seed)
    dt = torch.bfloat16
    es = 2
    logits = torch.randn(T, E, device="cuda")
    weights, indices = torch.softmax(logits, dim=-1).topk(K, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).float().contiguous()
    indices = indices.to(torch.int32).contiguous()
    x = torch.randn(T, H, device="cuda", dtype=dt)

    m = Moekit(fns, T, K, E)
    xp = torch.empty(m.max_rows, H, device="cuda", dtype=dt)
    row_w = torch.empty(m.max_rows, device="cuda", dtype=torch.float32)
    y = torch.empty(T, H, device="cuda", dtype=dt)

    # ---- check against PyTorch first ----
    m.build(indices)
    m.permute(x, weights, xp, row_w)
    m.combine(xp, weights, y)
    ref_xp, order = torch_permute(x, indices)
    ref_y = torch_combine(ref_xp, weights, order, T)
    torch.cuda.synchronize()
    total, dropped, invalid = m.totals()
    if total != T * K or dropped != 0 or invalid != 0:
        raise SystemExit("%s: moekit plan totals %s, expected %d rows" % (name, (total, dropped, invalid), T * K))
    if not torch.equal(xp[:total], ref_xp):
        raise SystemExit("%s: moekit's permuted rows differ from argsort + index_select" % name)
    if not torch.equal(row_w[:total], weights.reshape(-1)[order]):
        raise SystemExit("%s: moekit's row weights differ from PyTorch's" % name)
    torch.testing.assert_close(y, ref_y, atol=1e-2, rtol=1e-2)

    # ---- rotation copies (set 0 is what was just checked) ----
    permute_bytes = (T + T * K) * H * es + T * K * 8
    combine_bytes = (T * K + T) * H * es + T * K * 8
    plan_call_bytes = T * K * 4 * 2 + total * 4  # indices, row_of_slot, slot_of_row
    spare = 0.8 * torch.cuda.mem_get_info()[0]
    route_set_bytes = T * K * (4 + 4 + 8) + m.plan_bytes()  # indices, weights, order, plan
    move_set_bytes = (2 * T + 2 * m.max_rows) * H * es + m.max_rows * 4  # x, y, xp, ref_xp, row_w
    n_route = rotation_copies(plan_call_bytes, route_set_bytes, 0.1 * spare + route_set_bytes)
    n_move = rotation_copies(min(permute_bytes, combine_bytes), move_set_bytes, 0.9 * spare + move_set_bytes)
    routes = [(indices, weights, m, order)]
    for _ in range(1, n_route):
        mk = Moekit(fns, T, K, E, workspace=m.workspace)
        idx_k = indices.clone()
        mk.build(idx_k)
        routes.append((idx_k, weights.clone(), mk, order.clone()))
    torch.cuda.synchronize()
    for _, _, mk, _ in routes[1:]:
        if mk.totals() != [total, dropped, invalid]:
            raise SystemExit("%s: a copy of the plan has different totals" % name)
    moves = [(x, xp, row_w, y, ref_xp)]
    for _ in range(1, n_move):
        moves.append((x.clone(), xp.clone(), row_w.clone(), torch.empty_like(y), ref_xp.clone()))

    # ---- time ----
    rows = []
    reps = dict(warmup=args.warmup, repeats=args.repeats)
    floor = lambda b: b / copy_bw * 1e6  # noqa: E731

    def add(op, impl, fn, floor_bytes):
        if fn is None:
            return
        # A call counter that carries on from the warm-up into the timed calls, so the first
        # timed calls do not reuse the copies the warm-up just touched.
        calls = [0]

        def step(_):
            i = calls[0]
            calls[0] += 1
            fn(routes[i % n_route], moves[i % n_move])

        t = tb.time_us(step, **reps)
        f = floor(floor_bytes) if floor_bytes else None
        rows.append(dict(shape=name, op=op, impl=impl, median_us=t["median_us"], min_us=t["min_us"],
                         floor_us=f, fraction_of_floor=(f / t["median_us"]) if f else None,
                         routing_copies=n_route, tensor_copies=n_move))

    add("plan", "moekit", lambda r, v: r[2].build(r[0]), None)
    add("permute", "moekit", lambda r, v: r[2].permute(v[0], r[1], v[1], v[2]), permute_bytes)
    add("plan+permute", "moekit", lambda r, v: (r[2].build(r[0]), r[2].permute(v[0], r[1], v[1], v[2])),
        permute_bytes)
    add("plan+permute", "torch eager", lambda r, v: torch_permute(v[0], r[0]), permute_bytes)
    cp = tb.try_compile(torch_permute) if not args.no_compile else None
    if cp is not None:
        try:
            got, _ = cp(x, indices)
            torch.testing.assert_close(got, ref_xp, atol=0, rtol=0)
        except Exception as e:  # pragma: no cover - depends on the machine
            print("torch.compile permute failed: %s" % e, file=sys.stderr)
            cp = None
    add("plan+permute", "torch.compile", (lambda r, v: cp(v[0], r[0])) if cp else None, permute_bytes)
    add("combine", "moekit", lambda r, v: r[2].combine(v[1], r[1], v[3]), combine_bytes)
    add("combine", "torch eager", lambda r, v: torch_combine(v[4], r[1], r[3], T), combine_bytes)
    cc = tb.try_compile(torch_combine) if not args.no_compile else None
    if cc is not None:
        try:
            torch.testing.assert_close(cc(ref_xp, weights, order, T), ref_y, atol=1e-2, rtol=1e-2)
        except Exception as e:  # pragma: no cover
            print("torch.compile combine failed: %s" % e, file=sys.stderr)
            cc = None
    add("combine", "torch.compile", (lambda r, v: cc(v[4], r[1], r[3], T)) if cc else None, combine_bytes)
    del xp, row_w, y, ref_xp, ref_y, m, routes, moves
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON result path (e.g. bench/results/tokens-h100.json)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = ap.parse_args()

    fns = api()
    copy_bw = tb.copy_bandwidth()
    print("device: %s, copy bandwidth %.0f GB/s (read + write)" % (torch.cuda.get_device_name(0), copy_bw / 1e9))
    rows = []
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit("unknown shape %r (known: %s)" % (name, ", ".join(SHAPES)))
        rows += run_shape(name, SHAPES[name], fns, copy_bw, args)
    printable = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    tb.print_table(printable, ["shape", "op", "impl", "median_us", "floor_us", "fraction_of_floor"])
    if args.out:
        result = tb.header("tokens compare_torch")
        result.update(copy_bandwidth_gbps=copy_bw / 1e9, dtype="bf16",
                      floor="each input read once and each output written once over the copy bandwidth",
                      shapes={k: SHAPES[k] for k in args.shapes.split(",")}, results=rows)
        tb.write_json(args.out, result)
        print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
