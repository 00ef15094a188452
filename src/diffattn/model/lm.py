"""The decoder-only language model shared by every attention variant.

Pre-norm LLaMA-style blocks (methods.md §1.7):  Y = X + Attn(RMSNorm(X));  X' = Y + SwiGLU(RMSNorm(Y)),
rotary positions, no biases, optional tied embeddings. Only the attention module differs between
variants (``config.attention``); the kernel is ``config.kernel``.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import nn

from ..config import ModelConfig
from .attention import AttentionMaps, build_attention
from .kernels import KERNELS, get_kernel
from .cache import KVCache
from .layers import RMSNorm, Rotary, SwiGLU


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = build_attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(self, x, rope, *, mask, is_causal, cache, need_weights):
        a, maps = self.attn(self.attn_norm(x), rope, mask=mask, is_causal=is_causal, cache=cache,
                            need_weights=need_weights)
        x = x + a
        x = x + self.ffn(self.ffn_norm(x))
        return x, maps


class DecoderLM(nn.Module):
    """Token embedding → n_layer blocks → RMSNorm → output head. ``forward`` returns logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"expected a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        if not self.embed.weight.is_meta:  # a shapes-only model (torch.device("meta")) has no values to set
            self.init_weights()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor (the one place that does), by ``config.init``:

        * ``"gpt2"``: token embedding and every nn.Linear weight (projections, FFN, output head, V2's
          W_λ, Shared DIFF's A matrices) N(0, init_std²); residual output projections (attention
          ``o_proj``, FFN ``down``) N(0, init_std²/(2·n_layer)) (GPT-2's depth scaling).
        * ``"torch"``: PyTorch's defaults, which the DIFF authors' reference modules use (methods.md
          §1.5): every nn.Linear Kaiming-uniform(a=√5), i.e. U(±1/√fan_in); nn.Embedding N(0, 1).
        * ``"mixed"``: as ``"torch"``, but the token embedding N(0, init_std²).
        * ``"scaled"``: as ``"torch"``, but the token embedding and an untied output head N(0, 1/d_model)
          (torchscale / fairseq, the authors' framework; see config.INITS).

        Under both: block RMSNorm gains 1; then each attention module's ``reset_variant_parameters``
        (DIFF: λ vectors N(0, lambda_std²) in fp32 (methods.md §1.3), the per-head norm gain
        ``diff_norm_gain_init``; Shared DIFF: B matrices 0 for ``shared_init='lora'``, N(0, 1/r) for ``'random'``).
        docs/results/init.md measures what the choice does to the cpu-tiny comparison.
        """
        cfg = self.config
        std = cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if cfg.init == "gpt2":
                    module.weight.normal_(0.0, std)
                else:  # "torch", "mixed", "scaled": PyTorch's defaults first
                    module.reset_parameters()
            elif isinstance(module, RMSNorm) and module.weight is not None:
                module.weight.fill_(1.0)
        if cfg.init == "mixed":
            self.embed.weight.normal_(0.0, std)
        elif cfg.init == "scaled":
            self.embed.weight.normal_(0.0, cfg.d_model ** -0.5)
            if self.lm_head is not None:
                self.lm_head.weight.normal_(0.0, cfg.d_model ** -0.5)
        for block in self.layers:
            if cfg.init == "gpt2":
                block.attn.o_proj.weight.normal_(0.0, std / (2 * cfg.n_layer) ** 0.5)
                block.ffn.down.weight.normal_(0.0, std / (2 * cfg.n_layer) ** 0.5)
            block.attn.reset_variant_parameters()

    # ------------------------------------------------------------------ forward
    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty along time")
        if torch.compiler.is_compiling():
            return  # shapes and dtypes were checked when tracing; a value check would break the graph
        if input_ids.device.type != "cpu":  # no host sync per forward on accelerators
            torch._assert_async(((input_ids >= 0) & (input_ids < self.config.vocab_size)).all(),
                                f"token id out of range [0, {self.config.vocab_size}) (vocab_size)")
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} out of range [0, {self.config.vocab_size}) (vocab_size)")

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_maps: bool = False,
        return_hidden: bool = False,
    ):
        """Logits (B, T, V) for ``input_ids`` (B, T).

        attention_mask: optional (B, T) of 1 for real tokens and 0 for (left) padding of the *new*
            tokens; the cache remembers earlier steps. Rotary positions count real tokens only, so a
            left-padded row computes what it would alone.
        cache: a :class:`KVCache`; the new tokens are appended to it.
        return_maps: also return a list (one per layer) of :class:`AttentionMaps` (eager kernel).
        return_hidden: also return the final hidden states (B, T, D) before the output norm.
        """
        self._check_input_ids(input_ids)
        b, t = input_ids.shape
        past = 0 if cache is None else cache.length
        if past + t > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + t} exceeds max_seq_len {self.config.max_seq_len}")
        if return_maps and not all(block.attn.kernel.returns_maps for block in self.layers):
            raise ValueError("return_maps needs kernel='eager' (the only kernel that materialises the maps)")
        device = input_ids.device

        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
            new_valid = attention_mask.to(device=device, dtype=torch.bool)
        else:
            new_valid = torch.ones(b, t, dtype=torch.bool, device=device)
        padded = attention_mask is not None and not bool(new_valid.all())
        if cache is not None:
            cache.check_step(b, t)
            padded = padded or not bool(cache.valid[:, :past].all())
            start = cache.n_real[:, None]
        else:
            start = torch.zeros(b, 1, dtype=torch.long, device=device)
        positions = (start + new_valid.long().cumsum(1) - 1).clamp_min(0)  # (B, T) real-token positions

        mask, is_causal = self._mask(new_valid, cache, past, padded)
        rope = Rotary(positions, self.config.head_dim, self.config.rope_theta, self.embed.weight.dtype)

        x = self.embed(input_ids.long())
        maps: list[AttentionMaps] = []
        for block in self.layers:
            x, m = block(x, rope, mask=mask, is_causal=is_causal, cache=cache, need_weights=return_maps)
            if return_maps:
                maps.append(m)
        if cache is not None:
            cache.commit(t, new_valid)
        hidden = x
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else x @ self.embed.weight.t()
        extras = ([maps] if return_maps else []) + ([hidden] if return_hidden else [])
        return (logits, *extras) if extras else logits

    @staticmethod
    def _mask(new_valid, cache, past, padded):
        """(mask, is_causal) for the kernels; mask=None keeps the fused causal fast paths."""
        b, t = new_valid.shape
        if not padded:
            if past == 0:
                return None, True
            if t == 1:
                return None, False
        s = past + t
        device = new_valid.device
        key_valid = new_valid if cache is None else torch.cat((cache.valid[:, :past], new_valid), dim=1)  # (B, S)
        q_pos = torch.arange(past, s, device=device)[:, None]
        k_pos = torch.arange(s, device=device)[None, :]
        causal = k_pos <= q_pos  # (T, S), bottom-right aligned
        mask = causal[None] & key_valid[:, None, :]
        mask = mask | (k_pos == q_pos)[None]  # a padded query still sees itself: no empty softmax row
        return mask[:, None], False  # (B, 1, T, S)

    # ------------------------------------------------------------------ kernels
    def set_kernel(self, kernel) -> None:
        """Compute attention with ``kernel`` (a name in ``KERNELS`` or an ``AttentionKernel``) from now on.
        A named kernel also becomes ``config.kernel`` (what a saved checkpoint records)."""
        k = get_kernel(kernel)
        for block in self.layers:
            block.attn.set_kernel(k)
        if KERNELS.get(k.name) is k:
            self.config = self.config.replace(kernel=k.name)

    @contextmanager
    def using_kernel(self, kernel):
        """Use ``kernel`` for the duration of the ``with`` block, then restore each layer's own kernel.
        ``kernel`` is one kernel (name or object) for every layer, or a sequence with one per layer."""
        per_layer = list(kernel) if isinstance(kernel, (list, tuple)) else [kernel] * len(self.layers)
        if len(per_layer) != len(self.layers):
            raise ValueError(f"using_kernel: {len(per_layer)} kernels for {len(self.layers)} layers")
        old_config, old = self.config, [block.attn.kernel for block in self.layers]
        for block, k in zip(self.layers, per_layer):
            block.attn.set_kernel(k)
        try:
            yield self
        finally:
            for block, k in zip(self.layers, old):
                block.attn.set_kernel(k)
            self.config = old_config

    # ------------------------------------------------------------------ utilities
    def param_buckets(self) -> "OrderedDict[str, str]":
        """Each parameter's component by its ``named_parameters`` name (tied tensors once): "embedding",
        "lm_head", the attention class's own buckets (``PARAM_BUCKETS``: "attention.lambda", "attention.norm";
        any other attention tensor "attention.qkvo"), "ffn", "norm". ``param_counts`` and the optimizer's
        weight-decay split (train/optim.py) read it."""
        buckets: OrderedDict[str, str] = OrderedDict()
        own = type(self.layers[0].attn).PARAM_BUCKETS  # the variant class names its λ and norm tensors
        for name, _ in self.named_parameters():  # named_parameters de-duplicates tied tensors
            if name.startswith("embed."):
                key = "embedding"
            elif name.startswith("lm_head."):
                key = "lm_head"
            elif ".attn." in name:
                key = own.get(name.split(".attn.", 1)[1].split(".", 1)[0], "attention.qkvo")
            elif ".ffn." in name:
                key = "ffn"
            else:
                key = "norm"
            buckets[name] = key
        return buckets

    def param_counts(self) -> "OrderedDict[str, int]":
        """Parameter count by component (:meth:`param_buckets`); the parts sum to ``total`` (tied weights once)."""
        counts: OrderedDict[str, int] = OrderedDict(
            (k, 0) for k in ("embedding", "attention.qkvo", "attention.lambda", "attention.norm", "ffn", "norm", "lm_head"))
        buckets = self.param_buckets()
        for name, p in self.named_parameters():
            counts[buckets[name]] += p.numel()
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters())
        return counts

    def save_pretrained(self, directory, *, tokenizer_file=None):
        """Write a Hugging Face model directory (config.json + model.safetensors, optionally tokenizer.json),
        atomically: ``AutoModelForCausalLM.from_pretrained`` and ``DecoderLM.from_pretrained`` read it.
        The same as :func:`diffattn.checkpoint.save_model`."""
        from .pretrained import save_model

        return save_model(self, directory, tokenizer_file=tokenizer_file)

    @classmethod
    def from_pretrained(cls, directory, *, device=None, dtype=None, kernel=None) -> "DecoderLM":
        """Load a directory written by :meth:`save_pretrained` or a training checkpoint, with the command line's
        checks (checksums when present, every tensor name and shape against config.json). The same as
        :func:`diffattn.checkpoint.load_model`."""
        from .pretrained import load_model

        return load_model(directory, build=cls, device=device, dtype=dtype, kernel=kernel)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Decode with the KV cache; see :func:`diffattn.model.generate.generate` for options."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)


def build_model(config: ModelConfig) -> DecoderLM:
    """Build the decoder LM for ``config`` (weights initialised per ``DecoderLM.init_weights``)."""
    return DecoderLM(config)


__all__ = ["DecoderLM", "Block", "build_model", "AttentionMaps"]
