"""diffattn.hf.convert and the export/import commands: exact diff_v1 <-> DiffLlama and standard <-> Llama
conversions (stock transformers classes, float32 logits < 1e-5), refusals, tokenizers, CLI exit codes.

Run: .venv/bin/python -m pytest tests/test_hf_convert.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffattn import ModelConfig, build_model
from diffattn.checkpoint import load_model, read_config, save_model
from diffattn.cli import main as cli_main

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoTokenizer,
    DiffLlamaConfig,
    DiffLlamaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from diffattn.hf import convert  # noqa: E402
from diffattn.hf.convert import ConversionError, export_model, import_model  # noqa: E402

transformers.utils.logging.disable_progress_bar()
TOL = 1e-5
V = 67


def tiny(attention: str, **kw) -> ModelConfig:
    # init="gpt2": logits of order 1, which the absolute tolerance TOL was set on (the N(0, 1)-embedding "torch" init gives
    # logits of order 10, where fp32 rounding alone approaches 1e-5)
    base = dict(vocab_size=V, d_model=48, n_layer=3, n_head=2, max_seq_len=64, init="gpt2")
    base.update(kw)
    return ModelConfig(attention=attention, **base)


def randomized(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)  # a trained-looking per-head norm gain: it must be folded
            elif "lambda_" in name:
                p.normal_(0.0, 0.3)
    return model


def probe(b=3, t=20, seed=7):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40])
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 10, trainer)
    tok.save(str(path))
    return tok


# ------------------------------------------------------------------------------------------ permutations
def test_row_permutations_are_inverse_pairs():
    w = torch.randn(2 * 3 * 8, 5)
    assert torch.equal(convert.diff_qk_from_hf(convert.diff_qk_to_hf(w, 3, 8), 3, 8), w)
    assert torch.equal(convert.diff_v_from_hf(convert.diff_v_to_hf(w, 3, 8), 3, 8), w)
    assert torch.equal(convert.rope_from_hf(convert.rope_to_hf(w, 6, 8), 6, 8), w)
    assert convert.rotate_half_order(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


# ------------------------------------------------------------------------------------------ diff_v1 -> DiffLlama
@pytest.mark.parametrize("heads", [dict(n_head=2, n_kv_head=2), dict(n_head=4, n_kv_head=2, tie_embeddings=True),
                                   dict(n_head=3, n_kv_head=1)], ids=["mha", "gqa", "mqa"])
def test_diff_v1_exports_to_stock_diffllama(heads, tmp_path):
    cfg = tiny("diff_v1", **heads)
    core = randomized(cfg)
    save_model(core, tmp_path / "src")
    report = export_model(tmp_path / "src", tmp_path / "out", "diffllama")
    assert report.max_abs_diff is not None and report.max_abs_diff < TOL
    data = json.loads((tmp_path / "out" / "config.json").read_text())
    assert data["model_type"] == "diffllama" and data["architectures"] == ["DiffLlamaForCausalLM"]
    assert (data["num_attention_heads"], data["num_key_value_heads"]) == (2 * cfg.n_head, 2 * cfg.n_kv_head)
    theirs = DiffLlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = probe()
    with torch.no_grad():
        assert max_diff(theirs(x).logits, core(x)) < TOL
    # and back: DiffLlama -> diff_v1 gives the same function (the gain now lives in o_proj)
    import_model(tmp_path / "out", tmp_path / "back")
    back = load_model(tmp_path / "back")
    assert back.config.attention == "diff_v1" and back.config.diff_norm_affine is False
    assert (back.config.n_head, back.config.n_kv_head, back.config.head_dim) == (cfg.n_head, cfg.n_kv_head,
                                                                                 cfg.head_dim)
    with torch.no_grad():
        assert max_diff(back(x), core(x)) < TOL


def test_exported_dir_loads_without_diffattn(tmp_path):
    core = randomized(tiny("diff_v1", n_head=4, n_kv_head=2))
    save_model(core, tmp_path / "src")
    export_model(tmp_path / "src", tmp_path / "out", "diffllama", verify=False)
    x = probe(b=2, t=9)
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, dtype=torch.float32).eval()\n"
        "assert 'diffattn' not in sys.modules\n"
        f"x = torch.tensor({x.tolist()})\n"
        "with torch.no_grad():\n"
        "    print(type(m).__name__ + ' ' + json.dumps(m(x).logits.tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    name, logits = out.stdout.split(" ", 1)
    assert name == "DiffLlamaForCausalLM"
    with torch.no_grad():
        assert max_diff(torch.tensor(json.loads(logits)), core(x)) < TOL


def test_wrong_mapping_would_be_caught(tmp_path, monkeypatch):
    """Negative control: without the rotary permutation the logits differ, verification refuses, nothing is written."""
    core = randomized(tiny("diff_v1"))
    save_model(core, tmp_path / "src")
    monkeypatch.setattr(convert, "rotate_half_order", lambda d: torch.arange(d))
    with pytest.raises(ConversionError, match="verification failed"):
        export_model(tmp_path / "src", tmp_path / "out", "diffllama")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary directory left behind


# ------------------------------------------------------------------------------------------ DiffLlama -> diff_v1
def stock_diffllama(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = DiffLlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=kw.pop("n", 4), num_key_value_heads=kw.pop("nkv", 2), head_dim=12,
                          max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                          rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **kw)
    m = DiffLlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    m.save_pretrained(tmp_path / "stock")
    return m


@pytest.mark.parametrize("nkv", [2, 4])
def test_stock_diffllama_imports_exactly(nkv, tmp_path):
    stock = stock_diffllama(tmp_path, nkv=nkv)
    report = import_model(tmp_path / "stock", tmp_path / "ours")
    assert report.max_abs_diff < TOL
    cfg = read_config(tmp_path / "ours")
    assert (cfg.attention, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.rope_theta, cfg.norm_eps) == (
        "diff_v1", 2, nkv // 2, 12, 500.0, 1e-6)
    ours = load_model(tmp_path / "ours")
    x = probe()
    with torch.no_grad():
        assert max_diff(ours(x), stock(x).logits) < TOL


def test_diffllama_with_unpaired_heads_is_refused(tmp_path):
    stock_diffllama(tmp_path)
    data = json.loads((tmp_path / "stock" / "config.json").read_text())
    data["num_key_value_heads"] = 1  # odd: DiffLlama's own head pairing would not be diffattn's
    (tmp_path / "stock" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="num_key_value_heads=1: both must be even"):
        import_model(tmp_path / "stock", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


# ------------------------------------------------------------------------------------------ standard <-> Llama
@pytest.mark.parametrize("kv", [2, 1])
def test_standard_llama_round_trip(kv, tmp_path):
    core = randomized(tiny("standard", n_head=2, n_kv_head=kv))
    save_model(core, tmp_path / "src")
    export_model(tmp_path / "src", tmp_path / "llama", "llama")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    x = probe()
    with torch.no_grad():
        assert max_diff(theirs(x).logits, core(x)) < TOL
    import_model(tmp_path / "llama", tmp_path / "back")
    back = load_model(tmp_path / "back")
    for k, v in core.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # pure permutations: bit-exact round trip


def test_stock_llama_imports_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    stock = LlamaForCausalLM(cfg).eval()
    stock.save_pretrained(tmp_path / "stock")
    import_model(tmp_path / "stock", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    assert ours.config.tie_embeddings and ours.config.attention == "standard"
    x = probe()
    with torch.no_grad():
        assert max_diff(ours(x), stock(x).logits) < TOL


def test_llama_rope_scaling_is_refused(tmp_path):
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=64,
                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "stock")
    with pytest.raises(ConversionError, match="rope_type: 'linear'"):
        import_model(tmp_path / "stock", tmp_path / "ours")


def test_missing_and_misshaped_source_tensors_are_named(tmp_path):
    stock_diffllama(tmp_path)
    w = load_file(str(tmp_path / "stock" / "model.safetensors"))
    w.pop("model.layers.1.self_attn.lambda_q2")
    save_file(w, str(tmp_path / "stock" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing tensor 'model\.layers\.1\.self_attn\.lambda_q2'"):
        import_model(tmp_path / "stock", tmp_path / "ours")
    w["model.layers.1.self_attn.lambda_q2"] = torch.zeros(5)
    save_file(w, str(tmp_path / "stock" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"tensor 'model\.layers\.1\.self_attn\.lambda_q2' has shape \[5\]"):
        import_model(tmp_path / "stock", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


# ------------------------------------------------------------------------------------------ refusals on export
@pytest.mark.parametrize("cfg_kw, to, match", [
    (dict(attention="diff_v1", diff_norm=False, diff_norm_affine=False), "diffllama", "diff_norm"),
    (dict(attention="diff_v1", lambda_init=0.8), "diffllama", "lambda_init"),
    (dict(attention="diff_v2"), "diffllama", "attention: --to diffllama needs attention 'diff_v1'"),
    (dict(attention="shared_diff"), "diffllama", "attention"),
    (dict(attention="standard"), "diffllama", "use --to llama"),
    (dict(attention="diff_v1"), "llama", "use --to diffllama"),
])
def test_unrepresentable_exports_are_refused(cfg_kw, to, match, tmp_path):
    attention = cfg_kw.pop("attention")
    save_model(build_model(tiny(attention, **cfg_kw)), tmp_path / "src")
    with pytest.raises(ConversionError, match=match):
        export_model(tmp_path / "src", tmp_path / "out", to)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ tokenizers
def test_tokenizer_travels_both_ways(tmp_path):
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    core = randomized(tiny("diff_v1"))
    save_model(core, tmp_path / "src", tokenizer_file=tmp_path / "tokenizer.json")
    export_model(tmp_path / "src", tmp_path / "out", "diffllama")
    t = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert t("the cat sat").input_ids == tok.encode("the cat sat").ids
    assert t.eos_token == "<|endoftext|>" and t.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == t.eos_token_id
    import_model(tmp_path / "out", tmp_path / "back")
    t2 = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert t2("a dog ran").input_ids == tok.encode("a dog ran").ids and t2.eos_token == "<|endoftext|>"


# ------------------------------------------------------------------------------------------ CLI
def test_cli_export_and_import(tmp_path, capsys):
    save_model(randomized(tiny("diff_v1")), tmp_path / "src")
    assert cli_main(["export", "--to", "diffllama", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "diff_v1 -> DiffLlamaForCausalLM" in capsys.readouterr().out
    assert cli_main(["import", str(tmp_path / "out"), str(tmp_path / "back"), "--dtype", "bfloat16"]) == 0
    assert "DiffLlamaForCausalLM -> diff_v1" in capsys.readouterr().out
    assert load_model(tmp_path / "back").embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("argv, match", [
    (["export", "--to", "diffllama", "{tmp}/nope", "{tmp}/out"], "is not a directory"),
    (["export", "--to", "llama", "{tmp}/src", "{tmp}/out"], "use --to diffllama"),
    (["export", "--to", "diffllama", "{tmp}/src", "{tmp}/src"], "same directory"),
    (["export", "--to", "diffllama", "{tmp}/src", "{tmp}/full"], "not empty"),
    (["import", "{tmp}/src", "{tmp}/out"], "model_type 'diffattn' cannot be imported"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, match, tmp_path, capsys):
    save_model(build_model(tiny("diff_v1")), tmp_path / "src")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_cli_unknown_target_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", "--to", "gpt2", str(tmp_path), str(tmp_path / "out")])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
