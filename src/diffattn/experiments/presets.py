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
from .. import variants as variant_registry
from ..config import ModelConfig, variant_fields
from ..utils.options import opt, options_from_mapping, read_toml, set_dotted

# the repository's configs/ (editable installs, the README's setup), else ./configs
_REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
CONFIG_DIR = _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else Path("configs")
BASELINE = variant_registry.BASELINE
_TABLES = ("study", "data", "model", "train", "needle_mix", "eval", "recall")


def eval_tasks() -> tuple[str, ...]:
    """The evaluation tasks a study can run: the one task table, ``diffattn.eval.TASKS``."""
    from ..eval import TASKS as EVAL_TASKS  # loads the task modules (torch): only when a study is parsed

    return tuple(EVAL_TASKS)


def study_tasks() -> tuple[str, ...]:
    """Every ``[study] tasks`` name: the evaluation tasks and the recall study (experiments/recall.py)."""
    return (*eval_tasks(), "recall")


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
    """The parameter-matched configuration of ``variant`` (presets.matched; methods.md §1.6, §2.4); a
    same-heads control (a registry row's ``same_heads``, e.g. DIFF V2's) is the baseline with that variant's head
    counts (fewer parameters). ``options``: variant-only fields (e.g. ``diff_norm_gain_init``), applied to the
    variants that use them."""
    if variant == BASELINE:
        return baseline
    owner = variant_registry.same_heads_of(variant)
    if owner is not None:
        matched = model_presets.matched(baseline, owner.name)
        return baseline.replace(n_head=matched.n_head, n_kv_head=matched.n_kv_head)
    applicable = {k: v for k, v in (options or {}).items() if k in variant_fields(variant)}
    return model_presets.matched(baseline, variant, **applicable)


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class StudyTable:
    """The ``[study]`` table."""

    variants: list[str] | str | None = opt(None, "variants to train (default: every registered variant)")
    seeds: int | list[int] = opt(1, "a count or a list of seeds")
    tasks: list[str] = opt(["ppl", "needle", "attention-noise", "outliers", "lambda"], "evaluation tasks")
    v2_same_heads_baseline: bool = opt(True, "also train each variant's same-heads control (DIFF V2's)")
    variant_options: dict[str, Any] = opt({}, "variant-only ModelConfig fields, for the variants that use them")
    bench_repeats: int = opt(5, "timing repeats of the cost table (0: none)")

    def resolve(self, where: str) -> tuple[list[str], list[int]]:
        """(variants with the baseline first and the same-heads controls added, seeds), checked."""
        vs = variant_registry.names() if self.variants is None else self.variants
        if isinstance(vs, str):
            vs = [v.strip() for v in vs.split(",") if v.strip()]
        valid = variant_registry.names() + variant_registry.controls()
        bad = [v for v in vs if v not in valid]
        if bad or not vs:
            _fail(where, f"[study] variants: unknown {bad or 'empty list'}; valid: {', '.join(valid)}")
        if self.v2_same_heads_baseline:  # each variant's same-heads control (DIFF V2's), after the variants
            added = dict.fromkeys(filter(None, map(variant_registry.control_of, vs)))
            vs = list(vs) + [c for c in added if c not in vs]
        if BASELINE not in vs:
            vs = [BASELINE] + list(vs)  # every ratio and verdict is against the baseline
        seeds = self.seeds
        if _is_int(seeds):
            if not 1 <= seeds <= 100:
                _fail(where, f"[study] seeds must be in [1, 100], got {seeds}")
            seeds = list(range(seeds))
        if not isinstance(seeds, list) or not seeds or not all(map(_is_int, seeds)):
            _fail(where, f"[study] seeds must be a count or a list of integers, got {seeds!r}")
        return list(vs), seeds

    def check(self, where: str) -> None:
        valid = study_tasks()
        bad = [t for t in self.tasks if t not in valid]
        if bad:
            _fail(where, f"[study] tasks: unknown {bad}; valid: {', '.join(valid)}")
        known = set(variant_registry.all_fields())
        opts = self.variant_options
        if not isinstance(opts, dict) or set(opts) - known:
            bad = sorted(set(opts) - known) if isinstance(opts, dict) else opts
            _fail(where, f"[study] variant_options: unknown {bad!r}; valid: {', '.join(sorted(known))}")
        if not _is_int(self.bench_repeats) or self.bench_repeats < 0:
            _fail(where, f"[study] bench_repeats must be an integer >= 0, got {self.bench_repeats!r}")


@dataclass
class NeedleMixTable:
    """The ``[needle_mix]`` table (experiments/needle_mix.py)."""

    share: float = opt(0.0, "share of training rows replaced by retrieval sequences")
    max_needles: int = opt(6, "most needles in one retrieval sequence")

    def check(self, where: str) -> None:
        if not isinstance(self.share, (int, float)) or not 0 <= self.share <= 1:
            _fail(where, f"[needle_mix] share must be in [0, 1], got {self.share!r}")


def _table(cls, data: dict, name: str, where: str):
    """The ``[name]`` table as the dataclass ``cls`` (unknown keys: one line naming them), checked."""
    table = options_from_mapping(cls, dict(data.get(name, {})), source=where, unknown=f"[{name}] unknown key(s) {{names}}")
    table.check(where)
    return table


def _baseline(data: dict, where: str) -> ModelConfig:
    """The ``[model]`` table: the baseline Transformer (a named size + overrides, or ModelConfig fields)."""
    model = dict(data.get("model", {}))
    size = model.pop("preset", None)
    if model.pop("attention", BASELINE) != BASELINE:
        _fail(where, f"[model] describes the baseline Transformer: attention must be {BASELINE!r} (or omitted)")
    if "vocab_size" not in model and size is None:
        # replaced by the prepared data's vocabulary at run time; "bpe:N" tells it in advance
        tok = str(data.get("data", {}).get("tokenizer", "bpe:8192"))
        model["vocab_size"] = int(tok[4:]) if tok.startswith("bpe:") and tok[4:].isdigit() else 50257
    if size is not None:
        return model_presets.get(size, BASELINE, **model)
    return ModelConfig.from_dict({"attention": BASELINE, **model})


def _check_train_recall_eval(data: dict, tasks: list[str], where: str) -> None:
    train = dict(data.get("train", {}))
    for key in ("data", "out", "seed"):
        if key in train:
            _fail(where, f"[train] {key} is set by the study (per variant and seed); remove it")
    if "recall" in tasks:
        from .recall import RecallStudyOptions

        try:
            RecallStudyOptions.from_mapping(dict(data.get("recall", {})))
        except ValueError as e:
            _fail(where, f"[recall] {e}")
    ev = data.get("eval", {})
    if not isinstance(ev, dict) or any(not isinstance(v, dict) for v in ev.values()):
        _fail(where, "[eval.TASK] tables expected")
    bad = sorted(set(ev) - set(eval_tasks()))
    if bad:
        _fail(where, f"[eval] unknown task table(s) {bad}; valid: {', '.join(eval_tasks())}")


def parse_study(data: dict[str, Any], *, name: str, source: str | None = None) -> StudyConfig:
    """A preset's tables, validated, as a :class:`StudyConfig`; every error is one line naming the file."""
    where = source or name
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        _fail(where, f"unknown table(s) {', '.join(unknown)}; valid: {', '.join(_TABLES)}")
    study = _table(StudyTable, data, "study", where)
    variants, seeds = study.resolve(where)
    baseline = _baseline(data, where)
    for v in variants:  # fail now, not after an hour of training the first variants
        variant_config(baseline, v, study.variant_options)
    mix = _table(NeedleMixTable, data, "needle_mix", where)
    _check_train_recall_eval(data, study.tasks, where)
    return StudyConfig(name=name, variants=tuple(variants), seeds=tuple(seeds), tasks=tuple(study.tasks),
                       data=dict(data.get("data", {})), baseline=baseline, train=dict(data.get("train", {})),
                       needle_share=float(mix.share), needle_max=int(mix.max_needles),
                       eval={k: dict(v) for k, v in data.get("eval", {}).items()}, bench_repeats=study.bench_repeats,
                       source=source, variant_options=dict(study.variant_options),
                       recall=dict(data.get("recall", {})))


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
    """A preset (a name under configs/ or a .toml file) with ``--set TABLE.KEY=VALUE`` overrides applied."""
    path = preset_path(name_or_path)
    data = read_toml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value, example="train.max_steps=50")
    return parse_study(data, name=path.stem.removeprefix("compare-"), source=str(path))
