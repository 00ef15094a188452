"""``diffattn bench``: bad arguments exit 2 with one line; tiny runs write the documented JSON;
the reference implementations the benchmarks compare against are themselves correct.
Run: .venv/bin/python -m pytest tests/test_bench_cli.py -q
"""

import json

import pytest
import torch

from diffattn import ModelConfig, build_model
from diffattn.bench import common, references, train
from diffattn.cli import main

TINY = ["--d-model", "32", "--n-head", "4", "--warmup", "1", "--repeats", "2", "--quiet"]


def run_cli(capsys, *argv):
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["attention", "--variants", "standard,diff_v9"], "--variants: unknown variant 'diff_v9'; valid: standard, diff_v1"),
    (["attention", "--seq-len", "300", "--max-seq-len", "256"], "--seq-len 300 exceeds --max-seq-len 256"),
    (["generate", "--seq-len", "250", "--new-tokens", "10", "--max-seq-len", "256"],
     "--seq-len 250 + --new-tokens 10 exceeds --max-seq-len 256"),
    (["train", "--kernel", "triton"], "--kernel triton runs on a GPU"),
    (["attention", "--n-head", "6", "--d-model", "64"], "--d-model 64 is not divisible by --n-head 6"),
    (["train", "--repeats", "0"], "--repeats must be >= 1"),
    ([], "choose what to benchmark"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffattn bench: error: ") and message in lines[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_exits_2(capsys):
    code, _, err = run_cli(capsys, "attention", "--device", "cuda")
    assert code == 2 and "--device cuda: no CUDA GPU is available" in err and len(err.strip().splitlines()) == 1


def test_json_into_missing_directory_exits_2_and_writes_nothing(capsys, tmp_path):
    target = tmp_path / "nope" / "out.json"
    code, _, err = run_cli(capsys, "attention", "--seq-len", "16", *TINY, "--variants", "standard",
                           "--no-references", "--json", str(target))
    assert code == 2 and "does not exist" in err and not target.parent.exists()


def test_attention_bench_writes_json(capsys, tmp_path):
    out_file = tmp_path / "attention.json"
    code, out, _ = run_cli(capsys, "attention", "--seq-len", "16", "24", *TINY, "--json", str(out_file))
    assert code == 0 and "DiffLlamaAttention" in out
    data = json.loads(out_file.read_text())
    assert data["bench"] == "attention"
    assert {"date", "torch", "transformers", "cpu", "cpu_threads", "command"} <= set(data["env"])
    assert data["options"]["seq_len"] == [16, 24] and data["options"]["kernel"] == "sdpa"
    rows = data["results"]
    names = {r["name"] for r in rows if r["seq_len"] == 16}
    assert {"standard [sdpa]", "diff_v1 [sdpa]", "diff_v2 [sdpa]", "shared_diff [sdpa]", "diff_v1 [authors split-value]",
            "DiffLlamaAttention [transformers sdpa]", "standard core [sdpa]", "diff_v1 core [sdpa]",
            "diff_v1 core [authors split-value]", "diff_v2 core [sdpa GQA]"} == names
    for r in rows:
        assert {"scope", "variant", "impl", "matched", "fwd", "fwd_bwd", "ratio_fwd", "ratio_fwd_bwd"} <= set(r)
        for mode in ("fwd", "fwd_bwd"):
            s = r[mode]
            assert s["repeats"] == 2 and len(s["times_s"]) == 2 and s["min_s"] <= s["median_s"] <= s["max_s"]
        if r["variant"] == "standard":
            assert r["ratio_fwd_bwd"] == 1.0
    assert {r["matched"] for r in rows if r["variant"] == "diff_v2"} == {"query width"}  # 4 heads: not a multiple of 3


def test_train_bench_writes_json(capsys, tmp_path):
    out_file = tmp_path / "train.json"
    code, out, _ = run_cli(capsys, "train", "--seq-len", "16", *TINY, "--n-layer", "1", "--vocab-size", "64",
                           "--variants", "diff_v1", "--no-memory", "--json", str(out_file))
    assert code == 0
    data = json.loads(out_file.read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert set(rows) == {"standard [sdpa]", "diff_v1 [sdpa]", "diff_v1 [authors split-value]",
                         "DiffLlamaForCausalLM [transformers sdpa]"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] is None  # no MFU on CPU
        assert r["params"] > 0 and r["model_flops_per_step"] > 0 and "memory" not in r
    assert rows["standard [sdpa]"]["ratio_tokens_per_s"] == 1.0


def test_train_memory_only(capsys, tmp_path):
    """CPU peak memory from fresh child processes; larger activations mean a larger peak."""
    out_file = tmp_path / "mem.json"
    code, _, _ = run_cli(capsys, "train", "--seq-len", "32", "512", *TINY, "--n-layer", "1", "--vocab-size", "256",
                         "--variants", "standard", "--no-references", "--memory-only", "--json", str(out_file))
    assert code == 0
    rows = json.loads(out_file.read_text())["results"]
    assert [r["seq_len"] for r in rows] == [32, 512]
    for r in rows:
        assert "step" not in r and r["ratio_peak_memory"] == 1.0
        assert r["memory"]["peak_bytes"] > 0 and "clear_refs" in r["memory"]["method"]
    # T=512 holds (at least) a 512 × 256 fp32 logits tensor more than T=32
    assert rows[1]["memory"]["peak_bytes"] - rows[0]["memory"]["peak_bytes"] > 480 * 256 * 4


def test_generate_bench_writes_json(capsys, tmp_path):
    out_file = tmp_path / "generate.json"
    code, _, _ = run_cli(capsys, "generate", "--seq-len", "12", "--batch", "1", "2", "--new-tokens", "3", *TINY,
                         "--n-layer", "1", "--vocab-size", "64", "--variants", "diff_v1,diff_v2", "--json", str(out_file))
    assert code == 0
    rows = json.loads(out_file.read_text())["results"]
    assert sorted({r["batch"] for r in rows}) == [1, 2]
    assert len(rows) == 2 * 5  # standard, diff_v1, diff_v2, authors, DiffLlama per batch size
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["new_tokens"] == 3


# ---------------------------------------------------------------------------------------------- references
def test_authors_split_value_equals_differential_formula():
    torch.manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 9, 8
    q1, q2 = torch.randn(b, h, t, d, dtype=torch.float64), torch.randn(b, h, t, d, dtype=torch.float64)
    k1, k2 = torch.randn(b, hkv, t, d, dtype=torch.float64), torch.randn(b, hkv, t, d, dtype=torch.float64)
    v = torch.randn(b, hkv, t, 2 * d, dtype=torch.float64)
    lam = torch.tensor(0.6, dtype=torch.float64)
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def softmax(q, k):
        k = k.repeat_interleave(h // hkv, dim=1)  # query head j uses K/V head j // n_rep
        return (q @ k.transpose(-1, -2) * 0.3).masked_fill(~causal, float("-inf")).softmax(-1)

    want = (softmax(q1, k1) - lam * softmax(q2, k2)) @ v.repeat_interleave(h // hkv, dim=1)
    got = references.authors_split_value(q1, q2, k1, k2, v, lam, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_authors_core_model_equals_ours():
    torch.manual_seed(1)
    cfg = ModelConfig(attention="diff_v1", vocab_size=50, d_model=32, n_layer=2, n_head=2, kernel="sdpa")
    ours = build_model(cfg).double()
    theirs = references.use_authors_core(build_model(cfg).double())
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 50, (2, 11))
    torch.testing.assert_close(theirs(ids), ours(ids), rtol=1e-10, atol=1e-12)


def test_diffllama_has_our_shapes():
    """Same projections and λ vectors; ours adds only the per-head norm gain (2d per layer)."""
    from transformers import DiffLlamaForCausalLM

    cfg = ModelConfig(attention="diff_v1", vocab_size=50, d_model=64, n_layer=3, n_head=2, n_kv_head=1)
    hf = DiffLlamaForCausalLM(references.diffllama_config(cfg))
    ours = build_model(cfg)
    n_hf = sum(p.numel() for p in hf.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours - n_hf == cfg.n_layer * 2 * cfg.head_dim


def test_model_flops_diff_v1_attention_is_one_and_a_half_standard():
    shape = common.Shape(batch=1, seq_len=64, d_model=64, n_head=4, n_kv_head=4, head_dim=16, n_layer=2,
                         vocab_size=10, max_seq_len=64)
    std_cfg, _ = common.bench_config(shape, "standard", "sdpa")
    v1_cfg, _ = common.bench_config(shape, "diff_v1", "sdpa")
    std, v1 = build_model(std_cfg), build_model(v1_cfg)
    lin = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))  # noqa: E731
    attn_std = train.model_flops(std, std_cfg, shape) - 6 * lin(std) * 64
    attn_v1 = train.model_flops(v1, v1_cfg, shape) - 6 * lin(v1) * 64
    assert attn_std == 3 * 2 * 64 * 65 * (4 * 16 + 4 * 16)  # 3 × L × T(T+1) × (W_qk + W_v)
    assert attn_v1 == pytest.approx(1.5 * attn_std)
