#!/usr/bin/env python3
"""moekit's router next to the same semantics in PyTorch, on the same tensors, in the same run.

For each preset of moekit-bench-router (bf16 logits, T = 4096 and 32768): moekit's forward
(weights, indices and the preset's statistics: load, aux scores S and count N) and backward
(dL/dlogits from dL/dweights plus the aux-loss term) through ctypes on torch tensors, against

  PyTorch eager:  fp32 scores (softmax / sigmoid / sqrt(softplus)), + correction bias, group
                  scores, masked_fill of dropped groups, topk, gather, normalise, scale; loads by
                  bincount, S and N by sums; backward by autograd;
  torch.compile:  the same function compiled (forward; forward + backward through AOTAutograd).

moekit is checked against PyTorch first, on the benchmark tensors themselves: for every token the
selection values PyTorch computes at moekit's indices must equal (within fp32 rounding) those at
PyTorch's own indices -- index sets may differ only where scores tie or nearly tie in fp32, and
such tokens are counted and reported; moekit's weights must match PyTorch's weights gathered at
moekit's indices; S and N must match; moekit's gradient must match autograd's for moekit's
indices. Timing rotates over copies of the logits that together exceed the L2 twice (same copies
for every implementation). Two times per call: median_us, CUDA events around each call (when the
host is slower than the device, as eager PyTorch is, this includes the host's part: what a loop
that waits on it sees), and gpu_median_us, the same with a spin kernel queued first so the events
see only the device's work (what a step pays when the host runs ahead); speedups from both. The floor is each input read once and each output written once over
the measured device-to-device copy bandwidth:
  forward   T E 2 + T K 8 bytes;   backward   2 T E 2 + T K 8 bytes.

    python3 bench/router/compare_torch.py --out=bench/results/router-h100.json
    python3 bench/router/compare_torch.py --presets=dsv3,qwen3 --tokens=32768
    python3 bench/router/compare_torch.py --presets=mixtral --experts=2 --top-k=2 --no-compile

--experts / --top-k override the chosen presets' E and K (checked like the library checks them);
any E the library accepts works, down to a single expert.

The library is $MOEKIT_LIB, else build/libmoekit.so under the repository root.
"""
import argparse
import ctypes
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
import torchbench as tb  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SOFTMAX, SIGMOID, SQRT_SOFTPLUS = 0, 1, 2
THEN_TOPK, TOPK_THEN = 0, 1
GS_AUTO, GS_MAX, GS_TOP2, GS_TOPN = 0, 1, 2, 3

# name: (E, K, score, order, groups, kept, normalize, scale, bias, stats)
# stats: "load" = load accumulated for the bias update, "aux" = load + S + N and the aux gradient
PRESETS = {
    "dsv3": dict(E=256, K=8, score=SIGMOID, order=THEN_TOPK, G=8, Gk=4, normalize=1, scale=2.5, bias=True, stats="load"),
    "qwen3": dict(E=128, K=8, score=SOFTMAX, order=THEN_TOPK, G=1, Gk=1, normalize=1, scale=1.0, bias=False, stats="aux"),
    "gptoss": dict(E=128, K=4, score=SOFTMAX, order=TOPK_THEN, G=1, Gk=1, normalize=0, scale=1.0, bias=False, stats="aux"),
    "mixtral": dict(E=8, K=2, score=SOFTMAX, order=THEN_TOPK, G=1, Gk=1, normalize=1, scale=1.0, bias=False, stats="aux"),
    "qwen3next": dict(E=512, K=10, score=SOFTMAX, order=THEN_TOPK, G=1, Gk=1, normalize=1, scale=1.0, bias=False, stats="aux"),
    "e2048": dict(E=2048, K=32, score=SIGMOID, order=THEN_TOPK, G=1, Gk=1, normalize=1, scale=1.0, bias=True, stats="load"),
}
AUX_COEFF = 1e-3


class RouterConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t)] + [
        (n, ctypes.c_int32) for n in ("num_experts", "top_k", "score_func", "softmax_order", "num_groups",
                                      "num_groups_kept", "group_score", "group_score_topn", "group_mask",
                                      "normalize", "weights_use_bias", "accumulate_load")
    ] + [("route_scale", ctypes.c_float)]


P = ctypes.POINTER
c_void_p, c_int32, c_int64, c_size_t, c_float = tb.c_void_p, tb.c_int32, tb.c_int64, tb.c_size_t, tb.c_float


def api():
    return dict(
        init=tb.declare("moekit_router_config_init", [P(RouterConfig), c_size_t]),
        ws=tb.declare("moekit_router_forward_workspace_size", [P(RouterConfig), c_int64, P(c_size_t)]),
        forward=tb.declare("moekit_router_forward", [P(RouterConfig), c_int64, c_int32, c_void_p, c_int64, c_void_p,
                                                     c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                                                     c_void_p, c_size_t, c_void_p]),
        backward=tb.declare("moekit_router_backward", [P(RouterConfig), c_int64, c_int32, c_void_p, c_int64, c_void_p,
                                                       c_void_p, c_void_p, c_void_p, c_float, c_void_p, c_void_p,
                                                       c_void_p, c_int64, c_void_p, c_size_t, c_void_p]),
    )


class Moekit:
    def __init__(self, fns, p, tokens):
        self.f, self.p, self.T = fns, p, tokens
        self.cfg = RouterConfig()
        tb.check(self.f["init"](ctypes.byref(self.cfg), ctypes.sizeof(RouterConfig)))
        c = self.cfg
        c.num_experts, c.top_k, c.score_func, c.softmax_order = p["E"], p["K"], p["score"], p["order"]
        c.num_groups, c.num_groups_kept, c.normalize, c.route_scale = p["G"], p["Gk"], p["normalize"], p["scale"]
        c.accumulate_load = 1 if p["stats"] == "load" else 0
        n = c_size_t()
        tb.check(self.f["ws"](ctypes.byref(c), tokens, ctypes.byref(n)))
        raw = torch.empty(n.value + 256, dtype=torch.uint8, device="cuda")
        off = (-raw.data_ptr()) % 256
        self._raw, self.ws, self.ws_bytes = raw, raw[off:], n.value

    def forward_args(self, z, bias, w, idx, load, S, N):
        """The argument tuple of one forward call (converted once; the timed loop only calls)."""
        return (ctypes.byref(self.cfg), self.T, tb.DTYPE[z.dtype], tb.ptr(z), z.stride(0), tb.ptr(bias), None,
                tb.ptr(w), tb.ptr(idx), tb.ptr(load), tb.ptr(S), tb.ptr(N),
                tb.ptr(self.ws) if self.ws_bytes else None, self.ws_bytes, tb.stream_ptr())

    def backward_args(self, z, bias, idx, gw, coeff, load, N, grad):
        return (ctypes.byref(self.cfg), self.T, tb.DTYPE[z.dtype], tb.ptr(z), z.stride(0), tb.ptr(bias), None,
                tb.ptr(idx), tb.ptr(gw), coeff, tb.ptr(load) if coeff else None, tb.ptr(N) if coeff else None,
                tb.ptr(grad), grad.stride(0), None, 0, tb.stream_ptr())

    def call_forward(self, args):
        status = self.f["forward"](*args)
        if status:
            tb.check(status)

    def call_backward(self, args):
        status = self.f["backward"](*args)
        if status:
            tb.check(status)

    def forward(self, z, bias, w, idx, load, S, N):
        self.call_forward(self.forward_args(z, bias, w, idx, load, S, N))

    def backward(self, z, bias, idx, gw, coeff, load, N, grad):
        self.call_backward(self.backward_args(z, bias, idx, gw, coeff, load, N, grad))


# ---- the same semantics in PyTorch ----------------------------------------------------------------

def scores(p, z32):
    if p["score"] == SOFTMAX:
        return torch.softmax(z32, dim=-1)
    if p["score"] == SIGMOID:
        return torch.sigmoid(z32)
    return torch.sqrt(F.softplus(z32))


def group_scores(grouped, bias):
    """AUTO: the sum of a group's top two with a bias (its one value in a group of one), else its max."""
    if bias is None:
        return grouped.amax(-1)
    return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)


def selection_values(p, z32, s, bias):
    sel = (z32 if p["order"] == TOPK_THEN and p["score"] == SOFTMAX else s)
    if bias is not None:
        sel = sel + bias
    sel = torch.nan_to_num(sel, nan=-math.inf)
    G = p["G"]
    if G > 1:
        T, E = sel.shape
        grouped = sel.view(T, G, E // G)
        gs = group_scores(grouped, bias)
        keep = torch.zeros(T, G, dtype=torch.bool, device=sel.device)
        keep.scatter_(1, gs.topk(p["Gk"], dim=-1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // G, dim=1), 0.0)
    return sel


def weights_at(p, z32, s, idx):
    if p["order"] == TOPK_THEN and p["score"] == SOFTMAX:
        w = torch.softmax(z32.gather(1, idx), dim=-1)
    else:
        w = s.gather(1, idx)
    if p["normalize"] and p["K"] > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * p["scale"]


def aux_scores(p, z32, s):
    q = torch.softmax(z32, dim=-1) if p["score"] == SOFTMAX else s
    if p["normalize"] and p["K"] > 1:
        q = q / (q.sum(-1, keepdim=True) + 1e-20)
    return q


def torch_forward(p, z, bias, load):
    """Weights, indices (and the statistics of the preset); load is added to (accumulate) or the
    new load is returned with S and N (aux)."""
    z32 = z.float()
    s = scores(p, z32)
    idx = selection_values(p, z32, s, bias).topk(p["K"], dim=-1).indices
    w = weights_at(p, z32, s, idx)
    counts = torch.bincount(idx.reshape(-1), minlength=p["E"]).to(torch.int32)
    if p["stats"] == "load":
        load += counts
        return w, idx
    S = aux_scores(p, z32, s).sum(0)
    N = torch.tensor([z.shape[0]], dtype=torch.int32, device=z.device)
    return w, idx, counts, S, N


def torch_objective(p, z, bias, idx, gw, load, N, dtype=torch.float32):
    """sum(gw * w) + coeff * aux with the routing (idx) and f = L E / (K N') held fixed."""
    zc = z.to(dtype)
    s = scores(p, zc)
    J = (weights_at(p, zc, s, idx) * gw.to(dtype)).sum()
    if p["stats"] == "aux":
        n = max(int(N), 1)
        f = load.to(dtype) * p["E"] / (p["K"] * n)
        J = J + AUX_COEFF * (f * aux_scores(p, zc, s).sum(0) / n).sum()
    return J


def torch_forward_backward(p, z, bias, gw, load):
    """Forward (own routing) then autograd: what a PyTorch training step does."""
    zz = z.detach().requires_grad_(True)
    z32 = zz.float()
    s = scores(p, z32)
    idx = selection_values(p, z32, s, bias).topk(p["K"], dim=-1).indices
    J = (weights_at(p, z32, s, idx) * gw).sum()
    if p["stats"] == "aux":
        counts = torch.bincount(idx.reshape(-1), minlength=p["E"])
        n = z.shape[0]
        f = counts.float() * p["E"] / (p["K"] * n)
        J = J + AUX_COEFF * (f * aux_scores(p, z32, s).sum(0) / n).sum()
    return torch.autograd.grad(J, zz)[0]


# ---- timing -----------------------------------------------------------------------------------------

def time_gpu_us(fn, warmup=10, repeats=50):
    """Device time of fn(i): a spin kernel queued before the start event keeps the device busy
    while the host enqueues fn's work, so the events see only its kernels (tb.time_us: events
    around fn alone, which includes the host's part when the host is the slower one)."""
    if not hasattr(torch.cuda, "_sleep"):  # a private helper; without it there is no device time
        return {"median_us": float("nan"), "min_us": float("nan"), "max_us": float("nan"), "repeats": 0}
    # ~5 ms of cycles ahead of each start: longer than any call's host time here
    us = tb.event_times_us(fn, warmup, repeats, before_start=lambda: torch.cuda._sleep(10_000_000))
    return {"median_us": us[len(us) // 2], "min_us": us[0], "max_us": us[-1], "repeats": repeats}


# ---- one preset -----------------------------------------------------------------------------------

def run(name, p, T, fns, copy_bw, args):
    torch.manual_seed(args.seed)
    E, K = p["E"], p["K"]
    dt = torch.bfloat16
    per_call = 2 * T * E * 2 + T * K * 16
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = max(2, min(2 * l2 // per_call + 1, (2 << 30) // per_call))
    zs = [(1.5 * torch.randn(T, E, device="cuda")).to(dt) for _ in range(copies)]
    bias = (torch.randint(-32, 33, (E,), device="cuda").float() / 64.0) if p["bias"] else None
    gw = torch.rand(T, K, device="cuda") * 2 - 1
    m = Moekit(fns, p, T)
    w = torch.empty(T, K, device="cuda")
    idx = torch.empty(T, K, device="cuda", dtype=torch.int32)
    load = torch.zeros(E, device="cuda", dtype=torch.int32)
    S = torch.empty(E, device="cuda")
    N = torch.empty(1, device="cuda", dtype=torch.int32)
    grad = torch.empty(T, E, device="cuda", dtype=dt)
    aux = p["stats"] == "aux"
    coeff = AUX_COEFF if aux else 0.0

    # ---- check against PyTorch on the benchmark tensors ----
    z = zs[0]
    load.zero_()
    m.forward(z, bias, w, idx, load, S if aux else None, N if aux else None)
    m.backward(z, bias, idx, gw, coeff, load, N, grad)
    torch.cuda.synchronize()
    z32 = z.float()
    s = scores(p, z32)
    sel = selection_values(p, z32, s, bias)
    top = sel.topk(min(K + 1, E), dim=-1)  # K = E: every expert is picked, no (K+1)-th to tie with
    t_idx = top.indices[:, :K]
    differ = (idx.long().sort(-1).values != t_idx.sort(-1).values).any(-1)
    # A different expert set is fine only where PyTorch's own values tie or nearly tie (fp32) at
    # the K-th expert, or at the G'-th group.
    def near(a, b):
        return (a - b).abs() <= 1e-5 * (1 + a.abs())
    if K < E:
        tie = near(top.values[:, K - 1], top.values[:, K])
    else:
        tie = torch.zeros(T, dtype=torch.bool, device=z.device)
    if p["G"] > 1 and p["Gk"] < p["G"]:
        sel0 = torch.nan_to_num((s if not (p["order"] == TOPK_THEN and p["score"] == SOFTMAX) else z32)
                                + (bias if bias is not None else 0.0), nan=-math.inf)
        grouped = sel0.view(T, p["G"], E // p["G"])
        gs = group_scores(grouped, bias)
        g = gs.topk(p["Gk"] + 1, dim=-1).values
        tie |= near(g[:, p["Gk"] - 1], g[:, p["Gk"]])
    bad_rows = int((differ & ~tie).sum())
    if bad_rows:
        raise SystemExit("%s T=%d: %d tokens where moekit's experts differ from PyTorch's top-k without a tie"
                         % (name, T, bad_rows))
    torch.testing.assert_close(w, weights_at(p, z32, s, idx.long()), rtol=1e-4, atol=1e-6)
    counts = torch.bincount(idx.long().reshape(-1), minlength=E).to(torch.int32)
    if not torch.equal(load, counts):
        raise SystemExit("%s T=%d: moekit's load is not the count of its own indices" % (name, T))
    if aux:
        torch.testing.assert_close(S, aux_scores(p, z32, s).sum(0), rtol=1e-4, atol=1e-3)
        if int(N) != T:
            raise SystemExit("%s T=%d: N = %d" % (name, T, int(N)))
    # Reference gradient by autograd in float64: PyTorch's own fp32 backward rounds like the
    # textbook order (eps |grad_weights| on every unpicked expert), which is no reference for
    # moekit's order. The allowance is bf16's (moekit rounds its fp32 result once) plus 1e-2 of the
    # row's largest entry; the CPU suite bounds moekit's fp32 error far below that for these inputs
    # ("backward error bound" in tests/router/router_cpu_test.cpp).
    zz = z.detach().double().requires_grad_(True)
    ref = torch.autograd.grad(torch_objective(p, zz, bias, idx.long(), gw, load, N, torch.float64), zz)[0]
    scale = ref.abs().amax(-1, keepdim=True)
    gerr = ((grad.double() - ref).abs() > 2e-2 * (ref.abs() + 0.5 * scale)).sum()
    if int(gerr):
        raise SystemExit("%s T=%d: %d gradient entries differ from autograd" % (name, T, int(gerr)))
    tie_rows = int(differ.sum())
    print("%s T=%d: checked against PyTorch (%d tokens pick different experts, all at fp32 ties or "
          "near-ties of PyTorch's own scores)" % (name, T, tie_rows))

    # ---- time ----
    rows = []
    reps = dict(warmup=args.warmup, repeats=args.repeats)
    fwd_bytes = T * E * 2 + T * K * 8
    bwd_bytes = 2 * T * E * 2 + T * K * 8
    tload = torch.zeros(E, device="cuda", dtype=torch.int32)

    # The argument tuples are built once per copy: the timed loop pays one ctypes call per moekit
    # call (Python's own overhead, not the library's; the library's host time is in
    # moekit-bench-router's "host us").
    fwd_args = [m.forward_args(zs[k], bias, w, idx, load, S if aux else None, N if aux else None)
                for k in range(copies)]
    bwd_args = [m.backward_args(zs[k], bias, idx, gw, coeff, load, N, grad) for k in range(copies)]

    def mk_fwd(i):
        m.call_forward(fwd_args[i % copies])

    def mk_bwd(i):
        m.call_backward(bwd_args[i % copies])

    def mk_both(i):
        mk_fwd(i)
        mk_bwd(i)

    def add(pass_, impl, fn, floor_bytes):
        t = tb.time_us(fn, **reps)
        g = time_gpu_us(fn, **reps)
        floor = floor_bytes / copy_bw * 1e6 if floor_bytes else None
        rows.append(dict(preset=name, tokens=T, pass_=pass_, impl=impl, median_us=t["median_us"], min_us=t["min_us"],
                         gpu_median_us=g["median_us"], floor_us=floor,
                         fraction_of_floor=(floor / t["median_us"]) if floor else None,
                         gpu_fraction_of_floor=(floor / g["median_us"]) if floor else None))

    add("forward", "moekit", mk_fwd, fwd_bytes)
    add("backward", "moekit", mk_bwd, bwd_bytes)
    add("fwd+bwd", "moekit", mk_both, fwd_bytes + bwd_bytes)
    add("forward", "torch eager", lambda i: torch_forward(p, zs[i % copies], bias, tload), fwd_bytes)
    add("fwd+bwd", "torch eager", lambda i: torch_forward_backward(p, zs[i % copies], bias, gw, tload),
        fwd_bytes + bwd_bytes)
    if not args.no_compile:
        cf = tb.try_compile(lambda zz: torch_forward(p, zz, bias, tload))
        cfb = tb.try_compile(lambda zz: torch_forward_backward(p, zz, bias, gw, tload))
        for label, fn, nbytes, pass_ in (("forward", cf, fwd_bytes, "forward"), ("fwd+bwd", cfb, fwd_bytes + bwd_bytes, "fwd+bwd")):
            if fn is None:
                continue
            try:
                fn(zs[0])
                add(pass_, "torch.compile", lambda i, fn=fn: fn(zs[i % copies]), nbytes)
            except Exception as e:  # pragma: no cover - depends on the machine
                print("torch.compile %s failed for %s: %s" % (label, name, e), file=sys.stderr)
    by = {(r["pass_"], r["impl"]): r for r in rows}
    for r in rows:
        for impl, key in (("torch eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile")):
            other = by.get((r["pass_"], impl))
            mine = r["impl"] == "moekit"
            r[key] = (other["median_us"] / r["median_us"]) if (other and mine) else None
            r["gpu_" + key] = (other["gpu_median_us"] / r["gpu_median_us"]) if (other and mine) else None
        r["tie_rows"] = tie_rows
    del zs
    torch.cuda.empty_cache()
    return rows


def with_overrides(name, preset, args):
    """The preset with --experts / --top-k applied, rejected here (before any GPU work) where the
    library would reject it."""
    p = dict(preset)
    if args.experts is not None:
        p["E"] = args.experts
    if args.top_k is not None:
        p["K"] = args.top_k
    E, K, G, Gk = p["E"], p["K"], p["G"], p["Gk"]
    if E < 1 or K < 1 or K > E or K > 32:
        raise SystemExit("%s: need 1 <= top_k <= min(num_experts, 32) (E = %d, K = %d)" % (name, E, K))
    if G > 1 and (E % G != 0 or Gk * (E // G) < K):
        raise SystemExit("%s: %d groups do not fit E = %d, K = %d; use a preset without groups" % (name, G, E, K))
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON result path (e.g. bench/results/router-h100.json)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated: " + ", ".join(PRESETS))
    ap.add_argument("--tokens", default="4096,32768")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--experts", type=int, default=None, help="override E of the chosen presets")
    ap.add_argument("--top-k", type=int, default=None, help="override K of the chosen presets")
    args = ap.parse_args()

    fns = api()
    copy_bw = tb.copy_bandwidth()
    print("device: %s, copy bandwidth %.0f GB/s (read + write)" % (torch.cuda.get_device_name(0), copy_bw / 1e9))
    rows = []
    chosen = {}
    for name in args.presets.split(","):
        if name not in PRESETS:
            raise SystemExit("unknown preset %r (known: %s)" % (name, ", ".join(PRESETS)))
        chosen[name] = with_overrides(name, PRESETS[name], args)
    for name, p in chosen.items():
        for T in (int(t) for t in args.tokens.split(",")):
            rows += run(name, p, T, fns, copy_bw, args)
    printable = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    tb.print_table(printable, ["preset", "tokens", "pass_", "impl", "median_us", "gpu_median_us", "floor_us",
                               "fraction_of_floor", "speedup_vs_eager", "speedup_vs_compile", "gpu_speedup_vs_eager"])
    if args.out:
        result = tb.header("router compare_torch")
        result.update(copy_bandwidth_gbps=copy_bw / 1e9, dtype="bf16", aux_coeff=AUX_COEFF,
                      floor="forward T E 2 + T K 8 bytes, backward 2 T E 2 + T K 8 bytes, over the copy bandwidth",
                      timing="median_us: CUDA events around each call (host time included when the host is "
                             "slower than the device); gpu_median_us: the same with a spin kernel queued "
                             "before each call (device time only); speedups from each",
                      presets=chosen, results=rows)
        tb.write_json(args.out, result)
        print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
