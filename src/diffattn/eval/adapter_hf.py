"""The evaluation interface for Hugging Face causal LMs (:class:`HFAdapter`).

Any ``AutoModelForCausalLM`` directory (remote code only when the user passes ``trust_remote_code=True``).
Maps: ``attn_implementation="eager"`` and ``output_attentions=True`` for the call. Logits probe: an
attention function registered in transformers' ``AttentionInterface`` (with the eager mask) that does
the same as ``adapter_diffattn.probe_kernel``; it covers every model that dispatches through that
interface (Llama, Mistral, Qwen, Gemma, DiffLlama, ...). transformers' ``DiffLlama`` is recognised: its
effective map is built from the two halves of its heads (its layout), and its second (identical-logit)
call is flagged as a duplicate for statistics. DEX wrappers report their λ through ``current_lambda``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch
from torch import nn

from ..model.attention import lambda_record
from ..model.kernels import eager_attention
from ..utils.errors import UsageError
from .adapter import LayerMaps, ModelAdapter, ProbeSite, collect_outputs, json_sha256, weights_sha256


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
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    t, s = query.shape[2], key.shape[2]
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
        hq = query.shape[1]
        comp = (torch.arange(hq) >= hq // 2).long()  # DiffLlama: first half of the heads is map 1
        dup = call == 1  # same Q, K in both calls: identical logits
    softcap = kwargs.get("softcap")

    def hook(scores, allowed):
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        new = fn(ProbeSite(layer, call, comp, dup), scores, allowed)
        return new if new is not None else scores

    out, probs = eager_attention(query, key, value, mask=allowed, is_causal=False, scale=scaling, need_weights=True,
                                 logits_hook=hook)  # the one eager kernel, with the probe between QKᵀ and softmax
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


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
        return collect_outputs(self.blocks, lambda: self.model(input_ids=ids.to(self.device)))

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
                out.append({"layer": i, "kind": "difflama", **lambda_record(
                    mod.lambda_q1, mod.lambda_k1, mod.lambda_q2, mod.lambda_k2, float(mod.lambda_init))})
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

    def identity(self):
        d = super().identity()
        if getattr(self, "dex_adapter", None):
            d["dex_adapter"] = self.dex_adapter
        cfg_path = self.path / "config.json" if self.path and self.path.is_dir() else None
        if cfg_path is not None and cfg_path.is_file():
            config_hash = json_sha256(json.loads(cfg_path.read_text()))
        else:
            config_hash = json_sha256(self.config.to_dict())
        archs = getattr(self.config, "architectures", None) or [type(self.model).__name__]
        files = None
        if self.path is not None:
            base = self.path if self.path.is_dir() else self.path.parent
            pats = ("*.safetensors", "*.bin", "*.gguf") if self.path.is_dir() else (self.path.name,)
            files = sorted({p.name for pat in pats for p in base.glob(pat)})
        d.update(architecture=archs[0], model_type=getattr(self.config, "model_type", None), config_sha256=config_hash,
                 n_params=sum(p.numel() for p in self.model.parameters()),
                 weights_sha256=weights_sha256(self.path if self.path.is_dir() else self.path.parent, files)
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


__all__ = ["HFAdapter"]
