"""Every evaluation task end to end through ``diffattn eval``, on a tiny random diffattn model and a
tiny random Hugging Face ``LlamaForCausalLM`` (tokenizer trained in the test): each writes its JSON,
Markdown table and PNG plot(s) atomically, deterministically from the seed."""

from __future__ import annotations

import json

import pytest

from helpers import (cli, make_diffattn, make_difflama, make_llama, train_tokenizer, write_docs,
                             write_grounded_jsonl, write_icl_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-e2e")
    tok = train_tokenizer(root / "tokenizer.json")
    return {
        "diffattn": make_diffattn(root / "diff", tok, attention="diff_v1", max_seq_len=256),
        "llama": make_llama(root / "llama", tok, max_seq_len=256),
        "difflama": make_difflama(root / "difflama", tok, max_seq_len=256),
        "v2": make_diffattn(root / "v2", tok, attention="diff_v2", max_seq_len=128),
        "docs": write_docs(root / "docs"),
        "icl": write_icl_jsonl(root / "icl.jsonl"),
        "grounded": write_grounded_jsonl(root / "grounded.jsonl"),
        "root": root,
    }


def task_args(task, env):
    d = str(env["docs"])
    return {
        "ppl": ["--data", d, "--max-tokens", "300", "--max-docs", "2"],
        "needle": ["--data", d, "--nr", "1/1,2/2", "--lengths", "236", "--depths", "0,100", "--samples", "1",
                   "--max-new-tokens", "4"],
        "attention-noise": ["--data", d, "--length", "230", "--depths", "0,50", "--samples", "1"],
        "icl": ["--datasets", str(env["icl"]), "--shots", "1,2", "--runs", "1", "--test-size", "4",
                "--permutations", "1", "--robust-test-size", "2", "--max-text-tokens", "12"],
        "hallucination": ["--datasets", str(env["grounded"]), "--samples", "2", "--max-new-tokens", "4"],
        "outliers": ["--data", d, "--tokens", "256", "--seq-len", "128"],
        "quant": ["--data", d, "--bits", "16,4", "--loss-tokens", "128", "--seq-len", "128", "--needle-lengths", "230",
                  "--needle-depths", "50", "--needle-samples", "1", "--needle-nr", "1/1", "--needle-max-new-tokens", "4"],
        "lambda": [],
    }[task]


def check_outputs(out, task, kind):
    rec = json.loads((out / "results.json").read_text())
    assert rec["task"] == task and rec["seed"] == 0
    assert rec["model"]["kind"] == kind and rec["model"]["config_sha256"] and rec["model"]["path"]
    assert rec["tokenizer"]["sha256"] and rec["options"]["seed"] == 0
    md = (out / "results.md").read_text()
    assert "|---" in md and f"diffattn eval {task}" in md
    pngs = [f for f in rec["files"] if f.endswith(".png")]
    assert pngs
    for f in pngs:
        assert (out / f).read_bytes()[:8] == PNG
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]  # nothing half-written
    return rec


TASKS = ["ppl", "needle", "attention-noise", "icl", "hallucination", "outliers", "quant"]


@pytest.mark.parametrize("model", ["diffattn", "llama"])
@pytest.mark.parametrize("task", TASKS)
def test_task_end_to_end(env, task, model, monkeypatch, capsys):
    out = env["root"] / "out" / f"{task}-{model}"
    rc = cli(["eval", task, "--model", str(env[model]), "--out", str(out), *task_args(task, env)], monkeypatch)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "wrote" in captured.out
    rec = check_outputs(out, task, "diffattn" if model == "diffattn" else "hf")
    res = rec["results"]
    if task == "ppl":
        assert res["perplexity"] > 1 and res["tokens_scored"] >= 300
        assert len(res["position_curve"]["cumulative_nll"]) == res["window_text_tokens"]
    elif task == "needle":
        assert {(c["n"], c["r"]) for c in res["cells"]} == {(1, 1), (2, 2)}
        assert all(t["prompt_tokens"] == 236 for t in res["trials"])
    elif task == "attention-noise":
        for row in res["by_depth"]:
            assert row["answer"] + row["noise"] + row["bos"] + row["query"] == pytest.approx(1.0, abs=1e-6)
        assert res["map"] == ("effective (A1 - lambda*A2)" if model == "diffattn" else "softmax")
        assert (res["components"] is not None) == (model == "diffattn")
    elif task == "icl":
        ds = res["datasets"][0]
        assert [c["shots"] for c in ds["curve"]] == [1, 2]
        assert set(ds["robustness"]["arrangements"]) == {"random", "grouped", "alternating"}
    elif task == "hallucination":
        assert "proxy" in res["proxy_note"].lower() and res["datasets"][0]["samples"] == 2
    elif task == "outliers":
        assert res["tokens"] >= 256
        assert res["attention_logits"]["top1"] >= res["attention_logits"]["top100"] >= 0
        assert ("attention_logits_map1" in res) == (model == "diffattn")
        assert len(res["layer_max_hidden"]) == 2
    elif task == "quant":
        rows = {r["bits"]: r for r in res["rows"]}
        assert rows[16]["delta_loss"] == 0.0 and not rows[16]["quantized"] and rows[4]["quantized"]
        assert 0.0 <= rows[4]["needle_accuracy"] <= 1.0


def test_lambda_end_to_end(env, monkeypatch, capsys):
    for model, kind, n in (("diffattn", "diffattn", 2), ("difflama", "hf", 3)):
        out = env["root"] / "out" / f"lambda-{model}"
        assert cli(["eval", "lambda", "--model", str(env[model]), "--out", str(out)], monkeypatch) == 0
        rec = check_outputs(out, "lambda", kind)
        layers = rec["results"]["layers"]
        assert [r["layer"] for r in layers] == list(range(n))
        assert all(r["lambda_init"] == pytest.approx(0.8 - 0.6 * __import__("math").exp(-0.3 * r["layer"]))
                   for r in layers)
    # DIFF V2: λ is per token, measured on --data
    out = env["root"] / "out" / "lambda-v2"
    assert cli(["eval", "lambda", "--model", str(env["v2"]), "--data", str(env["docs"]), "--tokens", "200",
                "--out", str(out)], monkeypatch) == 0
    rec = check_outputs(out, "lambda", "diffattn")
    assert all(len(r["per_head"]) == 2 and 0 < r["lambda"] < 1 for r in rec["results"]["layers"])
    capsys.readouterr()
    # no λ in a standard Llama: a clear error, nothing written
    out = env["root"] / "out" / "lambda-llama"
    assert cli(["eval", "lambda", "--model", str(env["llama"]), "--out", str(out)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "no differential-attention layer" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_deterministic_from_seed(env, tmp_path):
    from diffattn.eval import NeedleOptions, load, run_needle

    adapter, tok = load(env["diffattn"])
    opts = dict(data=str(env["docs"]), nr=["2/2"], lengths=[236], depths=[50], samples=2, max_new_tokens=3)
    a = run_needle(adapter, tok, NeedleOptions(**opts), tmp_path / "a")
    b = run_needle(adapter, tok, NeedleOptions(**opts), tmp_path / "b")
    c = run_needle(adapter, tok, NeedleOptions(seed=1, **opts), None)
    strip = lambda r: {k: v for k, v in r.items() if k != "elapsed_s"}  # noqa: E731
    assert strip(a) == strip(b)
    assert (tmp_path / "a" / "results.md").read_text() == (tmp_path / "b" / "results.md").read_text()
    assert [t["answer"] for t in a["results"]["trials"]] != [t["answer"] for t in c["results"]["trials"]]
    assert not (tmp_path / "c").exists()


def test_dex_adapter_on_a_hf_base(env, monkeypatch, capsys, tmp_path):
    """``--adapter``: a DEX adapter applied to the HF base; λ per adapted layer, and the model changes."""
    import torch
    from transformers import AutoModelForCausalLM

    from diffattn.dex import DEXOptions, adapter_modules, apply_dex, base_fingerprint, save_adapter, set_dex_step

    m = AutoModelForCausalLM.from_pretrained(env["llama"])
    fingerprint = base_fingerprint(m)
    opts = DEXOptions(anneal_steps=10)
    heads = {0: [0, 1], 1: [3]}
    apply_dex(m, heads, opts)
    with torch.no_grad():
        for w in adapter_modules(m):
            w.W_D.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(w.layer_idx))
            w.lambda_learn.fill_(0.5)
    set_dex_step(m, 5)
    save_adapter(m, tmp_path / "dex", options=opts, heads=heads, train_mode="dex", fingerprint=fingerprint, step=5)
    with torch.no_grad():
        expected = [float(w.current_lambda()) for w in adapter_modules(m)]

    out = tmp_path / "lambda"
    assert cli(["eval", "lambda", "--model", str(env["llama"]), "--adapter", str(tmp_path / "dex"),
                "--out", str(out)], monkeypatch) == 0, capsys.readouterr().err
    rec = check_outputs(out, "lambda", "hf")
    layers = rec["results"]["layers"]
    assert [(r["layer"], r["kind"], r["heads"], r["step"]) for r in layers] == [(0, "dex", [0, 1], 5), (1, "dex", [3], 5)]
    assert [r["lambda"] for r in layers] == pytest.approx(expected)
    assert rec["model"]["dex_adapter"]["method"] == "dex" and rec["model"]["name"] == "llama+dex"

    losses = {}
    for name, extra in (("base", []), ("dex", ["--adapter", str(tmp_path / "dex")])):
        o = tmp_path / f"ppl-{name}"
        assert cli(["eval", "ppl", "--model", str(env["llama"]), *extra, "--data", str(env["docs"]),
                    "--max-tokens", "200", "--max-docs", "1", "--out", str(o)], monkeypatch) == 0
        losses[name] = json.loads((o / "results.json").read_text())["results"]["val_loss"]
    assert losses["base"] != losses["dex"]
