#!/usr/bin/env python3
"""NumPy baseline of one DTop-p routing step on the CPU, timed beside `dtopp bench routing`.

The composite a NumPy user writes for Top-p routing with DRN, op for op as
`dtopp bench routing` times its `step` line:
  DRN (standardise over experts, scale by theta, softmax), a stable descending argsort,
  cumsum, the mask (k_i = first rank whose prefix sum reaches p, capped at k_max),
  renormalised weights, the dropless dispatch plan (stable argsort of the selected pairs
  by expert, per-expert counts and offsets) and the controller's a_t (the mean of k_i).
All arrays are float32, as dtopp's are. NumPy runs it on one core (its sort, cumsum and
elementwise ops are single-threaded).

Usage:
  python3 bench/np_route.py [--tokens 65536] [--experts 64] [--target 8] [--iters 10]
                            [--dtopp target/release/dtopp] [--json]
With --dtopp, `dtopp bench routing --backend cpu --json` runs on the same shape in the
same call and the side-by-side table gives dtopp's fast CPU step, the CPU reference's
step, NumPy's composite and the ratios.
"""
import argparse
import json
import subprocess
import sys
import time

import numpy as np


def drn(z, theta=1.0, eps=1e-6):
    mu = z.mean(axis=1, keepdims=True)
    var = ((z - mu) ** 2).mean(axis=1, keepdims=True)
    s = theta * (z - mu) / np.sqrt(var + eps)
    s = np.exp(s - s.max(axis=1, keepdims=True))
    return s / s.sum(axis=1, keepdims=True)


def route_step(z, p, k_max):
    n, e = z.shape
    probs = drn(z)
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    prefix = np.cumsum(sorted_p, axis=1)
    # k_i = 1 + number of ranks whose prefix stays below p (the crossing expert included).
    k = np.minimum((prefix < p).sum(axis=1) + 1, k_max)
    selected = np.arange(e)[None, :] < k[:, None]
    weights = np.where(selected, sorted_p, np.float32(0))
    weights /= weights.sum(axis=1, keepdims=True)
    experts = order[selected]
    tokens = np.repeat(np.arange(n), k)
    route_w = weights[selected]
    by_expert = np.argsort(experts, kind="stable")
    route_tokens = tokens[by_expert]
    route_weights = route_w[by_expert]
    counts = np.bincount(experts, minlength=e)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    a_t = k.mean()
    return route_tokens, route_weights, offsets, k, a_t


def median_ms(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def dtopp_steps(binary, n, e, target, iters):
    """Median ms of the routing step: dtopp's fast CPU ops and the CPU reference."""
    cmd = [binary, "bench", "routing", "--backend", "cpu", "--json", "--tokens", str(n),
           "--experts", str(e), "--target", str(target), "--iters", str(iters)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.stderr}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    step = {r["backend"]: r["median_us"] / 1e3 for r in rows if r["op"] == "step"}
    return step["cpu"], step["cpu-reference"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--target", type=float, default=8.0)
    ap.add_argument("--k-max", type=int, help="cap on k_i (default 2T, as dtopp bench)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtopp", help="path of the dtopp binary (a release build)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n, e = args.tokens, args.experts
    k_max = min(args.k_max or int(np.ceil(2 * args.target)), e)
    rng = np.random.default_rng(1)
    # The same logit distribution as dtopp bench routing: standard normal times 2.
    z = (rng.standard_normal((n, e)) * 2.0).astype(np.float32)
    # p such that the mean k is about T on these logits.
    prefix = np.cumsum(-np.sort(-drn(z), axis=1), axis=1)
    p = np.float32(np.median(prefix[:, max(int(args.target) - 1, 0)]))
    _, _, _, k, a_t = route_step(z, p, k_max)
    ms = median_ms(lambda: route_step(z, p, k_max), args.iters)
    row = {"impl": "numpy", "numpy": np.__version__, "tokens": n, "experts": e,
           "target": args.target, "k_max": k_max, "a_t": float(a_t), "median_ms": ms}
    if args.dtopp:
        fast, reference = dtopp_steps(args.dtopp, n, e, args.target, args.iters)
        row.update({"dtopp_cpu_ms": fast, "dtopp_cpu_reference_ms": reference,
                    "speedup_vs_numpy": ms / fast, "reference_vs_numpy": ms / reference})
    if args.json:
        print(json.dumps(row))
        return
    print(f"N={n} E={e} T={args.target} k_max={k_max}: NumPy {np.__version__} composite "
          f"{ms:.1f} ms (a_t = {a_t:.2f})")
    if args.dtopp:
        print("| impl | routing step ms | ratio to NumPy |")
        print("|---|---|---|")
        print(f"| NumPy composite | {ms:.1f} | 1.00x |")
        print(f"| dtopp cpu-reference | {reference:.1f} | {ms / reference:.2f}x |")
        print(f"| dtopp cpu (fast) | {fast:.1f} | {ms / fast:.2f}x |")


if __name__ == "__main__":
    main()
