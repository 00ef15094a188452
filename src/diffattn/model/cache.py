"""A static key/value cache for incremental decoding.

Buffers are allocated on a layer's first write with shape (B, heads, max_len, width) for each
tensor the variant caches (K and V for standard/V2; K1, K2 and the 2d-wide V for DIFF V1), so the
cache never re-allocates while decoding. The model writes each step at ``length`` in every layer,
then calls :meth:`commit`. ``valid`` records which cached positions are real tokens (left padding
is not), and ``n_real`` how many real tokens each row has seen, from which rotary positions follow.
"""

from __future__ import annotations

import torch


class CacheError(ValueError):
    """Misuse of a KVCache (wrong model, batch, length or order of writes)."""


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, max_len: int, device: torch.device | str | None = None):
        if n_layer < 1 or batch_size < 1 or max_len < 1:
            raise CacheError(f"KVCache needs n_layer, batch_size, max_len >= 1, got {n_layer}, {batch_size}, {max_len}")
        self.n_layer = n_layer
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # positions committed in every layer
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._buffers: list[tuple[torch.Tensor, ...] | None] = [None] * n_layer
        self._written: list[int] = [0] * n_layer

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> "KVCache":
        cfg = model.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise CacheError(f"cache max_len {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        return cls(cfg.n_layer, batch_size, max_len, device=next(model.parameters()).device)

    def check_step(self, batch_size: int, n_new: int) -> None:
        """Validate a forward step of ``n_new`` tokens before any layer writes."""
        if batch_size != self.batch_size:
            raise CacheError(f"batch size {batch_size} does not match the cache's {self.batch_size}")
        if self.length + n_new > self.max_len:
            raise CacheError(f"cache overflow: {self.length} cached + {n_new} new tokens > max_len {self.max_len}")
        if any(w != self.length for w in self._written):
            raise CacheError("cache is in an inconsistent state (a previous step did not finish); start a new cache")

    def update(self, layer_idx: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append (B, heads, T, width) tensors at the current length; return the full (B, heads, S, width)."""
        if not 0 <= layer_idx < self.n_layer:
            raise CacheError(f"layer index {layer_idx} out of range for a cache of {self.n_layer} layers")
        if self._written[layer_idx] != self.length:
            raise CacheError(f"layer {layer_idx} written twice in one step")
        t = tensors[0].shape[2]
        bufs = self._buffers[layer_idx]
        if bufs is None:
            bufs = tuple(x.new_zeros(x.shape[0], x.shape[1], self.max_len, x.shape[3]) for x in tensors)
            self._buffers[layer_idx] = bufs
        elif len(bufs) != len(tensors) or any(b.shape[1] != x.shape[1] or b.shape[3] != x.shape[3] or b.dtype != x.dtype
                                              for b, x in zip(bufs, tensors)):
            raise CacheError(f"layer {layer_idx}: tensors do not match the cached shapes/dtypes (different model?)")
        end = self.length + t
        for buf, x in zip(bufs, tensors):
            buf[:, :, self.length:end] = x
        self._written[layer_idx] = end
        return tuple(buf[:, :, :end] for buf in bufs)

    def commit(self, n_new: int, new_valid: torch.Tensor) -> None:
        """Finish a step: every layer must have written ``n_new`` positions."""
        end = self.length + n_new
        if any(w != end for w in self._written):
            raise CacheError("not every layer wrote this step; the cache does not belong to this model")
        self.valid[:, self.length:end] = new_valid
        self.n_real += new_valid.sum(dim=1)
        self.length = end
