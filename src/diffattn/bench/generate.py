"""``diffattn bench generate``: prefill and KV-cache decode throughput of every variant.

For each batch size and context length: prefill a random prompt of ``--seq-len`` tokens into a
fresh cache, then decode ``--new-tokens`` greedy tokens one at a time. Decode tokens/s =
batch × new tokens / decode time; prefill tokens/s = batch × prompt / prefill time. Our models use
their static ``KVCache``; transformers' ``DiffLlamaForCausalLM`` (SDPA) runs the same loop with its
own dynamic cache (``past_key_values``), so both measure model + cache, not ``generate()`` overheads.
With ``--kernel triton`` on a GPU, DIFF V1 / Shared DIFF decode uses the fused split-key kernel.
"""

from __future__ import annotations

import time

import torch

from ..model import KVCache, build_model
from ..utils.environment import environment
from . import common
from .references import diffllama_config, use_authors_core
from .train import row_specs


def build_decoder(args, shape: common.Shape, spec: dict):
    """A function running prefill + decode once, returning (prefill seconds, decode seconds)."""
    dev, dt = args.device, args.torch_dtype
    cfg, matched = common.bench_config(shape, spec["variant"], spec.get("kernel", "sdpa"))
    torch.manual_seed(0)
    hf = bool(spec.get("hf"))
    if hf:
        from transformers import DiffLlamaForCausalLM

        model = DiffLlamaForCausalLM(diffllama_config(cfg))
    else:
        model = build_model(cfg)
        if spec.get("authors"):
            use_authors_core(model)
    model = model.to(dev, dt).eval()
    prompt = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len),
                           generator=torch.Generator().manual_seed(1)).to(dev)
    n_new = args.new_tokens

    @torch.no_grad()
    def run_once():
        common.sync(dev)
        t0 = time.perf_counter()
        if hf:
            out = model(input_ids=prompt, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        else:
            cache = KVCache.for_model(model, shape.batch, shape.seq_len + n_new)
            logits = model(prompt, cache=cache)[:, -1]
        common.sync(dev)
        t1 = time.perf_counter()
        for _ in range(n_new):
            nxt = logits.argmax(-1)[:, None]
            if hf:
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
            else:
                logits = model(nxt, cache=cache)[:, -1]
        common.sync(dev)
        return t1 - t0, time.perf_counter() - t1

    return model, run_once, matched


def run(args) -> int:
    env = environment(args.device)
    progress = None if args.quiet else common.log
    results = []
    for t in args.seq_len:
        for bsz in args.batch:
            shape = common.shape_for(args, t, batch=bsz)
            specs = row_specs(args)
            built = {n: build_decoder(args, shape, s) for n, s in specs.items()}
            prefill = {n: common.Timing() for n in built}
            decode = {n: common.Timing() for n in built}
            if progress:
                progress(f"T={t} B={bsz}: warm-up")
            for n, (_, fn, _) in built.items():
                for _ in range(args.warmup):
                    fn()
            for r in range(args.repeats):
                if progress:
                    progress(f"T={t} B={bsz}: repeat {r + 1}/{args.repeats}")
                for n, (_, fn, _) in built.items():
                    p, d = fn()
                    prefill[n].times.append(p)
                    decode[n].times.append(d)
            base = next(iter(built))
            table = []
            for n, (model, _, matched) in built.items():
                pf, dc = prefill[n].summary(), decode[n].summary()
                dec_tok_s = bsz * args.new_tokens / dc["median_s"]
                pre_tok_s = bsz * t / pf["median_s"]
                r = dict(seq_len=t, batch=bsz, new_tokens=args.new_tokens, name=n, variant=specs[n]["variant"],
                         impl=specs[n]["impl"], matched=matched, prefill=pf, decode=dc,
                         decode_tokens_per_s=dec_tok_s, prefill_tokens_per_s=pre_tok_s,
                         ratio_decode=decode[base].summary()["median_s"] / dc["median_s"],
                         ratio_prefill=prefill[base].summary()["median_s"] / pf["median_s"])
                results.append(r)
                table.append([n, common.fmt_ms(pf), f"{pre_tok_s:,.0f}", f"{r['ratio_prefill']:.3f}",
                              common.fmt_ms(dc), f"{dec_tok_s:,.1f}", f"{r['ratio_decode']:.3f}"])
            common.print_table(
                f"generate, {args.device} {args.dtype}, B={bsz} context={t} +{args.new_tokens} tokens, "
                f"d_model={shape.d_model} L={shape.n_layer} baseline {shape.n_head} heads x {shape.head_dim}; "
                f"median [min-max] of {args.repeats}",
                ["row", "prefill ms", "prefill tok/s", "vs std", f"decode ms ({args.new_tokens} steps)",
                 "decode tok/s", "vs std"], table)
    common.write_json(args.json, dict(bench="generate", env=env, options=common.options(args), results=results))
    return 0

