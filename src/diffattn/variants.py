"""The variant registry: one spec row per attention variant, read by config validation, the presets, the
optimizer's and report's code, the drop-in layers and every command.

A variant is one attention class (``model/attention.py`` or a third-party module: its parameters, forward
pieces, initialisation, FLOPs, parameter buckets, component maps and λ report) plus one :class:`VariantSpec` row
(its name, head semantics, variant-only config fields with their defaults and value checks, its parameter-matching
rule, its same-heads control and the report's note). Everything else — config validation, ``presets.matched``,
the optimizer's weight-decay split, the trainer's FLOPs, the eval probe and λ read-out, the report, the
benchmarks, ``diffattn info`` / ``train`` / ``from_pretrained``, the ``diffattn.nn`` drop-in layers — asks the row
or the class, never a variant name.

Adding a variant (docs/architecture.md): write the class (subclass ``AttentionBase``) and call
``register(VariantSpec(name=..., cls=YourClass, ...))``; a package registers without being imported by
declaring an entry point in the group ``diffattn.variants`` (see :func:`load_entry_points`).

This module imports no torch, so a configuration validates without loading the model code: the four built-in
rows below are registered with ``register`` like any other, and their classes attach with :func:`attach` when
``model/attention.py`` loads (the foundation layer never imports the model layer; tools/check_layering.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace as _replace
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .utils.checks import check_bool, check_choice, check_float, check_int, fail

ENTRY_POINT_GROUP = "diffattn.variants"
BASELINE = "standard"  # the baseline every variant is parameter-matched to and judged against
_log = logging.getLogger("diffattn")


@dataclass(frozen=True)
class VariantField:
    """A variant-only ``ModelConfig`` field: its default (a value, or a callable of the config being built, for
    defaults derived from the shape) and its value check ``check(cfg, set_)``, which raises ``ValueError`` naming
    the field and may normalise the value with ``set_(name, value)``."""

    default: Any
    check: Callable[[Any, Callable[[str, Any], None]], None] | None = None


@dataclass(frozen=True)
class SameHeads:
    """A second baseline a variant is also judged against: the baseline Transformer with this variant's head
    counts (fewer parameters; DIFF V2's authors compare with it). ``name`` is its key in a study."""

    name: str
    label: str


@dataclass(frozen=True)
class VariantSpec:
    """One attention variant, as the pipeline outside the model sees it.

    name: the ``ModelConfig.attention`` value.
    cls: the attention class (None until :func:`attach` binds it: the built-in rows).
    label: the name reports print.
    heads: what ``n_head`` counts, in words (docs and ``diffattn info``).
    head_split: ``head_dim`` defaults to ``d_model / (head_split · n_head)`` (2 for DIFF V1: two sub-heads).
    fields: the variant-only ``ModelConfig`` fields this variant uses: name -> :class:`VariantField` (or a bare
        default); ``None`` elsewhere.
    baseline_heads: the matching rule — heads (and K/V heads) per head of the parameter-matched standard
        Transformer (``presets.matched``; methods.md §1.6, §2.4).
    keep_kv_heads: matching keeps the baseline's K/V heads instead of scaling them (DIFF V2).
    differential: the layer combines two attention maps (reports compare it with the baseline as a DIFF variant).
    same_heads: the same-heads control a study adds beside this variant (``[study] v2_same_heads_baseline``).
    matched_exactly: its projections have the baseline's shapes, so the report checks the parameter gap against
        the matching tolerance.
    report_note: the report's note on this variant's parameters (``{same_heads}`` becomes the control's label).
    """

    name: str
    cls: Any
    label: str
    heads: str
    head_split: int = 1
    fields: Mapping[str, Any] = field(default_factory=dict)
    baseline_heads: Fraction = Fraction(1)
    keep_kv_heads: bool = False
    differential: bool = True
    same_heads: SameHeads | None = None
    matched_exactly: bool = False
    report_note: str = ""

    def __post_init__(self):
        fields_ = {k: v if isinstance(v, VariantField) else VariantField(v) for k, v in self.fields.items()}
        object.__setattr__(self, "fields", MappingProxyType(fields_))
        object.__setattr__(self, "baseline_heads", Fraction(self.baseline_heads))

    def attention_class(self):
        """The attention class."""
        if self.cls is None:
            raise LookupError(f"variant {self.name!r} has no attention class attached yet (import diffattn.model)")
        return self.cls

    def default(self, name: str, cfg) -> Any:
        value = self.fields[name].default
        return value(cfg) if callable(value) else value

    def check(self, cfg, set_) -> None:
        """Run the value checks of this variant's fields on ``cfg``, in field order."""
        for f in self.fields.values():
            if f.check is not None:
                f.check(cfg, set_)


_REGISTRY: dict[str, VariantSpec] = {}
_entry_points_loaded = False


def register(spec: VariantSpec, *, replace: bool = False) -> VariantSpec:
    """Add a variant; every ``ModelConfig``, preset and command accepts its name from then on."""
    if not isinstance(spec, VariantSpec):
        raise TypeError(f"expected a VariantSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"variant {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def attach(name: str, cls: type) -> None:
    """Bind the attention class of a row registered without one (the built-ins: model/attention.py)."""
    _REGISTRY[name] = _replace(get(name), cls=cls)


def unregister(name: str) -> None:
    """Remove a variant added with :func:`register` (tests)."""
    _REGISTRY.pop(name, None)


def load_entry_points() -> None:
    """Register the variants that installed packages declare in the entry-point group ``diffattn.variants``
    (once per process; on the first lookup). An entry point names a :class:`VariantSpec`, a list of them, or a
    function that registers its rows itself or returns them. A plugin that fails to load is reported in one
    log line and skipped: it never breaks diffattn."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            _register_plugin(ep.load(), ep.name)
        except Exception as e:  # a third party's bug must not stop every command
            _log.warning("diffattn: variant plugin %r (%s) failed to load: %s", ep.name, ep.value, e)


def _register_plugin(obj, plugin: str) -> None:
    if callable(obj) and not isinstance(obj, VariantSpec):
        obj = obj()
    for spec in [obj] if isinstance(obj, VariantSpec) else (obj or []):
        have = _REGISTRY.get(spec.name)
        if have is None:
            register(spec)
        elif have is not spec:  # a plugin never replaces a registered variant (a built-in above all)
            _log.warning("diffattn: variant plugin %r: %r is already registered; its row is ignored", plugin,
                         spec.name)


def names() -> tuple[str, ...]:
    """Registered variant names, in registration order (the built-in four first)."""
    load_entry_points()
    return tuple(_REGISTRY)


def get(name: str) -> VariantSpec:
    if name not in _REGISTRY:
        load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; valid: {', '.join(_REGISTRY)}") from None


def all_fields() -> tuple[str, ...]:
    """Every variant-only config field of every registered variant (first-seen order)."""
    return tuple(dict.fromkeys(f for name in names() for f in _REGISTRY[name].fields))


def users_of(field_name: str) -> tuple[str, ...]:
    """The variants that use the variant-only field ``field_name``."""
    return tuple(n for n in names() if field_name in _REGISTRY[n].fields)


def label(name: str) -> str:
    """The printed name of a variant or of a same-heads control; the name itself for anything else."""
    for spec in (_REGISTRY[n] for n in names()):
        if spec.name == name:
            return spec.label
        if spec.same_heads is not None and spec.same_heads.name == name:
            return spec.same_heads.label
    return name


def same_heads_of(control: str) -> VariantSpec | None:
    """The variant whose same-heads control is named ``control`` (None when no row names it)."""
    return next((s for s in map(get, names()) if s.same_heads and s.same_heads.name == control), None)


def control_of(name: str) -> str | None:
    """The name of variant ``name``'s same-heads control (None when it has none, or ``name`` is no variant)."""
    spec = _REGISTRY.get(name) if name in names() else None
    return spec.same_heads.name if spec is not None and spec.same_heads is not None else None


def controls() -> tuple[str, ...]:
    """The names of the registered variants' same-heads controls (DIFF V2's ``standard_same_heads``)."""
    return tuple(c for c in map(control_of, names()) if c)


def fused_differential(name: str) -> bool:
    """Whether the variant makes a kernel's ``attend_differential`` call (fused kernels apply to it). Asks the
    class: the model code must be loaded (every caller builds models)."""
    return bool(getattr(get(name).attention_class(), "uses_attend_differential", False))


# ------------------------------------------------------------------------------------ the built-in rows
SHARED_INITS = ("lora", "random")


def _check_lambda_init(cfg, set_) -> None:
    li = cfg.lambda_init
    if isinstance(li, str):
        if li != "depth":
            fail("lambda_init", f"must be 'depth' or a number in [0, 1), got {li!r}")
    else:
        check_float("lambda_init", li, 0.0, 1.0, hi_open=True)
        set_("lambda_init", float(li))


def _check_norm_affine(cfg, set_) -> None:
    check_bool("diff_norm_affine", cfg.diff_norm_affine)
    if cfg.diff_norm_affine and not cfg.diff_norm:
        fail("diff_norm_affine", "must be false when diff_norm is false (there is no norm to scale)")


def _check_gain_init(cfg, set_) -> None:
    check_float("diff_norm_gain_init", cfg.diff_norm_gain_init, 0.0, 10.0, lo_open=True)
    set_("diff_norm_gain_init", float(cfg.diff_norm_gain_init))
    if cfg.diff_norm_gain_init != 1.0 and not cfg.diff_norm_affine:
        fail("diff_norm_gain_init", "applies only with diff_norm_affine=true (a learnable gain to start); "
             f"got {cfg.diff_norm_gain_init}")


def _shared_rank_default(cfg) -> int:
    """Well below the break-even rank D·Hd / (2(D + Hd)) at which Shared DIFF saves nothing."""
    hd = cfg.n_head * cfg.head_dim
    return max(1, min(16, cfg.d_model * hd // (4 * (cfg.d_model + hd))))


# The DIFF V1 knobs (methods.md §1.3-1.5) shared by V1 and Shared DIFF, checked in this order.
_V1_FIELDS = {
    # λ_init(depth) = 0.8 − 0.6·exp(−0.3·depth), methods.md §1.3; or a constant in [0, 1)
    "lambda_init": VariantField("depth", _check_lambda_init),
    # λ_q1, λ_k1, λ_q2, λ_k2 ~ N(0, 0.1²)
    "lambda_std": VariantField(0.1, lambda cfg, set_: check_float("lambda_std", cfg.lambda_std, 0.0, 10.0)),
    # per-head RMSNorm over 2·head_dim (Table 6: removing it hurts)
    "diff_norm": VariantField(True, lambda cfg, set_: check_bool("diff_norm", cfg.diff_norm)),
    # learnable gain, as the current unilm top-level files
    "diff_norm_affine": VariantField(True, _check_norm_affine),
    # starting value of that gain (the reference code: 1)
    "diff_norm_gain_init": VariantField(1.0, _check_gain_init),
}
_SHARED_FIELDS = {
    **_V1_FIELDS,
    "shared_rank": VariantField(_shared_rank_default, lambda cfg, set_: check_int(
        "shared_rank", cfg.shared_rank, 1, min(cfg.d_model, cfg.n_head * cfg.head_dim))),
    "shared_init": VariantField("lora", lambda cfg, set_: check_choice("shared_init", cfg.shared_init, SHARED_INITS)),
}

register(VariantSpec(
    name=BASELINE, cls=None, label="Transformer (baseline)",
    heads="n_head plain heads of head_dim; head_dim defaults to d_model / n_head", differential=False))
register(VariantSpec(
    name="diff_v1", cls=None, label="DIFF V1",
    heads="n_head DIFF heads, each two query/key sub-heads of head_dim and a 2·head_dim value; "
          "head_dim defaults to d_model / (2·n_head)",
    head_split=2, fields=_V1_FIELDS, baseline_heads=Fraction(1, 2), matched_exactly=True,
    report_note="identical projections, plus only the λ vectors and the per-head norm gains (methods.md §1.6)."))
register(VariantSpec(
    name="diff_v2", cls=None, label="DIFF V2",
    heads="n_head output heads, 2·n_head query heads and n_kv_head shared K/V heads, all of head_dim; "
          "head_dim defaults to d_model / n_head",
    baseline_heads=Fraction(2, 3), keep_kv_heads=True,
    same_heads=SameHeads("standard_same_heads", "Transformer, V2's heads"),
    report_note="DIFF V2 with h heads is matched to the baseline with 1.5h heads (the blog's ablation 4); "
                "'{same_heads}' is the same-heads Transformer the V2 authors also compare with."))
register(VariantSpec(
    name="shared_diff", cls=None, label="Shared DIFF",
    heads="as diff_v1 (Q/K projections: a shared base plus per-map low-rank updates of rank shared_rank)",
    head_split=2, fields=_SHARED_FIELDS, baseline_heads=Fraction(1, 2),
    report_note="Shared DIFF follows our reading of its abstract (shared base + low-rank Q/K updates; "
                "methods.md §3.3, UNCONFIRMED) with the V1 head layout, hence fewer parameters."))

# The names of the built-in variants, in their canonical order (``names()`` includes registered ones too).
BUILTIN = tuple(_REGISTRY)

__all__ = ["VariantSpec", "VariantField", "SameHeads", "register", "attach", "unregister", "load_entry_points",
           "names", "get", "all_fields", "users_of", "label", "same_heads_of", "control_of", "controls", "fused_differential", "BUILTIN", "BASELINE",
           "ENTRY_POINT_GROUP"]
