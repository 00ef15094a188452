"""``diffattn info``: resolve a preset or config into a full ModelConfig and show its parameter counts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import presets, variants
from .config import ModelConfig
from .fsutil import read_json
from .utils.options import parse_set


def parse_override(item: str) -> tuple[str, object]:
    """``--set key=value`` (utils/options.py's grammar): ``n_layer=4``, ``lambda_init=0.8``."""
    return parse_set(item, example="n_layer=4")


def resolve_config(preset: str | None, config_file: str | None, attention: str | None, overrides: list[str]) -> ModelConfig:
    if config_file:
        path = Path(config_file)
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        data.update(dict(parse_override(o) for o in overrides))
        cfg = ModelConfig.from_dict(data)
        return presets.matched(cfg, attention) if attention and attention != cfg.attention else cfg
    return presets.get(preset or "tiny", attention or variants.BASELINE, **dict(parse_override(o) for o in overrides))


def run(args: argparse.Namespace) -> int:
    from .model import build_model

    cfg = resolve_config(args.preset, args.config, args.attention, args.set or [])
    import torch

    rough = 12 * cfg.n_layer * cfg.d_model ** 2 + 2 * cfg.vocab_size * cfg.d_model  # parameters, roughly
    # large presets: shapes only (no memory for 13B); small ones on the CPU, which skips the ~1.5 s that
    # initialising meta tensors costs (it imports torch._dynamo)
    with torch.device("meta" if rough > 50_000_000 else "cpu"):
        model = build_model(cfg)
    counts = model.param_counts()
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "params": counts}, indent=2))
    else:
        fields = cfg.to_dict()
        width = max(len(k) for k in [*fields, *(f"params.{k}" for k in counts)])  # one column for both tables
        for k, v in fields.items():
            print(f"{k:{width}s} {v}")
        print()
        for k, v in counts.items():
            print(f"{'params.' + k:{width}s} {v:,}")
    return 0


DESCRIPTION = ("Resolve a named preset (or a config.json) for one attention variant, "
               "parameter-matched, and print the configuration and parameter counts.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=list(presets.SIZES), help="named size (default: tiny)")
    p.add_argument("--config", help="a config.json (ModelConfig fields) instead of a preset")
    # no argparse choices: the registry is asked when the value is used (a plugin's variants load on the first
    # lookup, and `diffattn info --help` stays instant); an unknown name is one line listing the registered ones
    p.add_argument("--attention", metavar="VARIANT",
                   help="a registered variant (built in: " + ", ".join(variants.BUILTIN) + "), parameter-matched to "
                        "the preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
