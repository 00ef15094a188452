"""A variant is one class plus one spec row (issue #15): a toy fifth variant, defined here and nowhere else,
goes through config validation, the presets' matching, build, a training step, the eval probe, λ read-out,
the report and the benchmark — with no other file knowing its name. Also: one registry, kernels as objects."""

import copy
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from diffattn import ModelConfig, build_model, presets, variants
from diffattn.config import KERNELS as CONFIG_KERNELS
from diffattn.model import AttentionBase, AttentionMaps, kernels
from diffattn.model.attention import attention_class

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu-tiny" / "results.json"


class ToyDiffAttention(AttentionBase):
    """2H query heads against Hkv shared K/V heads; output head h = C(2h) − λ·C(2h+1) with ONE learnable scalar λ
    per layer, through the kernel's differential entry. Exists only in this test."""

    _fp32_params = ("lam",)
    PARAM_BUCKETS = {"lam": "attention.lambda"}
    uses_attend_differential = True

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        h, hkv, d, dm = config.n_head, config.n_kv_head, config.head_dim, config.d_model
        self.q_proj = nn.Linear(dm, 2 * h * d, bias=False)
        self.k_proj = nn.Linear(dm, hkv * d, bias=False)
        self.v_proj = nn.Linear(dm, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, dm, bias=False)
        self.lam = nn.Parameter(torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def reset_variant_parameters(self):
        self.lam.fill_(0.25)

    @classmethod
    def attention_widths(cls, config):
        hd = config.n_head * config.head_dim
        return 2 * hd, 2 * hd

    def lambda_report(self):
        return {"lambda": float(self.lam)}

    def forward(self, x, rope, *, mask=None, is_causal=True, cache=None, need_weights=False):
        b, t, _ = x.shape
        d = self.head_dim
        q = rope(self.q_proj(x).view(b, t, -1, d)).transpose(1, 2)
        k = rope(self.k_proj(x).view(b, t, -1, d)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out, probs = self.kernel.attend_differential(q[:, 0::2], q[:, 1::2], k, k, v, self.lam, mask=mask,
                                                     is_causal=is_causal, scale=self.scale, need_weights=need_weights)
        maps = None
        if need_weights:
            p1, p2 = probs
            maps = AttentionMaps(p1 - self.lam.to(p1.dtype) * p2, torch.stack((p1, p2), dim=2))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), maps


TOY = variants.VariantSpec(name="toy_diff", cls=ToyDiffAttention, label="Toy DIFF",
                           heads="n_head output heads, 2·n_head query heads", baseline_heads=Fraction(2, 3),
                           keep_kv_heads=True)


@pytest.fixture
def toy(registered_variant):
    return registered_variant(TOY)


def test_one_registry_and_kernel_names_agree():
    assert variants.names()[:4] == ("standard", "diff_v1", "diff_v2", "shared_diff")
    for name in variants.names():
        assert issubclass(attention_class(name), AttentionBase)
    assert tuple(kernels.KERNELS) == CONFIG_KERNELS  # the names config validates are the kernel objects'
    assert all(isinstance(k, kernels.AttentionKernel) and k.name == n for n, k in kernels.KERNELS.items())
    assert [n for n, k in kernels.KERNELS.items() if k.returns_maps] == ["eager"]


def test_unregistered_names_are_refused_and_registration_is_checked(toy):
    with pytest.raises(ValueError, match="unknown attention 'toy_difff'.*toy_diff"):
        ModelConfig(attention="toy_difff", vocab_size=8, d_model=16, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="already registered"):
        variants.register(TOY)
    with pytest.raises(ValueError, match="lambda_std: applies only to attention in .*not 'toy_diff'"):
        ModelConfig(attention="toy_diff", vocab_size=8, d_model=16, n_layer=1, n_head=2, lambda_std=0.1)


def test_toy_variant_builds_matched_and_trains_a_step(toy):
    base = presets.get("tiny", "standard")
    cfg = presets.get("tiny", "toy_diff")  # the matching rule comes from the row: 2/3 of the heads, K/V kept
    assert (cfg.attention, cfg.n_head, cfg.head_dim) == ("toy_diff", 4, base.head_dim)
    torch.manual_seed(0)
    model = build_model(cfg)
    counts = model.param_counts()
    assert counts["attention.lambda"] == cfg.n_layer  # the class's own bucket
    assert all(b.attn.lam.item() == 0.25 for b in model.layers)  # the class's own init
    from diffattn.train.metrics import flops_per_token

    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed."))
    assert flops_per_token(model, cfg, 64) == 6.0 * n + 6.0 * cfg.n_layer * 64 * 4 * cfg.n_head * cfg.head_dim
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # sdpa (fused CPU differential path) and eager compute the same thing
    model.eval()
    with torch.no_grad():
        with model.using_kernel("eager"):
            ref = model(ids)
        torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-5)


def test_toy_variant_through_the_eval_probe_maps_and_lambda(toy):
    from diffattn.eval.adapter import DiffattnAdapter

    torch.manual_seed(1)
    model = build_model(presets.get("tiny", "toy_diff"))
    adapter = DiffattnAdapter(model)
    ids = torch.randint(0, 512, (1, 12))
    maps = adapter.attention_maps(ids)
    assert len(maps) == 2 and maps[0].components.shape == (1, 4, 2, 12, 12)
    assert model.config.kernel == "sdpa" and all(b.attn.kernel is kernels.KERNELS["sdpa"] for b in model.layers)
    seen = []
    with adapter.logit_probe(lambda site, scores, allowed: seen.append((site.layer, site.call,
                                                                        site.component.tolist())) or None):
        probed = adapter.logits(ids)
    assert seen == [(0, 0, [0] * 4), (0, 1, [1] * 4), (1, 0, [0] * 4), (1, 1, [1] * 4)]  # both maps, tagged
    torch.testing.assert_close(probed, adapter.logits(ids), rtol=1e-4, atol=1e-5)  # an identity probe
    assert adapter.lambdas() == [{"layer": 0, "kind": "toy_diff", "lambda": 0.25},
                                 {"layer": 1, "kind": "toy_diff", "lambda": 0.25}]
    assert adapter.differential and not adapter.needs_lambda_data()


def test_toy_variant_in_the_report(toy, tmp_path):
    from diffattn.experiments import report

    results = json.loads(RESULTS.read_text())
    results["variants"] = [*results["variants"], "toy_diff"]
    for table in (results["models"], results["runs"], results["cost"]["variants"], results["recall"]["models"],
                  results["recall"]["runs"]):
        table["toy_diff"] = copy.deepcopy(table["diff_v1"])
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(results))
    text = report.write_report(out, "md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| Toy DIFF")]
    assert len(rows) >= 4  # parameters, loss, recall, summary rows: labelled by the registry row
    # judged as a DIFF variant: a verdict cell of the rule's (or the recall gate's) vocabulary, not a bare word
    verdict_cell = re.compile(r"\*\*(reproduced|not reproduced|inconclusive)\*\*|not testable at this budget")
    assert any(verdict_cell.search(line) for line in rows)


def test_toy_variant_in_the_benchmark(toy, capsys):
    from diffattn.cli import main

    rc = main(["bench", "attention", "--variants", "toy_diff", "--seq-len", "16", "--batch", "1", "--d-model", "48",
               "--n-head", "6", "--head-dim", "8", "--warmup", "0", "--repeats", "1", "--no-references"])
    out = capsys.readouterr().out
    assert rc == 0 and "toy_diff [sdpa]" in out  # the fused CPU kernel serves its differential call
