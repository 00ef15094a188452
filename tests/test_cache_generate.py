"""KV-cache decoding equals the full forward pass; batched, left-padded generation equals unbatched."""

import pytest
import torch

from diffattn import ATTENTION_VARIANTS, KVCache, ModelConfig, build_model, presets
from diffattn.model.cache import CacheError
from diffattn.model.generate import sample_next

KERNEL_NAMES = ["eager", "sdpa"]


def tiny(attention, kernel="sdpa", **kw):
    torch.manual_seed(0)
    cfg = presets.get("tiny", attention, kernel=kernel, max_seq_len=64, **kw)
    return build_model(cfg).eval()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
def test_token_by_token_equals_full_forward(attention, kernel):
    model = tiny(attention, kernel)
    ids = torch.randint(0, 512, (2, 19))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_len=19)
        steps = [model(ids[:, i:i + 1], cache=cache) for i in range(19)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
def test_chunked_prefill_equals_full_forward(attention):
    """Chunks of several tokens against a non-empty cache use the bottom-right causal mask."""
    model = tiny(attention)
    ids = torch.randint(0, 512, (1, 17))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 1, 17)
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 13), (13, 17))]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
def test_batched_left_padded_generate_equals_unbatched(attention, kernel):
    model = tiny(attention, kernel)
    torch.manual_seed(1)
    prompts = [torch.randint(1, 512, (n,)) for n in (7, 3, 5)]
    t = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, t - len(p):] = p
        mask[i, t - len(p):] = 1
    out = model.generate(batch, 12, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 12)
        # token ids of two different computations (padded batch vs alone): greedy choices agree unless two
        # logits of this random model tie within float32 rounding, which the logits check below bounds
        assert torch.equal(out[i, t:], alone[0, len(p):]), f"row {i}"
    # padded logits of real tokens equal the unpadded ones as well
    with torch.no_grad():
        padded_logits = model(batch, attention_mask=mask)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(padded_logits[i, t - len(p):], model(p[None])[0], rtol=1e-4, atol=1e-5)


def test_generate_greedy_matches_argmax_loop_and_stop_tokens():
    model = tiny("diff_v1")
    ids = torch.randint(0, 512, (1, 5))
    out = model.generate(ids, 6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq)  # token ids (cached vs full forward): equal unless two logits tie within rounding
    stop = int(out[0, 7])  # the third generated token
    stopped = model.generate(ids, 6, stop_tokens=[stop], pad_token_id=0)
    first = (out[0, 5:] == stop).nonzero()[0].item()
    assert torch.equal(stopped[0, 5:5 + first + 1], out[0, 5:5 + first + 1])
    assert stopped.shape[1] == 5 + first + 1  # single row: decoding ends at the stop token
    assert model.generate(ids, 0).equal(ids)


def test_sampling_options():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    top1 = sample_next(logits, temperature=1.0, top_k=1, generator=g)
    assert (top1 == 3).all()
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {2, 3}
    # p(3) = 0.644, p(2) = 0.237: top_p = 0.6 keeps only token 3, top_p = 0.8 keeps {2, 3}
    assert set(sample_next(logits, temperature=1.0, top_p=0.6, generator=g).tolist()) == {3}
    assert set(sample_next(logits, temperature=1.0, top_p=0.8, generator=g).tolist()) == {2, 3}
    free = sample_next(logits, temperature=1.0, generator=g)
    frac = (free == 3).float().mean().item()
    assert abs(frac - torch.softmax(logits[0], -1)[3].item()) < 0.05
    model = tiny("standard")
    a = model.generate(torch.ones(1, 3, dtype=torch.long), 8, temperature=0.9, top_p=0.9,
                       generator=torch.Generator().manual_seed(5))
    b = model.generate(torch.ones(1, 3, dtype=torch.long), 8, temperature=0.9, top_p=0.9,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # bitwise: the same computation with the same seeded generator in one process


def test_cache_misuse_raises_clear_errors():
    model = tiny("diff_v1")
    ids = torch.randint(0, 512, (2, 4))
    cache = KVCache.for_model(model, batch_size=2, max_len=6)
    model(ids, cache=cache)
    with pytest.raises(CacheError, match="batch size 1 does not match"):
        model(ids[:1, :1], cache=cache)
    with pytest.raises(CacheError, match="cache overflow"):
        model(ids[:, :3], cache=cache)
    other = build_model(presets.get("tiny", "diff_v1", n_layer=3, max_seq_len=64))
    with pytest.raises(CacheError, match="does not belong|out of range"):
        other(ids[:, :1], cache=KVCache.for_model(model, 2, 6))
    std = tiny("standard")
    with pytest.raises(CacheError, match="do not match the cached"):
        std(ids[:, :1], cache=cache)
    with pytest.raises(CacheError, match="exceeds the model's max_seq_len"):
        KVCache.for_model(model, 1, 65)
    with pytest.raises(CacheError, match=">= 1"):
        KVCache(2, 0, 4)


def test_bad_inputs_raise_clear_errors():
    model = tiny("diff_v2")
    with pytest.raises(ValueError, match=r"token id 512 out of range \[0, 512\)"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="token id -1 out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.ones(1, 2))
    with pytest.raises(ValueError, match="empty along time"):
        model(torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len 64"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2]])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(torch.ones(1, 60, dtype=torch.long), 5)
    for kw, msg in [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
                    ({"stop_tokens": [600]}, "stop token")]:
        with pytest.raises(ValueError, match=msg):
            model.generate(torch.ones(1, 2, dtype=torch.long), 3, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.ones(1, 2, dtype=torch.long), -1)
    with pytest.raises(TypeError, match="ModelConfig"):
        build_model({"attention": "standard"})
    with pytest.raises(ValueError, match="ModelConfig.kernel: unknown kernel 'flash'"):
        ModelConfig(attention="standard", vocab_size=8, d_model=8, n_layer=1, n_head=2, kernel="flash")
