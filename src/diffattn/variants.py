"""The variant registry: one spec row per attention variant, read by config validation and the presets.

A variant is one attention class (``model/attention.py``: its parameters, forward, initialisation,
FLOPs, component maps and λ report) plus one :class:`VariantSpec` row here (its name, head semantics,
variant-only config fields and their defaults, and its parameter-matching rule). Everything else in
the pipeline — config validation, ``presets.matched``, the trainer's FLOPs, the eval probe and λ
read-out, the report's labels, the benchmarks — asks the row or the class, never a variant name.

Adding a variant (docs/architecture.md): write the class (subclass ``AttentionBase``) and call
``register(VariantSpec(name=..., cls=YourClass, ...))``. This module imports no torch: the built-in
rows name their class by ``"module:Class"`` and it is imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Mapping

# The DIFF V1 knobs (methods.md §1.3-1.5) shared by V1 and Shared DIFF.
_V1_FIELDS = {
    "lambda_init": "depth",  # λ_init(depth) = 0.8 − 0.6·exp(−0.3·depth), methods.md §1.3
    "lambda_std": 0.1,  # λ_q1, λ_k1, λ_q2, λ_k2 ~ N(0, 0.1²)
    "diff_norm": True,  # per-head RMSNorm over 2·head_dim (Table 6: removing it hurts)
    "diff_norm_affine": True,  # learnable gain, as the current unilm top-level files
    "diff_norm_gain_init": 1.0,  # starting value of that gain (the reference code: 1)
}


def _shared_rank_default(cfg) -> int:
    """Well below the break-even rank D·Hd / (2(D + Hd)) at which Shared DIFF saves nothing."""
    hd = cfg.n_head * cfg.head_dim
    return max(1, min(16, cfg.d_model * hd // (4 * (cfg.d_model + hd))))


@dataclass(frozen=True)
class VariantSpec:
    """One attention variant, as the pipeline outside the model sees it.

    name: the ``ModelConfig.attention`` value.
    cls: the attention class, or ``"module:Class"`` imported on first use.
    label: the name reports print.
    heads: what ``n_head`` counts, in words (docs and ``diffattn info``).
    head_split: ``head_dim`` defaults to ``d_model / (head_split · n_head)`` (2 for DIFF V1: two sub-heads).
    fields: the variant-only ``ModelConfig`` fields this variant uses, with their defaults (a value, or a
        callable of the config being built for defaults derived from the shape); ``None`` elsewhere.
    baseline_heads: the matching rule — heads (and K/V heads) per head of the parameter-matched standard
        Transformer (``presets.matched``; methods.md §1.6, §2.4).
    keep_kv_heads: matching keeps the baseline's K/V heads instead of scaling them (DIFF V2).
    differential: the layer combines two attention maps (reports compare it with the baseline as a DIFF variant).
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

    def __post_init__(self):
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        object.__setattr__(self, "baseline_heads", Fraction(self.baseline_heads))

    def attention_class(self):
        """The attention class (imported on first use for the built-in rows)."""
        if isinstance(self.cls, str):
            module, _, name = self.cls.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.cls

    def default(self, name: str, cfg) -> Any:
        value = self.fields[name]
        return value(cfg) if callable(value) else value


_REGISTRY: dict[str, VariantSpec] = {}


def register(spec: VariantSpec, *, replace: bool = False) -> VariantSpec:
    """Add a variant; every ``ModelConfig``, preset and command accepts its name from then on."""
    if not isinstance(spec, VariantSpec):
        raise TypeError(f"expected a VariantSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"variant {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a variant added with :func:`register` (tests)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered variant names, in registration order (the built-in four first)."""
    return tuple(_REGISTRY)


def get(name: str) -> VariantSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; valid: {', '.join(_REGISTRY)}") from None


def all_fields() -> tuple[str, ...]:
    """Every variant-only config field of every registered variant (first-seen order)."""
    return tuple(dict.fromkeys(f for spec in _REGISTRY.values() for f in spec.fields))


def users_of(field_name: str) -> tuple[str, ...]:
    """The variants that use the variant-only field ``field_name``."""
    return tuple(n for n, s in _REGISTRY.items() if field_name in s.fields)


def label(name: str) -> str:
    spec = _REGISTRY.get(name)
    return spec.label if spec is not None else name


register(VariantSpec(
    name="standard", cls="diffattn.model.attention:StandardAttention", label="Transformer (baseline)",
    heads="n_head plain heads of head_dim; head_dim defaults to d_model / n_head", differential=False))
register(VariantSpec(
    name="diff_v1", cls="diffattn.model.attention:DiffV1Attention", label="DIFF V1",
    heads="n_head DIFF heads, each two query/key sub-heads of head_dim and a 2·head_dim value; "
          "head_dim defaults to d_model / (2·n_head)",
    head_split=2, fields=_V1_FIELDS, baseline_heads=Fraction(1, 2)))
register(VariantSpec(
    name="diff_v2", cls="diffattn.model.attention:DiffV2Attention", label="DIFF V2",
    heads="n_head output heads, 2·n_head query heads and n_kv_head shared K/V heads, all of head_dim; "
          "head_dim defaults to d_model / n_head",
    baseline_heads=Fraction(2, 3), keep_kv_heads=True))
register(VariantSpec(
    name="shared_diff", cls="diffattn.model.attention:SharedDiffAttention", label="Shared DIFF",
    heads="as diff_v1 (Q/K projections: a shared base plus per-map low-rank updates of rank shared_rank)",
    head_split=2, fields={**_V1_FIELDS, "shared_rank": _shared_rank_default, "shared_init": "lora"},
    baseline_heads=Fraction(1, 2)))

# The names of the built-in variants, in their canonical order (``names()`` includes registered ones too).
BUILTIN = names()
BASELINE = "standard"  # the baseline every variant is parameter-matched to and judged against


def fused_differential(name: str) -> bool:
    """Whether the variant makes a kernel's ``attend_differential`` call (fused kernels apply to it)."""
    return bool(getattr(get(name).attention_class(), "uses_attend_differential", False))


__all__ = ["VariantSpec", "register", "unregister", "names", "get", "all_fields", "users_of", "label",
           "BUILTIN", "fused_differential"]

