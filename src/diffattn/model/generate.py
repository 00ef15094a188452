"""Incremental decoding with the KV cache: greedy, temperature, top-k, top-p, stop tokens, batches."""

from __future__ import annotations

from typing import Iterable

import torch

from .cache import KVCache


def _check_options(max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0.0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 means greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to each row of ``input_ids`` (B, T).

    Batches of different prompt lengths are *left*-padded, with ``attention_mask`` (B, T) marking
    real tokens by 1; each row then decodes exactly as it would alone. A row stops after emitting
    one of ``stop_tokens`` (which is kept) and is filled with ``pad_token_id`` afterwards; decoding
    ends when every row has stopped. Returns (B, T + n) with n <= max_new_tokens.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    cfg = model.config
    if t + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds max_seq_len {cfg.max_seq_len}")
    stop = torch.tensor(sorted(set(int(s) for s in stop_tokens)), dtype=torch.long, device=input_ids.device)
    if len(stop) and (stop.min() < 0 or stop.max() >= cfg.vocab_size):
        raise ValueError(f"stop token out of range [0, {cfg.vocab_size})")
    if max_new_tokens == 0:
        return input_ids.clone()
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, b, t + max_new_tokens)
        logits = model(input_ids, attention_mask=attention_mask, cache=cache)[:, -1]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = []
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            out.append(nxt)
            done = done | torch.isin(nxt, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = model(nxt[:, None], cache=cache)[:, -1]
        return torch.cat((input_ids, torch.stack(out, dim=1).to(input_ids.dtype)), dim=1)
    finally:
        model.train(was_training)
