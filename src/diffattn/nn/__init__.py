"""Differential attention as drop-in layers for any PyTorch model (issue #17; docs/nn.md).

    from diffattn import nn as dnn
    attn = dnn.DiffAttention(512, 8)                       # 8 DIFF heads of 32 (+ λ, per-head norm)
    out, _ = attn(x)                                       # self-attention, bidirectional, batch-first
    out, maps = attn(x, memory, key_padding_mask=pad, need_weights=True)   # cross-attention + the maps
    dnn.replace_attention(encoder, "diff_v1")              # swap nn.MultiheadAttention in a model trained from scratch

Layers: :class:`DiffAttention` (V1), :class:`DiffAttentionV2`, :class:`SharedDiffAttention` and
:class:`MultiheadAttention` (the standard baseline); :func:`layer_class` gives any registered variant's layer. Built like ``torch.nn.MultiheadAttention`` and sharing one
implementation with the decoder LM's attention (``model/attention.py``) and its kernels. Functional core:
:func:`diffattn.nn.functional.differential_attention`.
"""

from . import functional
from .layers import DiffAttention, DiffAttentionV2, MultiheadAttention, SharedDiffAttention, layer_class
from .replace import Replacement, replace_attention

__all__ = ["DiffAttention", "DiffAttentionV2", "SharedDiffAttention", "MultiheadAttention", "functional",
           "replace_attention", "Replacement", "layer_class"]
