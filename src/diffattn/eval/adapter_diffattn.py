"""The evaluation interface for diffattn checkpoints (:class:`DiffattnAdapter`).

Attention maps come from the ``eager`` kernel with ``return_maps=True``, selected for the call with
``DecoderLM.using_kernel``: for DIFF variants the *effective* map A1 − λ·A2 and both components.
Pre-softmax logits: :meth:`DiffattnAdapter.logit_probe` gives each layer a :class:`ProbeKernel` — the
eager kernel with a hook between QKᵀ·scale and the softmax and no fused differential path, so both DIFF
maps pass through the probe, each tagged with its component. With a hook that returns ``None`` it
computes exactly what the eager kernel computes. What a variant's components and λ are is asked of its
attention class (``head_components``, ``lambda_report``, ``lambda_per_token``), never of its name.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import variants
from ..model.kernels import AttentionKernel, eager_attention
from ..utils.errors import UsageError
from .adapter import LayerMaps, ModelAdapter, ProbeSite, collect_outputs, json_sha256, weights_sha256


def probe_kernel(q, k, v, *, mask=None, is_causal=True, scale, need_weights=False, hook=None):
    """The eager kernel (``diffattn.model.kernels.eager_attention``) with ``hook`` on the logits.

    ``hook(scores, allowed)`` sees the fp32 logits QKᵀ·scale (B, Hq, T, S) and the boolean "may
    attend" mask before the softmax and may return replacement logits (e.g. quantised ones).
    """
    return eager_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, need_weights=need_weights,
                           logits_hook=hook)


class ProbeKernel(AttentionKernel):
    """The eager kernel with ``hook(call, component, scores, allowed)`` between QKᵀ·scale and the softmax.

    ``attend_differential`` is the default two ``attend`` calls (no fused path), so both DIFF maps pass
    through the hook, each tagged with its component; a plain call is tagged with the variant's
    ``head_components`` (DIFF V2's interleaved query heads) or None.
    """

    name = "probe"
    returns_maps = True

    def __init__(self, attn, hook):
        self.attn, self.hook, self.calls, self._component = attn, hook, 0, None

    def attend(self, q, k, v, *, mask=None, is_causal=True, scale, need_weights=False, dropout_p=0.0):
        if self._component is not None:
            comp = torch.full((q.shape[1],), self._component, dtype=torch.long)
        else:
            comp = self.attn.head_components(q.shape[1])
        call = self.calls
        self.calls += 1
        return probe_kernel(q, k, v, mask=mask, is_causal=is_causal, scale=scale, need_weights=need_weights,
                            hook=lambda scores, allowed: self.hook(call, comp, scores, allowed))

    def attend_differential(self, q1, q2, k1, k2, v, lam, *, mask=None, is_causal=True, scale, need_weights=False,
                            dropout_p=0.0):
        outs, maps = [], []
        for c, (q, k) in enumerate(((q1, k1), (q2, k2))):
            self._component = c
            try:
                a, p = self.attend(q, k, v, mask=mask, is_causal=is_causal, scale=scale, need_weights=need_weights)
            finally:
                self._component = None
            outs.append(a)
            maps.append(p)
        return outs[0] - lam.to(outs[0].dtype) * outs[1], (tuple(maps) if need_weights else None)


class DiffattnAdapter(ModelAdapter):
    kind = "diffattn"

    def __init__(self, model, *, path=None, device="cpu", dtype=torch.float32):
        cfg = model.config
        super().__init__(max_len=cfg.max_seq_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, device=device,
                         dtype=dtype, path=path)
        self.model = model.eval()
        self.config = cfg
        self.differential = variants.get(cfg.attention).differential

    @torch.no_grad()
    def logits(self, ids):
        return self.model(ids.to(self.device)).float()

    @torch.no_grad()
    def greedy(self, prompt, max_new_tokens, stop_ids=()):
        ids = torch.tensor([list(prompt)], device=self.device)
        out = self.model.generate(ids, max_new_tokens, stop_tokens=list(stop_ids))
        return out[0, ids.shape[1]:].tolist()

    @torch.no_grad()
    def attention_maps(self, ids, last_rows=None):
        def keep_rows(mod, inp, out):  # drop the other query rows layer by layer (memory)
            a, m = out
            comps = None if m.components is None else m.components[..., -last_rows:, :]
            return a, type(m)(m.effective[..., -last_rows:, :], comps)

        hooks = [b.attn.register_forward_hook(keep_rows) for b in self.model.layers] if last_rows else []
        try:
            with self.model.using_kernel("eager"):  # only the eager kernel materialises the maps
                _, maps = self.model(ids.to(self.device), return_maps=True)
        finally:
            for h in hooks:
                h.remove()
        return [LayerMaps(m.effective.float(), None if m.components is None else m.components.float()) for m in maps]

    @torch.no_grad()
    def layer_outputs(self, ids):
        return collect_outputs(self.model.layers, lambda: self.model(ids.to(self.device)))

    @contextmanager
    def logit_probe(self, fn):
        def kernel_for(layer, attn):  # a probe kernel per layer: its calls are numbered per forward
            return ProbeKernel(attn, lambda call, comp, scores, allowed: fn(ProbeSite(layer, call, comp), scores,
                                                                             allowed))

        kernels = [kernel_for(i, b.attn) for i, b in enumerate(self.model.layers)]
        with self.model.using_kernel(kernels):  # no fused differential path: both maps go through the probe
            yield

    def needs_lambda_data(self):
        return type(self.model.layers[0].attn).lambda_needs_data

    @torch.no_grad()
    def lambdas(self, batches=()):
        cfg, layers = self.config, [b.attn for b in self.model.layers]
        if not type(layers[0]).lambda_needs_data:  # λ is a parameter: the variant reports it
            return [{"layer": i, "kind": cfg.attention, **rep} for i, a in enumerate(layers)
                    if (rep := a.lambda_report()) is not None]
        sums = [torch.zeros(cfg.n_head, dtype=torch.float64) for _ in layers]  # λ per token: mean over data
        sq = [torch.zeros(cfg.n_head, dtype=torch.float64) for _ in layers]
        count = [0]

        def hook_for(i):
            def hook(mod, inp, out):
                lam = mod.lambda_per_token(inp[0]).reshape(-1, cfg.n_head).cpu()  # (tokens, H)
                sums[i] += lam.sum(0)
                sq[i] += (lam ** 2).sum(0)
                if i == 0:
                    count[0] += lam.shape[0]
            return hook

        hooks = [a.register_forward_hook(hook_for(i)) for i, a in enumerate(layers)]
        try:
            for ids in batches:
                self.model(ids.to(self.device))
        finally:
            for h in hooks:
                h.remove()
        n = count[0]
        if n == 0:
            raise UsageError(f"{cfg.attention}'s λ depends on the input: pass --data")
        out = []
        for i in range(len(layers)):
            m = sums[i] / n
            sd = (sq[i] / n - m ** 2).clamp_min(0).sqrt()
            out.append({"layer": i, "kind": cfg.attention, "lambda": float(m.mean()), "lambda_std": float(sd.mean()),
                        "per_head": [float(x) for x in m], "tokens": n})
        return out

    def identity(self):
        d = super().identity()
        d.update(architecture=self.config.attention, model_type="diffattn",
                 config_sha256=json_sha256(self.config.to_dict()), n_params=self.model.param_counts()["total"],
                 weights_sha256=weights_sha256(self.path, ("model.safetensors",)) if self.path else None)
        return d


__all__ = ["DiffattnAdapter", "ProbeKernel", "probe_kernel"]
