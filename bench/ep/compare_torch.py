"""Expert-parallel dispatch/combine the PyTorch way, next to moekit's numbers from the same run.

    bench/ep/moekit-bench-ep --preset=deepseek-v3 --json=/tmp/ep-moekit.json   (build dir)
    python3 bench/ep/compare_torch.py --moekit=/tmp/ep-moekit.json --out=bench/results/

One process per GPU (torch.multiprocessing, NCCL backend, NCCL_NVLS_ENABLE=0), on the same GPUs
right after moekit-bench-ep. Measured, per rank, median of --repeats CUDA-event timings:
  all_to_all_single   torch.distributed.all_to_all_single with equal splits moving the same remote
                      payload per rank as moekit's dispatch (read from --moekit, else from this
                      script's own routing);
  torch_dispatch      what a PyTorch EP layer does: destinations from the indices, counts exchanged
                      with all_to_all_single, a host sync (.tolist()) for the split sizes, the rows
                      gathered with index_select, then all_to_all_single with uneven splits;
  torch_combine       partial rows back with all_to_all_single, summed per token with index_add_
                      in fp32, cast to bf16.
Routing: uniform random, K distinct experts per token (the distribution moekit-bench-ep uses, not
the same draws). Bus bandwidth = remote payload bytes per rank / slowest rank's median time.
Writes one JSON with moekit's results (when --moekit is given), these, and the fractions
moekit / all_to_all_single and moekit / torch; --out may be a directory (the file is then named
ep-<N>gpu-<gpu>.json) or a file path.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import sys

os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (set before torch loads NCCL)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, warmup, repeats):
    """Median / min CUDA-event microseconds of fn() after warmup calls; ranks aligned by a
    barrier before every call."""
    for _ in range(warmup):
        dist.barrier()
        fn()
    torch.cuda.synchronize()
    us = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        us.append(1000.0 * start.elapsed_time(end))
    return statistics.median(us)


def worker(rank, n, port, args, payload_per_rank, queue):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:%d" % port, rank=rank,
                            world_size=n)
    dev = torch.device("cuda", rank)
    T, H, K, E = args.tokens, args.hidden, args.top_k, args.experts
    per_rank = E // n
    gen = torch.Generator(device="cpu").manual_seed(args.seed * 1000 + rank)
    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.to(torch.int32).to(dev)
    x = (torch.rand(T, H, generator=gen) * 2 - 1).to(torch.bfloat16).to(dev)
    row_bytes = H * 2

    # Destinations, deduplicated: the (destination, token) pairs in destination-then-token order.
    def route():
        dest = (idx // per_rank).long()
        hit = torch.zeros(T, n, dtype=torch.bool, device=dev)
        hit.scatter_(1, dest, True)
        pairs = hit.t().nonzero()  # [rows, 2]: (destination, token), sorted
        counts = hit.sum(0)
        return pairs, counts

    pairs, counts = route()
    remote_rows = int(counts.sum().item() - counts[rank].item())
    own_payload = remote_rows * row_bytes
    payload = payload_per_rank if payload_per_rank else None

    # all_to_all_single with equal splits of the same remote payload.
    gathered = [None] * n
    dist.all_gather_object(gathered, own_payload)
    mean_payload = payload if payload else statistics.mean(gathered)
    per_peer = int(mean_payload / (n - 1) + 15) // 16 * 16
    a2a_in = torch.full((n * per_peer,), 7, dtype=torch.uint8, device=dev)
    a2a_out = torch.empty_like(a2a_in)
    t_a2a = timed(lambda: dist.all_to_all_single(a2a_out, a2a_in), args.warmup, args.repeats)

    # The PyTorch way of EP dispatch and combine.
    state = {}

    def dispatch():
        p, c = route()
        recv_counts = torch.empty_like(c)
        dist.all_to_all_single(recv_counts, c)
        in_splits = c.tolist()
        out_splits = recv_counts.tolist()  # the host sync every PyTorch EP dispatcher has
        send = x.index_select(0, p[:, 1])
        recv = torch.empty(sum(out_splits), H, dtype=x.dtype, device=dev)
        dist.all_to_all_single(recv, send, out_splits, in_splits)
        state.update(pairs=p, in_splits=in_splits, out_splits=out_splits, recv=recv)

    t_dispatch = timed(dispatch, args.warmup, args.repeats)
    partials = (torch.rand(state["recv"].shape, generator=None, device=dev) * 2 - 1).to(torch.bfloat16)

    def combine():
        back = torch.empty(len(state["pairs"]), H, dtype=partials.dtype, device=dev)
        dist.all_to_all_single(back, partials, state["in_splits"], state["out_splits"])
        y = torch.zeros(T, H, dtype=torch.float32, device=dev)
        y.index_add_(0, state["pairs"][:, 1], back.float())
        state["y"] = y.to(torch.bfloat16)

    t_combine = timed(combine, args.warmup, args.repeats)

    mine = {"a2a_us": t_a2a, "dispatch_us": t_dispatch, "combine_us": t_combine,
            "payload": own_payload, "per_peer": per_peer}
    everyone = [None] * n
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        queue.put(everyone)
    dist.barrier()
    dist.destroy_process_group()


def nccl_version_string():
    v = torch.cuda.nccl.version()
    return ".".join(str(p) for p in v) if isinstance(v, (tuple, list)) else str(v)


def gbps(nbytes, us):
    return nbytes / (us * 1e-6) / 1e9 if us > 0 else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--top-k", dest="top_k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--moekit", default=None, help="JSON written by moekit-bench-ep in this run "
                                                   "(default: bench-ep.json beside --out, if any)")
    ap.add_argument("--out", default=None, help="result JSON file, or a directory for "
                                                "ep-<N>gpu-<gpu>.json")
    args = ap.parse_args()
    n = args.gpus
    if n < 2:
        print("compare_torch.py needs at least 2 GPUs (found %d)" % n, file=sys.stderr)
        return 2
    moekit = None
    payload = None
    if args.moekit is None and args.out:
        # scripts/gpu-check.sh writes moekit-bench-ep's JSON as bench-ep.json next to --out.
        sibling = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bench-ep.json")
        if not (args.out.endswith("/") or os.path.isdir(args.out)) and os.path.exists(sibling):
            args.moekit = sibling
    if args.moekit:
        with open(args.moekit) as f:
            moekit = json.load(f)
        if moekit.get("num_gpus") != n:
            print("--moekit was measured on %s GPUs, this run uses %d" % (moekit.get("num_gpus"), n),
                  file=sys.stderr)
            return 2
        shape = moekit["shape"]
        args.tokens, args.hidden = shape["tokens_per_rank"], shape["hidden"]
        args.top_k, args.experts = shape["top_k"], shape["experts"]
        payload = moekit["payload_bytes_per_rank_mean"]
    if args.experts % n:
        print("--experts=%d is not a multiple of %d GPUs" % (args.experts, n), file=sys.stderr)
        return 2

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(n, free_port(), args, payload, queue), nprocs=n, join=True)
    ranks = queue.get()

    slowest = {k: max(r[k] for r in ranks) for k in ("a2a_us", "dispatch_us", "combine_us")}
    torch_payload = statistics.mean(r["payload"] for r in ranks)
    a2a_payload = payload if payload else torch_payload
    torch_rows = {
        "all_to_all_single": {"us": slowest["a2a_us"], "bytes_per_peer": ranks[0]["per_peer"],
                              "busbw_GBps": gbps(a2a_payload, slowest["a2a_us"])},
        "torch_dispatch": {"us": slowest["dispatch_us"],
                           "busbw_GBps": gbps(torch_payload, slowest["dispatch_us"])},
        "torch_combine": {"us": slowest["combine_us"],
                          "busbw_GBps": gbps(torch_payload, slowest["combine_us"])},
        "payload_bytes_per_rank_mean": torch_payload,
        "per_rank": ranks,
    }
    name = torch.cuda.get_device_name(0)
    result = {
        "benchmark": "ep",
        "gpu": name,
        "num_gpus": n,
        "torch": torch.__version__,
        "nccl": nccl_version_string(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": (moekit or {}).get("commit", os.environ.get("MOEKIT_COMMIT", "unknown")),
        "nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "shape": {"tokens_per_rank": args.tokens, "hidden": args.hidden, "dtype": "bf16",
                  "top_k": args.top_k, "experts": args.experts},
        "torch_results": torch_rows,
    }
    print("%-22s %10s %10s" % ("", "us", "busbw_GBs"))
    for k in ("all_to_all_single", "torch_dispatch", "torch_combine"):
        print("%-22s %10.1f %10.1f" % (k, torch_rows[k]["us"], torch_rows[k]["busbw_GBps"]))
    if moekit:
        result["moekit"] = moekit
        base = torch_rows["all_to_all_single"]["busbw_GBps"]
        fractions = []
        for row in moekit["results"]:
            if row["mode"] != "exact":
                continue
            fractions.append({
                "chunks": row["chunks"],
                "dispatch_fraction_of_torch_all_to_all": row["dispatch_busbw_GBps"] / base,
                "combine_fraction_of_torch_all_to_all": row["combine_busbw_GBps"] / base,
                "dispatch_speedup_vs_torch_dispatch": torch_rows["torch_dispatch"]["us"] / row["dispatch_us"],
                "combine_speedup_vs_torch_combine": torch_rows["torch_combine"]["us"] / row["combine_us"],
            })
            print("moekit exact, %d chunks: dispatch %.1f GB/s (%.0f%% of all_to_all_single, "
                  "%.2fx torch dispatch), combine %.1f GB/s (%.0f%%, %.2fx)" % (
                      row["chunks"], row["dispatch_busbw_GBps"],
                      100 * fractions[-1]["dispatch_fraction_of_torch_all_to_all"],
                      fractions[-1]["dispatch_speedup_vs_torch_dispatch"], row["combine_busbw_GBps"],
                      100 * fractions[-1]["combine_fraction_of_torch_all_to_all"],
                      fractions[-1]["combine_speedup_vs_torch_combine"]))
        result["moekit_vs_torch"] = fractions
        best = moekit.get("best_exact", {})
        print("moekit vs ncclAlltoAll (same run, same bytes), best exact: dispatch %.0f%%, "
              "combine %.0f%% (bar 80%%)" % (100 * best.get("dispatch_fraction_of_alltoall", 0),
                                              100 * best.get("combine_fraction_of_alltoall", 0)))
    if args.out:
        path = args.out
        if path.endswith("/") or os.path.isdir(path):
            slug = next((g for g in ("h200", "h100", "b200", "a100") if g in name.lower()),
                        "".join(c for c in name.lower() if c.isalnum()))
            path = os.path.join(path, "ep-%dgpu-%s.json" % (n, slug))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print("wrote %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
