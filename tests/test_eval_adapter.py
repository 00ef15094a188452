"""The evaluation adapter: diffattn checkpoints and Hugging Face models behind one interface.

The logit probe must not change what the model computes; the maps it exposes must be the model's
(effective DIFF map = A1 − λ·A2); greedy decoding must equal each library's own generate."""

from __future__ import annotations

import pytest
import torch

from diffattn.eval import DiffattnAdapter, HFAdapter, load
from helpers import make_diffattn, make_difflama, make_llama, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VARIANTS = ["standard", "diff_v1", "diff_v2", "shared_diff"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    tok = train_tokenizer(root / "tokenizer.json")
    for v in VARIANTS:
        make_diffattn(root / v, tok, attention=v, max_seq_len=64)
    make_llama(root / "llama", tok, max_seq_len=64)
    make_difflama(root / "difflama", tok, max_seq_len=64)
    return root


def _ids(n=24, seed=0, vocab=300):
    return torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_probe_is_transparent_and_sees_both_maps(root, variant):
    adapter, _ = load(root / variant)
    assert isinstance(adapter, DiffattnAdapter) and adapter.differential == (variant != "standard")
    ids = _ids()
    ref = adapter.logits(ids)
    sites = []
    with adapter.logit_probe(lambda site, scores, allowed: sites.append((site, scores.shape, allowed.shape))):
        probed = adapter.logits(ids)
    torch.testing.assert_close(probed, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.logits(ids), ref)  # original kernels restored
    layers = adapter.n_layer
    if variant in ("diff_v1", "shared_diff"):
        assert [(s.layer, s.call) for s, _, _ in sites] == [(i, c) for i in range(layers) for c in (0, 1)]
        assert all(bool((s.component == s.call).all()) for s, _, _ in sites)
    elif variant == "diff_v2":
        assert len(sites) == layers
        assert all(s.component.tolist() == [0, 1] * (shape[1] // 2) for s, shape, _ in sites)
    else:
        assert len(sites) == layers and all(s.component is None for s, _, _ in sites)
    assert all(shape[-2:] == (24, 24) for _, shape, _ in sites)


def test_probe_logits_are_the_presoftmax_of_the_maps(root):
    adapter, _ = load(root / "standard")
    ids = _ids(16)
    got = []
    with adapter.logit_probe(lambda site, s, allowed: got.append(s.masked_fill(~allowed, float("-inf")).softmax(-1))):
        adapter.logits(ids)
    maps = adapter.attention_maps(ids)
    for p, m in zip(got, maps):
        torch.testing.assert_close(p, m.effective, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_effective_map_is_a1_minus_lambda_a2(root, variant):
    adapter, _ = load(root / variant)
    ids = _ids(20)
    maps = adapter.attention_maps(ids)
    for layer, m in enumerate(maps):
        a1, a2 = m.components[:, :, 0], m.components[:, :, 1]
        if variant == "diff_v1":
            lam = adapter.lambdas()[layer]["lambda"]
            torch.testing.assert_close(m.effective, a1 - lam * a2, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(m.effective.sum(-1), torch.full_like(m.effective.sum(-1), 1 - lam), atol=1e-5,
                                       rtol=1e-5)
        else:  # per-token λ in (0, 1): rows sum to 1 − λ_t
            sums = m.effective.sum(-1)
            assert bool(((sums > 0) & (sums < 1)).all())
    last = adapter.attention_maps(ids, last_rows=3)
    for full, cut in zip(maps, last):
        torch.testing.assert_close(cut.effective, full.effective[..., -3:, :])
        torch.testing.assert_close(cut.components, full.components[..., -3:, :])


def test_diffattn_layer_outputs_and_greedy(root):
    adapter, _ = load(root / "diff_v1")
    ids = _ids(12)
    outs = adapter.layer_outputs(ids)
    assert len(outs) == adapter.n_layer
    _, hidden = adapter.model(ids, return_hidden=True)
    torch.testing.assert_close(outs[-1], hidden)
    ref = adapter.model.generate(ids, 6)[0, 12:].tolist()
    assert adapter.greedy(ids[0].tolist(), 6) == ref
    # the default greedy of the base class (no cache) agrees
    from diffattn.eval.adapter import ModelAdapter

    assert ModelAdapter.greedy(adapter, ids[0].tolist(), 6) == ref


def test_v2_lambda_needs_data_and_is_a_sigmoid_mean(root):
    adapter, _ = load(root / "diff_v2")
    assert adapter.needs_lambda_data()
    with pytest.raises(ValueError, match="--data"):
        adapter.lambdas([])
    rows = adapter.lambdas([_ids(16, 1), _ids(16, 2)])
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(0 < r["lambda"] < 1 and r["tokens"] == 32 and len(r["per_head"]) == 2 for r in rows)


def test_hf_llama_probe_maps_outputs_and_greedy(root):
    adapter, tok = load(root / "llama")
    assert isinstance(adapter, HFAdapter) and not adapter.differential
    assert tok.prefix_ids == [tok.eos_id]  # the Llama-style tokenizer puts BOS first
    ids = _ids(20)
    ref = adapter.logits(ids)
    sites = []
    with adapter.logit_probe(lambda site, s, allowed: sites.append(site)):
        probed = adapter.logits(ids)
    torch.testing.assert_close(probed, ref, atol=1e-5, rtol=1e-5)
    assert [s.layer for s in sites] == [0, 1] and all(s.component is None for s in sites)
    assert adapter.model.config._attn_implementation == "sdpa"  # restored
    maps = adapter.attention_maps(ids)
    assert len(maps) == 2 and maps[0].effective.shape == (1, 4, 20, 20)
    torch.testing.assert_close(maps[0].effective.sum(-1), torch.ones(1, 4, 20))
    torch.testing.assert_close(adapter.attention_maps(ids, last_rows=2)[1].effective, maps[1].effective[..., -2:, :])
    outs = adapter.layer_outputs(ids)
    assert len(outs) == 2 and outs[0].shape == (1, 20, 32)
    hf = adapter.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 20:].tolist()
    assert adapter.greedy(ids[0].tolist(), 5) == hf


def test_hf_difflama_effective_map_and_lambda(root):
    adapter, _ = load(root / "difflama")
    assert adapter.differential
    ids = _ids(16)
    lams = adapter.lambdas()
    assert [r["kind"] for r in lams] == ["difflama"] * 3
    for r, mod in zip(lams, adapter.attn_modules):
        expected = (torch.exp((mod.lambda_q1 * mod.lambda_k1).sum()) - torch.exp((mod.lambda_q2 * mod.lambda_k2).sum())
                    + mod.lambda_init)
        assert r["lambda"] == pytest.approx(float(expected.detach()), rel=1e-5)
    maps = adapter.attention_maps(ids)
    for m, r in zip(maps, lams):
        a1, a2 = m.components[:, :, 0], m.components[:, :, 1]
        assert m.effective.shape == (1, 2, 16, 16)
        torch.testing.assert_close(m.effective, a1 - r["lambda"] * a2, atol=1e-6, rtol=1e-5)
    ref = adapter.logits(ids)
    sites = []
    with adapter.logit_probe(lambda site, s, allowed: sites.append(site)):
        torch.testing.assert_close(adapter.logits(ids), ref, atol=1e-5, rtol=1e-5)
    assert [(s.layer, s.call, s.duplicate) for s in sites] == [(i, c, c == 1) for i in range(3) for c in (0, 1)]
    assert sites[0].component.tolist() == [0, 0, 1, 1]


def test_load_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path / "empty")
    big = train_tokenizer(tmp_path / "t.json")
    small = make_diffattn(tmp_path / "small", big, max_seq_len=32)
    import json

    cfg = json.loads((small / "config.json").read_text())
    assert cfg["vocab_size"] > 100
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(big))
    t.add_tokens([f"extra{i}" for i in range(400)])  # a tokenizer larger than the model's vocabulary
    t.save(str(tmp_path / "big.json"))
    with pytest.raises(ValueError, match="vocabulary"):
        load(small, tokenizer=tmp_path / "big.json")
