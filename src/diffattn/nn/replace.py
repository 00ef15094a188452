"""Swap a model's ``torch.nn.MultiheadAttention`` modules for parameter-matched differential layers (issue #17).

For models trained from scratch (an ``nn.TransformerEncoder``, a ViT, a custom block): every
``nn.MultiheadAttention`` becomes the variant's ``matched`` layer (same embed_dim; DIFF V1/Shared DIFF: half the
heads of twice the width, DIFF V2: 2/3 of the heads), keeping ``batch_first``, ``dropout`` and ``bias``. The new
layers are freshly initialised: a pretrained model's attention cannot be converted this way — adapt one with DEX
(``diffattn adapt dex``) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import variants
from .layers import layer_class


@dataclass(frozen=True)
class Replacement:
    """One swapped module: where it was, what it was, what it became."""

    name: str
    embed_dim: int
    num_heads: int
    new_num_heads: int
    params_before: int
    params_after: int


def replace_attention(model: nn.Module, variant: str = "diff_v1", **layer_kwargs) -> list[Replacement]:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` (in place) with ``layer_class(variant).matched(...)``
    (any registered variant).

    ``layer_kwargs`` go to the new layers (e.g. ``kernel="eager"``, ``rope=10000.0``, ``causal=True``); each layer's
    ``depth`` (for λ_init) is its position among the replaced modules, 0-based. Returns what was replaced; an empty
    list means the model had no ``nn.MultiheadAttention``. Modules with ``kdim``/``vdim`` different from
    ``embed_dim`` are refused (ValueError), as are ``add_bias_kv`` / ``add_zero_attn``.
    """
    if variant not in variants.names():
        raise ValueError(f"variant must be one of {', '.join(variants.names())}, got {variant!r}")
    cls = layer_class(variant)
    depth_matters = "lambda_init" in variants.get(variant).fields  # λ_init(depth): DIFF V1, Shared DIFF
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    done = []
    for depth, (name, mha) in enumerate(targets):
        if not mha._qkv_same_embed_dim:
            raise ValueError(f"{name}: kdim/vdim differ from embed_dim; replace_attention needs one width")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{name}: add_bias_kv / add_zero_attn have no differential counterpart")
        kwargs = dict(dropout=mha.dropout, bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                      device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        if depth_matters:
            kwargs["depth"] = depth
        new = cls.matched(mha.embed_dim, mha.num_heads, **{**kwargs, **layer_kwargs})
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        done.append(Replacement(name, mha.embed_dim, mha.num_heads, new.num_heads,
                                sum(p.numel() for p in mha.parameters()), sum(p.numel() for p in new.parameters())))
    return done


__all__ = ["replace_attention", "Replacement", "layer_class"]
