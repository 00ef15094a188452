"""Gradients reach every parameter of every variant; a tiny model of each variant overfits a fixed batch."""

import pytest
import torch
import torch.nn.functional as F

from diffattn import ATTENTION_VARIANTS, build_model, presets


@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
def test_every_parameter_gets_a_gradient(attention):
    torch.manual_seed(0)
    # with the LoRA-style init (B = 0) A's gradient is exactly zero at step 0, as in LoRA
    kw = {"shared_init": "random"} if attention == "shared_diff" else {}
    model = build_model(presets.get("tiny", attention, n_layer=2, **kw))
    ids = torch.randint(0, 512, (2, 12))
    F.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
def test_tiny_model_overfits_a_fixed_batch(attention):
    torch.manual_seed(0)
    model = build_model(presets.get("tiny", attention, vocab_size=64, max_seq_len=32))
    ids = torch.randint(0, 64, (4, 33))
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(400):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if loss.item() < 0.1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"{attention}: loss {loss.item():.3f} after {step + 1} steps"
    assert all(torch.isfinite(p).all() for p in model.parameters())
