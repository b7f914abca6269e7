#!/usr/bin/env python3
"""moekit's grouped expert FFN next to the PyTorch way, on the same tensors, in the same run.

For each shape of issue 4 (bf16, SwiGLU, routing weight applied before the down projection), with
balanced and skewed group sizes (the same counts as moekit-bench-experts: proportional to u^3 with
u from a fixed-seed splitmix64 stream):
  moekit      moekit_experts_forward / _backward through ctypes on torch tensors
  grouped_mm  torch._grouped_mm (offsets = cumulative group ends, weights [E, K, N] for x @ W) with
              the activation as PyTorch ops: eager (F.silu in fp32, one cast, as NeMo's
              weighted SwiGLU) and with the activation under torch.compile; forward, and forward +
              backward through autograd
  loop        a per-expert matmul loop (host-read counts), forward and forward + backward
  moekit sm90 the same calls with config->gemm_path = MOEKIT_GEMM_PATH_SM90 (TMA + wgmma kernels),
              timed next to the default path when the device and the library can run it
              (compute capability 9.0, gpu_archs containing 90); --paths=auto skips it
moekit is checked against the grouped_mm composition first (outputs and every gradient, within
bf16 tolerance), on every path it times. TFLOP/s count 2 R H 2I + 2 R I H per forward and three times that per forward +
backward; "of dense" divides by the dense 8192^3 bf16 GEMM rate measured in the same run. The bar
of issue 4 is moekit forward >= 60 % of the best grouped_mm + activation forward on every row.

    python3 bench/experts/compare_torch.py --out=bench/results/experts-h100.json
    python3 bench/experts/compare_torch.py --shapes=qwen3-30b --dists=skewed --repeats=20

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

SHAPES = {
    "dsv3-ep8": dict(experts=32, hidden=7168, inter=2048, rows=32768),
    "qwen3-30b": dict(experts=128, hidden=2048, inter=768, rows=131072),
    "mixtral": dict(experts=8, hidden=4096, inter=14336, rows=16384),
    # Small batches, 32 rows per expert on average (the sm_90a path's 64-row tile class,
    # docs/experts.md "Tile per shape class"); not in the default set.
    "dsv3-ep8-r32": dict(experts=32, hidden=7168, inter=2048, rows=1024),
    "qwen3-30b-r32": dict(experts=128, hidden=2048, inter=768, rows=4096),
    "mixtral-r32": dict(experts=8, hidden=4096, inter=14336, rows=256),
}
DEFAULT_SHAPES = ("dsv3-ep8", "qwen3-30b", "mixtral")
MASK64 = (1 << 64) - 1


class ExpertsConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("num_experts", ctypes.c_int32), ("hidden", ctypes.c_int32),
                ("inter", ctypes.c_int32), ("dtype", ctypes.c_int32), ("activation", ctypes.c_int32),
                ("gate_up_layout", ctypes.c_int32), ("weight_after_down", ctypes.c_int32),
                ("act_alpha", ctypes.c_float), ("act_limit", ctypes.c_float), ("gemm_path", ctypes.c_int32)]


GEMM_PATHS = {"auto": 0, "sm80": 1, "sm90": 2}  # moekit_gemm_path_t
STATUS_UNSUPPORTED = 2


P = ctypes.POINTER
c_void_p, c_int32, c_int64, c_size_t = tb.c_void_p, tb.c_int32, tb.c_int64, tb.c_size_t


def api():
    v = c_void_p
    return dict(
        config_init=tb.declare("moekit_experts_config_init", [P(ExpertsConfig), c_size_t]),
        fwd_ws=tb.declare("moekit_experts_forward_workspace_size", [P(ExpertsConfig), c_int64, P(c_size_t)]),
        bwd_ws=tb.declare("moekit_experts_backward_workspace_size",
                          [P(ExpertsConfig), c_int64, c_int32, P(c_size_t)]),
        forward=tb.declare("moekit_experts_forward", [P(ExpertsConfig), c_int64, v, v, v, v, v, v, v, v, v, v,
                                                      c_size_t, v]),
        backward=tb.declare("moekit_experts_backward", [P(ExpertsConfig), c_int64, v, v, v, v, v, v, v, v, v, v,
                                                        v, v, v, v, v, v, c_size_t, v]),
    )


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def make_counts(experts, rows, skewed, seed):
    """The counts of moekit-bench-experts (bench_util.cpp expert_counts), bit for bit."""
    w = [1.0] * experts
    if skewed:
        u = [(splitmix64((seed + e) & MASK64) >> 11) * 2.0 ** -53 for e in range(experts)]
        w = [x * x * x for x in u]  # as the C++ tool: two multiplications, not pow()
    s = sum(w)
    counts = [int((rows * x / s) // 1) for x in w]
    e = 0
    while sum(counts) < rows:
        counts[e] += 1
        e = (e + 1) % experts
    return counts


class Moekit:
    """One grouped-FFN problem for moekit: config, workspaces and the two calls."""

    def __init__(self, fns, experts, hidden, inter, rows, gemm_path=0):
        self.f = fns
        self.rows = rows
        self.cfg = ExpertsConfig()
        tb.check(self.f["config_init"](ctypes.byref(self.cfg), ctypes.sizeof(ExpertsConfig)))
        self.cfg.num_experts, self.cfg.hidden, self.cfg.inter = experts, hidden, inter
        self.cfg.dtype = tb.DTYPE[torch.bfloat16]
        self.cfg.gemm_path = gemm_path
        fw, bw = c_size_t(), c_size_t()
        tb.check(self.f["fwd_ws"](ctypes.byref(self.cfg), rows, ctypes.byref(fw)))
        tb.check(self.f["bwd_ws"](ctypes.byref(self.cfg), rows, 1, ctypes.byref(bw)))
        self.fws = torch.empty(max(fw.value, 1), dtype=torch.uint8, device="cuda")
        self.bws = torch.empty(max(bw.value, 1), dtype=torch.uint8, device="cuda")

    def forward(self, offsets, x, p, wgu, wd, u, out):
        tb.check(self.f["forward"](ctypes.byref(self.cfg), self.rows, tb.ptr(offsets), tb.ptr(x), tb.ptr(p),
                                   tb.ptr(wgu), None, tb.ptr(wd), None, tb.ptr(u), tb.ptr(out), tb.ptr(self.fws),
                                   self.fws.numel(), tb.stream_ptr()))

    def backward(self, offsets, x, p, wgu, wd, u, dout, dx, dwgu, dwd, dp):
        tb.check(self.f["backward"](ctypes.byref(self.cfg), self.rows, tb.ptr(offsets), tb.ptr(x), tb.ptr(p),
                                    tb.ptr(wgu), None, tb.ptr(wd), None, tb.ptr(u), tb.ptr(dout), tb.ptr(dx),
                                    tb.ptr(dwgu), None, tb.ptr(dwd), None, tb.ptr(dp), tb.ptr(self.bws),
                                    self.bws.numel(), tb.stream_ptr()))


def swiglu_weighted(u, p):
    """NeMo's weighted SwiGLU: silu(gate) * up * p in fp32, rounded once to the activation dtype."""
    g, v = u.chunk(2, dim=-1)
    return (F.silu(g.float()) * v.float() * p.unsqueeze(-1)).to(u.dtype)


def grouped_mm_forward(act, x, wgu, wd, p, ends):
    u = torch._grouped_mm(x, wgu, offs=ends)
    return torch._grouped_mm(act(u, p), wd, offs=ends)


def loop_forward(x, wgu, wd, p, offsets):
    host = offsets.tolist()  # the host read a per-expert loop needs
    out = torch.empty_like(x)
    for e in range(len(host) - 1):
        a, b = host[e], host[e + 1]
        if a == b:
            continue
        out[a:b] = swiglu_weighted(x[a:b] @ wgu[e], p[a:b]) @ wd[e]
    return out


def loop_forward_grad(x, wgu, wd, p, offsets):
    """Differentiable version (no in-place writes into a shared output).

    The leaves are cut once (split / unbind), not indexed per expert: autograd's backward of
    x[a:b] or wgu[e] materialises a zero tensor of the leaf's full size per slice and adds into it,
    which made this loop's backward E full-size gradients (O(E * |W|) traffic, 72 TFLOP/s for
    dsv3 on an H200) instead of one concatenation."""
    host = offsets.tolist()
    counts = [host[e + 1] - host[e] for e in range(len(host) - 1)]
    total = host[-1]
    xs = x[:total].split(counts)
    ps = p[:total].split(counts)
    wgus, wds = wgu.unbind(0), wd.unbind(0)
    parts = []
    for e, n in enumerate(counts):
        if n == 0:
            continue
        parts.append(swiglu_weighted(xs[e] @ wgus[e], ps[e]) @ wds[e])
    return torch.cat(parts)


def path_runs(fns, name):
    """Whether gemm_path `name` runs here: a one-row forward answers UNSUPPORTED otherwise."""
    m = Moekit(fns, 1, 8, 8, 1, GEMM_PATHS[name])
    offsets = torch.tensor([0, 1], device="cuda", dtype=torch.int32)
    x = torch.zeros(1, 8, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(1, 8, 16, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, 8, device="cuda", dtype=torch.bfloat16)
    status = fns["forward"](ctypes.byref(m.cfg), 1, tb.ptr(offsets), tb.ptr(x), None, tb.ptr(w), None, tb.ptr(w),
                            None, None, tb.ptr(out), tb.ptr(m.fws), m.fws.numel(), tb.stream_ptr())
    torch.cuda.synchronize()
    if status == STATUS_UNSUPPORTED:
        print("moekit %s skipped: %s" % (name, tb.lib().moekit_get_last_error().decode()))
        return False
    tb.check(status)
    return True


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def make_problem(shape, skewed, seed):
    """The benchmark's problem for one shape: group sizes (host list), their ends and offsets
    (int32), xp [R, H], W_gu [E, H, 2I], W_down [E, I, H] (bf16, fan-in scaled), routing weights
    p [R] in [0.1, 1), drawn in that order after torch.manual_seed(seed) (profile_forward.py draws
    its problems here too)."""
    E, H, I, R = shape["experts"], shape["hidden"], shape["inter"], shape["rows"]
    counts = make_counts(E, R, skewed, seed)
    torch.manual_seed(seed)
    dt = torch.bfloat16
    ends = torch.tensor(counts, device="cuda", dtype=torch.int32).cumsum(0, dtype=torch.int32)
    offsets = torch.cat([torch.zeros(1, device="cuda", dtype=torch.int32), ends])
    x = torch.randn(R, H, device="cuda", dtype=dt)
    wgu = (torch.randn(E, H, 2 * I, device="cuda") / H ** 0.5).to(dt)
    wd = (torch.randn(E, I, H, device="cuda") / I ** 0.5).to(dt)
    p = torch.rand(R, device="cuda") * 0.9 + 0.1
    return counts, ends, offsets, x, wgu, wd, p


def run(name, shape, skewed, fns, dense, args):
    E, H, I, R = shape["experts"], shape["hidden"], shape["inter"], shape["rows"]
    dist = "skewed" if skewed else "balanced"
    dt = torch.bfloat16
    counts, ends, offsets, x, wgu, wd, p = make_problem(shape, skewed, args.seed)
    dout = torch.randn(R, H, device="cuda", dtype=dt)

    # "moekit" is the default path (AUTO); "moekit sm90" etc. the extra paths asked for.
    impls = [("moekit", Moekit(fns, E, H, I, R, GEMM_PATHS["auto"]))]
    impls += [("moekit " + pn, Moekit(fns, E, H, I, R, GEMM_PATHS[pn])) for pn in args.extra_paths]
    m = impls[0][1]
    u = torch.empty(R, 2 * I, device="cuda", dtype=dt)
    out = torch.empty(R, H, device="cuda", dtype=dt)
    dx, dwgu, dwd = torch.empty_like(x), torch.empty_like(wgu), torch.empty_like(wd)
    dp = torch.empty(R, device="cuda", dtype=torch.float32)

    # ---- check moekit (every path) against the grouped_mm composition first ----
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, wgu, wd, p)]
    ref = grouped_mm_forward(swiglu_weighted, *leaves, ends)
    ref.backward(dout)
    for impl, mi in impls:
        mi.forward(offsets, x, p, wgu, wd, u, out)
        mi.backward(offsets, x, p, wgu, wd, u, dout, dx, dwgu, dwd, dp)
        torch.cuda.synchronize()
        for what, got, want, tol in (("out", out, ref, 1e-2), ("grad_x", dx, leaves[0].grad, 2e-2),
                                     ("grad_w_gate_up", dwgu, leaves[1].grad, 2e-2),
                                     ("grad_w_down", dwd, leaves[2].grad, 2e-2),
                                     ("grad_row_weights", dp, leaves[3].grad, 2e-2)):
            err = rel_err(got, want)
            if not err < tol:
                raise SystemExit("%s %s: %s %s differs from torch._grouped_mm by %.3g (relative norm)"
                                 % (name, dist, impl, what, err))
    del leaves, ref

    flops = 2.0 * R * H * 2 * I + 2.0 * R * I * H
    results = []
    reps = dict(warmup=args.warmup, repeats=args.repeats)

    # Every implementation of a pass is timed in interleaved rounds (tb.time_interleaved: the same
    # thermal history for all; timed one after the other, position alone moved results 5-19 %).
    jobs = {"fwd": [], "fwd+bwd": []}

    def add(impl, pass_, fn):
        if fn is not None:
            jobs[pass_].append((impl, fn))

    def no_grad(fn):
        def run(i):
            with torch.no_grad():
                fn(i)
        return run

    for impl, mi in impls:
        add(impl, "fwd", lambda i, mi=mi: mi.forward(offsets, x, p, wgu, wd, None, out))
        add(impl, "fwd+bwd", lambda i, mi=mi: (mi.forward(offsets, x, p, wgu, wd, u, out),
                                               mi.backward(offsets, x, p, wgu, wd, u, dout, dx, dwgu, dwd, dp)))
    add("grouped_mm+eager act", "fwd", no_grad(lambda i: grouped_mm_forward(swiglu_weighted, x, wgu, wd, p, ends)))
    act_c = None if args.no_compile else tb.try_compile(swiglu_weighted)
    if act_c is not None:
        try:
            with torch.no_grad():
                torch.testing.assert_close(act_c(u, p), swiglu_weighted(u, p), atol=1e-2, rtol=1e-2)
        except Exception as e:  # pragma: no cover - depends on the machine
            print("torch.compile activation failed: %s" % e, file=sys.stderr)
            act_c = None
    if act_c is not None:
        add("grouped_mm+compiled act", "fwd", no_grad(lambda i: grouped_mm_forward(act_c, x, wgu, wd, p, ends)))
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, wgu, wd, p)]

    def autograd_step(act):
        for t in leaves:
            t.grad = None
        grouped_mm_forward(act, *leaves, ends).backward(dout)

    add("grouped_mm+eager act", "fwd+bwd", lambda i: autograd_step(swiglu_weighted))
    if act_c is not None:
        add("grouped_mm+compiled act", "fwd+bwd", lambda i: autograd_step(act_c))
    if not args.no_loop:
        add("per-expert loop", "fwd", no_grad(lambda i: loop_forward(x, wgu, wd, p, offsets)))

        def loop_step():
            for t in leaves:
                t.grad = None
            loop_forward_grad(*leaves, offsets).backward(dout)

        add("per-expert loop", "fwd+bwd", lambda i: loop_step())
    for pass_, f in (("fwd", flops), ("fwd+bwd", 3 * flops)):
        times = tb.time_interleaved(jobs[pass_], **reps)
        for impl, _ in jobs[pass_]:
            t = times[impl]
            rate = f / (t["median_us"] * 1e-6)
            results.append(dict(shape=name, dist=dist, impl=impl, passes=pass_, median_us=t["median_us"],
                                min_us=t["min_us"], tflops=rate / 1e12, of_dense=rate / dense,
                                timing=t["timing"]))
    del leaves, m, impls, u, out, dx, dwgu, dwd, dp, x, wgu, wd, dout
    torch.cuda.empty_cache()

    # The bar: moekit forward >= 60 % of the best grouped_mm + activation forward.
    best = max(r["tflops"] for r in results if r["passes"] == "fwd" and r["impl"].startswith("grouped_mm"))
    mk = next(r["tflops"] for r in results if r["passes"] == "fwd" and r["impl"] == "moekit")
    for r in results:
        r["of_grouped_mm_fwd"] = r["tflops"] / best if r["passes"] == "fwd" else None
    print("%s %s: moekit forward %.1f TFLOP/s = %.0f%% of grouped_mm + activation (%.1f) -> bar 60%% %s"
          % (name, dist, mk, 100 * mk / best, best, "met" if mk >= 0.6 * best else "MISSED"))
    for pn in args.extra_paths:
        mp = next(r["tflops"] for r in results if r["passes"] == "fwd" and r["impl"] == "moekit " + pn)
        print("%s %s: moekit %s forward %.1f TFLOP/s = %.2fx grouped_mm + activation (issue 5 bar 1.0x, goal "
              "1.15x), %.2fx the default path" % (name, dist, pn, mp, mp / best, mp / mk))
    return results, counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON result path (e.g. bench/results/experts-h100.json)")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--dists", default="balanced,skewed", help="comma-separated: balanced, skewed")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile activation")
    ap.add_argument("--no-loop", action="store_true", help="skip the per-expert loop")
    ap.add_argument("--paths", default="auto,sm90",
                    help="moekit gemm paths to time, comma-separated: auto (always), sm80, sm90 "
                         "(sm90 is skipped with a note where it cannot run)")
    args = ap.parse_args()

    fns = api()
    args.extra_paths = []
    for pn in args.paths.split(","):
        if pn not in GEMM_PATHS:
            raise SystemExit("unknown path %r (known: %s)" % (pn, ", ".join(GEMM_PATHS)))
        if pn != "auto" and pn not in args.extra_paths and path_runs(fns, pn):
            args.extra_paths.append(pn)
    dense = tb.gemm_rate()
    print("device: %s, dense bf16 GEMM 8192^3 %.1f TFLOP/s" % (torch.cuda.get_device_name(0), dense / 1e12))
    rows, counts = [], {}
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit("unknown shape %r (known: %s)" % (name, ", ".join(SHAPES)))
        for dist in args.dists.split(","):
            if dist not in ("balanced", "skewed"):
                raise SystemExit("unknown distribution %r" % dist)
            r, c = run(name, SHAPES[name], dist == "skewed", fns, dense, args)
            rows += r
            counts["%s/%s" % (name, dist)] = dict(max=max(c), min=min(c), empty=sum(1 for v in c if v == 0))
    printable = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    tb.print_table(printable, ["shape", "dist", "impl", "passes", "median_us", "tflops", "of_dense",
                               "of_grouped_mm_fwd"])
    if args.out:
        result = tb.header("experts compare_torch")
        result.update(dtype="bf16", activation="swiglu (weight before down)", dense_gemm_tflops=dense / 1e12,
                      flops="forward 2 R H 2I + 2 R I H; forward+backward 3x forward",
                      bar="moekit forward >= 60% of the best torch._grouped_mm + activation forward",
                      shapes={k: SHAPES[k] for k in args.shapes.split(",")}, counts=counts,
                      moekit_paths=["auto"] + args.extra_paths, results=rows)
        tb.write_json(args.out, result)
        print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
