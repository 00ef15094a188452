"""Attention variants: the algebra of each paper, on top of a kernel object (see kernels.py).

Every variant has the constructor ``(config, layer_idx)`` and the forward contract

    forward(x (B, T, D), rope, *, mask, is_causal, cache, need_weights) -> (out (B, T, D), maps)

``maps`` is ``None`` unless ``need_weights`` (a kernel with ``returns_maps``: eager); then it is an
``AttentionMaps`` holding the effective map each output head applies to its values (for DIFF: A1 − λ·A2)
and the component softmax maps. λ, the subtraction and the per-head norm are written once per variant.

A variant class also carries what the pipeline outside the model asks of it (``AttentionBase``):
its parameter initialisation (``reset_variant_parameters``), parameter buckets for ``param_counts``,
attention FLOPs (``attention_widths``), which query heads are which component map (``head_components``)
and its λ report (``lambda_report`` / ``lambda_per_token``). Its registry row is in ``diffattn/variants.py``.

Sources (docs/methods.md; section numbers § refer to the project's methods spec): standard and DIFF V1 §1 (arXiv 2410.05258), DIFF V2 §2
(Microsoft blog 2026-01), Shared DIFF §3 (arXiv 2501.17900; method text unavailable, our reading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .. import variants
from .kernels import AttentionKernel, get_kernel
from .layers import RMSNorm, Rotary, compute_dtype


@dataclass
class AttentionMaps:
    """Attention maps of one layer (eager kernel only).

    effective: (B, H_out, T, S) the weights each output head applies to its values; for DIFF
        variants the signed differential map A1 − λ·A2 (before the per-head norm).
    components: (B, H_out, 2, T, S) the two softmax maps of each DIFF head, or None (standard).
    """

    effective: torch.Tensor
    components: Optional[torch.Tensor] = None


class KeepFP32Params(nn.Module):
    """Keeps the parameters named in ``_fp32_params`` in fp32 when the module is cast to bf16/fp16.

    λ must be computed and stored in fp32 (methods.md §1.3); ``model.to(torch.bfloat16)`` would
    otherwise round the λ vectors. Casts to fp32/fp64 and device moves apply as usual.
    """

    _fp32_params: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {n: getattr(self, n).data for n in self._fp32_params}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            p = getattr(self, name)
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self


@torch.no_grad()
def lambda_record(q1, k1, q2, k2, lambda_init: float, *, lam: float | None = None) -> dict:
    """The λ read-out of Eq. 2 from its four vectors, in float64: λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init and its
    two exponentials (DIFF V1, Shared DIFF, transformers' DiffLlama). ``lam``: the model's own λ to report instead."""
    l1 = math.exp(float(torch.dot(q1.double().flatten(), k1.double().flatten())))
    l2 = math.exp(float(torch.dot(q2.double().flatten(), k2.double().flatten())))
    return {"lambda": l1 - l2 + float(lambda_init) if lam is None else lam, "lambda_init": float(lambda_init),
            "exp_q1k1": l1, "exp_q2k2": l2}


class AttentionBase(KeepFP32Params):
    """What every variant shares: the config, the layer index, the 1/√d scale and the kernel object."""

    # Name of a top-level parameter or submodule -> param_counts bucket; anything else is "attention.qkvo".
    PARAM_BUCKETS: dict[str, str] = {}
    # Whether forward makes a kernel's attend_differential call (fused differential kernels apply).
    uses_attend_differential = False
    # Whether λ depends on the input (then lambda_per_token, else lambda_report, gives it).
    lambda_needs_data = False
    # Kernel query heads per output head in combine (DIFF V2: 2, its two maps); the drop-in layers' masks use it.
    query_heads_per_head = 1

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5  # 1/√d with d the per-component q/k width
        self.kernel: AttentionKernel = get_kernel(config.kernel)

    def set_kernel(self, kernel) -> None:
        """Use ``kernel`` (a name or an :class:`AttentionKernel`) from the next call on."""
        self.kernel = get_kernel(kernel)

    def _attend(self, q, k, v, mask, is_causal, need_weights, kernel=None, dropout_p=0.0):
        return (kernel or self.kernel).attend(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale,
                                              need_weights=need_weights, dropout_p=dropout_p)

    # --- the forward, in the pieces the drop-in layers (diffattn.nn) share with the decoder -------------
    # project_q/k/v(x): token-major projections (B, T, heads, ...); split(q, k, v, rope_q, rope_k): rotary
    # (when given) and the heads-first layout the kernels take; combine(q, k, v, xq, ...): the kernel call(s)
    # and the variant's algebra, returning (B, T, H_out·dv) before the output projection, and the maps.
    def forward(self, x, rope: Rotary, *, mask=None, is_causal=True, cache: KVCache | None = None,
                need_weights=False):
        q, k, v = self.split(self.project_q(x), self.project_k(x), self.project_v(x), rope, rope)
        if cache is not None:
            k, v = self.cache_update(cache, k, v)  # (B, Hkv, S, ·)
        out, maps = self.combine(q, k, v, x, mask=mask, is_causal=is_causal, need_weights=need_weights)
        return self.o_proj(out), maps

    def project_q(self, x):
        b, t, _ = x.shape
        return self.q_proj(x).view(b, t, -1, self.head_dim)  # (B, T, Hq, d)

    def project_k(self, x):
        b, s, _ = x.shape
        return self.k_proj(x).view(b, s, -1, self.head_dim)  # (B, S, Hkv, d)

    def project_v(self, x):
        b, s, _ = x.shape
        return self.v_proj(x).view(b, s, -1, self.head_dim)  # (B, S, Hkv, d)

    def split(self, q, k, v, rope_q: Rotary | None, rope_k: Rotary | None):
        if rope_q is not None:
            q = rope_q(q)
        if rope_k is not None:
            k = rope_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, d)

    def cache_update(self, cache: KVCache, k, v):
        return cache.update(self.layer_idx, k, v)

    def combine(self, q, k, v, xq, *, mask=None, is_causal=True, need_weights=False, kernel=None, dropout_p=0.0):
        raise NotImplementedError

    # --- what the pipeline asks of a variant ---------------------------------------------
    @torch.no_grad()
    def reset_variant_parameters(self) -> None:
        """Initialise the variant's own tensors (λ, norm gains, ...); runs after the generic init of
        ``DecoderLM.init_weights`` (nn.Linear / nn.Embedding / block norms)."""

    @classmethod
    def attention_widths(cls, config: ModelConfig) -> tuple[int, int]:
        """(query·key width, value width) summed over every score map of one layer: attention costs
        2·T·(w_qk + w_v) multiply-adds per token and layer in the forward pass."""
        return config.n_head * config.head_dim, config.n_head * config.head_dim

    def head_components(self, n_query_heads: int) -> Optional[torch.Tensor]:
        """For one plain ``attend`` call over ``n_query_heads`` heads, which component map (0 or 1) each
        query head computes, or None when the heads are not differential components."""
        return None

    def lambda_report(self) -> Optional[dict]:
        """This layer's λ as a record (input-independent λ only), or None when the variant has none."""
        return None

    def lambda_per_token(self, x: torch.Tensor) -> torch.Tensor:
        """λ per token and output head, (..., H) float64, for variants whose λ depends on the input."""
        raise NotImplementedError(f"{type(self).__name__} has no input-dependent λ")


class StandardAttention(AttentionBase):
    """Multi-head / grouped-query softmax attention: the baseline Transformer."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h, hkv, d, dm = config.n_head, config.n_kv_head, config.head_dim, config.d_model
        self.q_proj = nn.Linear(dm, h * d, bias=False)
        self.k_proj = nn.Linear(dm, hkv * d, bias=False)
        self.v_proj = nn.Linear(dm, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, dm, bias=False)

    def combine(self, q, k, v, xq, *, mask=None, is_causal=True, need_weights=False, kernel=None, dropout_p=0.0):
        out, probs = self._attend(q, k, v, mask, is_causal, need_weights, kernel, dropout_p)  # (B, H, T, d)
        maps = AttentionMaps(probs) if need_weights else None
        return out.transpose(1, 2).flatten(2), maps


class DiffV1Attention(AttentionBase):
    """DIFF Transformer V1 differential attention (arXiv 2410.05258, methods.md §1.2-1.5).

    Per DIFF head h:  ((softmax(Q1K1ᵀ/√d) − λ·softmax(Q2K2ᵀ/√d)) V, then RMSNorm over 2d, ×(1−λ_init).
    λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, one set of four vectors per layer, computed in fp32.

    Layout (the reference code's): the query projection gives 2H sub-heads of width d, sub-heads
    2h and 2h+1 are (Q1, Q2) of head h ("interleaved stripes"); keys give 2Hkv sub-heads with the
    same pairing; values give Hkv heads of width 2d. Interleaved rotary is applied to every
    sub-head. GQA follows the flash versions: component c of head h meets key component c of KV
    head ⌊h/n_rep⌋, and both components read that KV head's 2d-wide value (not the naive file's
    repeat of key sub-heads, which differs for n_rep > 1).
    """

    _fp32_params = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    PARAM_BUCKETS = {**{n: "attention.lambda" for n in _fp32_params}, "head_norm": "attention.norm"}
    uses_attend_differential = True

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h, hkv, d, dm = config.n_head, config.n_kv_head, config.head_dim, config.d_model
        self.n_head = h
        self.lambda_init = config.layer_lambda_init(layer_idx)
        self._build_qk(config)
        self.v_proj = nn.Linear(dm, hkv * 2 * d, bias=False)
        self.o_proj = nn.Linear(h * 2 * d, dm, bias=False)
        # Eq. 2 re-parameterisation vectors, N(0, lambda_std²) in fp32 (reset in init_lambdas).
        for name in self._fp32_params:
            setattr(self, name, nn.Parameter(torch.zeros(d, dtype=torch.float32)))
        self.init_lambdas()
        # Per-head RMSNorm over the 2d channels of each head ("GroupNorm" in the paper's Fig. 2).
        self.head_norm = RMSNorm(2 * d, config.norm_eps, affine=config.diff_norm_affine) if config.diff_norm else None

    def init_lambdas(self) -> None:
        with torch.no_grad():
            for name in self._fp32_params:
                getattr(self, name).normal_(0.0, self.config.lambda_std)

    @torch.no_grad()
    def reset_variant_parameters(self) -> None:
        """λ vectors N(0, lambda_std²) in fp32 (methods.md §1.3); the per-head norm gain ``diff_norm_gain_init``."""
        self.init_lambdas()
        if self.head_norm is not None and self.head_norm.weight is not None:
            self.head_norm.weight.fill_(self.config.diff_norm_gain_init)

    @classmethod
    def attention_widths(cls, config: ModelConfig) -> tuple[int, int]:
        hd = config.n_head * config.head_dim  # two maps of H heads: q·k width d, value width 2d each
        return 2 * hd, 4 * hd

    def lambda_report(self) -> dict:
        return lambda_record(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init,
                             lam=float(self.lambda_full()))

    # --- Q/K projections: the only part Shared DIFF changes -------------------------------
    def _build_qk(self, config: ModelConfig) -> None:
        h, hkv, d, dm = config.n_head, config.n_kv_head, config.head_dim, config.d_model
        self.q_proj = nn.Linear(dm, 2 * h * d, bias=False)
        self.k_proj = nn.Linear(dm, 2 * hkv * d, bias=False)

    def project_q(self, x):
        """q (B, T, H, 2, d); [..., c, :] is component c+1 (sub-heads 2h, 2h+1)."""
        b, t, _ = x.shape
        return self.q_proj(x).view(b, t, -1, 2, self.head_dim)

    def project_k(self, x):
        """k (B, S, Hkv, 2, d)."""
        b, s, _ = x.shape
        return self.k_proj(x).view(b, s, -1, 2, self.head_dim)

    def project_v(self, x):
        """v (B, S, Hkv, 2d): both components read the same 2d-wide value."""
        b, s, _ = x.shape
        return self.v_proj(x).view(b, s, -1, 2 * self.head_dim)

    def split(self, q, k, v, rope_q, rope_k):
        """-> (q1, q2) (B, H, T, d), (k1, k2) (B, Hkv, S, d), v (B, Hkv, S, 2d); rotary on every d-wide sub-head."""
        if rope_q is not None:
            q = rope_q(q.flatten(2, 3)).view_as(q)
        if rope_k is not None:
            k = rope_k(k.flatten(2, 3)).view_as(k)
        return ((q[:, :, :, 0].transpose(1, 2), q[:, :, :, 1].transpose(1, 2)),
                (k[:, :, :, 0].transpose(1, 2), k[:, :, :, 1].transpose(1, 2)), v.transpose(1, 2))

    def cache_update(self, cache: KVCache, k, v):
        k1, k2, v = cache.update(self.layer_idx, k[0], k[1], v)
        return (k1, k2), v

    # --- λ (Eq. 2) ------------------------------------------------------------------------
    def lambda_full(self) -> torch.Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, a 0-d fp32 (or fp64) tensor."""
        dt = compute_dtype(self.lambda_q1.dtype)
        l1 = torch.exp(torch.dot(self.lambda_q1.to(dt), self.lambda_k1.to(dt)))
        l2 = torch.exp(torch.dot(self.lambda_q2.to(dt), self.lambda_k2.to(dt)))
        return l1 - l2 + self.lambda_init

    def combine(self, q, k, v, xq, *, mask=None, is_causal=True, need_weights=False, kernel=None, dropout_p=0.0):
        (q1, q2), (k1, k2) = q, k
        lam = self.lambda_full()
        # Eq. 1: (A1 − λ·A2)·V, (B, H, T, 2d); a fused kernel computes both maps in one pass
        out, probs = (kernel or self.kernel).attend_differential(q1, q2, k1, k2, v, lam, mask=mask, is_causal=is_causal,
                                                                 scale=self.scale, need_weights=need_weights,
                                                                 dropout_p=dropout_p)
        if self.head_norm is not None:
            out = self.head_norm(out)
        out = out * (1.0 - self.lambda_init)  # Eq. 3: aligns gradients with a Transformer
        maps = None
        if need_weights:
            p1, p2 = probs
            maps = AttentionMaps(p1 - lam.to(p1.dtype) * p2, torch.stack((p1, p2), dim=2))
        return out.transpose(1, 2).flatten(2), maps


class SharedDiffAttention(DiffV1Attention):
    """Shared DIFF Transformer (Cang et al., arXiv 2501.17900) — OUR READING, UNCONFIRMED.

    Only the paper's abstract could be read ("a shared base matrix to model global patterns and
    low-rank updates to enhance task-specific flexibility"). We implement the working hypothesis
    of methods.md §3.3: the two maps' query and key projections are

        W^Q_c = W^Q_base + A^Q_c B^Q_c,   W^K_c = W^K_base + A^K_c B^K_c,   c ∈ {1, 2},

    computed as X·W_base + (X·A_c)·B_c, never materialising W_c. V, λ, the per-head RMSNorm and
    the (1 − λ_init) factor are exactly DIFF V1's (inherited). Initialisation of A and B is an
    explicit choice (``config.shared_init``, see ``init_weights``): "lora" (A ~ N(0, init_std²),
    B = 0, both maps start identical and diverge as B_1 and B_2 receive different gradients) or
    "random" (B ~ N(0, 1/r) so that A_c B_c has the scale of W_base and the maps differ at step 0).
    """

    @torch.no_grad()
    def reset_variant_parameters(self) -> None:
        """V1's, then the low-rank B matrices: 0 for ``shared_init='lora'``, N(0, 1/r) for ``'random'``."""
        super().reset_variant_parameters()
        for up in (self.q_up, self.k_up):
            if self.config.shared_init == "lora":
                up.zero_()
            else:
                up.normal_(0.0, self.config.shared_rank ** -0.5)

    def _build_qk(self, config: ModelConfig) -> None:
        h, hkv, d, dm, r = config.n_head, config.n_kv_head, config.head_dim, config.d_model, config.shared_rank
        self.q_base = nn.Linear(dm, h * d, bias=False)
        self.k_base = nn.Linear(dm, hkv * d, bias=False)
        self.q_down = nn.Linear(dm, 2 * r, bias=False)  # [A^Q_1 | A^Q_2]
        self.k_down = nn.Linear(dm, 2 * r, bias=False)  # [A^K_1 | A^K_2]
        self.q_up = nn.Parameter(torch.zeros(2, r, h * d))  # B^Q_1, B^Q_2
        self.k_up = nn.Parameter(torch.zeros(2, r, hkv * d))  # B^K_1, B^K_2

    def _shared(self, x, base, down, up):
        b, t, _ = x.shape
        d, r = self.head_dim, self.config.shared_rank
        low = down(x).view(b, t, 2, r)  # (X·A_c) for c = 1, 2
        upd = torch.einsum("btcr,crn->btcn", low, up.to(low.dtype))  # (X·A_c)·B_c
        out = base(x).unsqueeze(2) + upd  # (B, T, 2, n·d)
        return out.view(b, t, 2, -1, d).transpose(2, 3)  # (B, T, n, 2, d)

    def project_q(self, x):
        return self._shared(x, self.q_base, self.q_down, self.q_up)

    def project_k(self, x):
        return self._shared(x, self.k_base, self.k_down, self.k_up)


class DiffV2Attention(AttentionBase):
    """DIFF Transformer V2 (Microsoft blog 2026-01, methods.md §2.2).

    2H query heads against Hkv shared K/V heads of width d in one ordinary GQA attention call;
    output head i is C_{2i} − sigmoid(x W_λ)_i · C_{2i+1} with a λ per token and head. Heads 2i
    and 2i+1 always fall in the same GQA group (Hkv divides H, so 2H/Hkv is even), which the blog
    calls crucial. No per-head norm, no λ_init; the output projection maps H·d → D.
    """

    PARAM_BUCKETS = {"lambda_proj": "attention.lambda"}
    lambda_needs_data = True
    query_heads_per_head = 2

    @classmethod
    def attention_widths(cls, config: ModelConfig) -> tuple[int, int]:
        hd = config.n_head * config.head_dim  # 2H query heads of width d against values of width d
        return 2 * hd, 2 * hd

    def head_components(self, n_query_heads: int) -> torch.Tensor:
        return torch.arange(n_query_heads) % 2  # query heads 2i, 2i+1 are the two maps of output head i

    def lambda_per_token(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.lambda_proj(x).double())  # the forward's λ, in float64 for statistics

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h, hkv, d, dm = config.n_head, config.n_kv_head, config.head_dim, config.d_model
        self.n_head = h
        self.q_proj = nn.Linear(dm, 2 * h * d, bias=False)
        self.k_proj = nn.Linear(dm, hkv * d, bias=False)
        self.v_proj = nn.Linear(dm, hkv * d, bias=False)
        self.lambda_proj = nn.Linear(dm, h, bias=False)  # W_λ
        self.o_proj = nn.Linear(h * d, dm, bias=False)

    def combine(self, q, k, v, xq, *, mask=None, is_causal=True, need_weights=False, kernel=None, dropout_p=0.0):
        c, probs = self._attend(q, k, v, mask, is_causal, need_weights, kernel, dropout_p)  # (B, 2H, T, d)
        # λ per token and head, sigmoid computed in fp32: (B, T, H) -> (B, H, T, 1)
        lam = torch.sigmoid(self.lambda_proj(xq).to(compute_dtype(xq.dtype))).transpose(1, 2).unsqueeze(-1)
        out = c[:, 0::2] - lam.to(c.dtype) * c[:, 1::2]  # (B, H, T, d)
        maps = None
        if need_weights:
            p1, p2 = probs[:, 0::2], probs[:, 1::2]
            maps = AttentionMaps(p1 - lam.to(p1.dtype) * p2, torch.stack((p1, p2), dim=2))
        return out.transpose(1, 2).flatten(2), maps


# The built-in rows (variants.py) are registered without a class, so that a config validates without torch;
# their classes attach here, when the model code loads.
for _name, _cls in (("standard", StandardAttention), ("diff_v1", DiffV1Attention), ("diff_v2", DiffV2Attention),
                    ("shared_diff", SharedDiffAttention)):
    variants.attach(_name, _cls)


def attention_class(attention: str) -> type[AttentionBase]:
    """The class of variant ``attention``, from the registry (diffattn/variants.py)."""
    return variants.get(attention).attention_class()


def build_attention(config: ModelConfig, layer_idx: int) -> AttentionBase:
    return attention_class(config.attention)(config, layer_idx)
