"""A variant is one class plus one spec row (issues #15, #27): a toy fifth variant, defined in tests/toy_variant.py
and nowhere else, goes through config validation, the presets' matching, build, a training step (the optimizer's
weight-decay split by its buckets), the eval probe, λ read-out, the report, the benchmark, the drop-in layer,
save/from_pretrained, and — registered through an entry point, as a third-party package would — ``diffattn info`` in
a fresh process; no other file knows its name. Also: one registry, kernels as objects."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffattn import ModelConfig, build_model, presets, variants
from diffattn.config import KERNELS as CONFIG_KERNELS
from diffattn.model import AttentionBase, kernels
from diffattn.model.attention import attention_class
from toy_variant import TOY, ToyDiffAttention  # tests/toy_variant.py: a helper module, not a test module

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TESTS = Path(__file__).resolve().parent
RESULTS = TESTS.parent / "docs" / "results" / "cpu-tiny" / "results.json"


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
    with pytest.raises(ValueError, match=r"^unknown attention 'toy_difff'; valid: .*toy_diff"):
        presets.get("tiny", "toy_difff")  # the registry's line, not a matching failure
    with pytest.raises(ValueError, match="already registered"):
        variants.register(TOY)
    with pytest.raises(ValueError, match="lambda_std: applies only to attention in .*not 'toy_diff'"):
        ModelConfig(attention="toy_diff", vocab_size=8, d_model=16, n_layer=1, n_head=2, lambda_std=0.1)


def test_a_variant_s_own_field_needs_no_modelconfig_change(toy):
    """``toy_lambda_init`` is declared only in the toy's row: a default, a check, an attribute of the config,
    flat in to_dict / from_dict, refused for other variants; built-in configs serialise exactly as before."""
    cfg = presets.get("tiny", "toy_diff")
    assert cfg.toy_lambda_init == 0.25 and cfg.to_dict()["toy_lambda_init"] == 0.25 and "extra" not in cfg.to_dict()
    half = ModelConfig.from_dict({**cfg.to_dict(), "toy_lambda_init": 0.5})
    assert half.toy_lambda_init == 0.5 and ModelConfig.from_dict(half.to_dict()) == half
    assert cfg.replace(toy_lambda_init=0.5) == half and presets.get("tiny", "toy_diff", toy_lambda_init=0.5) == half
    assert all(b.attn.lam.item() == 0.5 for b in build_model(half).layers)  # the class reads its own field
    with pytest.raises(ValueError, match=r"ModelConfig.toy_lambda_init: must be in \(0.0, 1.0\), got 1.5"):
        ModelConfig.from_dict({**cfg.to_dict(), "toy_lambda_init": 1.5})
    with pytest.raises(ValueError, match="toy_lambda_init: applies only to attention 'toy_diff', not 'diff_v1'"):
        presets.get("tiny", "diff_v1", toy_lambda_init=0.5)
    base = presets.get("tiny")
    assert base.toy_lambda_init is None and set(base.to_dict()) == {
        f for f in ModelConfig.__dataclass_fields__ if f != "extra"}  # a built-in's config.json is unchanged


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
    from diffattn.eval import DiffattnAdapter

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


def test_toy_variant_weight_decay_goes_by_its_buckets(toy):
    """The optimizer asks the class's PARAM_BUCKETS, not parameter names: the toy's λ is never decayed."""
    from diffattn.train.optim import param_groups

    model = build_model(presets.get("tiny", "toy_diff"))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, weight_decay=0.1)}
    assert model.param_buckets()["layers.0.attn.lam"] == "attention.lambda"
    assert all(id(b.attn.lam) in groups["no_decay"] for b in model.layers)
    assert all(id(b.attn.q_proj.weight) in groups["decay"] for b in model.layers)


def _reference_toy(layer, x):
    """The toy's equation written out: (softmax(Q1Kᵀ·s) − λ·softmax(Q2Kᵀ·s))·V per output head, GQA, then W_O."""
    b, t, _ = x.shape
    d, h = layer.head_dim, layer.num_heads
    q = layer.q_proj(x).view(b, t, 2 * h, d).transpose(1, 2)
    k = layer.k_proj(x).view(b, t, -1, d).transpose(1, 2).repeat_interleave(h // layer.num_kv_heads, dim=1)
    v = layer.v_proj(x).view(b, t, -1, d).transpose(1, 2).repeat_interleave(h // layer.num_kv_heads, dim=1)
    a1 = torch.softmax(q[:, 0::2] @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
    a2 = torch.softmax(q[:, 1::2] @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
    return layer.o_proj(((a1 - layer.lam * a2) @ v).transpose(1, 2).flatten(2))


def test_toy_variant_as_a_drop_in_layer(toy):
    """A class written to the forward-pieces contract becomes a torch.nn.MultiheadAttention-style layer with no code
    of its own: nn.layer_class derives it from the class and the row."""
    from diffattn import nn as dnn

    layer_cls = dnn.layer_class("toy_diff")
    assert issubclass(layer_cls, ToyDiffAttention) and dnn.layer_class("toy_diff") is layer_cls
    torch.manual_seed(0)
    layer = layer_cls(48, 4, num_kv_heads=2, kernel="eager")  # head_dim 12 = 48 / 4 (head_split 1)
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.lam.item()) == (4, 2, 12, 0.25)
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    layer = layer.double()
    out, maps = layer(x, need_weights=True)
    torch.testing.assert_close(out, _reference_toy(layer, x), rtol=1e-10, atol=1e-12)
    assert maps.components.shape == (2, 4, 2, 7, 7)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, -2:] = True  # the last two keys are padding: no weight in either map
    _, maps = layer(x, key_padding_mask=pad, need_weights=True)
    assert maps.components[..., -2:].abs().max() == 0
    matched = layer_cls.matched(48, 6)  # 2/3 of a 6-head standard layer's heads, its head width
    assert (matched.num_heads, matched.head_dim) == (4, 8)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(48, 6, 96, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    done = dnn.replace_attention(enc, "toy_diff")
    assert [r.new_num_heads for r in done] == [4, 4]
    enc(torch.randn(2, 5, 48)).sum().backward()
    assert all(m.lam.grad is not None for m in enc.modules() if isinstance(m, ToyDiffAttention))


def test_toy_variant_save_and_from_pretrained(toy, tmp_path):
    from diffattn.model import DecoderLM

    torch.manual_seed(2)
    model = build_model(presets.get("tiny", "toy_diff")).eval()
    with torch.no_grad():
        for b in model.layers:
            b.attn.lam.fill_(0.375)  # not the init value: the loaded λ is the saved one
    model.save_pretrained(tmp_path / "m")
    loaded = DecoderLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config and isinstance(loaded.layers[0].attn, ToyDiffAttention)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        # a copy of the saved values, no arithmetic: bit-equal on any CPU and thread count
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))  # same weights, same process and thread count, same kernels


def _plugin_env(tmp_path, extra: str = "") -> dict:
    """An environment in which toy_variant is an installed plugin: a dist-info whose entry point, in the group
    diffattn.variants, names toy_variant.register (what `pip install` of a third-party package writes)."""
    dist = tmp_path / "site" / "toy_variant_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-variant-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{variants.ENTRY_POINT_GROUP}]\ntoy = toy_variant:register\n{extra}")
    path = [str(tmp_path / "site"), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _info(args, env):
    return subprocess.run([sys.executable, "-m", "diffattn", "info", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_plugin_variant_in_diffattn_info_and_from_a_saved_model(tmp_path, toy):
    env = _plugin_env(tmp_path)
    r = _info(["--attention", "toy_diff", "--set", "toy_lambda_init=0.5", "--json"], env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["config"]["attention"] == "toy_diff" and rec["config"]["n_head"] == 4  # matched to tiny's 6 heads
    assert rec["config"]["toy_lambda_init"] == 0.5  # its own field, through --set
    assert rec["params"]["attention.lambda"] == 2  # one λ per layer, the class's bucket
    torch.manual_seed(3)
    model = build_model(presets.get("tiny", "toy_diff", toy_lambda_init=0.75))
    model.save_pretrained(tmp_path / "m")
    load = ("from diffattn.model import DecoderLM; m = DecoderLM.from_pretrained(r'%s'); "
            "print(m.config.attention, type(m.layers[0].attn).__name__, sum(p.numel() for p in m.parameters()), "
            "m.config.toy_lambda_init)")
    r = subprocess.run([sys.executable, "-c", load % (tmp_path / "m")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["toy_diff", "ToyDiffAttention", str(sum(p.numel() for p in model.parameters())), "0.75"]
    r = _info(["--attention", "toy_diff"], {**env, "PYTHONPATH": str(TESTS)})  # the plugin is not installed
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown attention 'toy_diff'" in r.stderr


def test_a_plugin_variant_trains_from_the_command_line(tmp_path, tiny_corpus):
    """`diffattn train` with `attention = "toy_diff"` in a fresh process where only the entry point registers it."""
    from helpers import write_config

    env = _plugin_env(tmp_path)
    model = {"attention": "toy_diff", "d_model": 32, "n_layer": 2, "n_head": 2, "max_seq_len": 64,
             "toy_lambda_init": 0.5}  # the variant's own field, in a run file
    cfg = write_config(tmp_path / "run.toml", tiny_corpus, tmp_path / "run", model=model, max_steps=4,
                       eval_every=0, checkpoint_every=4)
    r = subprocess.run([sys.executable, "-m", "diffattn", "train", "--config", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/config.json")).read_text())
    assert saved["attention"] == "toy_diff" and saved["toy_lambda_init"] == 0.5


def test_a_broken_or_colliding_plugin_is_one_log_line_and_nothing_else(tmp_path):
    """A plugin that fails to import, and one whose row takes a built-in's name, each cost one log line; the toy
    plugin beside them still registers, and the built-in keeps its row."""
    env = _plugin_env(tmp_path, "broken = no_such_module:register\nclash = clash_plugin:ROW\nagain = toy_variant:TOY\n")
    (tmp_path / "site" / "clash_plugin.py").write_text(
        "from diffattn.variants import VariantSpec\nROW = VariantSpec(name='diff_v1', cls=None, label='X', heads='x')\n")
    r = _info(["--attention", "toy_diff", "--json"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["attention"] == "toy_diff"
    lines = sorted(r.stderr.strip().splitlines())
    assert len(lines) == 2, lines  # the toy's row named a second time ('again') is the same row: no line
    assert "variant plugin 'broken'" in lines[0] and "failed to load" in lines[0]
    assert "variant plugin 'clash'" in lines[1] and "'diff_v1' is already registered" in lines[1]
    r = _info(["--attention", "diff_v1", "--json"], env)
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["lambda_init"] == "depth"  # the built-in row
