"""Reference implementations the benchmarks compare against (issue #8).

* :func:`authors_split_value` — the attention core of the authors' ``multihead_flashdiff_2.py``
  (microsoft/unilm Diff-Transformer, methods.md §1.5), re-written here: V is split into its two d-wide
  halves and each map is computed by two stock flash calls, ``[attn(Q1,K1,V1) | attn(Q1,K1,V2)]``
  and ``[attn(Q2,K2,V1) | attn(Q2,K2,V2)]``, then ``A1 − λ·A2``: the attention core is computed twice
  (2× the FLOPs of the parameter-matched baseline). Stock flash-attn is replaced by SDPA (its flash
  back end on GPU). :data:`AUTHORS_KERNEL` is a kernel object whose differential entry it is, so a
  ``DiffV1Attention`` given that kernel (``attn.set_kernel(AUTHORS_KERNEL)``) is the authors' layer
  with everything else identical.
* :func:`diffllama_config` — transformers' ``DiffLlamaConfig`` with the same widths as a diffattn
  DIFF V1 config (``num_attention_heads`` = 2 × DIFF heads, as DiffLlama counts them), SDPA back end.
  DiffLlama makes two SDPA calls with 2H heads over the two halves of V (also 2× the FLOPs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model.kernels import FunctionKernel, sdpa_attention


def authors_split_value(q1, q2, k1, k2, v, lam, *, mask=None, is_causal=True, scale):
    """(softmax(Q1K1ᵀ)−λ·softmax(Q2K2ᵀ))V the flashdiff_2 way: four calls, value split in halves."""
    d = q1.shape[-1]
    v1, v2 = v.split(d, dim=-1)  # the authors view V as (..., 2, d) and take the two halves
    gqa = q1.shape[1] != k1.shape[1]
    causal = is_causal and mask is None and q1.shape[2] > 1

    def attn(q, k, vv):
        return F.scaled_dot_product_attention(q, k, vv, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)

    a1 = torch.cat([attn(q1, k1, v1), attn(q1, k1, v2)], dim=-1)
    a2 = torch.cat([attn(q2, k2, v1), attn(q2, k2, v2)], dim=-1)
    return a1 - lam.to(a1.dtype) * a2


AUTHORS_KERNEL = FunctionKernel("authors-split-value", sdpa_attention, authors_split_value)


def use_authors_core(model_or_layer: torch.nn.Module) -> torch.nn.Module:
    """Give every DIFF V1 attention layer inside ``model_or_layer`` the authors' split-value core."""
    from ..model.attention import DiffV1Attention

    n = 0
    for m in model_or_layer.modules():
        if isinstance(m, DiffV1Attention):
            m.set_kernel(AUTHORS_KERNEL)
            n += 1
    if not n:
        raise ValueError("no DIFF V1 attention layer to patch")
    return model_or_layer


def diffllama_config(cfg: ModelConfig):
    """transformers DiffLlamaConfig with the shapes of the diffattn DIFF V1 config ``cfg`` (SDPA)."""
    from transformers import DiffLlamaConfig

    if cfg.attention != "diff_v1":
        raise ValueError(f"diffllama_config needs a diff_v1 config, got {cfg.attention!r}")
    return DiffLlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=2 * cfg.n_head, num_key_value_heads=2 * cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
