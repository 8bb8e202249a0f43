#!/usr/bin/env python3
"""PyTorch eager baseline of one DTop-p routing step, timed with CUDA events.

The composite a PyTorch MoE layer runs for Top-p routing with DRN, op for op as
`dtopp bench routing` times it:
  DRN (standardise over experts, scale by theta, softmax), sort descending, cumsum,
  mask (k_i = first rank whose prefix sum reaches p), renormalised weights, and the
  dropless dispatch plan (argsort of the selected pairs by expert, per-expert counts and
  offsets).
Also measures device-to-device copy bandwidth for the floor: bytes moved by the step
(logits read, probabilities written, selection written) / copy bandwidth.

Usage (on the GPU machine):
  python3 bench/torch_routing.py [--tokens 4096 16384 65536] [--experts 64 128 256]
                                 [--target 8] [--iters 20] [--json] [--dtopp PATH]
With --dtopp (the dtopp binary, built with `--features cuda`) each shape is also run
through `dtopp bench routing --backend cuda --no-cpu-baseline --json` in the same call,
and the side-by-side table is printed: dtopp's routing step (fused DRN + Top-p at the
device threshold, dispatch plan, controller update) against PyTorch's composite, the
ratio, and both against the bandwidth floor.
"""
import argparse
import json
import subprocess
import sys

import torch


def drn(z, theta=1.0, eps=1e-6):
    mu = z.mean(dim=-1, keepdim=True)
    var = ((z - mu) ** 2).mean(dim=-1, keepdim=True)
    return torch.softmax(theta * (z - mu) / torch.sqrt(var + eps), dim=-1)


def route_step(z, p):
    probs = drn(z)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    prefix = sorted_p.cumsum(dim=-1)
    # k_i = 1 + number of ranks whose prefix stays below p (the crossing expert included).
    k = (prefix < p).sum(dim=-1, keepdim=True) + 1
    k = k.clamp(max=z.shape[-1])
    ranks = torch.arange(z.shape[-1], device=z.device).expand_as(sorted_p)
    selected = ranks < k
    weights = torch.where(selected, sorted_p, torch.zeros_like(sorted_p))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    # Dispatch plan: selected (token, expert) pairs grouped by expert, token order kept.
    token_ids = torch.arange(z.shape[0], device=z.device).unsqueeze(1).expand_as(order)
    experts = order[selected]
    tokens = token_ids[selected]
    route_w = weights[selected]
    by_expert = torch.argsort(experts, stable=True)
    route_tokens = tokens[by_expert]
    route_weights = route_w[by_expert]
    counts = torch.bincount(experts, minlength=z.shape[-1])
    offsets = torch.zeros(z.shape[-1] + 1, dtype=torch.long, device=z.device)
    offsets[1:] = counts.cumsum(0)
    return route_tokens, route_weights, offsets, k


def time_ms(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbps():
    n = 256 * 1024 * 1024 // 4
    a = torch.empty(n, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), 20)
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def dtopp_step_ms(binary, n, e, target, iters):
    """Median time of dtopp's whole routing step on CUDA for one shape, in ms."""
    cmd = [binary, "bench", "routing", "--backend", "cuda", "--no-cpu-baseline", "--json",
           "--tokens", str(n), "--experts", str(e), "--target", str(target),
           "--iters", str(iters)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.stderr}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    ops = {r["op"]: r["median_us"] / 1e3 for r in rows if r["backend"] == "cuda"}
    return ops["step"], ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--experts", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--target", type=float, default=8.0)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dtopp", help="path of the dtopp binary (built with --features cuda)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible to PyTorch")
    bandwidth = copy_bandwidth_gbps()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for e in args.experts:
        for n in args.tokens:
            z = torch.randn(n, e, device="cuda", generator=gen)
            # p such that the mean k is about T on these logits.
            probs = drn(z).sort(dim=-1, descending=True).values.cumsum(-1)
            p = float(probs[:, int(args.target) - 1].median())
            ms = time_ms(lambda: route_step(z, p), args.iters)
            # Floor: logits read, probabilities written, experts + weights written
            # ([N, E] each) and the counts: the traffic of dtopp's fused step.
            floor_bytes = 4 * n * e * 4 + 4 * n
            floor_ms = floor_bytes / (bandwidth * 1e9) * 1e3
            row = {"impl": "torch-eager", "tokens": n, "experts": e, "median_ms": ms,
                   "floor_ms": floor_ms, "copy_gbps": bandwidth,
                   "gpu": torch.cuda.get_device_name()}
            if args.dtopp:
                ours, ops = dtopp_step_ms(args.dtopp, n, e, args.target, args.iters)
                row.update({"dtopp_step_ms": ours, "dtopp_ops_ms": ops,
                            "speedup_vs_torch": ms / ours, "dtopp_over_floor": ours / floor_ms})
            if args.json:
                print(json.dumps(row))
            elif args.dtopp:
                if (e, n) == (args.experts[0], args.tokens[0]):
                    print(f"GPU: {row['gpu']}, device copy bandwidth {bandwidth:.0f} GB/s")
                    print("| N | E | dtopp step ms | PyTorch eager ms | speed-up | floor ms"
                          " | dtopp / floor | dtopp drn+select ms |")
                    print("|---|---|---|---|---|---|---|---|")
                print(f"| {n} | {e} | {ours:.4f} | {ms:.4f} | {ms / ours:.1f}x | {floor_ms:.4f}"
                      f" | {ours / floor_ms:.1f}x | {ops['drn+select']:.4f} |")
            else:
                print(f"N={n:6d} E={e:4d}  torch eager {ms:8.3f} ms   floor {floor_ms:7.4f} ms"
                      f"   (copy {bandwidth:.0f} GB/s)")


if __name__ == "__main__":
    main()
