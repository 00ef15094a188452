"""Named model sizes and parameter matching between variants.

Sizes are written as the *baseline Transformer* (``standard``) they describe; ``get(name, attention)``
turns one into the parameter-matched configuration of any variant with :func:`matched`.

Matching rules (methods.md §1.6, §2.4), with d the per-head width, kept fixed:

* ``diff_v1`` / ``shared_diff`` with H heads and Hkv K/V heads  <->  ``standard`` with 2H heads and
  2Hkv K/V heads: all four projections have identical shapes; DIFF V1 adds only the λ vectors (4d)
  and the per-head norm gain (2d) per layer. Shared DIFF uses the same head layout with fewer
  Q/K parameters (it is an ablation of V1's Q/K parameterisation).
* ``diff_v2`` with h output heads  <->  ``standard`` with 1.5h heads and the same K/V heads
  (the blog's "Transformer, 1.5h heads", ablation 4): identical Q+O widths; V2 adds W_λ (D·h).
  When the baseline is MHA (K/V heads = heads) V2 takes h K/V heads, so V2 has D·h·d fewer K/V
  parameters; use a GQA baseline for an exact match.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from . import variants
from .config import ModelConfig

# The matching rule of each variant is its registry row (variants.py): ``baseline_heads`` (its head count in
# "baseline head" units) and ``keep_kv_heads``.

# name -> baseline Transformer shape. Paper sizes: methods.md §1.8 (App. D Table 9, App. E Table 10);
# there the DIFF head count is half the listed ``n_head``.
SIZES: dict[str, dict[str, Any]] = {
    # tests and smoke runs: heads divisible by 6 so that every variant matches exactly
    "tiny": dict(d_model=96, n_layer=2, n_head=6, head_dim=16, ffn_hidden=256, vocab_size=512, max_seq_len=256),
    "mini": dict(d_model=192, n_layer=4, n_head=12, n_kv_head=4, head_dim=16, vocab_size=8192, max_seq_len=512),
    "small": dict(d_model=384, n_layer=6, n_head=12, n_kv_head=4, head_dim=32, vocab_size=8192, max_seq_len=1024),
    "base": dict(d_model=768, n_layer=12, n_head=12, n_kv_head=4, head_dim=64, vocab_size=50257, max_seq_len=2048),
    # DIFF paper, scaling-size suite (App. E, Table 10): seq 2048, vocab of cl100k_base
    "830M": dict(d_model=1536, n_layer=24, n_head=16, vocab_size=100288, max_seq_len=2048),
    "1.4B": dict(d_model=2048, n_layer=24, n_head=16, vocab_size=100288, max_seq_len=2048),
    "2.8B": dict(d_model=2560, n_layer=32, n_head=20, vocab_size=100288, max_seq_len=2048),
    # DIFF-3B (App. D, Table 9): 28 layers, hidden 3072, FFN 8192, head dim 128, 12 DIFF heads, seq 4096
    "3B": dict(d_model=3072, n_layer=28, n_head=24, ffn_hidden=8192, vocab_size=100288, max_seq_len=4096),
    "6.8B": dict(d_model=4096, n_layer=32, n_head=32, vocab_size=100288, max_seq_len=2048),
    "13.1B": dict(d_model=5120, n_layer=40, n_head=40, vocab_size=100288, max_seq_len=2048),
}


def _baseline_heads(config: ModelConfig) -> tuple[Fraction, Fraction]:
    """(heads, kv_heads) of the standard Transformer that ``config`` is matched to."""
    spec = variants.get(config.attention)
    per = spec.baseline_heads
    heads = Fraction(config.n_head) / per
    if spec.keep_kv_heads:  # V2 keeps the baseline's K/V heads (MHA baselines: see module doc)
        kv = heads if config.n_kv_head == config.n_head else Fraction(config.n_kv_head)
    else:
        kv = Fraction(config.n_kv_head) / per
    return heads, kv


def matched_heads(variant: str, heads: int | Fraction, kv_heads: int | Fraction) -> tuple[int, int]:
    """(n_head, n_kv_head) of ``variant`` parameter-matched to a standard Transformer with ``heads`` heads and
    ``kv_heads`` K/V heads: the row's ``baseline_heads`` and ``keep_kv_heads`` (module docstring). The one
    place the rule is applied: ``matched`` and the drop-in layers' ``matched`` call it. ValueError (without a
    prefix; callers add theirs) when the counts do not divide."""
    spec = variants.get(variant)
    heads, kv = Fraction(heads), Fraction(kv_heads)
    per = spec.baseline_heads
    n_head = heads * per
    if spec.keep_kv_heads:  # V2 keeps the baseline's K/V heads (MHA baselines: see module doc)
        n_kv = n_head if kv == heads else kv
    else:
        n_kv = kv * per
    if n_head.denominator != 1 or n_kv.denominator != 1 or n_head < 1 or n_kv < 1:
        raise ValueError(f"would need n_head={float(n_head):g}, n_kv_head={float(n_kv):g}")
    if int(n_head) % int(n_kv):
        raise ValueError(f"would need n_kv_head={n_kv} dividing n_head={n_head}")
    return int(n_head), int(n_kv)


def matched(config: ModelConfig, variant: str, **variant_options: Any) -> ModelConfig:
    """The configuration of ``variant`` parameter-matched to ``config`` (see the module docstring).

    Everything but the head counts (widths, depth, vocabulary, kernel, ...) is kept; ``head_dim``
    is kept as well. ``variant_options`` sets the variant-only fields (e.g. ``lambda_init=0.8``).
    Raises ValueError when the head counts do not divide (e.g. diff_v2 needs a baseline whose head
    count is a multiple of 3).
    """
    variants.get(variant)  # an unknown name: the registry's one line, not a matching failure
    heads, kv = _baseline_heads(config)
    try:
        n_head, n_kv = matched_heads(variant, heads, kv)
    except ValueError as e:
        raise ValueError(f"presets.matched: a {config.attention} model with n_head={config.n_head}, "
                         f"n_kv_head={config.n_kv_head} has no parameter-matched {variant} ({e})") from None
    data = config.to_dict()
    for name in variants.all_fields():
        data[name] = None
    data.update(attention=variant, n_head=n_head, n_kv_head=n_kv, **variant_options)
    return ModelConfig.from_dict(data)


def get(name: str, attention: str = variants.BASELINE, **overrides: Any) -> ModelConfig:
    """Named size ``name`` as a ``attention`` model. ``overrides`` apply to the baseline shape
    (e.g. ``vocab_size``, ``max_seq_len``, ``kernel``) or, for variant-only fields, to the variant."""
    if name not in SIZES:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(SIZES)}")
    variant_opts = {k: overrides.pop(k) for k in list(overrides) if k in variants.all_fields()}
    base = ModelConfig.from_dict({**SIZES[name], **overrides, "attention": variants.BASELINE})
    if base.attention == attention and not variant_opts:
        return base
    return matched(base, attention, **variant_opts)


__all__ = ["SIZES", "get", "matched", "matched_heads"]
