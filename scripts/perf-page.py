#!/usr/bin/env python3
"""Generates docs/performance.md and one roofline PNG per op in docs/perf/ from the JSON files in
bench/results/ (the C++ benchmark tools' bench-<family>-<gpu>.json, compare_torch.py's
compare-<family>-<gpu>.json and scripts/gpu-check-ep.sh's ep-<N>gpu-<gpu>.json).

    python3 scripts/perf-page.py
    python3 scripts/perf-page.py --results=bench/results --docs=docs

Files are recognised by their "benchmark" field, not their name. Output is deterministic: rows are
sorted, numbers have fixed formats, nothing depends on the clock, and the PNGs carry no software or
date metadata, so running it again on the same JSON (and the same git history and matplotlib)
changes nothing. The only input besides the JSON is `git log`, which says per family which kernel
commits came after the measured one. Needs matplotlib (not needed by the build or CI).
"""
import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FAMILIES = ["router", "tokens", "experts", "ep", "layer"]
FAMILY_TITLES = {"router": "Router", "tokens": "Token movement", "experts": "Expert FFN",
                 "ep": "Expert parallelism (dispatch / combine)", "layer": "Whole layer"}
KIND_OF_BENCHMARK = {
    "moekit-bench-router": ("router", "bench"), "router compare_torch": ("router", "compare"),
    "moekit-bench-tokens": ("tokens", "bench"), "tokens compare_torch": ("tokens", "compare"),
    "moekit-bench-experts": ("experts", "bench"), "experts compare_torch": ("experts", "compare"),
    "layer compare_torch": ("layer", "compare"),
    "moekit-bench-sm90-tiles": ("experts", "tiles"),
}

# ---- small helpers --------------------------------------------------------------------------------


def num(v):
    """v as a finite float, or None (missing, null, NaN, infinite, not a number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def fmt_us(v):
    v = num(v)
    if v is None:
        return "n/a"
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    if v >= 1:
        return "%.2f" % v
    return "%.3f" % v


def fmt_pct(v):
    v = num(v)
    return "n/a" if v is None else "%.1f %%" % (100.0 * v)


def fmt_x(v):
    v = num(v)
    return "n/a" if v is None else "%.2fx" % v


def fmt_rate(v):
    v = num(v)
    return "n/a" if v is None else "%.0f" % v if v >= 100 else "%.1f" % v


def ratio(a, b):
    a, b = num(a), num(b)
    return a / b if a is not None and b else None


def div(a, b):
    a, b = num(a), num(b)
    return a / b if a is not None and b else None


def card_of(d):
    """'NVIDIA H200 (sm_90, 132 SMs)' and 'NVIDIA H200' both give 'NVIDIA H200'."""
    name = d.get("gpu") or d.get("device") or "unknown card"
    return re.sub(r"\s*\(.*\)\s*$", "", str(name)).strip() or "unknown card"


def joined(values):
    """Distinct values in first-seen order, joined by ' / ' ('n/a' when none)."""
    out = []
    for v in values:
        if v and v not in out:
            out.append(v)
    return " / ".join(out) if out else "n/a"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def span(values, f):
    vals = sorted(v for v in (num(x) for x in values) if v is not None)
    if not vals:
        return None
    return f(vals[0]) if vals[0] == vals[-1] else "%s to %s" % (f(vals[0]), f(vals[-1]))


def slug(s):
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def git(*args):
    try:
        return subprocess.run(["git", "-C", REPO] + list(args), check=True, capture_output=True,
                              text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def canonical_commit(commit):
    """One spelling per commit (the tools record 7 to 40 hex digits): 12 digits where this clone knows it."""
    commit = str(commit or "unknown")
    if commit == "unknown":
        return commit
    full = git("rev-parse", "--short=12", commit + "^{commit}")
    return full.strip() if full else commit[:12]


def commits_after(commit, paths):
    """Commits touching `paths` after `commit` (newest first), or a string saying why not known."""
    if not commit or commit == "unknown":
        return "the JSON records no commit"
    if git("cat-file", "-e", commit + "^{commit}") is None:
        return "commit %s is not in this clone's history" % commit
    out = git("log", "--format=%h %s", "%s..HEAD" % commit, "--", *paths)
    if out is None:
        return "git log failed"
    return [line for line in out.splitlines() if line.strip()]


# ---- loading --------------------------------------------------------------------------------------


class Source:
    def __init__(self, path, data, family, kind):
        self.path, self.data, self.family, self.kind = path, data, family, kind
        self.name = os.path.basename(path)
        self.card = card_of(data)
        self.commit = canonical_commit(data.get("commit"))
        self.date = str(data.get("date") or "n/a")


def load(results_dir):
    sources, skipped = [], []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        name = os.path.basename(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            skipped.append((name, "not readable as JSON (%s)" % type(e).__name__))
            continue
        if not isinstance(d, dict):
            skipped.append((name, "not a JSON object"))
            continue
        b = d.get("benchmark")
        if b == "ep":
            if "torch_results" not in d and d.get("tool") == "moekit-bench-ep":
                d = {"benchmark": "ep", "gpu": d.get("gpu"), "num_gpus": d.get("num_gpus"),
                     "commit": d.get("commit"), "date": d.get("date"), "moekit": d}
            sources.append(Source(path, d, "ep", "ep"))
        elif b in KIND_OF_BENCHMARK:
            fam, kind = KIND_OF_BENCHMARK[b]
            sources.append(Source(path, d, fam, kind))
        else:
            skipped.append((name, "unknown benchmark field %r" % (b,)))
    return sources, skipped


def of(sources, family, kind=None):
    return [s for s in sources if s.family == family and (kind is None or s.kind == kind)]


def copy_bandwidth_gbps(src):
    return num(src.data.get("copy_bandwidth_gbps"))


def bandwidth_for_card(sources, card, commits):
    """A copy bandwidth measured on `card` (for a family whose JSON has none): same commit first,
    then any, by file name. Returns (GB/s, file name) or (None, None)."""
    cands = [s for s in sources if s.card == card and copy_bandwidth_gbps(s)]
    cands.sort(key=lambda s: (0 if s.commit in commits else 1, 0 if s.kind == "bench" else 1, s.name))
    return (copy_bandwidth_gbps(cands[0]), cands[0].name) if cands else (None, None)


# ---- plotting -------------------------------------------------------------------------------------

IMPL_STYLE = {
    # label: (marker, filled)
    "moekit (bench tool)": ("o", True),
    "moekit (compare run)": ("o", False),
    "moekit exact": ("o", True),
    "moekit capacity": ("P", True),
    "torch eager": ("^", True),
    "torch.compile": ("s", True),
    "grouped_mm + eager act": ("^", True),
    "grouped_mm + compiled act": ("s", True),
    "per-expert loop (torch)": ("v", True),
    "cuBLASLt loop (bench tool)": ("D", True),
    "torch dispatch/combine": ("^", True),
    "torch all_to_all_single": ("X", True),
}


class Plotter:
    def __init__(self, out_dir):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        matplotlib.rcParams.update({"font.size": 8, "svg.hashsalt": "moekit", "path.simplify": True})
        self.plt = plt
        self.out_dir = out_dir
        self.written = []

    @staticmethod
    def _dodge(points):
        """Shapes whose points share an x (within 2 %) are drawn slightly apart (3.5 % per shape) so
        none hides another; the offset is deterministic (shape order)."""
        xs = sorted({p[2] for p in points})
        groups, cur = [], []
        for x in xs:
            if cur and x > cur[0] * 1.02:
                groups.append(cur)
                cur = []
            cur.append(x)
        if cur:
            groups.append(cur)
        factor = {}
        for g in groups:
            shapes = []
            for p in points:
                if p[2] in g and p[0] not in shapes:
                    shapes.append(p[0])
            for j, sh in enumerate(shapes):
                for x in g:
                    factor[(sh, x)] = 1.035 ** (j - (len(shapes) - 1) / 2.0)
        return [(p[0], p[1], p[2] * factor.get((p[0], p[2]), 1.0), p[3], p[4]) for p in points]

    def _points(self, ax, points, colors):
        """points: (shape, impl, x, y, note) tuples."""
        for shape, impl, x, y, note in points:
            marker, filled = IMPL_STYLE.get(impl, ("*", True))
            c = colors[shape]
            ax.scatter([x], [y], marker=marker, s=34, facecolors=c if filled else "none", edgecolors=c,
                       linewidths=1.1, zorder=3)
            if note:
                ax.annotate(note, (x, y), xytext=(4, 2), textcoords="offset points", fontsize=6, color=c)

    def _legends(self, ax, points, colors, line_kinds=()):
        from matplotlib.lines import Line2D
        impls = []
        for p in points:
            if p[1] not in impls:
                impls.append(p[1])
        handles = []
        for impl in impls:
            marker, filled = IMPL_STYLE.get(impl, ("*", True))
            handles.append(Line2D([], [], linestyle="none", marker=marker, color="black",
                                  markerfacecolor="black" if filled else "none", label=impl))
        for kind, style in line_kinds:
            handles.append(Line2D([], [], linestyle=style, color="black", linewidth=1.0, label=kind))
        first = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                          title="implementation", title_fontsize=7, frameon=False)
        ax.add_artist(first)
        shape_handles = [Line2D([], [], linestyle="none", marker="o", color=colors[s], label=s) for s in colors]
        ax.legend(handles=shape_handles, loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=7,
                  title="shape", title_fontsize=7, frameon=False)

    @staticmethod
    def _colors(points):
        import matplotlib
        shapes = []
        for p in points:
            if p[0] not in shapes:
                shapes.append(p[0])
        cmap = matplotlib.colormaps["tab10" if len(shapes) <= 10 else "tab20"]
        return {s: cmap(i % cmap.N) for i, s in enumerate(shapes)}

    def _save(self, fig, name):
        path = os.path.join(self.out_dir, name)
        fig.savefig(path, dpi=100, metadata={"Software": None})
        self.plt.close(fig)
        self.written.append(name)
        return name

    def bandwidth(self, name, title, points, roofs, xlabel, ylabel, dodge=True, xticks=None):
        """A roofline's memory roof alone, for ops with no arithmetic to speak of: achieved GB/s
        against bytes moved per call. roofs: (label, GB/s, color or None)."""
        points = [p for p in points if num(p[2]) and num(p[3])]
        if not points:
            return None
        colors = self._colors(points)
        if dodge:
            points = self._dodge(points)
        fig, ax = self.plt.subplots(figsize=(8.6, 4.4))
        ax.set_xscale("log")
        ax.set_yscale("log")
        line_kinds = []
        for roof in roofs:
            label, value, color = roof[:3]
            if len(roof) > 3:  # (label, value, color, linestyle, kind): in the legend by kind, not inline
                style, kind = roof[3], roof[4]
                if (kind, style) not in line_kinds:
                    line_kinds.append((kind, style))
            else:
                style = "--"
                ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), xytext=(0, 2),
                            textcoords="offset points", fontsize=7, color=color or "0.3")
            ax.axhline(value, color=color or "0.3", linestyle=style, linewidth=1.0, zorder=1)
        self._points(ax, points, colors)
        ys = [p[3] for p in points] + [r[1] for r in roofs]
        ax.set_ylim(min(ys) / 2.5, max(ys) * 2.5)
        xs = [p[2] for p in points]
        if xticks:
            ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
            ax.set_xticks(xticks)
            ax.set_xticklabels([str(t) for t in xticks])
            ax.minorticks_off()
        else:
            ax.set_xlim(min(xs) / 3, max(xs) * 3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        self._ticks(ax, x=not xticks)
        ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
        self._legends(ax, points, colors, line_kinds)
        fig.subplots_adjust(left=0.08, right=0.70, bottom=0.12, top=0.92)
        return self._save(fig, name)

    @staticmethod
    def _ticks(ax, x=True):
        """Log axes ticked at 1, 2, 5 x 10^n with plain numbers."""
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
        axes = [ax.yaxis] + ([ax.xaxis] if x else [])
        for a in axes:
            a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            a.set_minor_locator(NullLocator())
            a.set_major_formatter(FuncFormatter(lambda v, _: "%g" % v))

    def roofline(self, name, title, points, compute_roofs, memory_roofs):
        """Classic roofline: x = FLOP/byte, y = TFLOP/s; compute_roofs (label, TFLOP/s),
        memory_roofs (label, GB/s)."""
        points = [p for p in points if num(p[2]) and num(p[3])]
        if not points:
            return None
        colors = self._colors(points)
        points = self._dodge(points)
        fig, ax = self.plt.subplots(figsize=(8.6, 4.4))
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs = [p[2] for p in points]
        lo, hi = min(xs) / 30, max(xs) * 4
        if memory_roofs:
            lo = min(lo, min(c[1] for c in compute_roofs) * 1e3 / max(m[1] for m in memory_roofs) / 4) \
                if compute_roofs else lo
        grid = [lo * (hi / lo) ** (i / 200.0) for i in range(201)]
        styles = ["-", "--", ":", "-."]
        for i, (clabel, tflops) in enumerate(compute_roofs):
            for j, (mlabel, gbps) in enumerate(memory_roofs or [(None, None)]):
                ys = [min(tflops, x * gbps / 1e3) if gbps else tflops for x in grid]
                ax.plot(grid, ys, color="0.3", linestyle=styles[(i + j) % len(styles)], linewidth=1.0, zorder=1)
                if mlabel and i == 0:
                    ax.annotate(mlabel, (lo * 1.3, lo * 1.3 * gbps / 1e3), xytext=(0, 6), textcoords="offset points",
                                fontsize=7, color="0.3")
            ax.annotate(clabel, (lo * 1.3, tflops), xytext=(0, 3), textcoords="offset points", fontsize=7,
                        color="0.3")
        self._points(ax, points, colors)
        ys = [p[3] for p in points] + [c[1] for c in compute_roofs]
        ax.set_ylim(min(ys) / 4, max(ys) * 2.5)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("arithmetic intensity (FLOP / byte of minimal DRAM traffic)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(title, fontsize=9)
        self._ticks(ax)
        ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
        self._legends(ax, points, colors)
        fig.subplots_adjust(left=0.08, right=0.70, bottom=0.12, top=0.92)
        return self._save(fig, name)


# ---- families -------------------------------------------------------------------------------------

def by_key(rows, key):
    out = {}
    for r in rows:
        out.setdefault(key(r), r)
    return out


def render_router(sources, plot):
    benches, compares = of(sources, "router", "bench"), of(sources, "router", "compare")
    out = []
    bench_rows, cmp_rows = [], []
    for s in benches:
        for r in s.data.get("results") or []:
            bench_rows.append(dict(r, _src=s))
    for s in compares:
        presets = s.data.get("presets") or {}
        for r in s.data.get("results") or []:
            p = presets.get(r.get("preset"), {})
            cmp_rows.append(dict(r, _src=s, _E=p.get("E"), _K=p.get("K")))
    bench = by_key(bench_rows, lambda r: (r["_src"].card, r.get("preset"), r.get("tokens"), r.get("pass")))
    cmpx = by_key(cmp_rows, lambda r: (r["_src"].card, r.get("preset"), r.get("tokens"), r.get("pass_"),
                                       r.get("impl")))
    has_dev = any("gpu_median_us" in r for r in cmp_rows)
    shapes = sorted({(k[0], k[1], k[2]) for k in bench} | {(k[0], k[1], k[2]) for k in cmpx},
                    key=lambda k: (k[0], str(k[1]), num(k[2]) or 0))
    for op in ("forward", "backward", "fwd+bwd"):
        rows, points, fracs, eag, com = [], [], [], [], []
        for card, preset, T in shapes:
            b = bench.get((card, preset, T, op))
            m = cmpx.get((card, preset, T, op, "moekit"))
            e = cmpx.get((card, preset, T, op, "torch eager"))
            c = cmpx.get((card, preset, T, op, "torch.compile"))
            if not (b or m or e or c):
                continue
            E = (b or {}).get("experts", (m or e or c or {}).get("_E"))
            K = (b or {}).get("top_k", (m or e or c or {}).get("_K"))
            floor = num((b or {}).get("floor_us")) or num((m or e or c or {}).get("floor_us"))
            frac = div((b or {}).get("floor_us"), (b or {}).get("median_us")) if b else \
                div((m or {}).get("floor_us"), (m or {}).get("median_us"))
            mk_t = (m or {}).get("median_us")
            re_, rc_ = ratio((e or {}).get("median_us"), mk_t), ratio((c or {}).get("median_us"), mk_t)
            fracs.append(frac)
            eag.append(re_)
            com.append(rc_)
            row = ["%s T=%s" % (preset, T), E if E is not None else "n/a", K if K is not None else "n/a",
                   fmt_us((b or {}).get("median_us")), fmt_us(floor), fmt_pct(frac), fmt_us(mk_t),
                   fmt_us((e or {}).get("median_us")), fmt_x(re_), fmt_us((c or {}).get("median_us")), fmt_x(rc_)]
            if has_dev:
                row += [fmt_us((m or {}).get("gpu_median_us")), fmt_us((e or {}).get("gpu_median_us")),
                        fmt_us((c or {}).get("gpu_median_us"))]
            srcs = [x["_src"] for x in (b, m, e, c) if x]
            row += [card, joined(s.commit for s in srcs)]
            rows.append(row)
            label = "%s T=%s" % (preset, T)
            if b and num(b.get("bytes")) and num(b.get("median_us")):
                points.append((label, "moekit (bench tool)", b["bytes"] / 1e6, b["bytes"] / b["median_us"] / 1e3, ""))
            for x, impl in ((m, "moekit (compare run)"), (e, "torch eager"), (c, "torch.compile")):
                bw = copy_bandwidth_gbps(x["_src"]) if x else None
                if x and num(x.get("floor_us")) and bw and num(x.get("median_us")):
                    nbytes = x["floor_us"] * bw * 1e3
                    points.append((label, impl, nbytes / 1e6, nbytes / x["median_us"] / 1e3, ""))
        if not rows:
            continue
        header = ["shape", "E", "K", "moekit us", "floor us", "of floor", "moekit us (same run)",
                  "torch eager us", "eager / moekit", "torch.compile us", "compile / moekit"]
        if has_dev:
            header += ["moekit device us", "eager device us", "compile device us"]
        header += ["card", "commit"]
        out.append("### Router %s\n" % op)
        summary = []
        if span(fracs, fmt_pct):
            summary.append("moekit at %s of its floor" % span(fracs, fmt_pct))
        if span(eag, fmt_x):
            summary.append("PyTorch eager takes %s moekit's time" % span(eag, fmt_x))
        if span(com, fmt_x):
            summary.append("torch.compile %s" % span(com, fmt_x))
        if summary:
            out.append("; ".join(summary) + ".\n")
        out.append(table(header, rows) + "\n")
        roofs = []
        for s in sorted(benches or compares, key=lambda s: s.name):
            if copy_bandwidth_gbps(s):
                roofs.append(("%s copy bandwidth %.0f GB/s (%s)" % (s.card, copy_bandwidth_gbps(s), s.name),
                              copy_bandwidth_gbps(s), None))
        png = plot.bandwidth("router-%s.png" % slug(op), "router %s: achieved bandwidth (bytes of the floor / time)" % op,
                             points, roofs[:2], "MB the floor counts per call", "GB/s")
        if png:
            out.append("![router %s](perf/%s)\n" % (op, png))
    return out


TOKENS_OPS = ["plan", "plan_no_tokens", "permute", "plan+permute", "combine", "combine_unweighted",
              "permute_backward", "combine_backward"]


def render_tokens(sources, plot):
    benches, compares = of(sources, "tokens", "bench"), of(sources, "tokens", "compare")
    out = []
    bench_rows, cmp_rows, shape_info = [], [], {}
    for s in benches:
        for sh in s.data.get("shapes") or []:
            shape_info.setdefault((s.card, sh.get("name")), sh)
            for o in sh.get("ops") or []:
                bench_rows.append(dict(o, _src=s, _shape=sh.get("name")))
    for s in compares:
        for name, sh in (s.data.get("shapes") or {}).items():
            shape_info.setdefault((s.card, name), sh)
        for r in s.data.get("results") or []:
            cmp_rows.append(dict(r, _src=s, _shape=r.get("shape")))
    bench = by_key(bench_rows, lambda r: (r["_src"].card, r["_shape"], r.get("op")))
    cmpx = by_key(cmp_rows, lambda r: (r["_src"].card, r["_shape"], r.get("op"), r.get("impl")))
    ops = [o for o in TOKENS_OPS if any(k[2] == o for k in bench) or any(k[2] == o for k in cmpx)]
    ops += sorted(({k[2] for k in bench} | {k[2] for k in cmpx}) - set(ops))
    shapes = sorted({(k[0], k[1]) for k in bench} | {(k[0], k[1]) for k in cmpx}, key=lambda k: (k[0], str(k[1])))
    for op in ops:
        rows, points, fracs, eag, com = [], [], [], [], []
        any_torch = any(k[2] == op and k[3] != "moekit" for k in cmpx)
        for card, name in shapes:
            b = bench.get((card, name, op))
            m = cmpx.get((card, name, op, "moekit"))
            e = cmpx.get((card, name, op, "torch eager"))
            c = cmpx.get((card, name, op, "torch.compile"))
            if not (b or m or e or c):
                continue
            sh = shape_info.get((card, name), {})
            label = "%s (T=%s H=%s K=%s E=%s)" % (name, sh.get("tokens", "?"), sh.get("hidden", "?"),
                                                  sh.get("top_k", "?"), sh.get("experts", "?"))
            floor = num((b or {}).get("floor_us")) or num((m or e or c or {}).get("floor_us"))
            frac = div((b or {}).get("floor_us"), (b or {}).get("median_us")) if b else \
                div((m or {}).get("floor_us"), (m or {}).get("median_us"))
            mk_t = (m or {}).get("median_us")
            re_, rc_ = ratio((e or {}).get("median_us"), mk_t), ratio((c or {}).get("median_us"), mk_t)
            fracs.append(frac)
            eag.append(re_)
            com.append(rc_)
            row = [label, fmt_us((b or {}).get("median_us")), fmt_us(floor), fmt_pct(frac),
                   fmt_rate((b or {}).get("gbps"))]
            if any_torch:
                row += [fmt_us(mk_t), fmt_us((e or {}).get("median_us")), fmt_x(re_),
                        fmt_us((c or {}).get("median_us")), fmt_x(rc_)]
            row += [(b or {}).get("bar") or "", card, joined(x["_src"].commit for x in (b, m, e, c) if x)]
            rows.append(row)
            if b and num(b.get("bytes")) and num(b.get("median_us")):
                points.append((name, "moekit (bench tool)", b["bytes"] / 1e6, b["bytes"] / b["median_us"] / 1e3, ""))
            for x, impl in ((m, "moekit (compare run)"), (e, "torch eager"), (c, "torch.compile")):
                bw = copy_bandwidth_gbps(x["_src"]) if x else None
                if x and num(x.get("floor_us")) and bw and num(x.get("median_us")):
                    nbytes = x["floor_us"] * bw * 1e3
                    points.append((name, impl, nbytes / 1e6, nbytes / x["median_us"] / 1e3, ""))
        if not rows:
            continue
        header = ["shape", "moekit us", "floor us", "of floor", "GB/s"]
        if any_torch:
            header += ["moekit us (same run)", "torch eager us", "eager / moekit", "torch.compile us",
                       "compile / moekit"]
        header += ["bar", "card", "commit"]
        out.append("### Tokens %s\n" % op)
        summary = []
        if span(fracs, fmt_pct):
            summary.append("moekit at %s of its floor" % span(fracs, fmt_pct))
        if span(eag, fmt_x):
            summary.append("PyTorch eager takes %s moekit's time" % span(eag, fmt_x))
        if span(com, fmt_x):
            summary.append("torch.compile %s" % span(com, fmt_x))
        if not any_torch:
            summary.append("no PyTorch counterpart is timed for this op")
        out.append("; ".join(summary) + ".\n")
        if op == "plan+permute":
            out.append("PyTorch's permute (stable argsort + index_select) builds its own order, so it is "
                       "compared with moekit's plan + permute; the floor counts the permute's bytes only.\n")
        out.append(table(header, rows) + "\n")
        roofs = []
        for s in sorted(benches or compares, key=lambda s: s.name):
            if copy_bandwidth_gbps(s):
                roofs.append(("%s copy bandwidth %.0f GB/s (%s)" % (s.card, copy_bandwidth_gbps(s), s.name),
                              copy_bandwidth_gbps(s), None))
            wb = num(s.data.get("write_bandwidth_gbps"))
            if wb and op.startswith("permute"):
                roofs.append(("%s write bandwidth %.0f GB/s (%s)" % (s.card, wb, s.name), wb, "tab:gray"))
        png = plot.bandwidth("tokens-%s.png" % slug(op), "tokens %s: achieved bandwidth (bytes of the floor / time)" % op,
                             points, roofs[:3], "MB the floor counts per call", "GB/s")
        if png:
            out.append("![tokens %s](perf/%s)\n" % (op, png))
    return out


def experts_bytes(experts, hidden, inter, rows, activation, es):
    """Minimal DRAM traffic: forward reads x [R, H], the weights (E (H NU + I H)) and the row weights
    (fp32), writes y [R, H]; the backward reads dy, x and the weights again and writes dx and dW
    (and the row-weight gradient). Saved intermediates are not counted (a lower bound)."""
    nu = inter if str(activation).startswith("relu2") else 2 * inter
    w = experts * (hidden * nu + inter * hidden) * es
    fwd = 2 * rows * hidden * es + w + 4 * rows
    bwd = 3 * rows * hidden * es + 2 * w + 8 * rows
    return fwd, fwd + bwd


def render_experts(sources, plot):
    benches, compares = of(sources, "experts", "bench"), of(sources, "experts", "compare")
    out = []
    recs = []  # (card, shape, dist, pass, impl, us, tflops, src, dims)
    dense = {}
    for s in benches:
        if num(s.data.get("dense_gemm_tflops")):
            dense.setdefault(s.card, (num(s.data["dense_gemm_tflops"]), s.name))
        for sh in s.data.get("shapes") or []:
            dims = (sh.get("experts"), sh.get("hidden"), sh.get("inter"), sh.get("rows"),
                    s.data.get("activation", "swiglu"), s.data.get("dtype", "bf16"))
            for impl_key, impl in (("moekit", "moekit (bench tool)"), ("cublaslt_loop", "cuBLASLt loop (bench tool)")):
                r = sh.get(impl_key) or {}
                for pass_, pre in (("fwd", "forward"), ("fwd+bwd", "forward_backward")):
                    if pre + "_us" in r:
                        recs.append((s.card, sh.get("shape"), sh.get("distribution"), pass_, impl, r.get(pre + "_us"),
                                     r.get(pre + "_tflops"), s, dims))
    for s in compares:
        if num(s.data.get("dense_gemm_tflops")):
            dense.setdefault(s.card, (num(s.data["dense_gemm_tflops"]), s.name))
        shapes = s.data.get("shapes") or {}
        names = {"moekit": "moekit (compare run)", "grouped_mm+eager act": "grouped_mm + eager act",
                 "grouped_mm+compiled act": "grouped_mm + compiled act", "per-expert loop": "per-expert loop (torch)"}
        for r in s.data.get("results") or []:
            sh = shapes.get(r.get("shape"), {})
            dims = (sh.get("experts"), sh.get("hidden"), sh.get("inter"), sh.get("rows"),
                    s.data.get("activation", "swiglu"), s.data.get("dtype", "bf16"))
            recs.append((s.card, r.get("shape"), r.get("dist"), r.get("passes"), names.get(r.get("impl"), r.get("impl")),
                         r.get("median_us"), r.get("tflops"), s, dims))
    idx = by_key(recs, lambda r: (r[0], r[1], r[2], r[3], r[4]))
    shapes = sorted({(r[0], r[1], r[2]) for r in recs}, key=lambda k: (k[0], str(k[1]), str(k[2])))
    flops_of = {}
    for s in benches:
        for sh in s.data.get("shapes") or []:
            flops_of[(s.card, sh.get("shape"), sh.get("distribution"))] = (num(sh.get("forward_flops")),
                                                                           num(sh.get("forward_backward_flops")))
    empty_experts = {}  # (card, shape, dist) -> experts without rows, as compare_torch.py drew them
    for s in compares:
        for key, c in (s.data.get("counts") or {}).items():
            shape_dist = key.split("/")
            if len(shape_dist) == 2 and num(c.get("empty")) is not None:
                empty_experts[(s.card, shape_dist[0], shape_dist[1])] = int(c["empty"])
    torch_impls = ["grouped_mm + eager act", "grouped_mm + compiled act", "per-expert loop (torch)"]
    for pass_, title in (("fwd", "forward"), ("fwd+bwd", "forward + backward")):
        rows, points, fracs, best = [], [], [], []
        for card, shape, dist in shapes:
            get = lambda impl: idx.get((card, shape, dist, pass_, impl))  # noqa: E731
            b, m, lt = get("moekit (bench tool)"), get("moekit (compare run)"), get("cuBLASLt loop (bench tool)")
            ts = [get(i) for i in torch_impls]
            if not (b or m or any(ts)):
                continue
            any_rec = b or m or next(t for t in ts if t)
            E, H, I, R, act, dt = any_rec[8]
            fl = flops_of.get((card, shape, dist))
            flops = (fl[0] if pass_ == "fwd" else fl[1]) if fl else None
            if flops is None and None not in (E, H, I, R):
                nu = I if str(act).startswith("relu2") else 2 * I
                flops = (2.0 * R * H * nu + 2.0 * R * I * H) * (1 if pass_ == "fwd" else 3)
            # The floor: the larger of FLOPs over the dense GEMM rate and the minimal bytes over the
            # copy bandwidth (small batches are bound by reading the weights).
            rate = dense.get(card, (None, None))[0]
            floor = flops / (rate * 1e12) * 1e6 if flops and rate else None
            # Experts without rows (the skewed draws have some) read no weights.
            bw = bandwidth_for_card(sources, card, {s.commit for s in benches + compares})[0]
            if floor is not None and bw and None not in (E, H, I, R):
                read = E - empty_experts.get((card, shape, dist), 0)
                nbytes = experts_bytes(read, H, I, R, act, 4 if dt == "f32" else 2)[0 if pass_ == "fwd" else 1]
                floor = max(floor, nbytes / (bw * 1e9) * 1e6)
            mk_b = b[5] if b else None
            frac = div(floor, mk_b) if b else div(floor, m[5] if m else None)
            fracs.append(frac)
            mk_t = m[5] if m else None
            row = ["%s %s" % (shape, dist), "E=%s H=%s I=%s R=%s" % (E, H, I, R), fmt_us(mk_b), fmt_us(floor),
                   fmt_pct(frac), fmt_us(mk_t)]
            for t in ts:
                row += [fmt_us(t[5] if t else None), fmt_x(ratio(t[5] if t else None, mk_t))]
            row += [fmt_us(lt[5] if lt else None), fmt_x(ratio(lt[5] if lt else None, mk_b))]
            gm = [ratio(t[5], mk_t) for t in ts[:2] if t]
            best.append(min((g for g in gm if g is not None), default=None))
            srcs = [x[7] for x in [b, m, lt] + ts if x]
            row += [card, joined(s.commit for s in srcs)]
            rows.append(row)
            es = 4 if dt == "f32" else 2
            if None not in (E, H, I, R):
                nb = experts_bytes(E - empty_experts.get((card, shape, dist), 0), H, I, R, act, es)[
                    0 if pass_ == "fwd" else 1]
                label = "%s %s" % (shape, dist)
                for x in [b, m, lt] + ts:
                    if x and num(x[5]) and flops:
                        points.append((label, x[4], flops / nb, flops / (x[5] * 1e-6) / 1e12, ""))
        if not rows:
            continue
        header = ["shape", "dims", "moekit us", "floor us", "of floor", "moekit us (same run)"]
        for t in torch_impls:
            header += [t + " us", t.split(" (")[0] + " / moekit"]
        header += ["cuBLASLt loop us", "loop / moekit", "card", "commit"]
        out.append("### Experts %s\n" % title)
        summary = []
        if span(fracs, fmt_pct):
            summary.append("moekit at %s of its floor (the larger of FLOPs over the dense GEMM rate and its minimal "
                           "bytes over the copy bandwidth)" % span(fracs, fmt_pct))
        if span(best, fmt_x):
            summary.append("the faster torch._grouped_mm composition takes %s moekit's time "
                           "(below 1x: moekit is slower)" % span(best, fmt_x))
        if summary:
            out.append("; ".join(summary) + ".\n")
        out.append(table(header, rows) + "\n")
        compute_roofs = []
        for card in sorted(dense):
            compute_roofs.append(("%s dense GEMM %.0f TFLOP/s (%s)" % (card, dense[card][0], dense[card][1]),
                                  dense[card][0]))
        memory_roofs = []
        for card in sorted(dense):
            bw, name = bandwidth_for_card(sources, card, {s.commit for s in benches + compares})
            if bw:
                memory_roofs.append(("%s copy bandwidth %.0f GB/s (%s)" % (card, bw, name), bw))
        png = plot.roofline("experts-%s.png" % slug(title), "experts %s (bf16 SwiGLU grouped GEMMs)" % title, points,
                            compute_roofs[:2], memory_roofs[:1])
        if png:
            out.append("![experts %s](perf/%s)\n" % (title, png))
    out += render_sm90_tiles(of(sources, "experts", "tiles"))
    return out


def render_sm90_tiles(sources):
    """moekit-bench-sm90-tiles: per shape, rows per expert and distribution, each other tile's time
    over the 128-row tile's, as the geometric mean and the range over the timed kernels."""
    names = {"64x256": "64-row", "128x256x2": "cluster of two"}
    cells = {}  # (card, shape, rows per expert, tile, dist) -> [ratios], [sources]
    for s in sources:
        for r in s.data.get("results") or []:
            for tile in names:
                x = num(((r.get("tiles") or {}).get(tile) or {}).get("time_over_128x256"))
                if not x:
                    continue
                key = (s.card, r.get("shape"), num(r.get("rows_per_expert")), tile, r.get("dist"))
                c = cells.setdefault(key, ([], []))
                c[0].append(x)
                c[1].append(s)
    if not cells:
        return []
    order = ["balanced", "random", "skewed"]
    dists = sorted({k[4] for k in cells}, key=lambda d: order.index(d) if d in order else 9)
    columns = [(t, d) for t in names for d in dists if any(k[3] == t and k[4] == d for k in cells)]
    rows = []
    for card, shape, rpe in sorted({k[:3] for k in cells}, key=lambda k: (k[0], str(k[1]), k[2] or 0)):
        row = [str(shape), "%d" % rpe if rpe else "n/a"]
        srcs = []
        for tile, d in columns:
            c = cells.get((card, shape, rpe, tile, d))
            if not c:
                row.append("n/a")
                continue
            gm = math.exp(sum(math.log(v) for v in c[0]) / len(c[0]))
            row.append("%.3f (%.2f-%.2f)" % (gm, min(c[0]), max(c[0])))
            srcs += c[1]
        row += [card, joined(x.commit for x in srcs)]
        rows.append(row)
    header = ["shape", "rows per expert"] + ["%s / 128-row, %s" % (names[t], d) for t, d in columns] + ["card", "commit"]
    return ["### Experts: Hopper tile per shape class\n",
            "`moekit-bench-sm90-tiles`: each axis-M GEMM of the sm_90a path (forward gate-up with h, with h and u, "
            "down, dx, the act-backward dgrad; the cluster of two, with B multicast, runs the three forward ones) timed "
            "on every tile in interleaved rounds; geometric mean (range) over those kernels of each tile's time over "
            "the 128 x 256 tile's (below 1: faster than it). `sm90::choose_tile` picks the 64-row tile at 32 rows per "
            "expert or fewer on average, 128 x 256 above, the cluster never (docs/experts.md \"Tile per shape "
            "class\").\n",
            table(header, rows) + "\n"]


def render_ep(sources, plot):
    files = sorted(of(sources, "ep"), key=lambda s: (s.card, num(s.data.get("num_gpus")) or 0, s.name))
    out = []
    for op in ("dispatch", "combine", "layout"):
        rows, points, roofs, fracs, tr = [], [], [], [], []
        for s in files:
            d = s.data
            mk = d.get("moekit") or {}
            torch = d.get("torch_results") or {}
            n = d.get("num_gpus") or mk.get("num_gpus")
            shape = mk.get("shape") or d.get("shape") or {}
            label = "%s GPUs" % n
            nccl = mk.get("nccl_alltoall") or {}
            t_op = (torch.get("torch_" + op) or {}) if op != "layout" else {}
            a2a = torch.get("all_to_all_single") or {}
            results = sorted(mk.get("results") or [], key=lambda r: (0 if r.get("mode") == "exact" else 1, str(r.get("mode")),
                                                                     num(r.get("chunks")) or 0))
            for r in results:
                us = r.get(op + "_us")
                frac = num(r.get(op + "_fraction_of_alltoall"))
                speed = ratio(t_op.get("us"), us) if op != "layout" else None
                if op != "layout":
                    fracs.append(frac)
                    tr.append(speed)
                row = [label, "T=%s H=%s K=%s E=%s per rank" % (shape.get("tokens_per_rank", "?"), shape.get("hidden", "?"),
                                                                 shape.get("top_k", "?"), shape.get("experts", "?")),
                       r.get("mode", "n/a"), r.get("chunks", "n/a"), fmt_us(us)]
                if op != "layout":
                    row += [fmt_us(nccl.get("us")), fmt_pct(frac), fmt_rate(r.get(op + "_busbw_GBps")),
                            fmt_us(a2a.get("us")), fmt_us(t_op.get("us")), fmt_x(speed)]
                row += [s.card, joined([canonical_commit(mk.get("commit")), s.commit] if mk.get("commit") else [s.commit])]
                rows.append(row)
                bw = num(r.get(op + "_busbw_GBps"))
                if op != "layout" and bw and num(r.get("chunks")):
                    impl = "moekit capacity" if r.get("mode") == "capacity" else "moekit exact"
                    # exact and capacity drawn 3 % apart on x so neither hides the other
                    points.append((label, impl, r["chunks"] * (0.97 if impl == "moekit exact" else 1.03), bw, ""))
            if op != "layout":
                if num(nccl.get("busbw_GBps")):
                    roofs.append((label, nccl["busbw_GBps"], "--", "ncclAlltoAll, same bytes (the floor)"))
                if num(a2a.get("busbw_GBps")):
                    roofs.append((label, a2a["busbw_GBps"], ":", "torch all_to_all_single"))
                if num(t_op.get("busbw_GBps")):
                    roofs.append((label, t_op["busbw_GBps"], "-.", "torch %s (PyTorch EP layer)" % op))
        if not rows:
            continue
        out.append("### EP %s\n" % op)
        if op == "layout":
            out.append("The layout (who sends what where, exchanged counts) has no byte floor of its own; "
                       "its time is part of every step.\n")
            header = ["ranks", "shape", "mode", "chunks", "moekit us", "card", "commit"]
        else:
            summary = []
            if span(fracs, fmt_pct):
                summary.append("moekit at %s of ncclAlltoAll's bus bandwidth on the same bytes" % span(fracs, fmt_pct))
            if span(tr, fmt_x):
                summary.append("PyTorch's %s takes %s moekit's time" % (op, span(tr, fmt_x)))
            out.append("; ".join(summary) + ".\n")
            header = ["ranks", "shape", "mode", "chunks", "moekit us", "floor us (ncclAlltoAll)", "of floor",
                      "bus GB/s", "torch all_to_all_single us", "torch %s us" % op, "torch / moekit", "card", "commit"]
        out.append(table(header, rows) + "\n")
        if op != "layout":
            import matplotlib
            cmap = matplotlib.colormaps["tab10"]
            labels = []
            for p in points + [(r[0],) for r in roofs]:
                if p[0] not in labels:
                    labels.append(p[0])
            rl = [(kind, v, cmap(labels.index(lab) % 10), style, kind) for lab, v, style, kind in roofs]
            png = plot.bandwidth("ep-%s.png" % op, "EP %s: bus bandwidth (remote payload per rank / slowest rank's time)"
                                 % op, points, rl, "chunks per call (moekit); PyTorch and NCCL as lines",
                                 "bus GB/s", dodge=False,
                                 xticks=sorted({int(round(p[2])) for p in points}))
            if png:
                out.append("![EP %s](perf/%s)\n" % (op, png))
    return out


def render_layer(sources, plot):
    out = []
    rows = []
    for s in sorted(of(sources, "layer"), key=lambda s: s.name):
        res = s.data.get("results") or []
        for r in sorted(res, key=lambda r: (str(r.get("shape")), str(r.get("passes")), str(r.get("impl")))):
            rows.append([r.get("shape", "n/a"), r.get("passes", "n/a"), r.get("impl", "n/a"), fmt_us(r.get("median_us")),
                         fmt_rate(r.get("tflops")), fmt_x(r.get("speedup_vs_torch")), s.card, s.commit])
    if rows:
        out.append("### Layer forward and forward + backward\n")
        out.append("No floor or roofline: the layer's JSON records GEMM FLOPs but neither bytes nor a measured "
                   "GEMM rate. speedup = the PyTorch composition's time / this row's time (same run).\n")
        out.append(table(["shape", "passes", "impl", "us", "TFLOP/s", "speedup vs torch", "card", "commit"], rows) + "\n")
    return out


RENDER = {"router": render_router, "tokens": render_tokens, "experts": render_experts, "ep": render_ep,
          "layer": render_layer}

FLOOR_TEXT = {
    "router": "each input read once and each output written once over the measured device-to-device copy "
              "bandwidth: forward T E s + T K 8 bytes, backward 2 T E s + T K 8 bytes (s = logit size).",
    "tokens": "each input read once and each output written once over the measured copy bandwidth "
              "(rows padded to the alignment count as written).",
    "experts": "the GEMM FLOPs (forward 2 R H NU + 2 R I H, NU = 2I gated; forward + backward 3x that) over the dense "
               "8192^3 bf16 GEMM rate cuBLASLt reaches on the same card in the same run: a compute floor.",
    "ep": "ncclAlltoAll moving the same bytes per peer on the same GPUs in the same run (a measured floor, not "
          "a link's nominal rate); bus bandwidth = mean remote payload bytes per rank / slowest rank's median time.",
    "layer": "none recorded.",
}


def family_status(fam, srcs):
    if not srcs:
        return ["- **%s**: not measured yet (no JSON of this family in `bench/results/`)." % FAMILY_TITLES[fam]]
    lines = []
    commits = []
    for s in sorted(srcs, key=lambda s: s.name):
        for c in [s.commit] + ([canonical_commit(s.data["moekit"].get("commit"))] if fam == "ep" and isinstance(s.data.get("moekit"), dict)
                               and s.data["moekit"].get("commit") else []):
            if c not in commits:
                commits.append(c)
    cards = joined(s.card for s in sorted(srcs, key=lambda s: s.name))
    lines.append("- **%s**: measured on %s at %s (%s)." % (FAMILY_TITLES[fam], cards, ", ".join("`%s`" % c for c in commits),
                                                         ", ".join("`%s`" % s.name for s in sorted(srcs, key=lambda s: s.name))))
    # The whole layer runs every family's kernels.
    paths = ["kernels", "src"] if fam == "layer" else ["kernels/" + fam, "src/" + fam]
    where = " or ".join("`%s`" % p for p in paths)
    for c in commits:
        after = commits_after(c, paths)
        if isinstance(after, str):
            lines.append("  Whether %s changed since `%s` is unknown: %s." % (where, c, after))
        elif after:
            lines.append("  **Changed after `%s`, not yet re-measured**: %d commit%s touched %s since then, so these "
                         "numbers describe the code as it was at `%s`:" % (c, len(after), "" if len(after) == 1 else "s",
                                                                            where, c))
            for a in after:
                h, _, subj = a.partition(" ")
                lines.append("    - `%s` %s" % (h, subj[:140] + ("..." if len(subj) > 140 else "")))
        else:
            lines.append("  No commit touched %s after `%s`: the numbers describe the current code." % (where, c))
    return lines


def timing_text(sources):
    lines = []
    for s in sorted(sources, key=lambda s: s.name):
        t = s.data.get("timing")
        if isinstance(t, str):
            lines.append("- `%s`: %s" % (s.name, t))
        elif s.kind == "bench":
            lines.append("- `%s`: median of CUDA-event timings around each call, inputs rotated so every call reads "
                         "DRAM (this tool version records no separate device-only time)." % s.name)
        elif s.kind == "compare":
            lines.append("- `%s`: median of CUDA-event timings around each call; where a call's host side is "
                         "slower than its device side (eager PyTorch; moekit's shortest calls through ctypes) this "
                         "includes the host's time." % s.name)
        else:
            lines.append("- `%s`: per rank, median of CUDA-event timings with the ranks aligned by a barrier; the "
                         "slowest rank's median is reported." % s.name)
    return lines


def render_page(sources, skipped, plot):
    out = ["# Performance", "",
           "<!-- Generated by scripts/perf-page.py from bench/results/*.json. Do not edit by hand. -->", "",
           "Every number here comes from a JSON file in `bench/results/`, measured on the card and at the commit "
           "named next to it; nothing is estimated, scaled or carried over from another card. This page and the "
           "plots in `docs/perf/` are generated: to regenerate after new measurements land in `bench/results/`, run",
           "", "    python3 scripts/perf-page.py", "",
           "(it needs matplotlib: `pip install --user matplotlib`; CI does not run it). The same JSON and git "
           "history give the same page and PNGs byte for byte.", "",
           "## Where the numbers come from", ""]
    rows = []
    for s in sorted(sources, key=lambda s: s.name):
        tool = s.data.get("benchmark", "")
        if s.family == "ep":
            tool = "moekit-bench-ep%s (%s GPUs)" % (" + bench/ep/compare_torch.py" if "torch_results" in s.data else "",
                                                     s.data.get("num_gpus", "?"))
        elif s.kind == "compare":
            tool = "bench/%s/compare_torch.py (torch %s)" % (s.family, s.data.get("torch", "?"))
        rows.append(["`%s`" % s.name, tool, s.card, "`%s`" % s.commit, s.date])
    out.append(table(["file", "written by", "card", "commit", "measured (UTC)"], rows) if rows
               else "No JSON in `bench/results/` yet.")
    out.append("")
    for name, why in skipped:
        out.append("- `%s` was not read: %s." % (name, why))
    if skipped:
        out.append("")
    out += ["## Status per family", ""]
    for fam in FAMILIES:
        out += family_status(fam, of(sources, fam))
    out += ["", "## How to read this page", "",
            "- **moekit us**: the C++ benchmark tool's median (`bench-*.json`); **moekit us (same run)**: moekit "
            "timed by `compare_torch.py` in the same process as the PyTorch rows next to it (through ctypes).",
            "- **floor**: the least time the op could take on that card (per family below); **of floor** = floor / "
            "time, so 100 % is at the floor.",
            "- **eager / moekit**, **compile / moekit** and the like: PyTorch's time over moekit's, both from the "
            "same compare_torch.py run; above 1x moekit is faster, below 1x slower.",
            "- **n/a**: not measured, not applicable, or recorded as NaN/null (e.g. a device time where "
            "`torch.cuda._sleep` was missing).",
            "- Plots: the expert FFN gets a classic roofline (x = FLOP per byte of minimal DRAM traffic, y = "
            "TFLOP/s, roofs = the dense GEMM rate and the copy bandwidth measured on the same card). Router, token "
            "movement and EP do no arithmetic worth counting (intensity near 0 FLOP/byte), so their plots are the "
            "roofline's bandwidth roof alone: achieved GB/s (the floor's bytes over the time) against the bytes "
            "moved per call, with the measured copy bandwidth (or ncclAlltoAll bus bandwidth) as the roof. Colour = "
            "shape, marker = implementation; points of different shapes at the same x are drawn a few percent "
            "apart so that none hides another.",
            "- Where the benchmark tool has no row for an op (router fwd+bwd, tokens plan+permute), **of floor** "
            "uses the same-run moekit time.", "",
            "Floors:", ""]
    for fam in FAMILIES:
        if of(sources, fam):
            floor = FLOOR_TEXT[fam]
            out.append("- %s: %s" % (FAMILY_TITLES[fam], floor))
            for src in of(sources, fam):  # the launch floor the router benchmark times beside its calls
                empty, b2b = num(src.data.get("empty_kernel_us")), num(src.data.get("empty_kernel_b2b_us"))
                if empty is not None and b2b is not None:
                    out.append("  On %s (`%s`) an empty kernel costs the device %.2f us timed like a call, %.2f us "
                               "back to back: a floor below that cannot be reached by any kernel." %
                               (src.card, src.name, empty, b2b))
    if any(of(sources, "experts")):
        out.append("- Expert FFN roofline x: minimal DRAM bytes = forward x, y (R H each), the weights "
                   "E (H NU + I H) and the fp32 row weights; forward + backward adds dy, x, dx (3 R H), the weights "
                   "read again and dW written (2x the weights). Saved intermediates are not counted.")
    out += ["", "Timing:", ""] + timing_text(sources) + [""]
    for fam in FAMILIES:
        out.append("## %s" % FAMILY_TITLES[fam])
        out.append("")
        srcs = of(sources, fam)
        body = RENDER[fam](sources, plot) if srcs else []
        if not body:
            out.append("Not measured yet: no JSON of this family in `bench/results/`." if not srcs
                       else "The JSON of this family holds no rows this script can read.")
            out.append("")
        for block in body:
            out.append(block)
    return "\n".join(out).rstrip("\n") + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(REPO, "bench", "results"), help="directory of result JSON")
    ap.add_argument("--docs", default=os.path.join(REPO, "docs"), help="docs directory (writes performance.md, perf/)")
    args = ap.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("perf-page.py: matplotlib is missing. Install it for yourself with `pip install --user "
                 "matplotlib` (or in a virtual environment) and run again; nothing was written.")
    sources, skipped = load(args.results)
    perf_dir = os.path.join(args.docs, "perf")
    os.makedirs(perf_dir, exist_ok=True)
    plot = Plotter(perf_dir)
    page = render_page(sources, skipped, plot)
    with open(os.path.join(args.docs, "performance.md"), "w") as f:
        f.write(page)
    for old in sorted(glob.glob(os.path.join(perf_dir, "*.png"))):
        if os.path.basename(old) not in plot.written:
            os.remove(old)
    print("wrote %s and %d plots in %s" % (os.path.join(args.docs, "performance.md"), len(plot.written), perf_dir))
    for name, why in skipped:
        print("skipped %s: %s" % (name, why), file=sys.stderr)


if __name__ == "__main__":
    main()
