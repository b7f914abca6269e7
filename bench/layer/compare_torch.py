#!/usr/bin/env python3
"""The whole MoE layer, moekit next to the PyTorch composition, on the same weights, in the same run.

For each shape, forward and forward + backward (aux-loss term included, the router weight trained):
  moekit   moekit_layer_forward / moekit_layer_backward through ctypes on torch tensors (one call each)
  torch    the NeMo-style composition in eager PyTorch: F.linear router projection, fp32 scores,
           group-limited top-k, gather / normalise / scale, aux loss from bincount and masked sums,
           stable argsort permutation with the host-read row count (as NeMo's boolean filtering
           does), torch._grouped_mm experts with the weighted SwiGLU in fp32 rounded once, index_add
           combine in fp32, the shared expert as nn.Linear layers; autograd for the backward.
moekit is checked against the composition first (y on the tokens both route the same way, dx and
every weight gradient, relative norm), with the composition fed moekit's logits so that rounding
of the projection cannot flip a selection. The bar of issue 6: moekit forward + backward at least 2x
faster than the composition's. TFLOP/s count the GEMMs (projection, experts, shared expert; the
backward twice the forward's).

    python3 bench/layer/compare_torch.py --out=bench/results/layer-torch-h100.json
    python3 bench/layer/compare_torch.py --shapes=qwen3-30b --repeats=20

The library is $MOEKIT_LIB, else build/libmoekit.so under the repository root.
"""
import argparse
import ctypes
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
import torchbench as tb  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# dsv3-ep8: DeepSeek-V3 widths, the 32 experts one rank of EP8 owns (all local), groups scaled to 8 of 4.
SHAPES = {
    "dsv3-ep8": dict(tokens=8192, hidden=7168, inter=2048, experts=32, top_k=8, score="sigmoid", groups=8,
                     groups_kept=4, normalize=True, route_scale=2.5, correction_bias=True, shared_inter=2048,
                     aux_coeff=0.0),
    "qwen3-30b": dict(tokens=16384, hidden=2048, inter=768, experts=128, top_k=8, score="softmax", groups=1,
                      groups_kept=1, normalize=True, route_scale=1.0, correction_bias=False, shared_inter=0,
                      aux_coeff=1e-3),
}

P = ctypes.POINTER
c_void_p, c_int32, c_int64, c_size_t, c_float = tb.c_void_p, tb.c_int32, tb.c_int64, tb.c_size_t, tb.c_float


class RouterConfig(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("num_experts", c_int32), ("top_k", c_int32), ("score_func", c_int32),
                ("softmax_order", c_int32), ("num_groups", c_int32), ("num_groups_kept", c_int32),
                ("group_score", c_int32), ("group_score_topn", c_int32), ("group_mask", c_int32),
                ("normalize", c_int32), ("weights_use_bias", c_int32), ("accumulate_load", c_int32),
                ("route_scale", c_float)]


class ExpertsConfig(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("num_experts", c_int32), ("hidden", c_int32), ("inter", c_int32),
                ("dtype", c_int32), ("activation", c_int32), ("gate_up_layout", c_int32),
                ("weight_after_down", c_int32), ("act_alpha", c_float), ("act_limit", c_float)]


class MlpConfig(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("hidden", c_int32), ("inter", c_int32), ("dtype", c_int32),
                ("activation", c_int32), ("gate_up_layout", c_int32), ("weight_layout", c_int32),
                ("act_alpha", c_float), ("act_limit", c_float)]


class LayerConfig(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("hidden", c_int32), ("dtype", c_int32), ("router", P(RouterConfig)),
                ("experts", P(ExpertsConfig)), ("shared", P(MlpConfig)), ("shared_gate", c_int32),
                ("router_bias", c_int32), ("expert_bias", c_int32), ("shared_bias", c_int32),
                ("router_fp32", c_int32), ("alignment", c_int32), ("capacity", c_int32), ("drop_policy", c_int32),
                ("recompute", c_int32), ("expert_parallel", c_void_p)]


PARAM_NAMES = ["router_weight", "router_bias", "correction_bias", "w_gate_up", "b_gate_up", "w_down", "b_down",
               "shared_w_gate_up", "shared_b_gate_up", "shared_w_down", "shared_b_down", "shared_gate_weight"]
GRAD_NAMES = [n for n in PARAM_NAMES if n != "correction_bias"]


class LayerParams(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t)] + [(n, c_void_p) for n in PARAM_NAMES]


class LayerGrads(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t)] + [(n, c_void_p) for n in GRAD_NAMES]


class SavedView(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("max_rows", c_int64), ("logits_row_stride", c_int64),
                ("logits_dtype", c_int32)] + [(n, c_void_p) for n in [
                    "logits", "weights", "indices", "expert_load", "aux_score_sum", "aux_token_count",
                    "expert_counts", "expert_offsets", "row_of_slot", "slot_of_row", "plan_totals", "expert_u",
                    "shared_u", "shared_gate_logit", "shared_out"]]


def api():
    v = c_void_p
    return dict(
        router_init=tb.declare("moekit_router_config_init", [P(RouterConfig), c_size_t]),
        experts_init=tb.declare("moekit_experts_config_init", [P(ExpertsConfig), c_size_t]),
        mlp_init=tb.declare("moekit_mlp_config_init", [P(MlpConfig), c_size_t]),
        layer_init=tb.declare("moekit_layer_config_init", [P(LayerConfig), c_size_t]),
        params_init=tb.declare("moekit_layer_params_init", [P(LayerParams), c_size_t]),
        grads_init=tb.declare("moekit_layer_grads_init", [P(LayerGrads), c_size_t]),
        create=tb.declare("moekit_layer_create", [P(LayerConfig), P(c_void_p)]),
        destroy=tb.declare("moekit_layer_destroy", [v]),
        saved_size=tb.declare("moekit_layer_saved_size", [P(LayerConfig), c_int64, P(c_size_t)]),
        ws_size=tb.declare("moekit_layer_workspace_size", [P(LayerConfig), c_int64, P(c_size_t), P(c_size_t)]),
        view=tb.declare("moekit_layer_saved_view", [P(LayerConfig), c_int64, v, c_size_t, P(SavedView)]),
        forward=tb.declare("moekit_layer_forward", [v, c_int64, v, v, P(LayerParams), v, v, v, v, c_size_t, v,
                                                    c_size_t, v]),
        backward=tb.declare("moekit_layer_backward", [v, c_int64, v, v, P(LayerParams), v, c_size_t, v, c_float, v,
                                                      P(LayerGrads), v, c_size_t, v]),
    )


class MoekitLayer:
    """One moekit layer over torch tensors: configs, buffers and the two calls."""

    def __init__(self, fns, s, t):
        self.f, self.s, self.T = fns, s, s["tokens"]
        self.router, self.experts, self.mlp, self.cfg = RouterConfig(), ExpertsConfig(), MlpConfig(), LayerConfig()
        tb.check(fns["router_init"](ctypes.byref(self.router), ctypes.sizeof(RouterConfig)))
        tb.check(fns["experts_init"](ctypes.byref(self.experts), ctypes.sizeof(ExpertsConfig)))
        tb.check(fns["mlp_init"](ctypes.byref(self.mlp), ctypes.sizeof(MlpConfig)))
        tb.check(fns["layer_init"](ctypes.byref(self.cfg), ctypes.sizeof(LayerConfig)))
        r = self.router
        r.num_experts, r.top_k = s["experts"], s["top_k"]
        r.score_func = 1 if s["score"] == "sigmoid" else 0
        r.num_groups, r.num_groups_kept = s["groups"], s["groups_kept"]
        r.normalize, r.route_scale = int(s["normalize"]), s["route_scale"]
        e = self.experts
        e.num_experts, e.hidden, e.inter, e.dtype = s["experts"], s["hidden"], s["inter"], tb.DTYPE[torch.bfloat16]
        c = self.cfg
        c.hidden, c.dtype = s["hidden"], tb.DTYPE[torch.bfloat16]
        c.router, c.experts = ctypes.pointer(r), ctypes.pointer(e)
        if s["shared_inter"]:
            m = self.mlp
            m.hidden, m.inter, m.dtype, m.weight_layout = s["hidden"], s["shared_inter"], tb.DTYPE[torch.bfloat16], 1
            c.shared = ctypes.pointer(m)
        self.handle = c_void_p()
        tb.check(fns["create"](ctypes.byref(c), ctypes.byref(self.handle)))
        sb, fb, bb = c_size_t(), c_size_t(), c_size_t()
        tb.check(fns["saved_size"](ctypes.byref(c), self.T, ctypes.byref(sb)))
        tb.check(fns["ws_size"](ctypes.byref(c), self.T, ctypes.byref(fb), ctypes.byref(bb)))
        self.saved = torch.empty(sb.value, dtype=torch.uint8, device="cuda")
        self.ws = torch.empty(max(fb.value, bb.value, 1), dtype=torch.uint8, device="cuda")
        self.params = LayerParams()
        tb.check(fns["params_init"](ctypes.byref(self.params), ctypes.sizeof(LayerParams)))
        self.p = t  # keeps the tensors alive
        self.params.router_weight = t["router_weight"].data_ptr()
        if t.get("correction_bias") is not None:
            self.params.correction_bias = t["correction_bias"].data_ptr()
        self.params.w_gate_up = t["w_gate_up"].data_ptr()
        self.params.w_down = t["w_down"].data_ptr()
        if s["shared_inter"]:
            self.params.shared_w_gate_up = t["shared_w_gate_up"].data_ptr()
            self.params.shared_w_down = t["shared_w_down"].data_ptr()
        self.g = {n: torch.empty_like(t[n]) for n in ["router_weight", "w_gate_up", "w_down"] +
                  (["shared_w_gate_up", "shared_w_down"] if s["shared_inter"] else [])}
        self.grads = LayerGrads()
        tb.check(fns["grads_init"](ctypes.byref(self.grads), ctypes.sizeof(LayerGrads)))
        for n, g in self.g.items():
            setattr(self.grads, n, g.data_ptr())
        self.y = torch.empty_like(t["x"])
        self.dx = torch.empty_like(t["x"])
        self.aux = torch.empty(1, dtype=torch.float32, device="cuda")

    def forward(self):
        t = self.p
        tb.check(self.f["forward"](self.handle, self.T, tb.ptr(t["x"]), tb.ptr(t["mask"]), ctypes.byref(self.params),
                                   tb.ptr(self.y), None, tb.ptr(self.aux), tb.ptr(self.saved), self.saved.numel(),
                                   tb.ptr(self.ws), self.ws.numel(), tb.stream_ptr()))

    def backward(self, dy):
        tb.check(self.f["backward"](self.handle, self.T, tb.ptr(self.p["x"]), tb.ptr(self.p["mask"]),
                                    ctypes.byref(self.params), tb.ptr(self.saved), self.saved.numel(), tb.ptr(dy),
                                    float(self.s["aux_coeff"]), tb.ptr(self.dx), ctypes.byref(self.grads),
                                    tb.ptr(self.ws), self.ws.numel(), tb.stream_ptr()))

    def view(self):
        v = SavedView()
        v.struct_size = ctypes.sizeof(SavedView)
        tb.check(self.f["view"](ctypes.byref(self.cfg), self.T, tb.ptr(self.saved), self.saved.numel(),
                                ctypes.byref(v)))
        return v

    def logits(self):
        """The saved router logits [T, E] (bf16) as a torch tensor (a copy)."""
        v = self.view()
        E, T = self.s["experts"], self.T
        off = v.logits - self.saved.data_ptr()
        raw = self.saved[off:off + T * v.logits_row_stride * 2].view(torch.bfloat16).view(T, v.logits_row_stride)
        return raw[:, :E].clone()

    def indices(self):
        v = self.view()
        off = v.indices - self.saved.data_ptr()
        return self.saved[off:off + self.T * self.s["top_k"] * 4].view(torch.int32).view(self.T, -1).clone()

    def close(self):
        self.f["destroy"](self.handle)


def top(values, k, stable):
    """Indices of the k largest values per row: torch.topk (as NeMo), or with ties to the lower index
    (moekit's rule; used when checking, where an arbitrary tie order would route tokens apart)."""
    if not stable:
        return values.topk(k, dim=-1).indices
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def torch_layer(s, t, logits_override=None, stable=False):
    """The NeMo-style composition. Returns (y, aux, indices)."""
    T, E, K, H = s["tokens"], s["experts"], s["top_k"], s["hidden"]
    x, mask = t["x"], t["mask"].bool()
    logits = F.linear(x, t["router_weight"]) if logits_override is None else logits_override
    z = logits.float()
    scores = torch.sigmoid(z) if s["score"] == "sigmoid" else torch.softmax(z, dim=-1)
    sel = scores + t["correction_bias"] if t.get("correction_bias") is not None else scores
    if s["groups"] > 1:
        G = s["groups"]
        gs = sel.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
        keep = top(gs, s["groups_kept"], stable)
        gmask = torch.zeros(T, G, device=x.device, dtype=sel.dtype).scatter_(1, keep, 1.0)
        sel = sel * gmask.repeat_interleave(E // G, dim=1)  # NeMo multiplies dropped groups by 0
    idx = top(sel, K, stable)
    w = scores.gather(1, idx)
    p = scores
    if s["normalize"] and K > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
        p = p / (p.sum(-1, keepdim=True) + 1e-20)
    w = w * s["route_scale"]
    m = mask.float()
    with torch.no_grad():
        load = torch.bincount(idx[mask].flatten(), minlength=E).float()
    n = m.sum().clamp_min(1.0)
    aux = ((load * E / (K * n)) * ((p * m[:, None]).sum(0) / n)).sum()
    # permute: padding tokens get the id E and sort past every expert, then drop (a host read, as
    # NeMo's boolean filtering needs)
    flat = idx.masked_fill(~mask[:, None], E).flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E + 1)[:E]
    ends = counts.cumsum(0).to(torch.int32)
    rows = int(ends[-1])
    order = order[:rows]
    token = order // K
    xp = x[token]
    pw = w.flatten()[order]
    u = torch._grouped_mm(xp, t["w_gate_up"], offs=ends)
    g, v = u.chunk(2, dim=-1)
    h = (F.silu(g.float()) * v.float() * pw[:, None]).to(x.dtype)
    out = torch._grouped_mm(h, t["w_down"], offs=ends)
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device).index_add(0, token, out.float()).to(x.dtype)
    if s["shared_inter"]:
        I = s["shared_inter"]
        wgu = t["shared_w_gate_up"]
        hs = F.silu(F.linear(x, wgu[:I])) * F.linear(x, wgu[I:])
        y = y + F.linear(hs, t["shared_w_down"])
    return y, aux, idx


def make_tensors(s, seed):
    torch.manual_seed(seed)
    T, H, E, I = s["tokens"], s["hidden"], s["experts"], s["inter"]
    dt = torch.bfloat16
    t = dict(
        x=torch.randn(T, H, device="cuda", dtype=dt),
        mask=(torch.rand(T, device="cuda") > 0.05).to(torch.uint8),
        router_weight=(torch.randn(E, H, device="cuda") / H ** 0.5).to(dt),
        w_gate_up=(torch.randn(E, H, 2 * I, device="cuda") / H ** 0.5).to(dt),
        w_down=(torch.randn(E, I, H, device="cuda") / I ** 0.5).to(dt),
    )
    if s["correction_bias"]:
        t["correction_bias"] = (torch.rand(E, device="cuda") - 0.5) * 0.2
    if s["shared_inter"]:
        Is = s["shared_inter"]
        t["shared_w_gate_up"] = (torch.randn(2 * Is, H, device="cuda") / H ** 0.5).to(dt)
        t["shared_w_down"] = (torch.randn(H, Is, device="cuda") / Is ** 0.5).to(dt)
    return t


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def gemm_flops(s, rows):
    T, H, E, I, Is = s["tokens"], s["hidden"], s["experts"], s["inter"], s["shared_inter"]
    fwd = 2.0 * T * H * E + 2.0 * rows * H * 2 * I + 2.0 * rows * I * H + 2.0 * T * H * 2 * Is + 2.0 * T * Is * H
    return fwd, 3 * fwd


def run(name, s, fns, args):
    t = make_tensors(s, args.seed)
    dy = torch.randn_like(t["x"])
    m = MoekitLayer(fns, s, t)
    m.forward()
    m.backward(dy)
    torch.cuda.synchronize()

    # ---- check against the composition, routed on moekit's logits ----
    trainable = ["x", "router_weight", "w_gate_up", "w_down"] + (
        ["shared_w_gate_up", "shared_w_down"] if s["shared_inter"] else [])
    leaves = {k: (v.detach().clone().requires_grad_(k in trainable) if torch.is_tensor(v) else v)
              for k, v in t.items()}
    # The composition's own projection, with moekit's rounding of it substituted (a straight-through
    # swap keeps the router weight's gradient flowing through F.linear).
    own = F.linear(leaves["x"], leaves["router_weight"]).float()
    logits = own + (m.logits().float() - own).detach()  # exact in fp32: both are bf16 values
    y_ref, aux_ref, idx_ref = torch_layer(s, leaves, logits_override=logits, stable=True)
    ((y_ref.float() * dy.float()).sum() + s["aux_coeff"] * aux_ref).backward()
    same = (m.indices().sort(dim=-1).values == idx_ref.to(torch.int32).sort(dim=-1).values).all(dim=-1)
    frac = same.float().mean().item()
    if frac < 0.999:
        raise SystemExit("%s: moekit and the composition route %.2f%% of the tokens differently"
                         % (name, 100 * (1 - frac)))
    checks = [("y (tokens routed alike)", m.y[same], y_ref.detach()[same], 2e-2), ("grad_x", m.dx, leaves["x"].grad, 3e-2)]
    for n in ["router_weight", "w_gate_up", "w_down"] + (
            ["shared_w_gate_up", "shared_w_down"] if s["shared_inter"] else []):
        checks.append(("grad " + n, m.g[n], leaves[n].grad, 3e-2))
    for what, got, want, tol in checks:
        err = rel_err(got, want)
        print("  check %-28s relative error %.3g (tolerance %.0e)" % (what, err, tol))
        if not err < tol:
            raise SystemExit("%s: moekit %s differs from the PyTorch composition by %.3g" % (name, what, err))
    del leaves, y_ref, own, logits

    v = m.view()
    totals = m.saved[v.plan_totals - m.saved.data_ptr():][:12].view(torch.int32)
    rows = int(totals[0])
    fwd_flops, all_flops = gemm_flops(s, rows)
    reps = dict(warmup=args.warmup, repeats=args.repeats)
    results = []

    # Both implementations of a pass are timed in interleaved rounds (tb.time_interleaved: the
    # same thermal history; timed one after the other, position alone moved results 5-19 %).
    jobs = {"fwd": [], "fwd+bwd": []}

    def fwd_torch(i):
        with torch.no_grad():
            torch_layer(s, t)

    jobs["fwd"] += [("moekit", lambda i: m.forward()), ("torch composition", fwd_torch)]
    leaves = {k: (v.detach().clone().requires_grad_(k in trainable) if torch.is_tensor(v) else v)
              for k, v in t.items()}

    def step():
        for k in trainable:
            leaves[k].grad = None
        y, aux, _ = torch_layer(s, leaves)
        ((y.float() * dy.float()).sum() + s["aux_coeff"] * aux).backward()

    jobs["fwd+bwd"] += [("moekit", lambda i: (m.forward(), m.backward(dy))), ("torch composition", lambda i: step())]
    for passes, flops in (("fwd", fwd_flops), ("fwd+bwd", all_flops)):
        times = tb.time_interleaved(jobs[passes], **reps)
        for impl, _ in jobs[passes]:
            r = times[impl]
            results.append(dict(shape=name, impl=impl, passes=passes, median_us=r["median_us"], min_us=r["min_us"],
                                tflops=flops / (r["median_us"] * 1e-6) / 1e12, timing=r["timing"]))
    m.close()
    mk = next(r for r in results if r["impl"] == "moekit" and r["passes"] == "fwd+bwd")
    pt = next(r for r in results if r["impl"] != "moekit" and r["passes"] == "fwd+bwd")
    speedup = pt["median_us"] / mk["median_us"]
    for r in results:
        r["speedup_vs_torch"] = next(q["median_us"] for q in results if q["impl"] != "moekit" and
                                     q["passes"] == r["passes"]) / r["median_us"]
    print("%s: moekit forward + backward %.2f ms, the PyTorch composition %.2f ms: %.2fx -> bar 2x %s"
          % (name, mk["median_us"] / 1e3, pt["median_us"] / 1e3, speedup, "met" if speedup >= 2 else "MISSED"))
    return results, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON result path (e.g. bench/results/layer-torch-h100.json)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=None, help="override T for every shape")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    fns = api()
    print("device: %s" % torch.cuda.get_device_name(0))
    rows, routed = [], {}
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit("unknown shape %r (known: %s)" % (name, ", ".join(SHAPES)))
        s = dict(SHAPES[name])
        if args.tokens:
            s["tokens"] = args.tokens
        r, n = run(name, s, fns, args)
        rows += r
        routed[name] = n
    tb.print_table(rows, ["shape", "impl", "passes", "median_us", "tflops", "speedup_vs_torch"])
    if args.out:
        result = tb.header("layer compare_torch")
        result.update(dtype="bf16", shapes={k: SHAPES[k] for k in args.shapes.split(",")}, routed_rows=routed,
                      flops="GEMMs: projection 2TEH, experts 2R H 2I + 2R I H, shared 2T H 2I_s + 2T I_s H; "
                            "forward+backward 3x forward",
                      bar="moekit forward+backward >= 2x faster than the PyTorch composition's", results=rows)
        tb.write_json(args.out, result)
        print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
