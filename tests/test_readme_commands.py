"""Every command in the README's examples is run, tiny-sized, in a fresh directory, in README order (issue #18).

Each ``diffattn`` line of a README ``bash`` block is either run as written, with only (a) size overrides appended
(fewer steps, smaller shapes) and (b) offline stand-ins for what needs the network or a GPU (a local text folder
for the default corpus, local JSONL files for the registry datasets), or listed in ``SKIPPED`` with the reason and
the test that covers it instead. A README command that is neither fails the first test, so the README cannot
grow an example nobody runs. The second test runs them all (about a minute on 2 cores) and checks each exits 0.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from helpers import SENTENCES, write_docs, write_grounded_jsonl, write_icl_jsonl

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # every README training run, tiny-sized: its final checkpoint is step-000004

# Not run here, with the reason and where it is covered instead.
SKIPPED = {
    "python3 -m venv": "installs the environment (what `make test` does before running this)",
    "make test": "this suite",
    "make demo": "14 min; its preset is run below with tiny overrides (`compare --preset cpu-tiny`)",
    "torchrun": "4 processes; tests/test_train_distributed.py runs DDP/FSDP2 with 2 gloo processes",
    "pip install": "installs an optional extra",
    "lm_eval": "needs the optional lm-eval package; tests/test_hf_lmeval.py (slow) runs it",
    "python -m diffattn.hf.lmeval": "needs the optional lm-eval package; tests/test_hf_lmeval.py (slow)",
    "diffattn adapt dex --base smollm2": "installs SmolLM2 from PyPI (network); tests/test_dex_cli.py runs `adapt dex` "
                                         "and `adapt load` on a tiny local Llama base",
    "diffattn adapt dex --base gemma3-270m": "installs Gemma 3 from PyPI (network); see tests/test_dex_cli.py",
    "diffattn adapt load smollm2": "needs the SmolLM2 install above; tests/test_dex_cli.py loads and merges adapters",
    "benchmarks/gpu_check.sh gpu-check-out": "needs a GPU; its --dry-run below runs every section on CPU",
    "python benchmarks/gpu_results_to_docs.py": "reads a GPU run's output; tests/test_gpu_check.py converts a recorded one",
    "diffattn bench attention --device cuda": "needs a GPU",
    "diffattn compare --preset gpu-small": "GPU-sized (hours on CPU); `compare --preset micro` below runs the same code",
    "benchmarks/gpu_check.sh /tmp/gpu-dry --dry-run": "84 s; tests/test_gpu_check.py (slow) runs it",
}

# What is appended to (or substituted in) a command to make it tiny and offline; matched by prefix, longest first.
TINY_TRAIN = (f"--set train.max_steps={STEPS} --set train.seq_len=32 --set train.batch_size=2 "
              "--set train.eval_every=2 --set train.eval_tokens=64 --set train.checkpoint_every=2 "
              "--set train.warmup_steps=1 --set train.progress=false")
TINY_COMPARE = ("--set train.max_steps=2 --set train.seq_len=32 --set train.batch_size=2 --set train.eval_tokens=64 "
                "--set train.warmup_steps=1 --set study.bench_repeats=0 --set recall.steps=2 --set recall.seeds=1 "
                "--set recall.eval_queries=8 --set recall.workers=1 --set 'study.tasks=[\"ppl\", \"lambda\", \"recall\"]' "
                "--set model.max_seq_len=64 --set eval.ppl.max_tokens=64 --set eval.lambda.tokens=64")
TINY_BENCH = "--seq-len 16 --d-model 32 --n-head 4 --warmup 0 --repeats 1 --no-references --quiet"
RULES = {
    "diffattn data prepare --corpus": ("--tokenizer gpt2", "--tokenizer bpe:300"),
    "diffattn data prepare": ("", "--corpus texts/ --tokenizer bpe:300 --out data/default"),
    "diffattn train": ("", TINY_TRAIN),
    "diffattn eval ppl": ("", "--max-tokens 64"),
    "diffattn eval needle": ("--nr 1/1,2/2,4/2,6/2 --samples 20",  # 6 needles need ~400 tokens: the tiny model has 256
                             "--nr 1/1,2/2 --samples 1 --lengths 250 --depths 50 --max-new-tokens 4"),
    "diffattn eval attention-noise": ("", "--samples 1 --length 200 --depths 50"),
    "diffattn eval icl": ("--datasets wiki-topic,bbc-topic,wordnet-supersense",
                          "--datasets topics.jsonl --shots 0,2 --runs 1 --test-size 3 --pool-size 12 "
                          "--no-robustness"),
    "diffattn eval hallucination": ("--datasets bbc-headline,wiki-description,wiki-qa",
                                    "--datasets grounded.jsonl --samples 2 --shots 0 --max-new-tokens 4"),
    "diffattn eval outliers": ("--tokens 400000", "--tokens 128 --seq-len 64"),
    "diffattn eval quant": ("", "--loss-tokens 64 --seq-len 32 --no-needle"),
    "diffattn eval lambda": ("", "--tokens 64"),
    "diffattn bench train --seq-len 2048": ("--seq-len 2048", TINY_BENCH + " --n-layer 1 --vocab-size 64"),
    "diffattn bench train --seq-len 8192": ("--seq-len 8192", TINY_BENCH + " --n-layer 1 --vocab-size 64"),
    "diffattn bench generate": ("--seq-len 1024 --batch 1 4",
                                "--batch 1 --new-tokens 2 --n-layer 1 --vocab-size 64 " + TINY_BENCH),
    "diffattn bench attention": ("", TINY_BENCH),
    # the 300-token test vocabulary spells a needle prompt in more tokens than micro's 192: no needle rows/tasks
    "diffattn compare --preset micro": ("--set train.max_steps=20",
                                        "--set train.max_steps=2 --set study.bench_repeats=0 --set needle_mix.share=0 "
                                        "--set 'study.tasks=[\"ppl\", \"outliers\", \"lambda\", \"recall\"]'"),
    "diffattn compare --preset cpu-tiny": ("", "--data data/default " + TINY_COMPARE),
    "diffattn generate": ("--max-new-tokens 40", "--max-new-tokens 4"),
    # the full matrix is minutes of ptxas (tests/test_bench_compile.py runs it, slow): one kernel and target here
    "diffattn bench compile": ("", "--arch sm_90 --dtype bf16 --head-dim 64 --kernel combine --jobs 1 --quiet"),
}
RUN_AS_WRITTEN = ("diffattn --help", "diffattn info", "diffattn export", "diffattn import", "diffattn report")


def readme_commands() -> list[str]:
    """The README's example command lines, in order (comments and shell variables resolved)."""
    text = (ROOT / "README.md").read_text()
    lines, env = [], {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for raw in joined.splitlines():
            line = re.split(r"\s+#\s", raw)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"([A-Z]+)=(\S+)", line)
            if m:
                env[m.group(1)] = m.group(2)
                continue
            for k, v in env.items():
                line = line.replace(f"${k}", v)
            lines.append(line)
    return lines


def _rule(cmd: str):
    for prefix in sorted(RULES, key=len, reverse=True):
        if cmd.startswith(prefix):
            return RULES[prefix]
    return None


def _skipped(cmd: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if cmd.startswith(prefix)), None)


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = readme_commands()
    assert len(commands) > 30
    for cmd in commands:
        assert _skipped(cmd) or _rule(cmd) or cmd.startswith(RUN_AS_WRITTEN), \
            f"README command neither run by tests/test_readme_commands.py nor skipped with a reason: {cmd}"
        rule = _rule(cmd)
        if rule and rule[0]:
            assert rule[0] in cmd, f"stale rule for {cmd!r}: {rule[0]!r} is not in it"


def _tiny(cmd: str) -> list[str]:
    rule = _rule(cmd)
    if rule:
        old, new = rule
        cmd = cmd.replace(old, new) if old else f"{cmd} {new}"
    cmd = re.sub(r"step-000400", f"step-{STEPS:06d}", cmd)  # the tiny runs' final checkpoint
    return shlex.split(cmd)[1:]  # drop "diffattn"


def _fixtures(cwd: Path) -> None:
    shutil.copytree(ROOT / "configs", cwd / "configs")
    write_docs(cwd / "texts", n=30, words=120)
    (cwd / "my_texts").mkdir()
    (cwd / "my_texts" / "a.txt").write_text("\n".join(SENTENCES * 5))
    with open(cwd / "notes.jsonl", "w") as f:
        for s in SENTENCES * 3:
            f.write(json.dumps({"body": s}) + "\n")
    write_icl_jsonl(cwd / "topics.jsonl")
    write_grounded_jsonl(cwd / "grounded.jsonl")


@pytest.mark.usefixtures("one_thread")
def test_readme_commands_run_tiny_sized(tmp_path, monkeypatch, capsys):
    from diffattn.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFATTN_CACHE", str(tmp_path / "cache"))
    _fixtures(tmp_path)
    ran = []
    for cmd in readme_commands():
        if _skipped(cmd) or not cmd.startswith("diffattn"):
            continue
        argv = _tiny(cmd)
        try:
            rc = main(argv)
        except SystemExit as e:  # --help exits through argparse
            rc = e.code or 0
        out = capsys.readouterr()
        assert rc == 0, f"README command failed ({rc}): diffattn {' '.join(argv)}\n{out.err[-2000:]}"
        ran.append(cmd)
    # what the commands were meant to leave behind
    assert (tmp_path / "data" / "default" / "index.json").is_file() and (tmp_path / "data" / "mine").is_dir()
    assert (tmp_path / "runs" / "tiny-diff_v1" / "checkpoints" / f"step-{STEPS:06d}").is_dir()
    assert (tmp_path / "out" / "tiny-diff_v1" / "config.json").is_file()
    assert (tmp_path / "runs" / "compare-cpu-tiny" / "REPORT.html").is_file()
    assert len(ran) >= 30
