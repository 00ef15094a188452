"""`diffattn adapt dex|load` end to end on a tiny random Llama with its own tokenizer (no downloads),
the training loop, the registry-package extraction, and the one-line errors."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from diffattn.cli import main
from diffattn.data.shards import write_shards
from diffattn.dex import DEXOptions, adapter_modules, apply_dex, load_adapter
from diffattn.dex import bases as B
from diffattn.dex.data import AdaptationData, check_shards_match
from diffattn.dex.train import TrainSettings, train_adapter

WORDS = ("the cat sat on a mat and the dog ran to the park while a bird sang in the tree "
         "one two three four five six seven eight nine ten red green blue").split()


def make_text(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: mostly the fixed cycle of WORDS, sometimes a random word
    out = []
    for i in range(n_words):
        if torch.rand(1, generator=g).item() < 0.15:
            out.append(WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))])
        else:
            out.append(WORDS[i % len(WORDS)])
    return " ".join(out)


@pytest.fixture()
def tiny_base(tmp_path, monkeypatch):
    """A tiny Llama directory with a word-level tokenizer, and two text files; cache in tmp."""
    monkeypatch.setenv("DIFFATTN_CACHE", str(tmp_path / "cache"))
    vocab = {"<unk>": 0, "<|endoftext|>": 1}
    for w in sorted(set(WORDS)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, eos_token_id=1, bos_token_id=None,
                      initializer_range=0.2)  # large enough weights that attention matters
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    fast.save_pretrained(base)
    texts = []
    for i in range(3):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(make_text(700, i))
        texts.append(str(p))
    return base, texts


def run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_adapt_dex_then_load_and_merge(tiny_base, tmp_path, capsys):
    base, texts = tiny_base
    out = tmp_path / "adapter"
    rc, stdout, err = run(["adapt", "dex", "--base", str(base), "--text", *texts, "--out", str(out), "--steps", "6",
                           "--batch-size", "2", "--seq-len", "16", "--val-tokens", "64", "--calib-tokens", "64",
                           "--fraction", "0.5", "--lr", "0.01", "--no-progress"], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["format"] == "diffattn-dex-adapter-v1" and cfg["step"] == 6
    assert cfg["options"]["anneal_steps"] == 3  # default T: half the steps
    assert cfg["heads"].keys() == {"0", "1"} and all(len(v) == 2 for v in cfg["heads"].values())
    assert cfg["calibration"]["criterion"] == "entropy" and len(cfg["calibration"]["entropy"]) == 2
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "val_loss" in metrics[0] and "val_loss" in metrics[-1]
    assert any("loss" in m and "lambda_mean" in m for m in metrics)
    assert "val ppl: base" in stdout
    assert not list(tmp_path.glob(".adapter*"))  # no temporary leftovers

    # apply to a fresh base and generate
    rc, stdout, err = run(["adapt", "load", str(base), str(out), "--prompt", "the cat", "--max-new-tokens", "4"],
                          capsys)
    assert rc == 0, err
    assert "2 layers" in stdout and "the cat" in stdout

    # merge -> stock Llama directory whose logits equal the unmerged adapter's
    merged = tmp_path / "merged"
    rc, stdout, err = run(["adapt", "load", str(base), str(out), "--merge", "--out", str(merged)], capsys)
    assert rc == 0, err
    m = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(m) is LlamaForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(base).eval()
    load_adapter(ref, out)
    x = torch.randint(0, 48, (2, 20))
    with torch.no_grad():
        assert (m(x).logits - ref(x).logits).abs().max() < 1e-5
    assert (merged / "tokenizer.json").is_file()


def test_plain_finetune_control_trains_every_base_weight_and_merges_to_them(tiny_base, tmp_path, capsys):
    """--control finetune --train all: no module, every base weight trained (the control of DEX + --train all);
    the saved weights load onto a fresh base and merge to a stock model with exactly the trained weights."""
    base, texts = tiny_base
    common = ["adapt", "dex", "--base", str(base), "--text", *texts, "--steps", "4", "--batch-size", "2",
              "--seq-len", "16", "--val-tokens", "64", "--lr", "0.01", "--no-progress"]
    rc, _, err = run([*common, "--control", "finetune", "--out", str(tmp_path / "bad")], capsys)
    assert rc == 2 and "needs --train all" in err and not (tmp_path / "bad").exists()
    out = tmp_path / "ft"
    rc, _, err = run([*common, "--control", "finetune", "--train", "all", "--out", str(out)], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    ref = AutoModelForCausalLM.from_pretrained(base)
    assert cfg["options"]["method"] == "finetune" and cfg["heads"] == {} and cfg["lambda"] == {}
    assert cfg["training"]["trainable_params"] == sum(p.numel() for p in ref.parameters())
    merged = tmp_path / "merged"
    rc, _, err = run(["adapt", "load", str(base), str(out), "--merge", "--out", str(merged)], capsys)
    assert rc == 0, err
    m = AutoModelForCausalLM.from_pretrained(merged)
    saved = load_file(str(out / "adapter.safetensors"))
    changed = 0
    for name, p in m.named_parameters():
        assert torch.equal(p, saved[f"model.{name}"]), name
        changed += int(not torch.equal(p, dict(ref.named_parameters())[name]))
    assert changed == len(saved)  # every weight moved


def test_training_lowers_validation_loss_and_trains_only_the_adapter(tiny_base, tmp_path):
    base, texts = tiny_base
    from diffattn.dex.data import prepare_text
    fast = PreTrainedTokenizerFast.from_pretrained(base)
    shards = prepare_text(texts, fast, log=lambda m: None)
    assert prepare_text(texts, fast, log=lambda m: None) == shards  # cached by content
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_dex(model, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, DEXOptions(anneal_steps=10))
    data = AdaptationData(shards, seq_len=16, batch_size=4, seed=0, bos_id=None)
    summary = train_adapter(model, data, TrainSettings(steps=25, lr=0.05, val_tokens=256), progress=False,
                            metrics_dir=tmp_path / "m")
    assert summary["val_after"]["val_loss"] < summary["val_before"]["val_loss"] - 0.1
    assert summary["trainable_params"] == 2 * (8 * 8 + 1)
    after = model.state_dict()
    for k, v in before.items():  # base weights untouched (o_proj now lives at o_proj.base)
        k2 = k.replace("o_proj.weight", "o_proj.base.weight")
        assert torch.equal(after[k2], v), k
    assert all(abs(float(w.W_D.abs().sum())) > 0 for w in adapter_modules(model))


def test_windows_with_bos_and_deterministic_batches(tmp_path):
    write_shards(tmp_path / "s", [list(range(2, 40))] * 3, [list(range(2, 30))], vocab_size=48, eos_id=1)
    d = AdaptationData(tmp_path / "s", seq_len=8, batch_size=3, seed=1, bos_id=47)
    x, y = d.batch(5)
    assert x.shape == y.shape == (3, 8)
    assert (x[:, 0] == 47).all() and torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x[:, 1], y[:, 0])
    x2, _ = d.batch(5)
    assert torch.equal(x, x2)
    vb = list(d.val_batches(16, 2))
    assert sum(v[0].numel() for v in vb) == 16 and (vb[0][0][:, 0] == 47).all()


def test_shards_with_another_tokenizer_are_refused(tiny_base, tmp_path):
    base, _ = tiny_base
    fast = PreTrainedTokenizerFast.from_pretrained(base)
    write_shards(tmp_path / "ids", [[2, 3, 4]] * 4, [[2, 3]], vocab_size=48, eos_id=1)  # id tokenizer
    with pytest.raises(ValueError, match="different tokenizer"):
        check_shards_match(tmp_path / "ids", fast, 48)
    with pytest.raises(ValueError, match="exceeds the base model"):
        check_shards_match(tmp_path / "ids", fast, 10)


# ---------------------------------------------------------------- errors: one line, exit 2

def test_errors_are_one_line_with_exit_2(tiny_base, tmp_path, capsys):
    base, texts = tiny_base
    common = ["--text", texts[0], "--steps", "1", "--no-progress"]
    rc, _, err = run(["adapt", "dex", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *common], capsys)
    assert rc == 2 and "not found" in err and "smollm2, gemma3-270m" in err and "llama, mistral" in err
    assert len(err.strip().splitlines()) == 1

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(bert)
    rc, _, err = run(["adapt", "dex", "--base", str(bert), "--out", str(tmp_path / "o"), *common], capsys)
    assert rc == 2 and "not a causal LM" in err and "llama, mistral, qwen2, qwen3, gemma3_text" in err

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(gpt2)
    rc, _, err = run(["adapt", "dex", "--base", str(gpt2), "--out", str(tmp_path / "o"), *common], capsys)
    assert rc == 2 and "unsupported architecture 'gpt2'" in err and "gemma3_text" in err

    rc, _, err = run(["adapt", "dex", "--base", str(base), "--out", str(tmp_path / "o"), "--heads", "0:9", *common],
                     capsys)
    assert rc == 2 and "head 9 out of range" in err
    assert not (tmp_path / "o").exists()

    rc, _, err = run(["adapt", "dex", "--base", str(base), "--out", str(tmp_path / "o"), "--anneal-steps", "1",
                      *common], capsys)
    assert rc == 2 and "stationary point" in err

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    rc, _, err = run(["adapt", "dex", "--base", str(base), "--out", str(tmp_path / "full"), *common], capsys)
    assert rc == 2 and "not overwriting" in err and (tmp_path / "full" / "keep.txt").read_text() == "mine"

    rc, _, err = run(["adapt", "load", str(base), str(tmp_path / "noadapter"), "--merge", "--out",
                      str(tmp_path / "m")], capsys)
    assert rc == 2 and "adapter directory not found" in err
    rc, _, err = run(["adapt", "load", str(base), str(tmp_path), "--out", str(tmp_path / "m")], capsys)
    assert rc == 2 and "--out needs --merge" in err


def test_nonlinear_adapter_cannot_be_merged_and_config_file(tiny_base, tmp_path, capsys):
    base, texts = tiny_base
    conf = tmp_path / "dex.toml"
    conf.write_text(f'head-norm = "rms"\nheads = "all"\nsteps = 2\nseq_len = 16\nbatch_size = 2\nval_tokens = 32\n'
                    f'no_progress = true\ntext = {json.dumps(texts[:2])}\n')
    out = tmp_path / "ad"
    rc, _, err = run(["adapt", "dex", "--config", str(conf), "--base", str(base), "--out", str(out), "--steps", "3"],
                     capsys)
    assert rc == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["options"]["head_norm"] == "rms" and cfg["step"] == 3 and cfg["mergeable"] is False
    assert cfg["heads"] == {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}
    rc, _, err = run(["adapt", "load", str(base), str(out), "--merge", "--out", str(tmp_path / "m")], capsys)
    assert rc == 2 and "cannot be merged" in err and not (tmp_path / "m").exists()
    conf.write_text('colour = "blue"\n')
    rc, _, err = run(["adapt", "dex", "--config", str(conf), "--base", str(base), "--out", str(out)], capsys)
    assert rc == 2 and "unknown key(s): colour" in err


# ---------------------------------------------------------------- named bases: extraction without a network

def test_known_base_wheels_are_extracted_reassembled_and_checked(tmp_path):
    part_a, part_b = b"GGUF" + b"a" * 1000, b"b" * 777
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    pkgs = []
    for name, member, data in [("fake-one", "fake_one/data/m.gguf.part00", part_a),
                               ("fake-two", "fake_two/data/m.gguf.part01", part_b)]:
        pkg = B.Package(name, "1.0", "0" * 64)
        with zipfile.ZipFile(wheels / pkg.wheel, "w") as z:
            z.writestr(member, data)
            z.writestr("fake_one/LICENSE", "licence text")
        pkgs.append(pkg)
    good = hashlib.sha256(part_a + part_b).hexdigest()
    spec = B.KnownBase(name="fake", title="Fake", licence="MIT", packages=tuple(pkgs),
                       gguf_members=("fake_one/data/m.gguf.part00", "fake_two/data/m.gguf.part01"),
                       gguf_file="m.gguf", gguf_sha256=good, prepend_bos=False, licence_members=("fake_one/LICENSE",))
    out = tmp_path / "out"
    out.mkdir()
    gguf = B._extract(spec, wheels, out)
    assert gguf.read_bytes() == part_a + part_b and (out / "LICENSE").read_text() == "licence text"
    bad = B.KnownBase(**{**spec.__dict__, "gguf_sha256": "1" * 64})
    with pytest.raises(B.BaseModelError, match="sha256 mismatch"):
        B._extract(bad, wheels, out)
    assert set(B.KNOWN_BASES) == {"smollm2", "gemma3-270m"}
    for kb in B.KNOWN_BASES.values():  # every pin is exact
        assert all(len(p.sha256) == 64 and p.version for p in kb.packages) and len(kb.gguf_sha256) == 64


def test_cached_named_base_is_used_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFATTN_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2"
    target.mkdir(parents=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(target)
    (target / B.PROVENANCE).write_text(json.dumps({"name": "smollm2", "prepend_bos": False}))

    def no_network(*a, **k):
        raise AssertionError("must not download")
    monkeypatch.setattr(B, "_download_wheels", no_network)
    monkeypatch.setattr(B, "ensure_gguf_support", no_network)
    b = B.load_base("smollm2", log=lambda m: None)
    assert type(b.model) is LlamaForCausalLM and b.tokenizer is None and b.prepend_bos is False


def test_study_summary_tables_from_run_records(tmp_path):
    from diffattn.dex.study import summarize

    tr = {"trainable_params": 122910, "tokens": 65536, "elapsed_s": 10.0,
          "val_before": {"val_loss": 3.3, "val_ppl": 27.1}, "val_after": {"val_loss": 3.2, "val_ppl": 24.5}}
    (tmp_path / "dex").mkdir()
    (tmp_path / "dex" / "adapter_config.json").write_text(json.dumps({"training": tr, "lambda": {"0": 0.2, "1": 0.4}}))
    for name, acc in (("base", 0.5), ("dex", 0.75)):
        d = tmp_path / "eval" / f"{name}-needle"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"results": {"by_nr": [{"n": 1, "r": 1, "accuracy": acc}]}}))
    d = tmp_path / "eval" / "dex-attention-noise"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"results": {"mean": {"answer": 0.1, "noise": 0.5, "bos": 0.3,
                                                                     "query": 0.1}}}))
    md = summarize(tmp_path, ["base", "dex", "lora"])
    assert "| base | 0 | 0 | — | — | 3.3000 | 27.100 |" in md
    assert "| dex | 122,910 | 65,536 | 10.0 | 0.3000 | 3.2000 | 24.500 |" in md
    assert "| base | 0.500 |" in md and "| dex | 0.750 |" in md and "N/R 1/1" in md
    assert "| dex | 0.1000 | 0.5000 | 0.3000 | 0.1000 |" in md
    assert "| lora |" in md  # a missing arm is listed with blanks, not an error


def test_study_verdicts_respect_the_evaluations_sampling_margin(tmp_path):
    """A needle difference of one prompt in 18 is no verdict, whatever the seeds say; ppl has no such margin."""
    from diffattn.dex.study import sampling_margin, summarize

    assert sampling_margin(18) == pytest.approx(2 * (0.5 / 18) ** 0.5) and sampling_margin(0) == float("inf")
    for name, acc, ppl in (("base", 0.5, 30.0), ("dex", 0.5 + 1 / 18, 28.0), ("dex-s1", 0.5 + 1 / 18, 28.2),
                           ("linear", 0.5, 29.0), ("linear-s1", 0.5, 29.1)):
        d = tmp_path / "eval" / f"{name}-needle"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"results": {"by_nr": [{"n": 1, "r": 1, "accuracy": acc}],
                                                                "trials": [{}] * 18}}))
        d = tmp_path / "eval" / f"{name}-ppl"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"results": {"perplexity": ppl}}))
    md = summarize(tmp_path, ["base", "dex", "dex-s1", "linear", "linear-s1"])
    row = next(ln for ln in md.splitlines() if ln.startswith("| DEX vs linear | needle"))
    assert "| 0.333 | inconclusive |" in row and "within the sampling margin" in row
    row = next(ln for ln in md.splitlines() if ln.startswith("| DEX vs linear | ppl"))
    assert "| — | reproduced |" in row  # 2 seeds, both lower, beyond 2·SE


def test_study_verdicts_cover_lora_the_quoted_schedule_and_all_vs_finetune(tmp_path):
    """The other arms get their own one-seed comparisons: DEX (the new default) against LoRA and against the
    quoted schedule it replaced, `all` against plain fine-tuning; an arm the study did not name gets no row."""
    from diffattn.dex.study import summarize

    for name, ppl in (("base", 30.0), ("dex", 28.0), ("dex-s1", 28.1), ("linear", 28.2), ("lora", 29.0),
                      ("dex-quoted", 28.1), ("all", 25.0), ("finetune", 26.0)):
        d = tmp_path / "eval" / f"{name}-ppl"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"results": {"perplexity": ppl}}))
    md = summarize(tmp_path, ["base", "dex", "dex-s1", "linear", "lora", "dex-quoted", "all", "finetune"])
    row = lambda prefix: next(ln for ln in md.splitlines() if ln.startswith(prefix))  # noqa: E731
    assert "| -1.0000 | — | reproduced | one seed:" in row("| DEX vs lora | ppl")
    assert "| -0.1000 | — | inconclusive | one seed:" in row("| DEX vs dex-quoted | ppl")
    assert "| -1.0000 | — | reproduced | one seed:" in row("| all vs finetune | ppl")
    assert "| -1.9500 | — | reproduced | 2 seeds" in row("| DEX vs base | ppl")
    md = summarize(tmp_path, ["base", "dex", "linear"])
    assert "DEX vs lora" not in md and "vs finetune" not in md and "| DEX vs linear | ppl" in md


def test_adapt_dex_from_a_shard_dir_with_importance_heads(tiny_base, tmp_path, capsys):
    base, texts = tiny_base
    from diffattn.dex.data import prepare_text
    shards = prepare_text(texts, PreTrainedTokenizerFast.from_pretrained(base), log=lambda m: None)
    out = tmp_path / "ad"
    rc, stdout, err = run(["adapt", "dex", "--base", str(base), "--data", str(shards), "--out", str(out),
                           "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--val-tokens", "32",
                           "--calib-tokens", "32", "--heads", "importance", "--fraction", "0.25", "--control",
                           "linear", "--no-progress"], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    cal = cfg["calibration"]
    assert cal["criterion"] == "importance" and len(cal["importance"]) == 2
    for layer, hs in cfg["heads"].items():  # the least important head of each layer (ties: lower index)
        scores = cal["importance"][int(layer)]
        assert hs == [min(range(4), key=lambda h: (scores[h], h))]
    assert cfg["options"]["method"] == "linear" and cfg["lambda"] == {"0": -1.0, "1": -1.0}
    assert cfg["training"]["data"]["dir"] == str(shards)


@pytest.mark.parametrize("scale", [1, 3])
def test_study_eval_grids_parse_with_the_eval_cli(scale):
    """Every option list the study passes to `diffattn eval TASK` is accepted by that task's parser."""
    from diffattn.cli import build_parser
    from diffattn.dex.study import eval_grids

    parser = build_parser()
    for task, opts in eval_grids("data/x", scale).items():
        args = parser.parse_args(["eval", task, "--model", "m", *opts])
        assert args.task == task
        if task == "needle":  # issue #16's set: N/R 1/1, 4/2, 6/2 at 1K tokens (2K too on the GPU preset)
            assert args.nr == ["1/1", "4/2", "6/2"] and args.lengths == [1024] and args.samples == 2 * scale
            assert args.depths == [0, 50, 100]
    gpu = eval_grids("data/x", scale, "gpu")
    assert parser.parse_args(["eval", "needle", "--model", "m", *gpu["needle"]]).lengths == [1024, 2048]


def test_study_adapts_on_text_disjoint_from_the_evaluation_sources():
    """The study's default adaptation text names valid corpus sources and none the ICL/hallucination sets use."""
    from diffattn.data import corpus
    from diffattn.dex.study import CLEAN_TEXT

    corpus.check_specs(list(CLEAN_TEXT))  # raises on an unknown source
    names = {s.split(":", 1)[1] for s in corpus.expand_specs(list(CLEAN_TEXT))}
    assert names and not names & {"bbc", "wikipedia", "wordnet"}


def test_adapt_load_refuses_a_damaged_adapter_with_one_line(tiny_base, tmp_path, capsys):
    """Issue #18: an adapter whose λ is not a number, or whose adapter.safetensors is truncated, is one line and
    exit 2 (both were tracebacks)."""
    import shutil

    base, texts = tiny_base
    out = tmp_path / "adapter"
    rc, _, err = run(["adapt", "dex", "--base", str(base), "--text", *texts, "--out", str(out), "--steps", "2",
                      "--batch-size", "2", "--seq-len", "16", "--val-tokens", "32", "--calib-tokens", "32",
                      "--heads", "all", "--no-progress"], capsys)
    assert rc == 0, err

    def damaged(name, edit):
        d = tmp_path / name
        shutil.copytree(out, d)
        edit(d)
        rc, _, err = run(["adapt", "load", str(base), str(d)], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    def bad_lambda(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["lambda"] = {k: "abc" for k in cfg["lambda"]}
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    assert "must be a finite number, got 'abc'" in damaged("lam", bad_lambda)

    def truncate(d):
        w = d / "adapter.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])

    assert "adapter.safetensors: cannot read safetensors" in damaged("trunc", truncate)


def test_first_use_install_is_seen_by_transformers_in_the_same_process(tmp_path):
    """Issue #18 item 1: transformers caches "accelerate is not installed" the first time it asks; after the
    DEX first-use install in the same process, the cached "no" made the first `adapt dex --base smollm2` fail.
    Simulated in a fresh process: accelerate looks missing (and transformers caches that), pip "installs" it."""
    import subprocess
    import sys

    script = r'''
import importlib.util, types
import transformers.utils.import_utils as iu
state = {"installed": False}
real_pkg, real_find = iu._is_package_available, importlib.util.find_spec
def fake_pkg(name, return_version=False):  # transformers' own probe: the packages appear once "installed"
    if name in ("accelerate", "gguf"):
        return (state["installed"], "1.5.0" if state["installed"] else "N/A") if return_version else state["installed"]
    return real_pkg(name, return_version)
iu._is_package_available = fake_pkg
importlib.util.find_spec = lambda name, *a: (real_find("json") if state["installed"] else None) \
    if name in ("accelerate", "gguf") else real_find(name, *a)  # missing even where the venv has them
iu.is_accelerate_available.cache_clear()  # importing transformers may have asked already (a venv that has it)
assert iu.is_accelerate_available() is False  # asked before the install: transformers caches the "no"
from diffattn.dex import bases
def fake_pip(cmd, **kw):
    assert cmd[1:4] == ["-m", "pip", "install"], cmd
    state["installed"] = True
    return types.SimpleNamespace(returncode=0, stdout="", stderr="")
bases.subprocess.run = fake_pip
bases.ensure_gguf_support(log=lambda m: None)
assert state["installed"]
assert iu.is_accelerate_available() is True, "transformers still says accelerate is missing"
print("ok")
'''
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ---------------------------------------------------------------- issue #16: a λ path that can learn

@pytest.mark.filterwarnings("ignore:the quoted λ schedule")  # its own test checks the warning
def test_additive_schedule_keeps_lambda_after_T_and_lambda_has_its_own_learning_rate(tiny_base, tmp_path, capsys):
    """The default schedule is λ = α·λ_init + λ_learn: after T it is λ_init + λ_learn, not λ_learn alone; λ_learn
    trains in its own AdamW group at --lambda-lr; per-layer λ and ‖λ·W_D‖ are logged at every step."""
    from diffattn.dex.schedule import lambda_init_for_depth

    base, texts = tiny_base
    common = ["--base", str(base), "--text", *texts[:2], "--steps", "8", "--anneal-steps", "4", "--batch-size", "2",
              "--seq-len", "16", "--val-tokens", "64", "--heads", "all", "--lr", "0.01", "--no-progress"]
    outs = {}
    for name, extra in (("additive", []), ("fast-lambda", ["--lambda-lr", "0.2"]), ("quoted", ["--schedule", "quoted"])):
        outs[name] = tmp_path / name
        rc, _, err = run(["adapt", "dex", *common, "--out", str(outs[name]), *extra], capsys)
        assert rc == 0, err
    cfg = json.loads((outs["additive"] / "adapter_config.json").read_text())
    assert cfg["options"]["schedule"] == "additive"
    learn = {int(k): v for k, v in cfg["lambda"].items()}
    for layer, lam in learn.items():  # λ_learn moved by at most ~Σ lr = 0.08 from 0: λ ≈ λ_init, never ≈ 0
        assert abs(lam - lambda_init_for_depth(layer)) < 0.09
    quoted = json.loads((outs["quoted"] / "adapter_config.json").read_text())
    assert all(abs(v) < 0.09 for v in quoted["lambda"].values())  # the collapse the issue measured: λ = λ_learn
    fast = json.loads((outs["fast-lambda"] / "adapter_config.json").read_text())
    moved = lambda c: max(abs(v - lambda_init_for_depth(int(k))) for k, v in c["lambda"].items())
    assert moved(fast) > 2 * moved(cfg)  # 20x the learning rate moves λ_learn further
    metrics = [json.loads(l) for l in (outs["additive"] / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    assert all(set(m["lambda"]) == set(m["lambda_wd"]) == {"0", "1"} for m in steps)
    assert steps[-1]["lambda_wd"]["0"] > 0  # the differential term is in use at the end


def test_quoted_schedule_that_cannot_reach_lambda_init_warns(tiny_base, tmp_path, capsys):
    import warnings

    base, texts = tiny_base
    common = ["--base", str(base), "--text", texts[0], "--steps", "4", "--batch-size", "2", "--seq-len", "16",
              "--val-tokens", "64", "--heads", "all", "--no-progress"]
    with pytest.warns(UserWarning, match=r"the quoted λ schedule ends at λ = λ_learn.*below the λ_init") as got:
        rc, _, err = run(["adapt", "dex", *common, "--schedule", "quoted", "--out", str(tmp_path / "q")], capsys)
    assert rc == 0, err
    assert len(got) == 1 and "\n" not in str(got[0].message)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc, _, err = run(["adapt", "dex", *common, "--out", str(tmp_path / "a")], capsys)
    assert rc == 0 and not [w for w in seen if "λ schedule" in str(w.message)]  # additive reaches λ_init by construction


def test_retrieval_rows_in_the_adaptation_stream(tiny_base, tmp_path):
    """--retrieval-share replaces that share of the training rows by needle-retrieval sequences from the train
    split, the same rows for every arm (a pure function of seed and step); validation windows are untouched."""
    from transformers import AutoTokenizer

    from diffattn.dex.data import prepare_text

    base, texts = tiny_base
    tok = AutoTokenizer.from_pretrained(base)
    shards = prepare_text(texts, tok, log=lambda m: None)
    plain = AdaptationData(shards, seq_len=96, batch_size=8, seed=0, bos_id=None)
    mixed = AdaptationData(shards, seq_len=96, batch_size=8, seed=0, bos_id=None, retrieval_share=0.5, tokenizer=tok)
    again = AdaptationData(shards, seq_len=96, batch_size=8, seed=0, bos_id=None, retrieval_share=0.5, tokenizer=tok)
    changed = 0
    for step in range(4):
        (x0, _), (x1, y1), (x2, y2) = plain.batch(step), mixed.batch(step), again.batch(step)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        changed += int((x0 != x1).any(1).sum())
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # still next-token pairs
    assert 8 <= changed <= 24  # about half of the 32 rows
    torch.testing.assert_close(next(iter(mixed.val_batches(96)))[0], next(iter(plain.val_batches(96)))[0])


@pytest.mark.slow
def test_study_runs_arms_with_seeds_resumes_and_reports_verdicts(tiny_base, tmp_path):
    """The DEX study (python -m diffattn.dex.study): DEX and linear with 2 seeds, the same retrieval-mixed stream,
    merged and evaluated; a second run finds every arm and evaluation done and runs nothing; the summary has
    seed-paired verdicts."""
    from diffattn.dex import study

    base, texts = tiny_base
    out = tmp_path / "study"
    argv = ["--out", str(out), "--base", str(base), "--text", *texts, "--arms", "dex", "linear", "--seeds", "2",
            "--steps", "4", "--batch-size", "2", "--seq-len", "96", "--val-tokens", "96", "--evals", "ppl",
            "--retrieval-share", "0.25", "--device", "cpu"]
    assert study.main(argv) == 0
    for arm in ("dex", "dex-s1", "linear", "linear-s1"):
        cfg = json.loads((out / arm / "adapter_config.json").read_text())
        assert cfg["training"]["seed"] == (1 if arm.endswith("-s1") else 0)
    assert (json.loads((out / "linear-s1" / "adapter_config.json").read_text())["heads"]
            == json.loads((out / "dex-s1" / "adapter_config.json").read_text())["heads"])  # the same heads per seed
    summary = (out / "summary.md").read_text()
    assert "## Verdicts (seed-paired)" in summary and "| DEX vs linear | ppl" in summary
    train_log = (out / "logs" / "train-dex.log").read_text()  # a file: a line per 10 steps (and the last), phases
    assert "dex: step 4/4 loss " in train_log and "\ntraining: " in train_log and "\nhead selection: " in train_log
    n_commands = len(json.loads((out / "study.json").read_text())["commands"])
    assert study.main(argv) == 0  # resumed: everything is there already
    assert len(json.loads((out / "study.json").read_text())["commands"]) == n_commands


@pytest.mark.parametrize("bad, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--retrieval-share", "1.5"], "--retrieval-share must be in [0, 1]"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--arms", "dex", "nope"], "invalid choice: 'nope'"),
    (["--evals", "vibes"], "invalid choice: 'vibes'"),
    (["--data", "/no/such/shards"], "--data /no/such/shards: no such shard directory"),
])
def test_bad_study_options_one_line_exit_2_nothing_written(bad, message, tmp_path, capsys):
    from diffattn.dex import study

    out = tmp_path / "study"
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(out), "--device", "cpu", *bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_study_refuses_to_write_into_a_directory_that_is_not_a_study(tmp_path, capsys):
    from diffattn.dex import study

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(tmp_path), "--device", "cpu"])
    assert e.value.code == 2 and "holds no study.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_a_killed_study_resumes_to_the_results_of_an_uninterrupted_one(tiny_base, tmp_path, monkeypatch):
    """The study killed while an arm trains (SIGKILL of the real `adapt dex` process), then run again, ends with
    the same adapters, evaluations and tables as a study that was never stopped."""
    import signal
    import subprocess as sp
    import time

    from safetensors.torch import load_file as load

    from diffattn.dex import study

    base, texts = tiny_base

    def argv(out):
        return ["--out", str(out), "--base", str(base), "--text", *texts, "--arms", "dex", "linear", "--seeds", "1",
                "--steps", "6", "--batch-size", "2", "--seq-len", "96", "--val-tokens", "96", "--evals", "ppl",
                "--device", "cpu"]

    assert study.main(argv(tmp_path / "whole")) == 0
    real = study._cmd
    killed = []

    def kill_linear_mid_training(args, log, out, name, timeout=None):
        if name != "train-linear" or killed:
            return real(args, log, out, name, timeout)
        proc = sp.Popen(args, stdout=sp.DEVNULL, stderr=sp.DEVNULL)
        deadline = time.time() + 120
        while not list(out.glob(".linear.metrics-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # training has started once its metrics directory exists
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed.append(True)
        raise KeyboardInterrupt  # the study process goes down with it

    monkeypatch.setattr(study, "_cmd", kill_linear_mid_training)
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        study.main(argv(stopped))
    assert killed and (stopped / "dex" / "adapter_config.json").is_file()
    assert not (stopped / "linear" / "adapter_config.json").exists()
    assert study.main(argv(stopped)) == 0  # resumed (the stub passes every later command through)

    for arm in ("dex", "linear"):
        a, b = (load(str(d / arm / "adapter.safetensors")) for d in (tmp_path / "whole", stopped))
        # bitwise: each arm is the same deterministic command (seeded data, same machine) in both studies
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm
    for name in ("base-ppl", "dex-ppl", "linear-ppl"):
        a, b = (json.loads((d / "eval" / name / "results.json").read_text())["results"]
                for d in (tmp_path / "whole", stopped))
        assert a == b, name
    ra, rb = (json.loads((d / "results.json").read_text())["arms"] for d in (tmp_path / "whole", stopped))
    assert {k: v["metrics"] for k, v in ra.items()} == {k: v["metrics"] for k, v in rb.items()}


def test_adapt_dex_log_lines_phases_and_smoke_sizes(tiny_base, tmp_path, capsys):
    """stderr not a terminal: one progress line per --log-every steps and one line per phase with its duration; the
    phases' seconds are kept in adapter_config.json; the evaluation budget follows the run's size (--smoke)."""
    import re

    base, texts = tiny_base
    out = tmp_path / "adapter"
    rc, stdout, err = run(["adapt", "dex", "--base", str(base), "--text", *texts, "--out", str(out), "--steps", "7",
                           "--batch-size", "2", "--seq-len", "16", "--calib-tokens", "64", "--log-every", "3"], capsys)
    assert rc == 0, err
    lines = err.splitlines()
    steps = [line for line in lines if line.startswith("dex: step ")]
    assert [re.match(r"dex: step (\d+)/7 ", line).group(1) for line in steps] == ["3", "6", "7"]
    assert all(re.match(r"dex: step \d/7 loss \d+\.\d{4} [\d,]+ tok/s λ -?\d\.\d{3} \[", line) for line in steps), steps
    phases = ["loading base", "preparing data", "head selection", "evaluation before", "training",
              "evaluation after", "saving"]
    for name in phases:
        assert any(re.match(rf"{name}: \d+\.\d s", line) for line in lines), (name, lines)
    # the order of the phase lines is the order of the work
    order = [next(i for i, line in enumerate(lines) if line.startswith(name + ":")) for name in phases]
    assert order == sorted(order)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["phases_s"]) == set(phases) - {"saving"}
    assert re.search(r"^time: .* in all; loading base .*, saving ", stdout, re.M)
    # no --val-tokens: the run's training tokens (7·2·16 = 224), raised to the 4,096 floor
    assert cfg["training"]["settings"]["val_tokens"] == 4096
    # --no-progress: no step lines; phases still timed
    rc, _, err = run(["adapt", "dex", "--base", str(base), "--text", *texts, "--out", str(tmp_path / "q"), "--steps",
                      "2", "--batch-size", "2", "--seq-len", "16", "--calib-tokens", "64", "--no-progress"], capsys)
    assert rc == 0 and "dex: step" not in err and "training: " in err


def test_dex_run_sizes_its_evaluation_and_calibration():
    from diffattn.dex.run import CALIB_TOKENS, MIN_VAL_TOKENS, SMOKE_CALIB_TOKENS, SMOKE_STEPS, VAL_TOKENS, DexRun

    small = DexRun(out="o", steps=40, batch_size=2, seq_len=128)
    assert small.eval_tokens(40) == 40 * 2 * 128 and small.calibration_tokens() == CALIB_TOKENS
    assert DexRun(out="o", steps=2).eval_tokens(2) == MIN_VAL_TOKENS
    full = DexRun(out="o")
    assert full.budget("cpu")[0] == 128 and full.eval_tokens(128) == VAL_TOKENS  # the default run is unchanged
    smoke = DexRun(out="o", smoke=True)
    assert smoke.budget("cpu")[0] == SMOKE_STEPS and smoke.eval_tokens(SMOKE_STEPS) == MIN_VAL_TOKENS
    assert smoke.calibration_tokens() == SMOKE_CALIB_TOKENS
    assert DexRun(out="o", smoke=True, steps=5, val_tokens=999, calib_tokens=77).budget("cpu")[0] == 5
    explicit = DexRun(out="o", smoke=True, val_tokens=999, calib_tokens=77)
    assert explicit.eval_tokens(40) == 999 and explicit.calibration_tokens() == 77
