"""Comparison-study presets: ``configs/compare-<name>.toml`` files, validated into a ``StudyConfig``.

A preset file has these tables (every one documented in the shipped files under ``configs/``):

``[study]``   variants, seeds, evaluation tasks, and whether DIFF V2 also gets its same-heads baseline
``[data]``    the corpus and tokenizer for ``diffattn data prepare`` (or a ready shard directory)
``[model]``   the *baseline* Transformer: a named size + overrides, or ModelConfig fields
``[train]``   TrainConfig fields shared by every variant (same data order, schedule and seed)
``[needle_mix]`` share of training rows replaced by retrieval sequences (experiments/needle_mix.py)
``[eval.TASK]`` options of each evaluation task (diffattn.eval), e.g. ``[eval.needle]`` lengths/samples
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import presets as model_presets
from ..utils.options import read_toml
from .. import variants as variant_registry
from ..config import ModelConfig, variant_fields

# the repository's configs/ (editable installs, the README's setup), else ./configs
_REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
CONFIG_DIR = _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else Path("configs")
SAME_HEADS = "standard_same_heads"  # the V2 authors' second baseline: a Transformer with V2's head count
TASKS = ("ppl", "needle", "attention-noise", "outliers", "lambda", "quant", "icl", "hallucination", "recall")
_TABLES = ("study", "data", "model", "train", "needle_mix", "eval", "recall")


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    name: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    data: dict[str, Any]
    baseline: ModelConfig
    train: dict[str, Any]
    needle_share: float = 0.0
    needle_max: int = 6
    eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    bench_repeats: int = 5
    source: str | None = None
    variant_options: dict[str, Any] = field(default_factory=dict)  # variant-only ModelConfig fields
    recall: dict[str, Any] = field(default_factory=dict)  # the [recall] table (experiments/recall.py)

    def model_config(self, variant: str) -> ModelConfig:
        return variant_config(self.baseline, variant, self.variant_options)


def variant_config(baseline: ModelConfig, variant: str, options: dict[str, Any] | None = None) -> ModelConfig:
    """The parameter-matched configuration of ``variant`` (presets.matched; methods.md §1.6, §2.4);
    ``standard_same_heads`` is the baseline with DIFF V2's head counts (fewer parameters).
    ``options``: variant-only fields (e.g. ``diff_norm_gain_init``), applied to the variants that use them."""
    if variant == "standard":
        return baseline
    if variant == SAME_HEADS:
        v2 = model_presets.matched(baseline, "diff_v2")
        return baseline.replace(n_head=v2.n_head, n_kv_head=v2.n_kv_head)
    applicable = {k: v for k, v in (options or {}).items() if k in variant_fields(variant)}
    return model_presets.matched(baseline, variant, **applicable)


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def parse_study(data: dict[str, Any], *, name: str, source: str | None = None) -> StudyConfig:
    where = source or name
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        _fail(where, f"unknown table(s) {', '.join(unknown)}; valid: {', '.join(_TABLES)}")
    study = dict(data.get("study", {}))
    variants = study.pop("variants", ["standard", "diff_v1", "diff_v2", "shared_diff"])
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    valid = variant_registry.names() + (SAME_HEADS,)
    bad = [v for v in variants if v not in valid]
    if bad or not variants:
        _fail(where, f"[study] variants: unknown {bad or 'empty list'}; valid: {', '.join(valid)}")
    if study.pop("v2_same_heads_baseline", True) and "diff_v2" in variants and SAME_HEADS not in variants:
        variants = list(variants) + [SAME_HEADS]
    if "standard" not in variants:
        variants = ["standard"] + list(variants)  # every ratio and verdict is against the baseline
    seeds = study.pop("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if not 1 <= seeds <= 100:
            _fail(where, f"[study] seeds must be in [1, 100], got {seeds}")
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        _fail(where, f"[study] seeds must be a count or a list of integers, got {seeds!r}")
    tasks = study.pop("tasks", ["ppl", "needle", "attention-noise", "outliers", "lambda"])
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        _fail(where, f"[study] tasks: unknown {bad}; valid: {', '.join(TASKS)}")
    variant_options = study.pop("variant_options", {})
    known = set(variant_registry.all_fields())
    if not isinstance(variant_options, dict) or set(variant_options) - known:
        bad = sorted(set(variant_options) - known) if isinstance(variant_options, dict) else variant_options
        _fail(where, f"[study] variant_options: unknown {bad!r}; valid: {', '.join(sorted(known))}")
    bench_repeats = study.pop("bench_repeats", 5)
    if not isinstance(bench_repeats, int) or bench_repeats < 0:
        _fail(where, f"[study] bench_repeats must be an integer >= 0, got {bench_repeats!r}")
    if study:
        _fail(where, f"[study] unknown key(s) {', '.join(sorted(study))}")

    model = dict(data.get("model", {}))
    size = model.pop("preset", None)
    if "attention" in model and model["attention"] != "standard":
        _fail(where, "[model] describes the baseline Transformer: attention must be 'standard' (or omitted)")
    model.pop("attention", None)
    if "vocab_size" not in model and size is None:
        # replaced by the prepared data's vocabulary at run time; "bpe:N" tells it in advance
        tok = str(data.get("data", {}).get("tokenizer", "bpe:8192"))
        model["vocab_size"] = int(tok[4:]) if tok.startswith("bpe:") and tok[4:].isdigit() else 50257
    if size is not None:
        baseline = model_presets.get(size, "standard", **model)
    else:
        baseline = ModelConfig.from_dict({"attention": "standard", **model})
    for v in variants:  # fail now, not after an hour of training the first variants
        variant_config(baseline, v, variant_options)

    train = dict(data.get("train", {}))
    for key in ("data", "out", "seed"):
        if key in train:
            _fail(where, f"[train] {key} is set by the study (per variant and seed); remove it")
    mix = dict(data.get("needle_mix", {}))
    share, nmax = mix.pop("share", 0.0), mix.pop("max_needles", 6)
    if mix:
        _fail(where, f"[needle_mix] unknown key(s) {', '.join(sorted(mix))}")
    if not isinstance(share, (int, float)) or not 0 <= share <= 1:
        _fail(where, f"[needle_mix] share must be in [0, 1], got {share!r}")
    recall = dict(data.get("recall", {}))
    if "recall" in tasks:
        from .recall import RecallStudyOptions

        try:
            RecallStudyOptions.from_mapping(recall)
        except ValueError as e:
            _fail(where, f"[recall] {e}")
    ev = data.get("eval", {})
    if not isinstance(ev, dict) or any(not isinstance(v, dict) for v in ev.values()):
        _fail(where, "[eval.TASK] tables expected")
    bad = sorted(set(ev) - set(TASKS))
    if bad:
        _fail(where, f"[eval] unknown task table(s) {bad}; valid: {', '.join(TASKS)}")
    return StudyConfig(name=name, variants=tuple(variants), seeds=tuple(seeds), tasks=tuple(tasks),
                       data=dict(data.get("data", {})), baseline=baseline, train=train, needle_share=float(share),
                       needle_max=int(nmax), eval={k: dict(v) for k, v in ev.items()}, bench_repeats=bench_repeats,
                       source=source, variant_options=dict(variant_options), recall=recall)


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml":
        if not p.is_file():
            raise FileNotFoundError(f"--preset {p}: no such file")
        return p
    candidate = CONFIG_DIR / f"compare-{name_or_path}.toml"
    if not candidate.is_file():
        known = sorted(f.stem.removeprefix("compare-") for f in CONFIG_DIR.glob("compare-*.toml"))
        raise ValueError(f"unknown preset {name_or_path!r}; valid: {', '.join(known)} (or a .toml file)")
    return candidate


def load_study(name_or_path: str, overrides: dict[str, Any] | None = None) -> StudyConfig:
    path = preset_path(name_or_path)
    data = read_toml(path)
    for dotted, value in (overrides or {}).items():
        table, _, key = dotted.rpartition(".")
        if not table:
            raise ValueError(f"--set {dotted}: use TABLE.KEY (e.g. train.max_steps=50)")
        node = data
        for part in table.split("."):
            node = node.setdefault(part, {})
        node[key] = value
    return parse_study(data, name=path.stem.removeprefix("compare-"), source=str(path))
