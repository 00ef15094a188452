"""Differential attention as drop-in layers for any PyTorch model (issue #17): see ``diffattn/nn/__init__.py``.

Each layer *is* the decoder's attention class of its variant (``model/attention.py``), built from a small
internal ``ModelConfig`` and driven through the same pieces the decoder uses — ``project_q/k/v``, ``split``
(rotary and the heads-first layout) and ``combine`` (the kernel call and the variant's algebra: λ, the
subtraction, the per-head norm, (1 − λ_init)). There is no second copy of the math: a layer and a decoder
layer with the same weights compute the same thing. What the layers add is the ``torch.nn.MultiheadAttention``
calling convention: separate query / key / value inputs (cross-attention), key-padding and attention masks,
optional rotary positions, bidirectional by default, dropout on the attention weights, optional biases.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import presets, variants
from ..config import ModelConfig
from ..model.attention import AttentionMaps, DiffV1Attention, DiffV2Attention, StandardAttention, attention_class
from ..model.attention import SharedDiffAttention as _SharedDiffCore
from ..model.kernels import KERNELS, get_kernel
from ..model.layers import Rotary


def _check_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


class _DropIn:
    """The ``nn.MultiheadAttention``-style interface shared by every layer, mixed into a variant's attention
    class (``class Layer(_DropIn, TheVariantsClass)``, :func:`layer_class`). What differs between variants comes
    from the registry row (``VARIANT``'s ``head_split``, its fields) and the class (``query_heads_per_head``)."""

    VARIANT = variants.BASELINE

    def __init__(self, embed_dim: int, num_heads: int, **kwargs):
        """See the class docstring and docs/nn.md; the variant-only options of the variant's registry row
        (DIFF V1: ``lambda_std``, ``diff_norm``, ``diff_norm_affine``; Shared DIFF also ``shared_rank``,
        ``shared_init``) are keyword arguments too."""
        config, opts = self._setup(embed_dim, num_heads, **kwargs)
        self._core().__init__(self, config, config.n_layer - 1)  # layer index = depth (λ_init for DIFF V1)
        self._finish(embed_dim, opts)

    @classmethod
    def _core(cls) -> type:
        """The decoder's attention class this layer drives (the variant's registered class)."""
        return attention_class(cls.VARIANT)

    def _setup(self, embed_dim, num_heads, *, num_kv_heads=None, head_dim=None, depth=0, lambda_init=None,
               causal=False, rope=None, dropout=0.0, bias=False, kernel="sdpa", batch_first=True, device=None,
               dtype=None, **variant_fields):
        _check_int("embed_dim", embed_dim)
        _check_int("num_heads", num_heads)
        if num_kv_heads is None:
            num_kv_heads = num_heads
        _check_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        spec = variants.get(self.VARIANT)
        if head_dim is None:
            split = spec.head_split
            if embed_dim % (split * num_heads):
                what = f"{split}*num_heads={split * num_heads}" if split > 1 else f"num_heads={num_heads}"
                raise ValueError(f"embed_dim={embed_dim} is not divisible by {what}; give head_dim")
            head_dim = embed_dim // (split * num_heads)
        _check_int("head_dim", head_dim, 2)
        if rope is not None and head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary positions (rope)")
        if rope is not None and (isinstance(rope, bool) or not isinstance(rope, (int, float)) or not rope > 1):
            raise ValueError(f"rope must be None or a rotary base theta > 1 (e.g. 10000.0), got {rope!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        _check_int("depth", depth, 0)
        fields = {k: v for k, v in variant_fields.items() if v is not None}
        if "lambda_init" in spec.fields:
            fields["lambda_init"] = "depth" if lambda_init is None else lambda_init
        elif lambda_init is not None:
            users = " and ".join(variants.label(v) for v in variants.users_of("lambda_init"))
            raise ValueError(f"lambda_init applies to {users}, not {type(self).__name__}")
        try:
            config = ModelConfig.from_dict(dict(
                attention=self.VARIANT, vocab_size=1, d_model=embed_dim, n_layer=depth + 1, n_head=num_heads,
                n_kv_head=num_kv_heads, head_dim=head_dim, max_seq_len=1, kernel=kernel, init="torch", **fields))
        except ValueError as e:  # name the layer's arguments, not the decoder config's fields
            msg = str(e).replace("ModelConfig.", "")
            for ours, theirs in (("d_model", "embed_dim"), ("n_kv_head", "num_kv_heads"), ("n_head", "num_heads")):
                msg = msg.replace(ours, theirs)
            raise ValueError(msg) from None
        return config, dict(causal=bool(causal), rope=None if rope is None else float(rope), dropout=float(dropout),
                            bias=bool(bias), batch_first=bool(batch_first), device=device, dtype=dtype)

    def _finish(self, embed_dim, opts):
        self.embed_dim, self.num_heads = embed_dim, self.config.n_head
        self.num_kv_heads, self.head_dim = self.config.n_kv_head, self.config.head_dim
        self.causal, self.rope_theta, self.dropout = opts["causal"], opts["rope"], opts["dropout"]
        self.batch_first = opts["batch_first"]
        # what torch.nn.TransformerEncoderLayer reads before choosing its fused fast path (never ours)
        self._qkv_same_embed_dim, self.in_proj_weight, self.in_proj_bias = False, None, None
        if opts["bias"]:  # the decoder's projections have none; the drop-in layers offer them (not W_λ, not A)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_base", "k_base"):
                mod = getattr(self, name, None)
                if isinstance(mod, nn.Linear):
                    setattr(self, name, nn.Linear(mod.in_features, mod.out_features, bias=True))
        self.reset_parameters()
        self.to(device=opts["device"], dtype=opts["dtype"])

    @property
    def out_proj(self) -> nn.Linear:
        return self.o_proj

    def reset_parameters(self) -> None:
        """PyTorch's default init for every projection (as the DIFF reference modules), then the variant's own."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()
        self.reset_variant_parameters()

    # --------------------------------------------------------------------------------------- forward
    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                *, key_padding_mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: Optional[bool] = None, need_weights: bool = False):
        """``(output, weights or None)``. Self-attention when ``key`` and ``value`` are None.

        query (B, T, E), key (B, S, E), value (B, S, E) (``batch_first=False``: sequence first).
        key_padding_mask (B, S): True (or a -inf float) marks a padded key, as in ``nn.MultiheadAttention``.
        attn_mask (T, S) or (B, T, S) or (B, H, T, S): True (or -inf) marks a pair that may not attend.
        is_causal: None uses the layer's ``causal``; True adds a (bottom-right aligned) causal mask.
        need_weights: also return an :class:`~diffattn.model.attention.AttentionMaps` — the effective map of each
        output head (DIFF: the signed A1 − λ·A2) and the component maps (computed with the eager kernel).
        A query row with no key left to attend returns zeros (and zero weights), never NaN.
        """
        if key is None and value is None:
            key = value = query
        elif value is None:
            value = key
        elif key is None:
            raise ValueError("key is None but value is given; pass both (or neither for self-attention)")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3 or x.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must have shape (batch, length, embed_dim={self.embed_dim}), "
                                 f"got {tuple(x.shape)}")
        b, t, _ = query.shape
        s = key.shape[1]
        if key.shape[:2] != value.shape[:2] or key.shape[0] != b:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must share batch and length "
                             f"with each other, and batch with query {tuple(query.shape)}")
        causal = self.causal if is_causal is None else bool(is_causal)
        mask, empty = self._mask(b, t, s, key_padding_mask, attn_mask, causal, query.device)
        rope_q = rope_k = None
        if self.rope_theta is not None:
            pos = torch.arange(max(t, s), device=query.device)
            rope_q = Rotary(pos[:t].expand(b, t), self.head_dim, self.rope_theta, query.dtype)
            rope_k = Rotary(pos[:s].expand(b, s), self.head_dim, self.rope_theta, key.dtype)
        q, k, v = self.split(self.project_q(query), self.project_k(key), self.project_v(value), rope_q, rope_k)
        fast_causal = causal and mask is None
        kernel = self.kernel if (not need_weights or self.kernel.returns_maps) else get_kernel("eager")
        out, maps = self.combine(q, k, v, query, mask=mask, is_causal=fast_causal, need_weights=need_weights,
                                 kernel=kernel, dropout_p=self.dropout if self.training else 0.0)
        if empty is not None:  # (B, 1|H, T): rows that had no key are zero, as if they attended to nothing
            keep = ~empty
            out = (out.view(b, t, self.num_heads, -1) * keep.transpose(1, 2)[..., None].to(out.dtype)).flatten(2)
            if maps is not None:
                zero = keep[..., None]  # (B, 1|H, T, 1)
                maps = AttentionMaps(maps.effective * zero, None if maps.components is None
                                     else maps.components * zero[:, :, None])
        out = self.o_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, maps

    def _mask(self, b, t, s, key_padding_mask, attn_mask, causal, device):
        """(allowed (B, 1|H, T, S) bool or None, rows-with-no-key (B, T) bool or None)."""
        allowed = None
        if key_padding_mask is not None:
            kpm = _as_blocked(key_padding_mask, "key_padding_mask")
            if kpm.shape != (b, s):
                raise ValueError(f"key_padding_mask must have shape (batch={b}, keys={s}), got {tuple(kpm.shape)}")
            allowed = ~kpm.to(device)[:, None, None, :]
        if attn_mask is not None:
            am = _as_blocked(attn_mask, "attn_mask").to(device)
            if am.dim() == 2:
                am = am[None, None]
            elif am.dim() == 3:
                am = am[:, None]
            ok = am.dim() == 4 and am.shape[-2:] == (t, s) and am.shape[0] in (1, b) and \
                am.shape[1] in (1, self.num_heads)
            if not ok:
                raise ValueError(f"attn_mask must have shape (T, S), (B, T, S) or (B, num_heads, T, S) with T={t}, "
                                 f"S={s}, B={b}, num_heads={self.num_heads}; got {tuple(attn_mask.shape)}")
            allowed = ~am if allowed is None else allowed & ~am
        if causal and (allowed is not None or t != s):
            tri = torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)[None, None]  # bottom-right aligned
            allowed = tri if allowed is None else allowed & tri
        if allowed is None:
            return None, None
        allowed = allowed.expand(b, allowed.shape[1], t, s)
        empty = ~allowed.any(-1)  # (B, 1|H, T)
        if bool(empty.any()):
            allowed = allowed | empty[..., None]  # a row with no key attends to all keys, then is zeroed
        else:
            empty = None
        per = self.query_heads_per_head  # the variant class's kernel query heads per output head (DIFF V2: 2)
        if allowed.shape[1] > 1 and per > 1:  # per-head masks reach every query head of a head
            allowed = allowed.repeat_interleave(per, dim=1)
        return allowed, empty

    # --------------------------------------------------------------------------------------- matching
    @classmethod
    def matched(cls, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None, **kwargs):
        """The layer parameter-matched to a standard ``MultiheadAttention(embed_dim, num_heads, num_kv_heads)``:
        the variant's registry rule (``presets.matched``; docs/nn.md). Every other argument is passed on."""
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % 2 or (embed_dim % num_heads):
            raise ValueError(f"matched: num_heads={num_heads} must be even and divide embed_dim={embed_dim}")
        try:
            heads, kvs = presets.matched_heads(cls.VARIANT, num_heads, kv)
        except ValueError as e:
            raise ValueError(f"matched: a standard layer with num_heads={num_heads}, num_kv_heads={kv} has no "
                             f"parameter-matched {cls.__name__} ({e})") from None
        return cls(embed_dim, heads, num_kv_heads=kvs, head_dim=embed_dim // num_heads, **kwargs)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, rope={self.rope_theta}, kernel={self.kernel.name!r}")


def _as_blocked(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A mask in ``nn.MultiheadAttention``'s convention as bool "blocked": True, or a -inf float, blocks."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point:
        finite = torch.isfinite(mask)
        if bool((finite & (mask != 0)).any()) or bool((~finite & (mask > 0)).any()):
            raise ValueError(f"{name}: a float mask must hold only 0 (attend) and -inf (blocked); additive biases "
                             "are not supported")
        return ~finite
    raise ValueError(f"{name} must be bool or float (0 / -inf), got {mask.dtype}")


class MultiheadAttention(_DropIn, StandardAttention):
    """Standard softmax attention behind the same interface: the baseline the DIFF layers are matched to.
    ``num_heads`` heads of ``head_dim`` (default ``embed_dim / num_heads``)."""

    VARIANT = "standard"


class DiffAttention(_DropIn, DiffV1Attention):
    """DIFF Transformer V1 attention (arXiv 2410.05258): ``num_heads`` DIFF heads, each two query/key sub-heads of
    ``head_dim`` (default ``embed_dim / (2·num_heads)``) and a 2·head_dim value; λ per layer (λ_init from ``depth``,
    0-based, or ``lambda_init``), the per-head RMSNorm and (1 − λ_init)."""

    VARIANT = "diff_v1"


class SharedDiffAttention(_DropIn, _SharedDiffCore):
    """Shared DIFF (arXiv 2501.17900, OUR READING): DIFF V1 with the two maps' Q/K projections as a shared base
    plus per-map low-rank updates of rank ``shared_rank``."""

    VARIANT = "shared_diff"


class DiffAttentionV2(_DropIn, DiffV2Attention):
    """DIFF Transformer V2 attention (Microsoft blog 2026-01): ``num_heads`` output heads, 2·num_heads query heads
    against ``num_kv_heads`` shared K/V heads of ``head_dim`` (default ``embed_dim / num_heads``); λ per token and
    head, sigmoid(x·W_λ)."""

    VARIANT = "diff_v2"


_LAYERS: dict[str, type] = {cls.VARIANT: cls for cls in (MultiheadAttention, DiffAttention, DiffAttentionV2,
                                                         SharedDiffAttention)}


def layer_class(variant: str) -> type:
    """The drop-in layer of a registered variant: the named class above for a built-in, else one derived from
    the variant's attention class (``class <Class>Layer(_DropIn, <Class>)``, made once per variant). Any class
    that follows the forward-pieces contract (``project_q/k/v``, ``split``, ``combine``; docs/architecture.md)
    becomes a drop-in layer this way."""
    core = attention_class(variant)  # ValueError naming the registered variants for an unknown name
    layer = _LAYERS.get(variant)
    if layer is None or not issubclass(layer, core):  # a new or re-registered variant
        layer = type(f"{core.__name__}Layer", (_DropIn, core), {"VARIANT": variant, "__module__": __name__,
                                                                "__doc__": f"{core.__doc__ or variant} (drop-in layer)"})
        _LAYERS[variant] = layer
    return layer


__all__ = ["MultiheadAttention", "DiffAttention", "DiffAttentionV2", "SharedDiffAttention", "layer_class"]
