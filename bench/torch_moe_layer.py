#!/usr/bin/env python3
"""PyTorch eager baseline of one MoE layer, forward and backward, beside `dtopp bench moe`:
`python/dtopp_torch.py`'s layer (`MoeLm.moe`: DRN router, Top-k, dropless dispatch with
routes sorted by expert and a loop over experts with index_select / index_add_, SwiGLU
experts, renormalised combine), and a dense SwiGLU over the same N k rows: the same expert
FLOPs with no routing, the floor a grouped product aims at.

Usage (the same shape on both sides):
  dtopp bench moe --backend cuda --tokens 16384 --hidden 1024 --experts 64 --expert-hidden 1024 --top-k 8 --json
  python3 bench/torch_moe_layer.py --tokens 16384 --hidden 1024 --experts 64 --expert-hidden 1024 --top-k 8

Prints one JSON object: median milliseconds of the eager layer and of the dense SwiGLU,
each forward + backward, and the expert TFLOP/s (9 products of 2 D F per route).
"""

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# The layer is dtopp_torch's (python/), the one bench/torch_moe.py's model runs.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from dtopp_torch import MoeLm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--expert-hidden", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    n, d, e, f, k = a.tokens, a.hidden, a.experts, a.expert_hidden, a.top_k
    dev = torch.device(a.device)
    gen = torch.Generator(device="cpu").manual_seed(2026)

    def param(*shape, fan_in):
        t = torch.randn(*shape, generator=gen) / fan_in**0.5
        return t.to(dev).requires_grad_()

    router, gate, up, down = param(d, e, fan_in=d), param(e, d, f, fan_in=d), param(e, d, f, fan_in=d), param(e, f, d, fan_in=f)
    theta = torch.ones(1, device=dev, requires_grad=True)
    x = param(n, d, fan_in=1)
    upstream = torch.randn(n, d, generator=gen).to(dev)

    block = SimpleNamespace(router=router, theta=theta, gate=gate, up=up, down=down)
    shape = SimpleNamespace(m={"experts": e})
    routing = {"drn": True, "top_k": k}

    def layer():
        return MoeLm.moe(shape, block, x, routing)[0]

    rows = param(n * k, d, fan_in=1)
    dense_up = torch.randn(n * k, d, generator=gen).to(dev)

    def dense():
        return (F.silu(rows @ gate[0]) * (rows @ up[0])) @ down[0]

    def timed(fn, grad_out):
        times = []
        for i in range(a.warmup + a.steps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            (fn() * grad_out).sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    layer_s = timed(layer, upstream)
    dense_s = timed(dense, dense_up)
    flops = 9 * 2 * n * k * d * f
    print(json.dumps({
        "backend": f"pytorch {torch.__version__} eager on {dev}",
        "tokens": n, "hidden": d, "experts": e, "expert_hidden": f, "top_k": k,
        "layer_median_ms": layer_s * 1e3, "layer_expert_tflops": flops / layer_s / 1e12,
        "dense_median_ms": dense_s * 1e3, "dense_tflops": flops / dense_s / 1e12,
    }))


if __name__ == "__main__":
    main()
