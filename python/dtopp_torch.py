#!/usr/bin/env python3
"""A dtopp MoE language model in PyTorch: built from `dtopp export`'s JSON, loaded from its
safetensors weights, run forward with DTop-p routing at a given threshold (or Top-k).

Dependencies: torch and safetensors (numpy for the command line's .npy inputs).

    import dtopp_torch
    model, export = dtopp_torch.load("tiny.json")           # tiny.safetensors beside it
    routing = dtopp_torch.trained_routing(export)            # the controller's p at export
    logits, stats = model(tokens, routing)                   # tokens: [B, S] int64

The model is the one `docs/export.md` describes (and `bench/torch_moe.py` trains for the
side-by-side speed table): token embedding, pre-norm blocks of causal self-attention
(fused qkv, RoPE on consecutive pairs) and an MoE feed-forward of SwiGLU experts (dense
SwiGLU in the blocks `moe_every` skips), final RMSNorm, untied head. Routing: DRN or
softmax, Top-p (the fewest top-ranked experts whose mass reaches p, capped at k_max) or
Top-k, the weights renormalised over the selected set; ties rank the lower expert first.

Command line (what dtopp's parity test runs):
    python3 python/dtopp_torch.py tiny.json --inputs x.npy --targets y.npy [--threshold P]
prints JSON: the mean cross-entropy and, per MoE layer, each token's expert count and
whether its selection was decided within 1e-5 of the threshold.
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

DRN_EPS = 1e-6
NORM_EPS = 1e-5
THRESHOLD_SLACK = 1e-5


def rms_norm(x, gamma):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * gamma


def rope_tables(seq, head_dim, theta, device):
    inv = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def rope(x, cos, sin):
    # x: [B, H, S, Dh]; rotate consecutive pairs (2i, 2i+1).
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[: x.shape[2]], sin[: x.shape[2]]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return out.flatten(-2)


def route(probs, routing):
    """Selection of each row of `probs` [N, E]: (sorted probabilities, order, selected
    mask in rank order, k, and with `routing["report_near"]` whether each row's count was
    decided within THRESHOLD_SLACK of p, else None)."""
    n, e = probs.shape
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    if routing.get("top_k") is not None:
        k = torch.full((n, 1), routing["top_k"], device=probs.device)
        near = None
    else:
        prefix = sorted_p.cumsum(-1)
        k = (prefix < routing["p"]).sum(-1, keepdim=True) + 1
        k = k.clamp(max=routing.get("k_max") or e)
        near = None
        if routing.get("report_near"):
            near = ((prefix - routing["p"]).abs() <= THRESHOLD_SLACK).any(-1)
    ranks = torch.arange(e, device=probs.device).expand(n, e)
    return sorted_p, order, ranks < k, k, near


class MoeLm(torch.nn.Module):
    """`m`: the export's `model` object (dtopp's ModelConfig)."""

    def __init__(self, m, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.m = m
        d, e, f, v = m["d_model"], m["experts"], m["expert_hidden"], m["vocab"]
        std = m["init_std"]

        def mat(*shape):
            return torch.nn.Parameter(torch.randn(*shape, device=device, dtype=dtype) * std)

        def ones(n):
            return torch.nn.Parameter(torch.ones(n, device=device, dtype=dtype))

        self.embed = mat(v, d)
        self.blocks = torch.nn.ModuleList()
        for layer in range(m["layers"]):
            b = torch.nn.Module()
            b.attn_norm, b.ffn_norm = ones(d), ones(d)
            b.qkv, b.out = mat(d, 3 * d), mat(d, d)
            b.is_moe = layer % m["moe_every"] == 0
            if b.is_moe:
                b.router = mat(d, e)
                b.theta = torch.nn.Parameter(torch.ones(1, device=device, dtype=torch.float32))
                b.gate, b.up, b.down = mat(e, d, f), mat(e, d, f), mat(e, f, d)
            else:
                h = m["dense_hidden"]
                b.gate, b.up, b.down = mat(d, h), mat(d, h), mat(h, d)
            self.blocks.append(b)
        self.final_norm = ones(d)
        self.head = mat(d, v)
        hd = d // m["heads"]
        self.cos, self.sin = rope_tables(m["seq_len"], hd, m["rope_theta"], device)

    def attention(self, b, x):
        bsz, seq, d = x.shape
        h = self.m["heads"]
        q, k, v = (x @ b.qkv).split(d, dim=-1)
        shape = (bsz, seq, h, d // h)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, self.cos, self.sin), rope(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(bsz, seq, d) @ b.out

    def moe(self, b, x, routing):
        n, d = x.shape
        e = self.m["experts"]
        z = (x @ b.router).float()
        if routing["drn"]:
            mu = z.mean(-1, keepdim=True)
            var = (z - mu).pow(2).mean(-1, keepdim=True)
            probs = torch.softmax(b.theta * (z - mu) / torch.sqrt(var + DRN_EPS), dim=-1)
        else:
            probs = torch.softmax(z, dim=-1)
        sorted_p, order, selected, k, near = route(probs, routing)
        weights = torch.where(selected, sorted_p, torch.zeros_like(sorted_p))
        weights = weights / weights.sum(-1, keepdim=True)
        # Dropless dispatch: routes sorted by expert, one slice per expert.
        tok = torch.arange(n, device=x.device)[:, None].expand(n, e)[selected]
        exp = order[selected]
        w = weights[selected]
        perm = torch.argsort(exp, stable=True)
        tok, exp, w = tok[perm], exp[perm], w[perm]
        counts = torch.bincount(exp, minlength=e)
        out = torch.zeros_like(x)
        start = 0
        for j, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            idx = tok[start : start + c]
            xe = x.index_select(0, idx)
            ye = (F.silu(xe @ b.gate[j]) * (xe @ b.up[j])) @ b.down[j]
            # Under bf16/f16 autocast the expert product is 16-bit; the sum stays in out's f32.
            out.index_add_(0, idx, (ye * w[start : start + c, None].to(ye.dtype)).to(out.dtype))
            start += c
        load = counts.float()
        stats = {
            "k": k.squeeze(-1),
            "near_threshold": near,
            "balance": e * (probs.mean(0) * (load / load.sum().clamp(min=1))).sum(),
            "entropy": -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean(),
        }
        return out, stats

    def forward(self, tokens, routing):
        """Logits [B, S, V] and, per MoE layer, its routing statistics. `routing`: a dict
        with `drn` (bool) and either `p` (and optionally `k_max`) or `top_k`; `p` may be a
        list with one threshold per MoE layer."""
        bsz, seq = tokens.shape
        x = self.embed[tokens]
        layers = []
        for b in self.blocks:
            x = x + self.attention(b, rms_norm(x, b.attn_norm))
            h = rms_norm(x, b.ffn_norm)
            if b.is_moe:
                layer_routing = dict(routing)
                if isinstance(routing.get("p"), list):
                    layer_routing["p"] = routing["p"][len(layers)]
                y, stats = self.moe(b, h.reshape(bsz * seq, -1), layer_routing)
                x = x + y.view(bsz, seq, -1)
                layers.append(stats)
            else:
                x = x + (F.silu(h @ b.gate) * (h @ b.up)) @ b.down
        logits = rms_norm(x, self.final_norm) @ self.head
        return logits, layers


def parameter(model, name):
    """The model's parameter for an export tensor name (docs/export.md)."""
    parts = name.split(".")
    if parts[0] != "blocks":
        return getattr(model, parts[0])
    block = model.blocks[int(parts[1])]
    # blocks.l.attn_norm.gamma, blocks.l.attn.qkv, blocks.l.moe.router, blocks.l.dense.up
    leaf = parts[2] if parts[3] == "gamma" else parts[3]
    return getattr(block, leaf)


def load(config_path, weights_path=None, device="cpu"):
    """The model of a `dtopp export` (its JSON; the weights default to the .safetensors
    beside it) and the export's JSON."""
    from safetensors.torch import load_file

    with open(config_path) as f:
        export = json.load(f)
    if weights_path is None:
        weights_path = os.path.splitext(config_path)[0] + ".safetensors"
    model = MoeLm(export["model"], device=device)
    weights = load_file(weights_path, device=str(device))
    expected = {t["name"]: tuple(t["shape"]) for t in export["tensors"]}
    if set(weights) != set(expected):
        raise ValueError(f"{weights_path}: tensors {sorted(set(weights) ^ set(expected))} differ from {config_path}")
    with torch.no_grad():
        for name, tensor in weights.items():
            target = parameter(model, name)
            if tuple(tensor.shape) != tuple(target.shape) or tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(tensor)
    return model, export


def trained_routing(export, threshold=None, top_k=None):
    """The routing the export was trained with at export time (the controller's p for
    DTop-p), or at `threshold` / `top_k` instead."""
    r, policy = export["routing"], export["policy"]
    routing = {"drn": r["mode"] in ("dtopp", "drn-only"), "k_max": r.get("k_max")}
    if top_k is not None or "TopK" in policy:
        routing["top_k"] = top_k if top_k is not None else policy["TopK"]
    elif threshold is not None:
        routing["p"] = threshold
    elif "Fixed" in policy:
        routing["p"] = policy["Fixed"]
    else:
        states = policy["Controlled"]
        layers = sum(1 for l in range(export["model"]["layers"]) if l % export["model"]["moe_every"] == 0)
        p = [s["threshold"] for s in states]
        routing["p"] = p if len(p) == layers else p * layers
    return routing


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="the JSON `dtopp export` wrote")
    ap.add_argument("--inputs", required=True, help=".npy of [B, S] input tokens")
    ap.add_argument("--targets", required=True, help=".npy of [B, S] next tokens")
    ap.add_argument("--threshold", type=float, help="Top-p threshold for every layer")
    ap.add_argument("--top-k", type=int, help="Top-k instead")
    args = ap.parse_args()
    import numpy as np

    model, export = load(args.export)
    routing = trained_routing(export, args.threshold, args.top_k)
    routing["report_near"] = True
    inputs = torch.from_numpy(np.load(args.inputs).astype("int64"))
    targets = torch.from_numpy(np.load(args.targets).astype("int64"))
    with torch.no_grad():
        logits, layers = model(inputs, routing)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    print(json.dumps({
        "loss": loss.item(),
        "tokens": int(targets.numel()),
        "counts": [layer["k"].tolist() for layer in layers],
        "near_threshold": [
            layer["near_threshold"].tolist() if layer["near_threshold"] is not None else [False] * len(layer["k"])
            for layer in layers
        ],
        "routing": routing,
        "torch": torch.__version__,
        "loss_is_finite": math.isfinite(loss.item()),
    }))


if __name__ == "__main__":
    main()
