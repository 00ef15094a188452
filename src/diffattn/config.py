"""Model configuration: one frozen, keyword-only dataclass for every variant.

`ModelConfig` is the single source of truth for a model's shape. Fields that only one variant
uses (the DIFF λ settings, the Shared-DIFF rank) are ``None`` for the others; a registered variant's own fields that
this class does not declare live in ``extra`` and read as attributes (variants.py: their defaults and checks are in
the variant's row); derived fields
(``n_kv_head``, ``head_dim``, ``ffn_hidden`` and the variant settings) are filled in
``__post_init__`` only when not given. Every impossible combination raises ``ValueError`` naming
the field and the valid range, so a bad configuration never reaches the model code.

Head semantics follow each paper (see ``docs/methods.md``):

* ``standard``: ``n_head`` plain heads of ``head_dim``; default ``head_dim = d_model / n_head``.
* ``diff_v1`` / ``shared_diff``: ``n_head`` DIFF heads, each with two query/key sub-heads of
  ``head_dim`` and a value of ``2 * head_dim``; default ``head_dim = d_model / (2 * n_head)``, so a
  DIFF model with H heads has the projection shapes of a standard model with 2H heads (§1.6).
* ``diff_v2``: ``n_head`` output heads, ``2 * n_head`` query heads, ``n_kv_head`` shared K/V heads,
  all of ``head_dim``; default ``head_dim = d_model / n_head`` (§2.2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from . import variants
from .utils.checks import check_bool, check_float, check_int, fail

KERNELS = ("eager", "sdpa", "triton")  # model/kernels.py KERNELS (a test ties the two); "triton": fused DIFF V1 on GPU
# Weight-initialisation schemes (model/lm.py ``DecoderLM.init_weights``; docs/results/init.md for the evidence):
#   "gpt2":   embeddings and every nn.Linear N(0, init_std²); residual output projections (o_proj, FFN down)
#             N(0, init_std²/(2·n_layer)). The GPT-2/LLaMA convention.
#   "torch":  PyTorch's own defaults, as the DIFF authors' reference modules use them (methods.md §1.5):
#             nn.Linear Kaiming-uniform(a=√5) = U(±1/√fan_in), nn.Embedding N(0, 1). ``init_std`` is unused.
#   "mixed":  PyTorch-default Linears, token embedding N(0, init_std²): "torch" without the N(0, 1) embedding
#             that makes the residual stream ~50x larger than what the first blocks add to it.
#   "scaled": PyTorch-default Linears, token embedding and untied output head N(0, 1/d_model): the way the
#             authors' framework builds them (torchscale's Decoder output projection; fairseq's Embedding),
#             without torchscale's √d_model scale on the embedding output.
INITS = ("gpt2", "torch", "mixed", "scaled")
# The built-in variants (variants.py holds the registry; a registered variant is valid here too).
ATTENTION_VARIANTS = variants.BUILTIN
SHARED_INITS = variants.SHARED_INITS  # Shared DIFF's B init (its field and check are in its registry row)


def variant_fields(attention: str) -> tuple[str, ...]:
    """The variant-only ModelConfig fields that ``attention`` uses (empty for the others)."""
    return tuple(variants.get(attention).fields)


def lambda_init_for_depth(depth: int) -> float:
    """DIFF V1 default λ_init = 0.8 − 0.6·exp(−0.3·depth), depth 0-based (methods.md §1.3)."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and options of a decoder-only LM with one attention variant in every layer."""

    attention: str = variants.BASELINE  # a registered variant (variants.names())
    vocab_size: int  # tokenizer vocabulary size
    d_model: int  # residual stream width D
    n_layer: int  # number of decoder blocks L
    n_head: int  # heads, in the variant's own meaning (see module docstring)
    n_kv_head: int | None = None  # K/V heads (GQA); default n_head. Must divide n_head.
    head_dim: int | None = None  # per-(sub-)head query/key width d; derived per variant
    max_seq_len: int = 2048  # longest sequence the rotary tables and caches cover
    rope_theta: float = 10000.0  # rotary base; the paper's training value is UNCONFIRMED (§1.5)
    ffn_hidden: int | None = None  # SwiGLU hidden width; default 8/3·D rounded up to a multiple of 64
    norm_eps: float = 1e-5  # eps of every RMSNorm (block norms and the DIFF per-head norm)
    tie_embeddings: bool = False  # share the token embedding with the output head
    # weight-initialisation scheme, one of INITS (model.init_weights). Default "scaled": chosen by the init study's
    # rule (docs/results/init.md, issue #24), the option under which the baseline Transformer is best across the
    # language model and the recall task; it is also what the authors' framework does around the reference modules
    init: str = "scaled"
    init_std: float = 0.02  # N(0, init_std²) for embeddings and linear weights under init="gpt2"
    kernel: str = "sdpa"  # one of KERNELS: how softmax(QKᵀ)V is computed
    # --- DIFF V1 and Shared DIFF only (None elsewhere) ---
    lambda_init: str | float | None = None  # "depth" (paper default) or a constant in [0, 1)
    lambda_std: float | None = None  # std of the λ re-parameterisation vectors
    diff_norm: bool | None = None  # per-head RMSNorm (then ×(1−λ_init)); False is the Table 6 ablation
    diff_norm_affine: bool | None = None  # learnable gain in that norm (default True, the current reference files; False: flashdiff.py)
    diff_norm_gain_init: float | None = None  # starting value of the learnable gain (1 in the reference code)
    # --- Shared DIFF only (our reading of the abstract, UNCONFIRMED; see model/attention.py) ---
    shared_rank: int | None = None  # rank r of the per-map low-rank updates; default min(16, D·Hd/(4(D+Hd)))
    shared_init: str | None = None  # "lora" (B = 0: both maps start equal) or "random"
    # --- a registered variant's own fields that this class does not declare (a third-party variant's options) ---
    # (name, value) pairs, read as attributes (``cfg.<name>``); flat in to_dict / config.json like every other field
    extra: tuple[tuple[str, Any], ...] = ()

    # ------------------------------------------------------------------ derivation + validation
    def __post_init__(self) -> None:  # noqa: C901 (one check per field, in field order)
        set_ = self._set_field
        if self.attention not in variants.names():
            fail("attention", f"unknown attention {self.attention!r}; valid: {', '.join(variants.names())}")
        spec = variants.get(self.attention)
        if self.kernel not in KERNELS:
            fail("kernel", f"unknown kernel {self.kernel!r}; valid: {', '.join(KERNELS)}")
        check_int("vocab_size", self.vocab_size, 1)
        check_int("d_model", self.d_model, 1)
        check_int("n_layer", self.n_layer, 1, 4096)
        check_int("n_head", self.n_head, 1, 4096)
        check_int("max_seq_len", self.max_seq_len, 1)
        check_float("rope_theta", self.rope_theta, 1.0, 1e12, lo_open=True)
        check_float("norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.init not in INITS:
            fail("init", f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        check_float("init_std", self.init_std, 0.0, 10.0, lo_open=True)
        check_bool("tie_embeddings", self.tie_embeddings)

        if self.n_kv_head is None:
            set_("n_kv_head", self.n_head)
        check_int("n_kv_head", self.n_kv_head, 1, self.n_head)
        if self.n_head % self.n_kv_head:
            fail("n_kv_head", f"must divide n_head={self.n_head} (GQA groups), got {self.n_kv_head}")

        if self.head_dim is None:
            split = spec.head_split * self.n_head
            what = f"{spec.head_split}*n_head" if spec.head_split != 1 else "n_head"
            if self.d_model % split:
                fail("d_model", f"must be divisible by {what}={split} to derive head_dim "
                      f"(or give head_dim), got {self.d_model}")
            set_("head_dim", self.d_model // split)
        check_int("head_dim", self.head_dim, 2, 1024)
        if self.head_dim % 2:
            fail("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")

        if self.ffn_hidden is None:
            set_("ffn_hidden", 64 * math.ceil(8 * self.d_model / 3 / 64))
        check_int("ffn_hidden", self.ffn_hidden, 1)

        self._variant_fields(spec)

    def _variant_fields(self, spec) -> None:
        """Variant-only fields: ``None`` unless the variant uses them, then its default when not given, and the
        row's value checks (``variants.VariantField``)."""
        names = variants.all_fields()
        extra = dict(self.extra)
        unknown = sorted(set(extra) - set(names))
        if unknown or any(n in _DECLARED for n in extra):
            bad = unknown or sorted(n for n in extra if n in _DECLARED)
            fail("extra", f"{', '.join(map(repr, bad))} is not the field of a registered variant that "
                           "ModelConfig does not declare")
        object.__setattr__(self, "extra", tuple(sorted((k, v) for k, v in extra.items() if v is not None)))
        for name in names:
            value = self._field(name)
            if name not in spec.fields:
                if value is not None:
                    users = variants.users_of(name)
                    where = f"attention {users[0]!r}" if len(users) == 1 else f"attention in {users}"
                    fail(name, f"applies only to {where}, not {self.attention!r}")
            elif value is None:
                self._set_field(name, spec.default(name, self))
        spec.check(self, self._set_field)  # the variant's own value checks (its registry row)

    def _field(self, name: str) -> Any:
        return getattr(self, name) if name in _DECLARED else dict(self.extra).get(name)

    def _set_field(self, name: str, value: Any) -> None:
        """Set a field of this frozen config while it is being built (derived values, normalised values)."""
        if name in _DECLARED:
            object.__setattr__(self, name, value)
        else:
            object.__setattr__(self, "extra", tuple(sorted({**dict(self.extra), name: value}.items())))  # one order: ==

    def __getattr__(self, name: str) -> Any:
        """A registered variant's own field (``extra``) as an attribute; ``None`` for another variant's."""
        if name.startswith("__") or name == "extra":
            raise AttributeError(name)
        extra = dict(object.__getattribute__(self, "extra"))
        if name in extra:
            return extra[name]
        if name in variants.all_fields():
            return None
        raise AttributeError(f"'ModelConfig' object has no attribute {name!r}")

    # ------------------------------------------------------------------ derived quantities
    @property
    def n_rep(self) -> int:
        """Query heads per K/V head (the GQA group size), in the variant's own head units."""
        return self.n_head // self.n_kv_head

    def layer_lambda_init(self, depth: int) -> float:
        """λ_init of the layer at 0-based ``depth`` (DIFF V1 / Shared DIFF only)."""
        if self.lambda_init is None:
            raise ValueError(f"lambda_init is not defined for attention {self.attention!r}")
        if self.lambda_init == "depth":
            return lambda_init_for_depth(depth)
        return float(self.lambda_init)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields, derived ones included, as plain JSON-able values; ``extra`` flat among them."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}, **dict(self.extra)}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every key a config can hold, as ``to_dict`` writes them: the declared fields and the undeclared fields of
        the registered variants (``extra``, flat). What run files, ``config.json`` readers and the HF config accept."""
        declared = tuple(f.name for f in fields(cls) if f.name != "extra")
        return declared + tuple(n for n in variants.all_fields() if n not in _DECLARED)

    @classmethod
    def _split(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` with a registered variant's undeclared fields gathered into ``extra``; unknown keys: an error."""
        extra = {k: v for k, v in data.items() if k not in _DECLARED and k in variants.all_fields()}
        unknown = sorted(set(data) - _DECLARED - set(extra))
        if unknown:
            valid = sorted(cls.field_names())
            raise ValueError(f"ModelConfig: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
        out = {k: v for k, v in data.items() if k in _DECLARED}
        if extra:
            out["extra"] = tuple({**dict(out.get("extra", ())), **extra}.items())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`. Unknown keys are an error, never silently ignored."""
        if not isinstance(data, Mapping):
            raise ValueError(f"ModelConfig: expected a mapping, got {type(data).__name__}")
        try:
            return cls(**cls._split(data))
        except TypeError as e:  # missing required field
            raise ValueError(f"ModelConfig: {e}") from None

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` (``dataclasses.replace``: derived values are kept as they are); a registered
        variant's undeclared field goes to ``extra``."""
        split = self._split(changes)
        if "extra" in split:
            split["extra"] = tuple({**dict(self.extra), **dict(split["extra"])}.items())
        return dataclasses.replace(self, **split)


_DECLARED = frozenset(f.name for f in fields(ModelConfig))


__all__ = ["ModelConfig", "ATTENTION_VARIANTS", "KERNELS", "INITS", "lambda_init_for_depth"]
