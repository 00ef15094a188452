"""DEX module surgery on Hugging Face causal LMs (Kong et al., arXiv 2505.16333, methods.md §4.3).

DEX keeps the pretrained softmax maps and adds a light differential operation on each selected head's
output before the output projection:

    O_h  = softmax(Q_h K_hᵀ/√d) V_h                        (pretrained, unchanged)
    O'_h = O_h − λ_l(t)·f_D(O_h)   for h ∈ ℋ_l,  f_D(O) = O·W_D,   O'_h = O_h otherwise
    MHA(X) = Concat_h(O'_h)·W_Oᵀ

We never copy the base model's classes: every supported architecture (Llama, Mistral, Qwen2/3,
Gemma 3) computes ``self_attn.o_proj(attn_output)`` with ``attn_output`` of shape (B, T, H·d) laid out
head-major, so replacing ``self_attn.o_proj`` by :class:`DEXOutputProjection` (which holds the
original ``nn.Linear`` as ``.base``) wraps exactly "what the attention layer feeds its output
projection". With W_D = 0 (its init) or λ = 0 (its value at t = 0) the wrapper returns the base
projection of the unchanged input: the adapted model's logits equal the base model's bit for bit.

Options for UNCONFIRMED details (methods.md §4.3, §6), all recorded in the adapter config:

* ``f_d="layer"`` (default; the third-party implementation's reading): one W_D ∈ R^{d×d} per layer,
  shared by that layer's selected heads. ``f_d="head"``: one W_D per selected head.
* ``head_norm="rms"``: after the subtraction, a per-head RMSNorm rescaled to the head's original RMS,
  ``O'' = RMSNorm(O')·rms(O)·g`` (g learnable, init 1) — our analogue of DIFF V1's per-head norm that
  keeps the pretrained output scale (so the init is still the identity up to rounding). It is a
  nonlinearity: an adapter using it cannot be merged into ``o_proj``.
* ``lambda_init`` ("depth" = 0.8 − 0.6·exp(−0.3·depth), or a constant); ``lambda_learn_init`` (0).

Controls for the study (same wrapper position, no differential structure):

* ``method="linear"``: O'_h = O_h + O_h·W (W zero-initialised, no λ, no schedule): the same function
  class as DEX with a shared linear f_D, trained without the λ parametrisation.
* ``method="finetune"``: no module at all; with ``--train all`` this is plain fine-tuning of the base weights,
  the control for DEX trained together with them (``--train all`` with DEX).
* ``method="lora"``: a rank-r update of ``o_proj`` (``W_O + B·A``, B = 0 at init), r chosen to match
  the DEX parameter count.

Merging (no nonlinearity): since O'_h = O_h(I − λW_D), ``o_proj``'s column block of head h becomes
``W_O[:, h] (I − λW_D)ᵀ`` (computed in float64), which gives a stock model of the base architecture.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from .schedule import SCHEDULES, dex_lambda, lambda_init_for_depth

# model_type -> family name; the attention modules of all of them feed o_proj a head-major (B, T, H·d)
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama (SmolLM2, Llama 2/3)",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3",
}
METHODS = ("dex", "linear", "lora", "finetune")  # finetune: no adapter module (plain fine-tuning, --train all)
F_D_CHOICES = ("layer", "head")
HEAD_NORMS = ("none", "rms")
TRAIN_MODES = ("dex", "dex+o_proj", "all")


class UnsupportedModelError(ValueError):
    """The model is not a causal LM of a supported architecture (message lists the supported ones)."""


def supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


@dataclass(frozen=True, kw_only=True)
class DEXOptions:
    """How the adapter is built; everything here is written to ``adapter_config.json``."""

    method: str = "dex"              # "dex" | control: "linear" | "lora" | "finetune" (no module)
    f_d: str = "layer"               # W_D shared per layer ("layer") or one per selected head ("head")
    head_norm: str = "none"          # "none" | "rms" (per-head RMSNorm, scale-preserving; disables merge)
    lambda_init: str | float = "depth"   # "depth" (DIFF V1 schedule) or a constant
    lambda_learn_init: float = 0.0   # λ_learn initial value ("near zero")
    anneal_steps: int = 1000         # T of the λ schedule
    schedule: str = "quoted"         # "additive" (λ = α·λ_init + λ_learn) or "quoted"; schedule.py. Configs written
                                     # before the option existed read as "quoted", what they were trained with.
    lora_rank: int = 0               # only for method="lora"; 0 = match the DEX parameter count

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.f_d not in F_D_CHOICES:
            raise ValueError(f"f_d must be one of {', '.join(F_D_CHOICES)}, got {self.f_d!r}")
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, got {self.head_norm!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {self.anneal_steps}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        lambda_init_for_depth(0, self.lambda_init)  # validates

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DEXOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DEX option(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a supported base model."""

    layer_idx: int
    attn: nn.Module        # the model's self_attn module (its o_proj is what we wrap)
    n_head: int
    head_dim: int


def model_type_of(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The attention layers of a supported HF causal LM, or :class:`UnsupportedModelError`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mtype = model_type_of(model)
    cls = type(model).__name__
    if not (cls.endswith(("ForCausalLM", "LMHeadModel")) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mtype) == cls):
        raise UnsupportedModelError(f"{type(model).__name__} ({mtype}) is not a causal LM; "
                                    f"DEX supports: {supported_list()}")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"unsupported architecture {mtype!r} for DEX; supported: {supported_list()}")
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers; DEX supports: {supported_list()}")
    cfg = model.config
    sites = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        head_dim = int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
                       or cfg.hidden_size // cfg.num_attention_heads)
        n_head = int(cfg.num_attention_heads)
        o_proj = attn.o_proj
        base = o_proj.base if isinstance(o_proj, AdapterProjection) else o_proj
        if base.in_features != n_head * head_dim:
            raise UnsupportedModelError(f"layer {i}: o_proj takes {base.in_features} features, expected "
                                        f"{n_head}×{head_dim}; DEX supports: {supported_list()}")
        sites.append(AttentionSite(i, attn, n_head, head_dim))
    return sites


class AdapterProjection(nn.Module):
    """Base class of the modules that replace ``self_attn.o_proj``; the original Linear is ``.base``."""

    base: nn.Linear

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError


class DEXOutputProjection(AdapterProjection):
    """``o_proj`` preceded by O'_h = O_h − λ_l(t)·O_h·W_D on the selected heads (see the module docstring).

    ``method="linear"`` is the control O'_h = O_h + O_h·W (λ ≡ −1, no schedule, no λ_learn).
    """

    def __init__(self, base: nn.Linear, *, layer_idx: int, n_head: int, head_dim: int, heads: list[int],
                 options: DEXOptions):
        super().__init__()
        if options.method not in ("dex", "linear"):
            raise ValueError(f"DEXOutputProjection does not implement method {options.method!r}")
        heads = sorted(set(int(h) for h in heads))
        if not heads or heads[0] < 0 or heads[-1] >= n_head:
            raise ValueError(f"layer {layer_idx}: head indices must be in 0..{n_head - 1}, got {heads}")
        self.base = base
        self.layer_idx, self.n_head, self.head_dim, self.heads = layer_idx, n_head, head_dim, heads
        self.options = options
        self.all_heads = len(heads) == n_head
        self.register_buffer("head_index", torch.tensor(heads, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        # the adapter's own weights are float32 whatever the base's dtype: AdamW's steps of ~lr on a bf16 λ_learn or
        # W_D would round away (bf16 keeps 8 bits: its spacing at 0.5 is 0.002); the forward casts them to the input's
        factory = dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
        k, d = len(heads), head_dim
        shape = (d, d) if options.f_d == "layer" else (k, d, d)
        self.W_D = nn.Parameter(torch.zeros(shape, **factory))
        if options.method == "dex":
            self.lambda_learn = nn.Parameter(torch.tensor(float(options.lambda_learn_init), **factory))
        else:
            self.lambda_learn = None
        self.norm_gain = nn.Parameter(torch.ones(k, d, **factory)) if options.head_norm == "rms" else None
        self.lambda_init = lambda_init_for_depth(layer_idx, options.lambda_init)
        self.anneal_steps = int(options.anneal_steps)
        self.step = 0  # the schedule's t; set by set_dex_step()

    def current_lambda(self) -> torch.Tensor | float:
        if self.lambda_learn is None:  # linear control: O + O·W
            return -1.0
        return dex_lambda(self.step, self.anneal_steps, self.lambda_init, self.lambda_learn, self.options.schedule)

    def _transform(self, o_sel: torch.Tensor) -> torch.Tensor:
        """o_sel: (..., k, d) outputs of the selected heads → O' of the same shape."""
        W_D = self.W_D.to(o_sel.dtype)
        if W_D.dim() == 2:
            f = o_sel @ W_D                                              # (..., k, d)
        else:
            f = torch.einsum("...kd,kde->...ke", o_sel, W_D)             # (..., k, d)
        lam = self.current_lambda()
        out = o_sel - (lam.to(o_sel.dtype) if torch.is_tensor(lam) else lam) * f
        if self.norm_gain is not None:  # RMSNorm(O')·rms(O)·g, in (at least) float32
            eps = 1e-6
            acc = torch.promote_types(o_sel.dtype, torch.float32)  # at least float32
            o32, n32 = o_sel.to(acc), out.to(acc)
            scale = torch.sqrt(o32.pow(2).mean(-1, keepdim=True) + eps) * torch.rsqrt(n32.pow(2).mean(-1, keepdim=True) + eps)
            out = (n32 * scale).to(out.dtype) * self.norm_gain.to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape                                                  # (..., H·d)
        xh = x.reshape(*shape[:-1], self.n_head, self.head_dim)          # (..., H, d)
        if self.all_heads:
            xh = self._transform(xh)
        else:
            sel = xh.index_select(-2, self.head_index)                   # (..., k, d)
            xh = xh.index_copy(-2, self.head_index, self._transform(sel))
        return self.base(xh.reshape(shape))

    def effective_matrix(self) -> torch.Tensor:
        """(k, d, d) float64: per selected head, the map O ↦ O·M with M = I − λW_D (linear case only)."""
        if self.norm_gain is not None:
            raise ValueError("an adapter with head_norm='rms' (a nonlinearity) cannot be merged into o_proj")
        lam = self.current_lambda()
        lam = float(lam.detach()) if torch.is_tensor(lam) else float(lam)
        eye = torch.eye(self.head_dim, dtype=torch.float64, device=self.W_D.device)
        w = self.W_D.detach().double()
        w = w.expand(len(self.heads), -1, -1) if w.dim() == 2 else w
        return eye - lam * w

    def merged_weight(self) -> torch.Tensor:
        # y = Σ_h O_h M_h W_O[:, h]ᵀ  ⇒  W_O[:, h] ← W_O[:, h] M_hᵀ
        W = self.base.weight.detach().double().clone()                   # (out, H·d)
        M = self.effective_matrix()
        d = self.head_dim
        for j, h in enumerate(self.heads):
            W[:, h * d:(h + 1) * d] = W[:, h * d:(h + 1) * d] @ M[j].T
        return W.to(self.base.weight.dtype)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_D": self.W_D}
        if self.lambda_learn is not None:
            out["lambda_learn"] = self.lambda_learn
        if self.norm_gain is not None:
            out["norm_gain"] = self.norm_gain
        return out

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, heads={self.heads}, method={self.options.method}, f_d={self.options.f_d}, "
                f"head_norm={self.options.head_norm}, lambda_init={self.lambda_init:.3f}, T={self.anneal_steps}")


class LoRAOutputProjection(AdapterProjection):
    """Control: ``o_proj`` with a rank-r update, y = x·(W_O + B·A)ᵀ, A Kaiming-uniform, B = 0 (LoRA init)."""

    def __init__(self, base: nn.Linear, *, layer_idx: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {rank}")
        self.base, self.layer_idx, self.rank = base, layer_idx, rank
        # float32 master weights on a bf16 base, as DEX's (see DEXOutputProjection)
        factory = dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T

    def merged_weight(self) -> torch.Tensor:
        W = self.base.weight.detach().double() + self.lora_B.detach().double() @ self.lora_A.detach().double()
        return W.to(self.base.weight.dtype)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, rank={self.rank}"


def dex_params_per_layer(n_selected: int, head_dim: int, options: DEXOptions) -> int:
    """Trainable parameters DEX adds to one layer with ``n_selected`` heads."""
    n = head_dim * head_dim * (1 if options.f_d == "layer" else n_selected)
    n += 1  # λ_learn
    if options.head_norm == "rms":
        n += n_selected * head_dim
    return n


def matched_lora_rank(n_params: int, in_features: int, out_features: int) -> int:
    """The LoRA rank whose parameter count r·(in + out) is closest to ``n_params`` (at least 1)."""
    return max(1, round(n_params / (in_features + out_features)))


def apply_dex(model: nn.Module, heads: dict[int, list[int]], options: DEXOptions) -> nn.Module:
    """Replace ``self_attn.o_proj`` of every layer in ``heads`` (layer → head indices) in place; returns model.

    For ``method="lora"`` the head lists only choose the layers; the rank is ``options.lora_rank`` or, when
    0, the one matching the parameter count DEX would add with the same heads.
    """
    sites = {s.layer_idx: s for s in attention_sites(model)}
    if options.method == "finetune":  # the plain fine-tuning control: the base model as it is
        return model
    for layer, hs in heads.items():
        if int(layer) not in sites:
            raise ValueError(f"layer {layer} does not exist (the model has {len(sites)} layers: 0..{len(sites) - 1})")
    for layer, hs in sorted(heads.items()):
        if not hs:
            continue
        site = sites[int(layer)]
        o_proj = site.attn.o_proj
        if isinstance(o_proj, AdapterProjection):
            raise ValueError(f"layer {layer} already carries an adapter")
        if not isinstance(o_proj, nn.Linear):
            raise UnsupportedModelError(f"layer {layer}: o_proj is {type(o_proj).__name__}, not nn.Linear")
        if options.method == "lora":
            rank = options.lora_rank or matched_lora_rank(
                dex_params_per_layer(len(set(hs)), site.head_dim, DEXOptions(f_d=options.f_d)),
                o_proj.in_features, o_proj.out_features)
            site.attn.o_proj = LoRAOutputProjection(o_proj, layer_idx=site.layer_idx, rank=rank)
        else:
            site.attn.o_proj = DEXOutputProjection(o_proj, layer_idx=site.layer_idx, n_head=site.n_head,
                                                   head_dim=site.head_dim, heads=list(hs), options=options)
    return model


def adapter_modules(model: nn.Module) -> list[AdapterProjection]:
    """The adapter wrappers of ``model``, in layer order."""
    return [m for m in model.modules() if isinstance(m, AdapterProjection)]


def set_dex_step(model: nn.Module, step: int) -> None:
    """Set the schedule's t on every DEX wrapper."""
    for m in adapter_modules(model):
        m.step = int(step)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in adapter_modules(model) for p in m.adapter_tensors().values()]


def configure_trainable(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """Set requires_grad for ``--train dex|dex+o_proj|all``; returns the trainable parameters (no duplicates)."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train mode must be one of {', '.join(TRAIN_MODES)}, got {mode!r}")
    mods = adapter_modules(model)
    if not mods and mode != "all":  # with no module, only plain fine-tuning of every weight trains something
        raise ValueError("the model carries no DEX adapter (apply_dex first)")
    for p in model.parameters():
        p.requires_grad_(mode == "all")
    for p in adapter_parameters(model):
        p.requires_grad_(True)
    if mode == "dex+o_proj":
        for m in mods:
            for p in m.base.parameters():
                p.requires_grad_(True)
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _replace_wrappers(model: nn.Module, make) -> nn.Module:
    for site in attention_sites(model):
        if isinstance(site.attn.o_proj, AdapterProjection):
            site.attn.o_proj = make(site.attn.o_proj)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its ``o_proj`` (exact for linear adapters); the result is a stock model."""
    def fold(w: AdapterProjection) -> nn.Linear:
        new_w = w.merged_weight()  # raises for head_norm="rms"
        base = w.base
        with torch.no_grad():
            base.weight.copy_(new_w)
        return base
    for w in adapter_modules(model):  # validate all first: nothing half-merged on error
        if isinstance(w, DEXOutputProjection):
            w.effective_matrix()
    return _replace_wrappers(model, fold)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Undo the surgery without merging (the base o_proj modules come back, with whatever weights they hold)."""
    return _replace_wrappers(model, lambda w: w.base)
