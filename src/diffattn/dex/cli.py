"""``diffattn adapt``: DEX adaptation of a pretrained causal LM (``adapt dex``) and applying/merging an
adapter (``adapt load``). See docs/dex.md.

    diffattn adapt dex --base smollm2 --out runs/dex-smollm2            # default corpus, CPU-sized budget
    diffattn adapt dex --base DIR --text my.txt --heads importance --fraction 0.25 --out runs/a
    diffattn adapt load smollm2 runs/dex-smollm2 --prompt "The capital of France is"
    diffattn adapt load smollm2 runs/dex-smollm2 --merge --out runs/smollm2-dex-merged
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..utils.errors import UsageError
from ..utils.options import add_actions, add_options_to_parser, options_from_args, read_toml
from ..utils.progress import duration
from .run import DexRun, _check_out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _device(name: str) -> str:
    from ..utils.runtime import resolve_device

    return str(resolve_device(name))


def run_dex(args: argparse.Namespace) -> int:
    """``adapt dex``: defaults <- --config TOML (a [dex] table or top-level keys) <- flags; then :func:`adapt`."""
    from .run import adapt

    config = None
    if args.config:
        config = read_toml(args.config)
        config = config.get("dex", config)
    try:
        run = options_from_args(DexRun, args, config)
    except UsageError as e:  # unknown keys: name the file they came from
        raise UsageError(str(e).replace("options:", f"--config {args.config}:", 1)) from None
    summary = adapt(run)
    vb, va = summary["val_before"], summary["val_after"]
    print(f"adapter: {summary['out']} ({summary['adapter_bytes'] / 1e6:.2f} MB, {summary['trainable_params']:,} "
          f"trained params)")
    print(f"val ppl: base {vb['val_ppl']:.3f} -> adapted {va['val_ppl']:.3f} "
          f"(loss {vb['val_loss']:.4f} -> {va['val_loss']:.4f}, {va['val_tokens']:,} tokens)")
    print(f"tokens: {summary['tokens']:,} in {summary['elapsed_s']:.0f} s ({summary['tokens_per_s']} tok/s)")
    print(f"time: {duration(summary['wall_s'])} in all; "
          + ", ".join(f"{name} {duration(s)}" for name, s in summary["phases_s"].items()))
    return 0


def run_load(args: argparse.Namespace) -> int:
    import torch

    from .adapter import load_adapter, read_adapter_config, save_merged
    from .bases import load_base
    from .surgery import adapter_modules

    if args.out and not args.merge:
        raise ValueError("--out needs --merge (an unmerged adapter is used from its directory with `adapt load`)")
    if args.merge and not args.out:
        raise ValueError("--merge needs --out DIR")
    if args.prompt:
        from ..utils.errors import check_text

        check_text(args.prompt, "--prompt")  # before the base model's slow load
    cfg = read_adapter_config(args.adapter)
    if args.merge and not cfg.get("mergeable", True):
        raise ValueError(f"adapter {args.adapter} uses head_norm={cfg['options'].get('head_norm')} "
                         f"(a nonlinearity): it cannot be merged exactly into o_proj")
    if args.out:
        _check_out(Path(args.out))
    device = _device(args.device)
    base = load_base(args.base, device=device, log=_stderr)
    model, tok = base.model, base.tokenizer
    load_adapter(model, args.adapter)
    mods = adapter_modules(model)
    lam = cfg.get("lambda") or {}
    print(f"adapter {args.adapter}: method {cfg['options']['method']}, {len(mods)} layers, "
          f"{sum(len(v) for v in cfg['heads'].values())} heads, {cfg.get('adapter_params', 0):,} params, "
          f"t={cfg.get('step')} T={cfg['options']['anneal_steps']}"
          + (f", mean λ {sum(lam.values()) / len(lam):.4f}" if lam else ""))
    if args.prompt:
        if tok is None:
            raise ValueError("the base model has no tokenizer: --prompt needs one")
        enc = tok(args.prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(tok.decode(gen[0], skip_special_tokens=True))
    if args.merge:
        probe = torch.randint(0, int(model.config.vocab_size), (1, 32), generator=torch.Generator().manual_seed(0))
        probe = probe.to(device)
        with torch.no_grad():
            before = model(input_ids=probe).logits
        out = save_merged(model, args.out, tokenizer=tok, copy_from=base.path)
        with torch.no_grad():
            after = model(input_ids=probe).logits
        diff = float((before - after).abs().max())
        print(f"merged into o_proj: {out} (stock {type(model).__name__}; max |Δlogit| vs unmerged {diff:.2e})")
    return 0


DESCRIPTION = ("DEX (Kong et al., arXiv 2505.16333): add a differential operation on selected "
               "heads of a pretrained causal LM and train it on a small token budget.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    asub = add_actions(p, "adapt_command", "{dex,load}")

    d = asub.add_parser("dex", help="train a DEX adapter",
                        description="Select heads on calibration text, insert O' = O - λ(t)·O·W_D before o_proj, "
                                    "train the adapter, write adapter_config.json + adapter.safetensors.")
    d.add_argument("--config", help="TOML file of options (keys = option names; command line overrides)")
    add_options_to_parser(d, DexRun, skip=())  # one flag per DexRun field (dex/run.py)
    d.set_defaults(func=run_dex)

    ld = asub.add_parser("load", help="apply an adapter to its base: generate, or --merge into a stock model",
                         description="Load BASE, apply the adapter in ADAPTER; optionally generate from --prompt; "
                                     "with --merge --out DIR fold O(I - λW_D) into o_proj and save a stock model.")
    ld.add_argument("base", help="smollm2 | gemma3-270m | a HF causal-LM directory")
    ld.add_argument("adapter", help="adapter directory written by `adapt dex`")
    ld.add_argument("--merge", action="store_true", help="merge into o_proj (exact; no nonlinearity allowed)")
    ld.add_argument("--out", help="where --merge writes the stock model directory")
    ld.add_argument("--prompt", help="greedy-decode a continuation with the adapted model")
    ld.add_argument("--max-new-tokens", type=int, default=32)
    ld.add_argument("--device", default="auto")
    ld.set_defaults(func=run_load)
