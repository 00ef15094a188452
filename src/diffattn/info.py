"""``diffattn info``: resolve a preset or config into a full ModelConfig and show its parameter counts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import presets
from .config import ATTENTION_VARIANTS, ModelConfig
from .fsutil import read_json


def parse_override(item: str) -> tuple[str, object]:
    """``key=value`` with a JSON value (bare words are strings): ``n_layer=4``, ``lambda_init=0.8``."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


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
    return presets.get(preset or "tiny", attention or "standard", **dict(parse_override(o) for o in overrides))


def run(args: argparse.Namespace) -> int:
    from .model import build_model

    cfg = resolve_config(args.preset, args.config, args.attention, args.set or [])
    import torch

    with torch.device("meta"):  # shapes only: no memory for the 13B presets
        model = build_model(cfg)
    counts = model.param_counts()
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "params": counts}, indent=2))
    else:
        for k, v in cfg.to_dict().items():
            print(f"{k:18s} {v}")
        print()
        for k, v in counts.items():
            print(f"params.{k:18s} {v:,}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="show a resolved model configuration and its parameter counts",
                       description="Resolve a named preset (or a config.json) for one attention variant, "
                                   "parameter-matched, and print the configuration and parameter counts.")
    p.add_argument("--preset", choices=list(presets.SIZES), help="named size (default: tiny)")
    p.add_argument("--config", help="a config.json (ModelConfig fields) instead of a preset")
    p.add_argument("--attention", choices=ATTENTION_VARIANTS, help="variant (parameter-matched to the preset)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
    return p
