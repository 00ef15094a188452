"""The prepared GPU check (benchmarks/gpu_check.sh, diffattn.bench.gpu_check): its plan, a runner that
records failing and timed-out sections and goes on, the doc converter on a recorded dry-run output, and
(slow) the dry run itself on CPU."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffattn.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "data" / "gpu_check_dryrun"
FILE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _convert(outdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_results_to_docs.py"), str(outdir), *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dry", [True, False])
def test_plan_orders_sections_and_names_flat_files(dry, tmp_path):
    sections = gpu_check.plan(dry, tmp_path / "out", None, tmp_path / "scratch", dex_base=None if dry else "BASE")
    assert [s.name for s in sections] == ["env", "correctness", "attention", "train", "decode", "compare", "dex"]
    files = [s.file for s in sections] + ["summary.json"]
    assert len(files) <= 8 and len(set(files)) == len(files) and all(FILE_NAME.fullmatch(f) for f in files)
    for s in sections:  # every command writes into OUTDIR only through the section's own file
        for cmd in s.commands:
            for arg in cmd:
                if str(tmp_path / "out") in arg:
                    assert arg == str(tmp_path / "out" / s.file)
    flat = " ".join(" ".join(c) for s in sections for c in s.commands)
    if dry:
        assert "--device cpu" in flat and "cuda" not in flat
        assert sections[1].env == {"TRITON_INTERPRET": "1"}
    else:
        assert "--device cuda --dtype bf16 --kernel triton" in flat
        assert "--seq-len 2048 4096 8192" in flat and "--compile" in flat and "--batch 1 16" in flat
        assert "--d-model 768" in flat and "--n-layer 12" in flat  # the gpu-medium shapes (~125M)
        dex = " ".join(sections[-1].commands[0])
        assert "diffattn.dex.study" in dex and "--base BASE --preset gpu" in dex and "--arms dex linear lora" in dex
        assert sections[-1].cap_s <= 570  # one 10-minute device command with room for the start
        assert gpu_check.plan(dry, tmp_path / "o", None, tmp_path / "s")[-1].commands == []  # no base: skipped


def test_runner_records_failed_and_timed_out_sections_and_goes_on(tmp_path, monkeypatch):
    out, scratch = tmp_path / "out", tmp_path / "s"

    def fake_plan(dry, out_, compare_data, scratch_=None, dex_base=None, dex_data=None):
        py = sys.executable
        w = lambda f: [py, "-c", f"import json,sys; json.dump({{'ok': 1}}, open({str(out_ / f)!r}, 'w'))"]  # noqa: E731
        return [gpu_check.Section("env", "1_env.json", 20, [w("1_env.json")]),
                gpu_check.Section("correctness", "2_correctness.json", 20, [[py, "-c", "import sys; sys.exit(5)"]]),
                gpu_check.Section("attention", "3_attention.json", 2, [[py, "-c", "import time; time.sleep(30)"]]),
                gpu_check.Section("train", "4_train.json", 20, [w("4_train.json")])]

    monkeypatch.setattr(gpu_check, "plan", fake_plan)
    summary = gpu_check.run(out, dry=True, log=lambda m: None)
    st = {k: v["status"] for k, v in summary["sections"].items()}
    assert st == {"env": "ok", "correctness": "failed", "attention": "timed out", "train": "ok"}
    assert summary["sections"]["attention"]["seconds"] < 10
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["sections"] == summary["sections"]
    assert sorted(p.name for p in out.iterdir()) == ["1_env.json", "4_train.json", "summary.json"]


def test_environment_check_stops_on_missing_requirements(tmp_path, monkeypatch):
    env = gpu_check.environment(dry=False)
    import torch

    if not torch.cuda.is_available():
        assert any("no CUDA GPU" in p for p in env["problems"])
    monkeypatch.setattr(gpu_check, "MIN_VERSIONS", {"torch": (99, 0)})
    assert any(p.startswith("torch ") for p in gpu_check.environment(dry=True)["problems"])


def test_cli_refuses_a_non_empty_outdir_and_unknown_sections(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert gpu_check.main([str(tmp_path / "new"), "--dry-run", "--skip", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err
    assert gpu_check.main([str(tmp_path / "new"), "--dry-run", "--only", "nope"]) == 2
    assert "--only: unknown section" in capsys.readouterr().err
    assert gpu_check.main([str(tmp_path / "new"), "--only", "dex", "--dex-base", str(tmp_path / "none")]) == 2
    assert "--dex-base" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_only_runs_the_named_sections_and_a_dex_section_without_base_is_skipped(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_check, "_run_section", lambda sec, out, scratch, cap, log: ran.append(sec.name) or {
        "status": "ok", "file": sec.file, "produced": True})
    assert gpu_check.main([str(tmp_path / "a"), "--only", "dex"]) == 0
    st = json.loads((tmp_path / "a" / "summary.json").read_text())["sections"]
    assert ran == ["env"]  # no --dex-base: the DEX section has nothing to run
    assert st["dex"]["status"] == "skipped" and "--dex-base" in st["dex"]["why"]
    assert all(st[n]["status"] == "skipped" for n in ("correctness", "attention", "train", "decode", "compare"))
    ran.clear()
    assert gpu_check.main([str(tmp_path / "b"), "--only", "dex", "--dex-base", str(tmp_path)]) == 0
    assert ran == ["env", "dex"]


def test_recorded_dry_run_converts_to_doc_tables():
    proc = _convert(RECORDED)
    assert proc.returncode == 0, proc.stderr
    md = proc.stdout
    assert md.startswith("# GPU check (DRY RUN on CPU")
    for title in ("1. Environment", "2. Correctness", "3. Attention speed", "4. Training step", "5. Decode",
                  "6. gpu-small compare"):
        assert f"## {title}" in md
    corr = json.loads((RECORDED / "2_correctness.json").read_text())
    rows = [ln for ln in md.splitlines() if ln.startswith("| kernel |") or ln.startswith("| decode |")
            or ln.startswith("| model |")]
    assert len(rows) == corr["total"] and f"{corr['passed']} of {corr['total']} checks passed" in md
    att = json.loads((RECORDED / "3_attention.json").read_text())
    for r in att["results"]:
        assert f"| {r['scope']} | {r['name']} |" in md and f"{r['ratio_fwd_bwd']:.2f}×" in md
    train = json.loads((RECORDED / "4_train.json").read_text())
    assert "**eager**" in md and "**torch.compile**" in md
    for r in train["eager"]["results"]:
        assert f"| {r['name']} |" in md
    dec = json.loads((RECORDED / "5_decode.json").read_text())
    assert all(f"{r['ratio_decode']:.3f}" in md for r in dec["results"])
    assert "recall accuracy" in md  # section 6 of the dry run is a recall-only micro study
    dex = json.loads((RECORDED / "7_dex.json").read_text())
    assert "## 7. DEX study" in md and "### Verdicts (seed-paired)" in md  # section 7: the study's own tables
    assert all(ln in md for ln in dex["results"]["summary_md"].splitlines() if ln.startswith("|"))
    assert "| DEX vs linear | val_loss" in md and set(dex["results"]["arms"]) == {"base", "dex", "linear"}


def test_converter_marks_missing_sections_and_rejects_other_dirs(tmp_path):
    out = tmp_path / "partial"
    out.mkdir()
    summary = json.loads((RECORDED / "summary.json").read_text())
    summary["sections"]["attention"] = {"status": "timed out", "seconds": 90, "cap_s": 90, "file": "3_attention.json",
                                        "produced": False, "stderr_tail": "killed at the cap"}
    del summary["sections"]["compare"]
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "1_env.json").write_text((RECORDED / "1_env.json").read_text())
    proc = _convert(out)
    assert proc.returncode == 0, proc.stderr
    assert "*status: **timed out***" in proc.stdout and "killed at the cap" in proc.stdout
    assert proc.stdout.split("## 6.")[1].strip().splitlines()[2] == "*not run*"
    bad = _convert(tmp_path)
    assert bad.returncode == 2 and "no summary.json" in bad.stderr


@pytest.mark.slow
def test_dry_run_produces_every_section_file(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["status"] for k, v in summary["sections"].items()} == dict.fromkeys(
        ["env", "correctness", "attention", "train", "decode", "compare", "dex"], "ok")
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and all(FILE_NAME.fullmatch(n) and (out / n).is_file() for n in names)
    assert summary["elapsed_s"] < 300  # the dry run stays under 5 minutes
    assert _convert(out).returncode == 0
