"""lm-evaluation-harness on a small local task file: an exported checkpoint with the stock
``lm_eval --model hf`` command, a native one through the documented adapter
``python -m diffattn.hf.lmeval --model diffattn``. Both must report the per-choice log-likelihoods that
diffattn's own model computes, and the accuracy that follows from them.

Slow (two lm_eval processes) and needs the optional extra: pip install 'diffattn[eval]'.
Run: .venv/bin/python -m pytest tests/test_hf_lmeval.py -q -m slow
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffattn import ModelConfig, build_model
from diffattn.checkpoint import save_model

pytestmark = pytest.mark.slow

DOCS = [
    {"question": "the cat sat on the", "choices": ["mat", "dog", "park"], "answer": 0},
    {"question": "what is two plus two?", "choices": ["four", "cat"], "answer": 0},
    {"question": "a dog ran in the", "choices": ["park", "mat"], "answer": 1},
    {"question": "the dog sat on the", "choices": ["cat", "mat", "four"], "answer": 1},
]
TASK = """task: diffattn_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [d["question"] + " " + " ".join(d["choices"]) for d in DOCS]
    tok.train_from_iterator(text * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation | context), tokenised as lm_eval's causal HFLM does (encode the whole, split)."""
    whole, ctx = tok.encode(context + continuation).ids, tok.encode(context).ids
    assert whole[:len(ctx)] == ctx
    x = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(x[:, :-1]).double(), -1)[0]
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def _run(argv: list[str], out: Path) -> list[dict]:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(argv + ["--tasks", "diffattn_tiny", "--device", "cpu", "--batch_size", "2",
                                  "--output_path", str(out), "--log_samples"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = sorted(out.rglob("samples_diffattn_tiny_*.jsonl"))
    assert len(samples) == 1, list(out.rglob("*"))
    return [json.loads(line) for line in samples[0].read_text().splitlines()]


def test_lm_eval_on_exported_and_native_checkpoints(tmp_path):
    pytest.importorskip("lm_eval")
    lm_eval_cmd = Path(sys.executable).with_name("lm_eval")
    if not lm_eval_cmd.exists():
        lm_eval_cmd = shutil.which("lm_eval")
    assert lm_eval_cmd, "lm_eval is importable but its command is not installed"
    from diffattn.hf.convert import export_model

    tok = _tokenizer(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    cfg = ModelConfig(attention="diff_v1", vocab_size=tok.get_vocab_size(), d_model=32, n_layer=2, n_head=2,
                      max_seq_len=64)
    core = build_model(cfg).eval()
    save_model(core, tmp_path / "native", tokenizer_file=tmp_path / "tokenizer.json")
    export_model(tmp_path / "native", tmp_path / "exported", "diffllama")
    (tmp_path / "tasks").mkdir()
    data = tmp_path / "tasks" / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=data))
    include = ["--include_path", str(tmp_path / "tasks")]

    exported = _run([str(lm_eval_cmd), "--model", "hf", "--model_args",
                     f"pretrained={tmp_path / 'exported'},dtype=float32", *include], tmp_path / "res_hf")
    native = _run([sys.executable, "-m", "diffattn.hf.lmeval", "--model", "diffattn", "--model_args",
                   f"pretrained={tmp_path / 'native'},dtype=float32", *include], tmp_path / "res_native")

    for samples in (exported, native):
        assert len(samples) == len(DOCS)
        for s in samples:
            doc = DOCS[s["doc_id"]]
            want = [_loglikelihood(core, tok, doc["question"], " " + c) for c in doc["choices"]]
            got = [float(r[0][0]) for r in s["resps"]]
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
            assert s["acc"] == float(max(range(len(want)), key=want.__getitem__) == doc["answer"])
