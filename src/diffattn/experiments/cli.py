"""``diffattn compare`` (run a parameter-matched study) and ``diffattn report`` (re-render its report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import variants
from ..utils.options import parse_set


def _override(item: str) -> tuple[str, object]:
    return parse_set(item, example="train.max_steps=50")


def run_compare_cli(args: argparse.Namespace) -> int:
    from . import compare, report
    from .presets import load_study

    overrides = dict(_override(o) for o in args.set or [])
    if args.variants:
        overrides["study.variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.seeds is not None:
        overrides["study.seeds"] = args.seeds
    if args.quiet:  # the training runs' progress lines too
        overrides["train.progress"] = False
    study = load_study(args.preset, overrides)
    out = Path(args.out or f"runs/compare-{study.name}")
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    compare.run_compare(study, out, data_dir=args.data, log=log)
    print(report.summary_table(out))
    print(f"\nreport: {out / 'REPORT.md'}")
    return 0


def run_report_cli(args: argparse.Namespace) -> int:
    from . import report

    print(report.write_report(args.dir, args.format))
    return 0


COMPARE_DESCRIPTION = ("A parameter-matched comparison study of the differential-attention family "
                       "(configs/compare-*.toml). Re-running with the same --out resumes.")


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-tiny", help="preset name (configs/compare-NAME.toml) or a .toml file")
    p.add_argument("--variants", help=f"comma-separated subset of: {', '.join(variants.names() + variants.controls())}")
    p.add_argument("--seeds", type=int, help="number of seeds (overrides the preset)")
    p.add_argument("--data", help="a ready token-shard directory (skips `data prepare`)")
    p.add_argument("--out", help="output directory (default: runs/compare-PRESET)")
    p.add_argument("--set", action="append", metavar="TABLE.KEY=VALUE",
                   help="override a preset value, e.g. train.max_steps=50 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run_compare_cli)


REPORT_DESCRIPTION = ("Re-render REPORT.md (or a self-contained REPORT.html) of a compare output dir.")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a `diffattn compare` output directory")
    p.add_argument("--format", choices=["md", "html"], default="md")
    p.set_defaults(func=run_report_cli)
