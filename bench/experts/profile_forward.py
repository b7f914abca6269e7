#!/usr/bin/env python3
"""The forward's grouped GEMMs kernel by kernel: moekit next to torch._grouped_mm (CUTLASS).

compare_torch.py times whole forwards; this tool separates them, on random bf16 tensors and
balanced (or skewed) groups drawn as compare_torch.py draws them (compare_torch.make_problem, seed
1):
  moekit fwd    moekit_experts_forward (gate-up GEMM with the fused activation, down GEMM)
  gmm gate-up   torch._grouped_mm(x, W_gu): u only, the activation is a separate kernel
  eager act     NeMo's weighted SwiGLU as PyTorch ops
  gmm down      torch._grouped_mm(h, W_down)
Without PROF=1 it times the four in interleaved rounds (torchbench.time_interleaved). With PROF=1
it runs each once after warm-up between cudaProfilerStart / Stop, for a profiler that starts
there; per-kernel durations on an H200 (docs/experts.md, bench/results/diagnostics/
ncu-forward-kernels-h200.json) came from

    PROF=1 ncu --clock-control none --cache-control none --profile-from-start off \\
        --metrics gpu__time_duration.sum python3 bench/experts/profile_forward.py

SHAPES=dsv3-ep8,qwen3-30b,mixtral (default all) and DISTS=balanced,skewed (default balanced)
select the problems. The library is $MOEKIT_LIB, else build/libmoekit.so.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_torch as ct  # noqa: E402
import torch  # noqa: E402

tb = ct.tb


def profile_problem(fns, name, dist, prof):
    """Times (or runs once for a profiler) the four jobs of one shape and distribution."""
    s = ct.SHAPES[name]
    E, H, I, R = s["experts"], s["hidden"], s["inter"], s["rows"]
    _, ends, offsets, x, wgu, wd, p = ct.make_problem(s, dist == "skewed", 1)
    out = torch.empty(R, H, device="cuda", dtype=torch.bfloat16)
    m = ct.Moekit(fns, E, H, I, R, ct.GEMM_PATHS["auto"])
    u = torch._grouped_mm(x, wgu, offs=ends)
    h = ct.swiglu_weighted(u, p)
    jobs = [("moekit fwd", lambda i: m.forward(offsets, x, p, wgu, wd, None, out)),
            ("gmm gate-up", lambda i: torch._grouped_mm(x, wgu, offs=ends)),
            ("eager act", lambda i: ct.swiglu_weighted(u, p)),
            ("gmm down", lambda i: torch._grouped_mm(h, wd, offs=ends))]
    if prof:
        for _, fn in jobs:
            for i in range(3):
                fn(i)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for _, fn in jobs:
            fn(0)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    flops = {"moekit fwd": 2.0 * R * H * 2 * I + 2.0 * R * I * H, "gmm gate-up": 2.0 * R * H * 2 * I,
             "gmm down": 2.0 * R * I * H}
    for n, r in tb.time_interleaved(jobs, warmup=5, repeats=20).items():
        fl = flops.get(n)
        print("%-10s %-8s %-12s median %9.1f us  min %9.1f %s" % (
            name, dist, n, r["median_us"], r["min_us"],
            "" if fl is None else " %.1f TFLOP/s" % (fl / r["median_us"] / 1e6)))


def main():
    prof = os.environ.get("PROF") == "1"
    shapes = os.environ.get("SHAPES", ",".join(ct.SHAPES)).split(",")
    dists = os.environ.get("DISTS", "balanced").split(",")
    fns = ct.api()
    for name in shapes:
        for dist in dists:
            profile_problem(fns, name, dist, prof)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
