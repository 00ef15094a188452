"""ModelConfig validation and serialisation; presets and parameter matching."""

import json
import math

import pytest
import torch

from diffattn import ModelConfig, build_model, presets
from diffattn.cli import main

BASE = dict(vocab_size=100, d_model=64, n_layer=2, n_head=4)


def test_derived_fields_per_variant():
    assert ModelConfig(**BASE).head_dim == 16
    v1 = ModelConfig(attention="diff_v1", **BASE)
    assert (v1.head_dim, v1.n_kv_head, v1.lambda_init, v1.lambda_std, v1.diff_norm, v1.diff_norm_affine) == (
        8, 4, "depth", 0.1, True, True)
    assert ModelConfig(attention="diff_v2", **BASE).head_dim == 16
    sd = ModelConfig(attention="shared_diff", **BASE)
    assert sd.head_dim == 8 and sd.shared_init == "lora" and 1 <= sd.shared_rank <= 16
    assert ModelConfig(**BASE).ffn_hidden == 64 * math.ceil(8 * 64 / 3 / 64)
    assert ModelConfig(**BASE, head_dim=10).head_dim == 10  # given: not re-derived, no divisibility needed
    assert ModelConfig(**BASE, ffn_hidden=100).ffn_hidden == 100
    with pytest.raises(Exception):
        ModelConfig(**BASE).d_model = 3  # frozen
    with pytest.raises(TypeError):
        ModelConfig("standard", 100, 64, 2, 4)  # keyword-only


@pytest.mark.parametrize("kw,message", [
    (dict(attention="diff_v3"), r"ModelConfig.attention: unknown attention 'diff_v3'; valid: standard, diff_v1, diff_v2, shared_diff"),
    (dict(kernel="cuda"), r"ModelConfig.kernel: unknown kernel 'cuda'; valid: eager, sdpa"),
    (dict(d_model=66), r"ModelConfig.d_model: must be divisible by n_head=4"),
    (dict(attention="diff_v1", d_model=68), r"ModelConfig.d_model: must be divisible by 2\*n_head=8"),
    (dict(n_kv_head=3), r"ModelConfig.n_kv_head: must divide n_head=4"),
    (dict(n_kv_head=8), r"ModelConfig.n_kv_head: must be in \[1, 4\], got 8"),
    (dict(head_dim=7), r"ModelConfig.head_dim: must be even for rotary embeddings, got 7"),
    (dict(d_model=12, n_head=4), r"ModelConfig.head_dim: must be even for rotary embeddings, got 3"),
    (dict(n_layer=0), r"ModelConfig.n_layer: must be in \[1, 4096\], got 0"),
    (dict(vocab_size=-5), r"ModelConfig.vocab_size: must be in \[1, 16777216\], got -5"),
    (dict(vocab_size=2.5), r"ModelConfig.vocab_size: must be an integer"),
    (dict(d_model=True), r"ModelConfig.d_model: must be an integer"),
    (dict(max_seq_len=10**12), r"ModelConfig.max_seq_len: must be in"),
    (dict(rope_theta=float("nan")), r"ModelConfig.rope_theta: must be a finite number"),
    (dict(norm_eps=0.0), r"ModelConfig.norm_eps: must be in \(0.0, 1.0\)"),
    (dict(init_std=-1.0), r"ModelConfig.init_std: must be in"),
    (dict(tie_embeddings="yes"), r"ModelConfig.tie_embeddings: must be true or false"),
    (dict(lambda_init=0.8), r"ModelConfig.lambda_init: applies only to attention in \('diff_v1', 'shared_diff'\)"),
    (dict(attention="diff_v1", lambda_init=1.2), r"ModelConfig.lambda_init: must be in \[0.0, 1.0\), got 1.2"),
    (dict(attention="diff_v1", lambda_init="layer"), r"ModelConfig.lambda_init: must be 'depth' or a number"),
    (dict(attention="diff_v1", lambda_std=-0.1), r"ModelConfig.lambda_std: must be in"),
    (dict(attention="diff_v1", diff_norm=False), r"ModelConfig.diff_norm_affine: must be false when diff_norm is false"),
    (dict(attention="diff_v2", diff_norm=True), r"ModelConfig.diff_norm: applies only to"),
    (dict(attention="diff_v1", shared_rank=4), r"ModelConfig.shared_rank: applies only to attention 'shared_diff'"),
    (dict(attention="shared_diff", shared_rank=0), r"ModelConfig.shared_rank: must be in \[1, 32\], got 0"),
    (dict(attention="shared_diff", shared_init="xavier"), r"ModelConfig.shared_init: unknown 'xavier'; valid: lora, random"),
])
def test_impossible_configurations_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, **kw})


def test_to_dict_from_dict_round_trip_and_unknown_keys():
    for attention in ("standard", "diff_v1", "diff_v2", "shared_diff"):
        cfg = ModelConfig(attention=attention, **BASE, n_kv_head=2)
        data = json.loads(json.dumps(cfg.to_dict()))
        assert ModelConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'n_heads'"):
        ModelConfig.from_dict({**BASE, "n_heads": 4})
    with pytest.raises(ValueError, match="missing 1 required keyword-only argument: 'n_head'"):
        ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "n_head"})
    with pytest.raises(ValueError, match="expected a mapping"):
        ModelConfig.from_dict([1, 2])


def test_matched_diff_v1_has_baseline_projections_plus_lambda_and_norm_only():
    for kv in (16, 8):  # MHA and GQA, as in the reference example.py (D=1024, 16 vs 8 heads)
        base = ModelConfig(vocab_size=100, d_model=1024, n_layer=2, n_head=16, n_kv_head=kv)
        diff = presets.matched(base, "diff_v1")
        assert (diff.n_head, diff.n_kv_head, diff.head_dim) == (8, kv // 2, 64)
        with torch.device("meta"):
            cb, cd = build_model(base).param_counts(), build_model(diff).param_counts()
        assert cd["attention.qkvo"] == cb["attention.qkvo"]
        assert cd["attention.lambda"] == 2 * 4 * 64  # 4 vectors of d per layer
        assert cd["attention.norm"] == 2 * 2 * 64  # gain of 2d per layer
        assert cd["total"] - cb["total"] == cd["attention.lambda"] + cd["attention.norm"]
        # methods.md §1.6 worked example: per layer 4,194,304 vs 4,194,688 (MHA), 3,145,728 vs 3,146,112 (GQA)
        per_layer_base = cb["attention.qkvo"] // 2
        per_layer_diff = (cd["attention.qkvo"] + cd["attention.lambda"] + cd["attention.norm"]) // 2
        assert (per_layer_base, per_layer_diff) == ((4194304, 4194688) if kv == 16 else (3145728, 3146112))


def test_matched_diff_v2_equals_the_blog_example():
    """methods.md §2.4: D=2048, h=16, h_kv=4, d=128: V2 14.71M, Transformer 1.5h 14.68M, 2h 18.87M."""
    v2 = ModelConfig(attention="diff_v2", vocab_size=10, d_model=2048, n_layer=1, n_head=16, n_kv_head=4, head_dim=128)
    base = presets.matched(v2, "standard")
    assert (base.n_head, base.n_kv_head, base.head_dim) == (24, 4, 128)
    with torch.device("meta"):
        p_v2 = build_model(v2).param_counts()
        p_std = build_model(base).param_counts()
        p_2h = build_model(base.replace(n_head=32)).param_counts()
    v2_attn = p_v2["attention.qkvo"] + p_v2["attention.lambda"]
    assert round(v2_attn / 1e6, 2) == 14.71 and round(p_std["attention.qkvo"] / 1e6, 2) == 14.68
    assert round(p_2h["attention.qkvo"] / 1e6, 2) == 18.87
    assert presets.matched(base, "diff_v2") == v2
    with pytest.raises(ValueError, match="no parameter-matched diff_v2"):
        presets.matched(ModelConfig(vocab_size=10, d_model=64, n_layer=1, n_head=4), "diff_v2")


def test_matched_round_trips_and_shared_diff_saves_parameters():
    base = presets.get("mini")
    for variant in ("diff_v1", "diff_v2", "shared_diff"):
        m = presets.matched(base, variant)
        assert m.attention == variant and m.head_dim == base.head_dim
        assert presets.matched(m, "standard") == base
    v1 = build_model(presets.matched(base, "diff_v1")).param_counts()
    sd_cfg = presets.matched(base, "shared_diff", shared_rank=4)
    sd = build_model(sd_cfg).param_counts()
    d_model, hd, r, n = base.d_model, sd_cfg.n_head * sd_cfg.head_dim, 4, base.n_layer
    # methods.md §3.3: Q/K saving 2·D·Hd − 4r(D+Hd) per layer (K has Hkv heads: computed from the shapes)
    hkv_d = sd_cfg.n_kv_head * sd_cfg.head_dim
    saving = (d_model * hd - 2 * r * (d_model + hd)) + (d_model * hkv_d - 2 * r * (d_model + hkv_d))
    assert v1["attention.qkvo"] - sd["attention.qkvo"] == n * saving
    with pytest.raises(ValueError, match="unknown attention"):
        presets.matched(base, "diff_v9")
    with pytest.raises(ValueError, match="unknown preset"):
        presets.get("huge")
    assert presets.get("tiny", "diff_v1", lambda_init=0.5).lambda_init == 0.5


def test_paper_presets_resolve():
    with torch.device("meta"):
        for name in ("830M", "1.4B", "3B"):
            cfg = presets.get(name, "diff_v1")
            assert cfg.n_head == presets.SIZES[name]["n_head"] // 2
        cfg = presets.get("3B", "diff_v1")
        assert (cfg.n_layer, cfg.d_model, cfg.ffn_hidden, cfg.head_dim, cfg.n_head) == (28, 3072, 8192, 128, 12)
        assert presets.get("1.4B", "diff_v1").head_dim == 128  # Table 6: d = 128


def test_cli_info(capsys):
    assert main(["info", "--preset", "tiny", "--attention", "diff_v1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["n_head"] == 3 and data["params"]["attention.lambda"] == 2 * 4 * 16
    assert main(["info", "--preset", "tiny", "--set", "n_head=5", "--set", "head_dim=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffattn info: error: ModelConfig.head_dim: must be even for rotary embeddings, got 7"]
    assert main(["info", "--config", "/nonexistent/config.json"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_info_table_is_aligned(capsys):
    """Every value starts in the same column, whatever the longest field name (diff_norm_gain_init, params.*)."""
    assert main(["info", "--preset", "tiny", "--attention", "diff_v1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert any(r.startswith("diff_norm_gain_init ") for r in rows) and any(r.startswith("params.") for r in rows)
    columns = {len(r) - len(r.split(maxsplit=1)[1]) for r in rows}  # where the value starts
    assert len(columns) == 1, columns
