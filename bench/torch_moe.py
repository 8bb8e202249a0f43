#!/usr/bin/env python3
"""PyTorch eager baseline of a dtopp training step: the same MoE language model (same
shapes, same routing, dropless), timed beside `dtopp bench train`.

The model is `python/dtopp_torch.py`'s, the one `docs/export.md` describes: token embedding, pre-norm blocks of
causal self-attention (fused qkv, RoPE on consecutive pairs) and an MoE feed-forward of
SwiGLU experts (a dense SwiGLU in the blocks `moe_every` skips), final RMSNorm, untied
head. Routing: DRN (standardise the router logits over experts, scale by the layer's
theta, softmax) or softmax, Top-p at the controller's p (the fewest top-ranked experts
whose mass reaches p, capped at k_max) or Top-k, weights renormalised over the selected
set; the PI controller updates p from a_t after every step (on the host, as an eager
implementation does). Dispatch is dropless, the usual eager way: the (token, expert)
routes sorted by expert, a loop over experts with index_select / index_add_. Loss: CE +
balance + router entropy with the config's coefficients; AdamW (decay on matrices only),
warmup + cosine schedule, global-norm clipping.

Usage, on the GPU machine (one run, side by side):
  dtopp bench train --preset small --backend cuda --write-config small.json --peak-tflops 989
  python3 bench/torch_moe.py --config small.json --peak-tflops 989 [--dtype f32|bf16|f16]

Prints tokens/s, the median step time, a_t, model TFLOP/s (the same FLOP count as dtopp:
6 N_active_matmul + 12 L d S per token), MFU and peak memory
(torch.cuda.max_memory_allocated; the process's peak RSS on the CPU).
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# The model and its routing are dtopp_torch's (python/), which loads `dtopp export`s too.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from dtopp_torch import DRN_EPS, MoeLm, rms_norm  # noqa: E402


def flops_per_token(m, active):
    """dtopp's ModelConfig::training_flops_per_token: 6 N_active_matmul + 12 L d S."""
    d, v, e, f, layers = m["d_model"], m["vocab"], m["experts"], m["expert_hidden"], m["layers"]
    moe_blocks = sum(1 for l in range(layers) if l % m["moe_every"] == 0)
    dense_blocks = layers - moe_blocks
    matmul = layers * 4 * d * d + d * v  # attention, head
    matmul += moe_blocks * (d * e + 3 * active * d * f) + dense_blocks * 3 * d * m["dense_hidden"]
    return 6 * matmul + 12 * layers * d * m["seq_len"]


def lr_at(step, total, o):
    if step <= o["warmup_steps"]:
        return o["lr"] * step / max(o["warmup_steps"], 1)
    t = (step - o["warmup_steps"]) / max(total - o["warmup_steps"], 1)
    return o["min_lr"] + 0.5 * (o["lr"] - o["min_lr"]) * (1 + math.cos(math.pi * min(t, 1.0)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="JSON from `dtopp bench train --write-config`")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"],
                    help="autocast dtype of the products (default: the config's run.precision); "
                         "parameters and optimizer state stay f32, as in dtopp")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cfg = json.load(open(args.config))
    m, r, o, run, loss_cfg = cfg["model"], cfg["routing"], cfg["optimizer"], cfg["run"], cfg["loss"]
    device = torch.device(args.device)
    args.dtype = args.dtype or run.get("precision", "f32")
    # Mixed precision as dtopp does it: f32 parameters, products under autocast.
    dtype = torch.float32
    autocast_dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(args.dtype)
    torch.manual_seed(run["seed"])
    model = MoeLm(m, dtype, device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
    )
    mode = r["mode"]
    top_k = int(r["target"]) if mode == "topk" else None
    routing = {
        "drn": mode in ("dtopp", "drn-only"),
        "top_k": top_k,
        "p": r["threshold"] or 0.5,
        "k_max": r["k_max"] or m["experts"],
    }
    controlled = mode in ("dtopp", "dtopp-no-drn")
    integral, p0 = 0.0, None
    batch, seq = run["batch_size"] * run["grad_accum"], m["seq_len"]
    gen = torch.Generator(device="cpu").manual_seed(run["seed"])
    total = args.warmup + args.steps
    times, actives, last_loss = [], [], float("nan")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(1, total + 1):
        tokens = torch.randint(0, m["vocab"], (batch, seq + 1), generator=gen).to(device)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        else:
            t0 = time.perf_counter()
        if controlled and p0 is None and r["threshold"] is None:
            # p_0 as dtopp calibrates it (the mean mass of the T largest probabilities on the
            # first batch), approximated with the first MoE router on the embeddings.
            with torch.no_grad():
                h = model.embed[tokens[:, :-1]].reshape(batch * seq, -1)
                z = (rms_norm(h, model.blocks[0].ffn_norm) @ model.blocks[0].router).float()
                mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
                probs = torch.softmax((z - mu) / torch.sqrt(var + DRN_EPS), -1)
                p0 = probs.topk(int(math.ceil(r["target"])), -1).values.sum(-1).mean().item()
            routing["p"] = min(max(p0, r["p_min"]), r["p_max"])
        elif controlled and p0 is None:
            p0 = routing["p"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, o)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits, layers = model(tokens[:, :-1], routing)
            act = [layer["k"].float().mean() for layer in layers]
            bal = [layer["balance"] for layer in layers]
            ent = [layer["entropy"] for layer in layers]
            ce = F.cross_entropy(logits.float().view(-1, m["vocab"]), tokens[:, 1:].reshape(-1))
        loss = ce + loss_cfg["balance"] * torch.stack(bal).mean() + loss_cfg["entropy"] * torch.stack(ent).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        opt.step()
        a_t = torch.stack(act).mean().item()  # the host reads a_t: the controller's input
        last_loss = loss.item()
        if controlled:
            e_t = (r["target"] - a_t) / m["experts"]
            raw = p0 + r["kp"] * e_t + r["ki"] * (integral + e_t)
            if r["p_min"] <= raw <= r["p_max"]:
                integral += e_t
            routing["p"] = min(max(p0 + r["kp"] * e_t + r["ki"] * integral, r["p_min"]), r["p_max"])
        if cuda:
            end.record()
            torch.cuda.synchronize(device)
            elapsed = begin.elapsed_time(end) / 1e3
        else:
            elapsed = time.perf_counter() - t0
        if step > args.warmup:
            times.append(elapsed)
            actives.append(a_t)
        if not args.json:
            print(f"step {step}/{total}: {elapsed:.3f} s, loss {last_loss:.4f}, a_t {a_t:.3f}, p {routing['p']:.4f}", file=sys.stderr)

    median = statistics.median(times)
    active = sum(actives) / len(actives)
    tokens_per_sec = batch * seq / median
    fpt = flops_per_token(m, active)
    tflops = fpt * tokens_per_sec / 1e12
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    result = {
        "backend": f"pytorch {torch.__version__} eager ({args.device}, {args.dtype})",
        "mode": mode,
        "tokens_per_step": batch * seq,
        "steps": args.steps,
        "median_step_s": median,
        "tokens_per_sec": tokens_per_sec,
        "active_experts": active,
        "flops_per_token": fpt,
        "model_tflops": tflops,
        "mfu": tflops / args.peak_tflops if args.peak_tflops else None,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "last_loss": last_loss,
    }
    if args.json:
        print(json.dumps(result))
        return
    mfu = f"{100 * result['mfu']:.1f} %" if result["mfu"] is not None else "-"
    print("| backend | mode | tokens/s | median step | a_t | model TFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {result['backend']} | {mode} | {tokens_per_sec:.0f} | {median:.3f} s | {active:.3f} | {tflops:.3f} | {mfu} | {peak / 2**30:.2f} GiB ({kind}) |")


if __name__ == "__main__":
    main()
