"""``diffattn bench attention``: one attention layer of every variant, forward and forward+backward.

Two scopes, each with the standard Transformer as its baseline (ratio 1.00):

* ``layer``: the whole attention module from hidden states (projections, rotary, attention core,
  λ/norm, output projection), for each diffattn variant, for DIFF V1 with the authors' split-value
  core (``references.authors_split_value``) and for transformers' ``DiffLlamaAttention`` (SDPA).
* ``core``: softmax(QKᵀ)V alone — one SDPA call of the baseline's 2H heads; DIFF V1's core as the
  chosen kernel computes it (the fused differential entry when the kernel has one, else its two
  kernel calls and A1 − λ·A2); the authors' split-value core; DIFF V2's one GQA call over 2H query heads.
"""

from __future__ import annotations

import torch

from ..model.attention import build_attention
from .. import variants
from ..model.kernels import get_kernel
from ..model.layers import Rotary
from ..utils.environment import environment
from . import common
from .references import authors_split_value, diffllama_config, use_authors_core


def _fwd_bwd(fn, leaves):
    def step():
        out = fn()
        out.backward(torch.ones_like(out))
        for x in leaves:
            x.grad = None
    return step


def _fwd(fn):
    def step():
        with torch.no_grad():
            fn()
    return step


def build_rows(args, shape: common.Shape) -> dict[str, dict]:
    """name -> dict(scope, variant, impl, fwd=callable, fwd_bwd=callable, matched): the ``layer`` rows, then the
    ``core`` rows, their inputs drawn in that order from one seeded generator."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(args.device, args.torch_dtype)  # noqa: E731
    rows: dict[str, dict] = {}
    cfgs, v1 = _layer_rows(args, shape, rand, rows)
    _core_rows(args, shape, rand, cfgs, v1, rows)
    return rows


def _layer_rows(args, shape: common.Shape, rand, rows: dict[str, dict]):
    """Add the ``layer`` rows: every variant's attention module from hidden states and, with ``--references``, DIFF
    V1 with the authors' split-value core and transformers' DiffLlamaAttention. Returns the variants' configs and
    DIFF V1's."""
    dev, dt = args.device, args.torch_dtype
    b, t = shape.batch, shape.seq_len
    x = rand(b, t, shape.d_model).requires_grad_()
    positions = torch.arange(t, device=dev)[None].expand(b, t)

    def add_layer(name, variant, impl, module, call, matched):
        module = module.to(dev, dt)  # λ stays fp32 (KeepFP32Params)
        if args.compile:
            call = torch.compile(call)
        leaves = [x, *module.parameters()]
        rows[name] = dict(scope="layer", variant=variant, impl=impl, matched=matched,
                          fwd=_fwd(call), fwd_bwd=_fwd_bwd(call, leaves))

    cfgs = {}
    for variant in args.variant_list:
        cfg, matched = common.bench_config(shape, variant, args.kernel)
        cfgs[variant] = cfg
        attn = build_attention(cfg, layer_idx=1)
        rope = Rotary(positions, cfg.head_dim, cfg.rope_theta, dt)
        kern = args.kernel if variants.fused_differential(variant) else "sdpa"  # fused kernels serve DIFF V1-like
        add_layer(f"{variant} [{kern}]", variant, f"diffattn {kern}", attn,
                  (lambda a=attn, r=rope: a(x, r)[0]), matched)
    v1 = cfgs.get("diff_v1") or common.bench_config(shape, "diff_v1", args.kernel)[0]
    if args.references:
        attn = use_authors_core(build_attention(v1, layer_idx=1))
        rope = Rotary(positions, v1.head_dim, v1.rope_theta, dt)
        add_layer("diff_v1 [authors split-value]", "diff_v1", "authors flashdiff_2 (4 SDPA calls)", attn,
                  lambda a=attn, r=rope: a(x, r)[0], "parameters")
        from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention, DiffLlamaRotaryEmbedding

        hf_cfg = diffllama_config(v1)
        hf = DiffLlamaAttention(hf_cfg, layer_idx=1)
        cos, sin = DiffLlamaRotaryEmbedding(hf_cfg).to(dev)(x, positions)
        cos, sin = cos.to(dt), sin.to(dt)
        add_layer("DiffLlamaAttention [transformers sdpa]", "diff_v1", "transformers DiffLlama (2 SDPA calls)", hf,
                  lambda a=hf: a(x, (cos, sin), None)[0], "parameters")

    return cfgs, v1


def _core_rows(args, shape: common.Shape, rand, cfgs: dict, v1, rows: dict[str, dict]) -> None:
    """Add the ``core`` rows, softmax(QKᵀ)V alone on (B, heads, T, d) inputs: the baseline's one SDPA call, DIFF V1's
    core as the chosen kernel computes it, the authors' split-value core, DIFF V2's one GQA call."""
    dev = args.device
    b, t = shape.batch, shape.seq_len
    h2, kv2, d = shape.n_head, shape.n_kv_head, shape.head_dim
    scale = d ** -0.5
    kernel = get_kernel(args.kernel)
    std = [rand(b, h2, t, d).requires_grad_(), rand(b, kv2, t, d).requires_grad_(), rand(b, kv2, t, d).requires_grad_()]
    std_call = lambda: get_kernel("sdpa")(*std, scale=scale)[0]  # noqa: E731
    rows[f"{variants.BASELINE} core [sdpa]"] = dict(scope="core", variant=variants.BASELINE, impl="one SDPA call", matched="baseline",
                                        fwd=_fwd(std_call), fwd_bwd=_fwd_bwd(std_call, std))
    h, kv = v1.n_head, v1.n_kv_head
    q1, q2 = rand(b, h, t, d).requires_grad_(), rand(b, h, t, d).requires_grad_()
    k1, k2 = rand(b, kv, t, d).requires_grad_(), rand(b, kv, t, d).requires_grad_()
    v = rand(b, kv, t, 2 * d).requires_grad_()
    lam = torch.tensor(0.3, device=dev, requires_grad=True)
    leaves = [q1, q2, k1, k2, v, lam]
    def diff_core():  # what a DIFF V1 layer calls: the fused entry where the kernel has one, else two calls
        return kernel.attend_differential(q1, q2, k1, k2, v, lam, scale=scale)[0]

    if any(variants.fused_differential(name) for name in args.variant_list):
        impl = "fused differential entry" if kernel.fuses_differential else "two kernel calls"
        rows[f"diff_v1 core [{args.kernel}]"] = dict(scope="core", variant="diff_v1", impl=impl, matched="parameters",
                                                      fwd=_fwd(diff_core), fwd_bwd=_fwd_bwd(diff_core, leaves))
    if args.references:
        ref = lambda: authors_split_value(q1, q2, k1, k2, v, lam, scale=scale)  # noqa: E731
        rows["diff_v1 core [authors split-value]"] = dict(scope="core", variant="diff_v1", impl="4 SDPA calls",
                                                         matched="parameters", fwd=_fwd(ref), fwd_bwd=_fwd_bwd(ref, leaves))
    if "diff_v2" in args.variant_list:
        c2 = cfgs["diff_v2"]
        qv2 = [rand(b, 2 * c2.n_head, t, d).requires_grad_(), rand(b, c2.n_kv_head, t, d).requires_grad_(),
               rand(b, c2.n_kv_head, t, d).requires_grad_()]
        v2_call = lambda: get_kernel("sdpa")(*qv2, scale=scale)[0]  # noqa: E731
        rows["diff_v2 core [sdpa GQA]"] = dict(scope="core", variant="diff_v2", impl="one GQA SDPA call",
                                               matched=common.bench_config(shape, "diff_v2", "sdpa")[1],
                                               fwd=_fwd(v2_call), fwd_bwd=_fwd_bwd(v2_call, qv2))


def run(args) -> int:
    env = environment(args.device)
    results = []
    for t in args.seq_len:
        shape = common.shape_for(args, t)
        rows = build_rows(args, shape)
        progress = common.log if not args.quiet else None
        timed = {}
        for mode in ("fwd", "fwd_bwd"):
            res = common.round_robin({n: r[mode] for n, r in rows.items()}, warmup=args.warmup, repeats=args.repeats,
                                     device=args.device, progress=progress and (lambda m, mode=mode: progress(f"T={t} {mode}: {m}")))
            for n, s in res.items():
                timed.setdefault(n, {})[mode] = s
        base = {"layer": next(n for n, r in rows.items() if r["scope"] == "layer" and r["variant"] == variants.BASELINE),
                "core": "standard core [sdpa]"}
        table = []
        for n, r in rows.items():
            ratios = {m: timed[n][m]["median_s"] / timed[base[r["scope"]]][m]["median_s"] for m in ("fwd", "fwd_bwd")}
            results.append(dict(seq_len=t, batch=shape.batch, name=n, scope=r["scope"], variant=r["variant"],
                                impl=r["impl"], matched=r["matched"], fwd=timed[n]["fwd"], fwd_bwd=timed[n]["fwd_bwd"],
                                ratio_fwd=ratios["fwd"], ratio_fwd_bwd=ratios["fwd_bwd"]))
            table.append([r["scope"], n, common.fmt_ms(timed[n]["fwd"]), f"{ratios['fwd']:.2f}x",
                          common.fmt_ms(timed[n]["fwd_bwd"]), f"{ratios['fwd_bwd']:.2f}x"])
        common.print_table(
            f"attention, {args.device} {args.dtype}, B={shape.batch} T={t} d_model={shape.d_model} "
            f"baseline {shape.n_head} heads x {shape.head_dim} (kv {shape.n_kv_head}); median [min-max] of {args.repeats}",
            ["scope", "row", "fwd ms", "ratio", "fwd+bwd ms", "ratio"], table)
    common.write_json(args.json, dict(bench="attention", env=env, options=common.options(args), results=results))
    return 0

