"""Shared helpers for the side-by-side benchmarks: moekit (through ctypes, on torch tensors) next
to the PyTorch way of doing the same job, on the same tensors, in the same run.

Used by bench/<family>/compare_torch.py. Needs torch and a CUDA device; the library is found at
$MOEKIT_LIB, else build/libmoekit.so under the repository root.
"""
import ctypes
import datetime
import json
import os
import random
import statistics
import subprocess
import sys

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

c_void_p = ctypes.c_void_p
c_int32 = ctypes.c_int32
c_int64 = ctypes.c_int64
c_size_t = ctypes.c_size_t
c_float = ctypes.c_float
c_uint64 = ctypes.c_uint64

DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class MoekitError(RuntimeError):
    pass


_lib = None


def lib():
    """The loaded libmoekit (ctypes.CDLL)."""
    global _lib
    if _lib is None:
        path = os.environ.get("MOEKIT_LIB", os.path.join(REPO, "build", "libmoekit.so"))
        _lib = ctypes.CDLL(path)
        _lib.moekit_get_last_error.restype = ctypes.c_char_p
        _lib.moekit_status_string.restype = ctypes.c_char_p
        _lib.moekit_status_string.argtypes = [c_int32]
    return _lib


def declare(name, argtypes):
    """Declares the argument types of one entry point (all return moekit_status_t)."""
    f = getattr(lib(), name)
    f.argtypes = argtypes
    f.restype = c_int32
    return f


def check(status):
    if status != 0:
        raise MoekitError("%s: %s" % (lib().moekit_status_string(status).decode(),
                                      lib().moekit_get_last_error().decode()))


def ptr(t):
    """Device pointer of a tensor, or NULL for None."""
    return None if t is None else c_void_p(t.data_ptr())


def stream_ptr():
    return c_void_p(torch.cuda.current_stream().cuda_stream)


def event_times_us(fn, warmup=10, repeats=50, before_start=None):
    """Sorted CUDA-event times (us) of `repeats` calls fn(i) after `warmup` untimed ones;
    before_start(), when given, is queued ahead of each start event."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        if before_start is not None:
            before_start()
        starts[i].record()
        fn(i)
        ends[i].record()
    torch.cuda.synchronize()
    return sorted(1000.0 * s.elapsed_time(e) for s, e in zip(starts, ends))


def summary(us, **extra):
    """Median / min / max of sorted times (us), the record every timing function returns."""
    return dict({"median_us": statistics.median(us), "min_us": us[0], "max_us": us[-1], "repeats": len(us)}, **extra)


def time_us(fn, warmup=10, repeats=50):
    """Median / min of `repeats` CUDA-event timings of fn(i) after `warmup` calls."""
    return summary(event_times_us(fn, warmup, repeats))


def time_interleaved(named_fns, warmup=10, repeats=50, seed=0x5eed):
    """Median / min CUDA-event times (us) of several implementations of one job, measured in
    rounds: every round runs each fn(i) once, back to back, in an order shuffled per round (a
    fixed seed, so runs repeat).

    Timed one after the other, the implementation measured right after a long heavy loop runs on a
    hotter, lower-clocked GPU than one measured after an idle pause: on an H200 the same moekit
    kernels measured 5-19 % apart by position alone (2026-11-27). Interleaved rounds give every
    implementation the same thermal history. Shuffled, not rotated: a rotation keeps each
    implementation's predecessor fixed, and the one after the launch-bound per-expert loop (an idle,
    down-clocked GPU) read 3-4 % slower than the same kernels one place later on Qwen3 in every run
    of sessions 5-8. named_fns: [(name, fn)]; returns {name: timing}."""
    names = [n for n, _ in named_fns]
    for _, fn in named_fns:
        for i in range(warmup):
            fn(i)
    torch.cuda.synchronize()
    n = len(named_fns)
    starts = [[torch.cuda.Event(enable_timing=True) for _ in range(repeats)] for _ in range(n)]
    ends = [[torch.cuda.Event(enable_timing=True) for _ in range(repeats)] for _ in range(n)]
    order = random.Random(seed)
    for r in range(repeats):
        ks = list(range(n))
        order.shuffle(ks)
        for k in ks:
            starts[k][r].record()
            named_fns[k][1](r)
            ends[k][r].record()
    torch.cuda.synchronize()
    out = {}
    for k, name in enumerate(names):
        us = sorted(1000.0 * a.elapsed_time(b) for a, b in zip(starts[k], ends[k]))
        out[name] = summary(us, timing="interleaved")
    return out


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + write) of 1 GiB buffers."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    b = torch.empty_like(a)
    t = time_us(lambda i: (b.copy_(a) if i % 2 else a.copy_(b)), warmup=3, repeats=20)
    del a, b
    return 2.0 * n / (t["median_us"] * 1e-6)


def gemm_rate(n=8192, dtype=torch.bfloat16):
    """Dense n^3 GEMM rate in FLOP/s on random data (the compute ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = time_us(lambda i: a @ b, warmup=3, repeats=10)
    return 2.0 * n ** 3 / (t["median_us"] * 1e-6)


def commit():
    # The caller's MOEKIT_COMMIT wins, as in the C++ tools: the GPU machine's copy of .git may lag
    # behind the working tree it was sent.
    if os.environ.get("MOEKIT_COMMIT"):
        return os.environ["MOEKIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"],
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def header(benchmark):
    p = torch.cuda.get_device_properties(0)
    return {
        "benchmark": benchmark,
        "gpu": p.name,
        "num_gpus": 1,
        "sms": p.multi_processor_count,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
    }


def try_compile(fn):
    """torch.compile(fn), or None (with a note on stderr) where compile is unavailable."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # pragma: no cover - depends on the machine
        print("torch.compile unavailable: %s" % e, file=sys.stderr)
        return None


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def print_table(rows, columns):
    """Prints rows (dicts) as an aligned table with the given column keys."""
    cells = [[str(c) for c in columns]]
    for r in rows:
        cells.append([("%.4g" % r[c]) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
