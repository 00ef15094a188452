"""Which exact CPU path is fastest for the DIFF V1 attention core? (issue #8, docs/benchmarks.md)

Times forward+backward of the attention core alone — softmax(Q1K1ᵀ)V − λ·softmax(Q2K2ᵀ)V with V 2d
wide — at the issue's CPU target shape (fp32, B=1, T=2048, d_model=512: 8 DIFF heads of d=32 vs a
standard layer of 16 heads of d=32), for every candidate implementation, against one SDPA call of
the standard layer. Run:  .venv/bin/python benchmarks/cpu_paths.py [--seq-len 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from diffattn.model.kernels import sdpa_differential


def split_value_4calls(q1, q2, k1, k2, v, lam, scale):
    """Current sdpa path (the authors' multihead_flashdiff_2): per component, one call per value half."""
    d = q1.shape[-1]
    va, vb = v.split(d, dim=-1)
    sd = lambda q, k, vv: F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)  # noqa: E731
    a1 = torch.cat([sd(q1, k1, va), sd(q1, k1, vb)], dim=-1)
    a2 = torch.cat([sd(q2, k2, va), sd(q2, k2, vb)], dim=-1)
    return a1 - lam * a2


def stacked_split_value(q1, q2, k1, k2, v, lam, scale):
    """Both components as 2H heads in one batch; two calls, one per value half."""
    h = q1.shape[1]
    d = q1.shape[-1]
    q = torch.cat([q1, q2], dim=1)
    k = torch.cat([k1, k2], dim=1)
    outs = [F.scaled_dot_product_attention(q, k, vv.repeat(1, 2, 1, 1), is_causal=True, scale=scale)
            for vv in v.split(d, dim=-1)]
    a = torch.cat(outs, dim=-1)
    return a[:, :h] - lam * a[:, h:]


def stacked_padded_qk(q1, q2, k1, k2, v, lam, scale):
    """Single call: both components as 2H heads, Q and K zero-padded to 2d so that the CPU flash
    kernel (which needs equal q/k/v widths) accepts the 2d-wide value; scale stays 1/√d."""
    h, d = q1.shape[1], q1.shape[-1]
    q = F.pad(torch.cat([q1, q2], dim=1), (0, d))
    k = F.pad(torch.cat([k1, k2], dim=1), (0, d))
    a = F.scaled_dot_product_attention(q, k, v.repeat(1, 2, 1, 1), is_causal=True, scale=scale)
    return a[:, :h] - lam * a[:, h:]


def fused_custom_backward(q1, q2, k1, k2, v, lam, scale):
    """The chosen sdpa path (kernels.sdpa_differential): one padded flash call, custom backward that
    saves no padded tensors."""
    return sdpa_differential(q1, q2, k1, k2, v, lam, scale=scale)


def eager(q1, q2, k1, k2, v, lam, scale):
    t = q1.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    def one(q, k):
        s = (q @ k.transpose(-1, -2)) * scale
        return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (one(q1, k1) - lam * one(q2, k2)) @ v


def standard(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _step(fn, inputs):
    out = fn(*inputs)
    out.backward(torch.ones_like(out))
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.grad is not None:
            x.grad = None


def time_round_robin(cands, warmup, repeats):
    """Median/min/max seconds of fwd+bwd per candidate; candidates alternate within each repeat so
    that load from other processes on a shared machine hits all of them alike."""
    for fn, inputs in cands.values():
        for _ in range(warmup):
            _step(fn, inputs)
    times = {name: [] for name in cands}
    for _ in range(repeats):
        for name, (fn, inputs) in cands.items():
            t0 = time.perf_counter()
            _step(fn, inputs)
            times[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(ts), min(ts), max(ts)) for n, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the candidates")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    b, t, d, h = 1, args.seq_len, 32, 8
    mk = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    q1, q2, k1, k2 = (mk(b, h, t, d) for _ in range(4))
    v = mk(b, h, t, 2 * d)
    lam = torch.tensor(0.3)
    scale = d ** -0.5
    diff_in = (q1, q2, k1, k2, v, lam, scale)
    ref = eager(*diff_in) if t <= 4096 else None
    std_in = (mk(b, 2 * h, t, d), mk(b, 2 * h, t, d), mk(b, 2 * h, t, d), scale)
    cands = {"standard sdpa (16 heads)": (standard, std_in)}
    fns = {"split-value, 4 calls (previous sdpa path)": split_value_4calls, "stacked split-value, 2 calls": stacked_split_value,
           "stacked, padded q/k, 1 call": stacked_padded_qk,
           "same, custom backward (kernels.sdpa_differential)": fused_custom_backward, "eager (T×T maps)": eager}
    if args.compile:
        fns.update({f"torch.compile({n})": torch.compile(f) for n, f in list(fns.items())})
    for name, fn in fns.items():
        if ref is not None:
            with torch.no_grad():
                err = (fn(*diff_in) - ref).abs().max().item()
            assert err < 1e-4, (name, err)
        cands[name] = (fn, diff_in)
    res = time_round_robin(cands, args.warmup, args.repeats)
    rows = [(n, *res[n]) for n in cands]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, "
          f"T={t}, fwd+bwd, median of {args.repeats} (min-max)")
    for name, med, lo, hi in rows:
        print(f"{name:45s} {med * 1e3:8.1f} ms  ({lo * 1e3:.1f}-{hi * 1e3:.1f})  {med / rows[0][1]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(name=n, median_s=m, min_s=lo, max_s=hi) for n, m, lo, hi in rows], f, indent=1)


if __name__ == "__main__":
    main()
