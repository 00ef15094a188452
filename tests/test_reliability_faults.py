# .venv/bin/python -m pytest tests/test_reliability_faults.py -q
"""Faults a long run must survive (docs/reliability.md): corrupt checkpoint and shard-index files
(checksums, fallback to the newest intact checkpoint), non-finite steps (skipped, counted, limited),
λ / gradient-norm explosions (reported), a full or read-only disk (one line, previous checkpoint
intact) and a second process on the same run directory (refused by a lock)."""

import errno
import json
import re
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffattn.checkpoint import load_model
from diffattn.cli import main
from diffattn.train import Trainer, load_run_file, plan_run
from diffattn.train import checkpoint as ckpt_mod
from diffattn.train.checkpoint import CheckpointWriteError, latest_checkpoint, list_checkpoints, load_checkpoint
from diffattn.train.faults import NAN_ENV, PAUSE_ENV, NumericsGuard, TrainingAlarm
from diffattn.train.metrics import read_metrics
from diffattn.utils.errors import CorruptFileError
from diffattn.utils.integrity import CHECKSUMS_NAME, verify_checksums
from helpers import make_corpus, write_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = {"attention": "diff_v1", "d_model": 32, "n_layer": 2, "n_head": 2, "max_seq_len": 32}
RUN = dict(max_steps=6, checkpoint_every=2, keep_checkpoints=3, eval_every=0, eval_tokens=64, log_every=1,
           tensorboard=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("faults-corpus") / "shards", n_train=150, n_val=10)


def config(tmp_path, corpus, out_name="out", **train):
    return write_config(tmp_path / f"{out_name}.toml", corpus, tmp_path / out_name, model=SMALL, **{**RUN, **train})


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    d = tmp_path_factory.mktemp("finished")
    plan = plan_run(load_run_file(config(d, corpus)))
    trainer = Trainer(plan)
    trainer.fit()
    trainer.close()
    assert [s for s, _ in list_checkpoints(d / "out")] == [2, 4, 6]
    return d / "out"


def cli(capsys, *args):
    rc = main(["train", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path, at: float = 0.7):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- corrupt files
CORRUPTIONS = [("model.safetensors", truncate), ("model.safetensors", flip), ("train_state.safetensors", flip),
               ("train_state.safetensors", truncate), ("train_state.json", flip), ("config.json", truncate),
               ("tokenizer.json", flip)]


@pytest.mark.parametrize("name,damage", CORRUPTIONS, ids=[f"{n}-{d.__name__}" for n, d in CORRUPTIONS])
def test_corrupt_checkpoint_file_is_named_and_resume_falls_back(name, damage, finished, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    newest = out / "checkpoints" / "step-000006"
    damage(newest / name)
    with pytest.raises(CorruptFileError) as e:
        load_checkpoint(newest)
    assert str(newest / name) in str(e.value)
    if name in ("model.safetensors", "config.json"):  # the model loader (generate, eval, export) checks too
        with pytest.raises(ValueError, match=name):
            load_model(newest)
    # --resume skips it with one line saying which, continues from step 4 and rewrites step 6 exactly
    rc, stdout, err = cli(capsys, "--config", config(tmp_path, corpus), "--resume")
    assert rc == 0, err
    notes = [line for line in err.splitlines() if line.startswith("diffattn train: skipping corrupt")]
    assert len(notes) == 1 and "step-000006" in notes[0] and name in notes[0] and "resuming from step-000004" in notes[0]
    assert "resuming at step 4" in err
    _, ref, ref_opt, _ = load_checkpoint(finished / "checkpoints" / "step-000006")
    _, got, got_opt, _ = load_checkpoint(newest)  # rewritten, intact
    # bitwise: the rewritten checkpoint comes from a deterministic resume of the same run on this machine
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert all(torch.equal(v, got_opt["state"][n][f]) for n, e in ref_opt["state"].items() for f, v in e.items())


def test_every_checkpoint_corrupt_refuses_resume(finished, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for _, path in list_checkpoints(out):
        flip(path / "model.safetensors")
    rc, _, err = cli(capsys, "--config", config(tmp_path, corpus), "--resume")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no intact checkpoint" in err and "model.safetensors" in err


def test_checksums_cover_every_file_and_catch_a_damaged_record(finished, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(finished / "checkpoints" / "step-000002", ckpt)
    listed = set(json.loads((ckpt / CHECKSUMS_NAME).read_text())["files"])
    assert listed == {p.name for p in ckpt.iterdir()} - {CHECKSUMS_NAME}
    assert verify_checksums(ckpt) is True
    (ckpt / CHECKSUMS_NAME).write_text("{")
    with pytest.raises(CorruptFileError, match=CHECKSUMS_NAME):
        load_checkpoint(ckpt)
    (ckpt / CHECKSUMS_NAME).unlink()  # a checkpoint from before checksums: loads (parsing checks only)
    assert verify_checksums(ckpt) is False and load_checkpoint(ckpt)[3]["step"] == 2


@pytest.mark.parametrize("damage", ["truncate", "flip-count"])
def test_corrupt_shard_index_is_named(damage, corpus, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    index = data / "index.json"
    if damage == "truncate":
        truncate(index)
    else:  # a flipped digit in a token count: the size check against the token file catches it
        meta = json.loads(index.read_text())
        meta["splits"]["train"][0]["tokens"] += 1
        index.write_text(json.dumps(meta))
    cfg = write_config(tmp_path / "r.toml", data, tmp_path / "out", model=SMALL, **RUN)
    rc, _, err = cli(capsys, "--config", cfg)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "index.json" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- numerical faults
def test_nonfinite_step_is_skipped_without_changing_anything(corpus, tmp_path, monkeypatch):
    plan = plan_run(load_run_file(config(tmp_path, corpus)))
    trainer = Trainer(plan)
    trainer.train_step(0)
    before = {k: v.clone() for k, v in trainer.raw.state_dict().items()}
    opt_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    monkeypatch.setenv(NAN_ENV, "1")
    result = trainer.train_step(1)
    assert result.skipped and not torch.isfinite(result.loss)
    # bitwise on any CPU: a skipped step writes nothing, so the weights are the very values copied before it
    assert all(torch.equal(before[k], v) for k, v in trainer.raw.state_dict().items())
    for p, s in trainer.optimizer.state.items():
        assert all(torch.equal(opt_before[id(p)][k], v) for k, v in s.items())
    monkeypatch.delenv(NAN_ENV)
    assert not trainer.train_step(1).skipped
    trainer.close()


def test_skipped_steps_are_counted_logged_and_resume_exactly(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(NAN_ENV, "2,3")  # 0-based steps 2 and 3 -> records of steps 3 and 4
    cfg = config(tmp_path, corpus, max_skipped_steps=2)
    with pytest.warns(TrainingAlarm, match="step skipped"):
        rc, _, err = cli(capsys, "--config", cfg, "--stop-at-step", "3")
        assert rc == 0, err
        rc, _, err = cli(capsys, "--config", cfg, "--resume")
    assert rc == 0, err
    skips = read_metrics(tmp_path / "out", "skip")
    assert [(r["step"], r["skipped_steps"]) for r in skips] == [(3, 1), (4, 2)]
    assert json.loads((latest_checkpoint(tmp_path / "out") / "train_state.json").read_text())["skipped_steps"] == 2
    # the same run without interruption gives the same weights (skipping is deterministic)
    plan = plan_run(load_run_file(config(tmp_path, corpus, "straight", max_skipped_steps=2)))
    trainer = Trainer(plan)
    trainer.fit()
    trainer.close()
    _, a, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "out"))
    _, b, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    # bitwise: both runs in one process at one thread count, same data order, deterministic skips: the same
    # operations in the same order, whatever the CPU
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_nonfinite_steps_stop_the_run_keeping_the_last_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(NAN_ENV, "3,4,5")
    with pytest.warns(TrainingAlarm):
        rc, stdout, err = cli(capsys, "--config", config(tmp_path, corpus, max_skipped_steps=1, checkpoint_every=3))
    assert rc == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffattn train: error: stopped at step 5: 2 non-finite steps skipped")
    assert "max_skipped_steps=1" in last and "step-000003" in last and "Traceback" not in err
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [3]
    _, weights, _, _ = load_checkpoint(tmp_path / "out" / "checkpoints" / "step-000003")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not any(p.name.startswith(".step") for p in (tmp_path / "out" / "checkpoints").iterdir())


def test_lambda_and_grad_norm_explosions_are_reported(corpus, tmp_path):
    plan = plan_run(load_run_file(config(tmp_path, corpus, max_steps=14, checkpoint_every=0, lambda_alarm=1e-6,
                                         grad_spike_factor=0.5)))
    trainer = Trainer(plan)
    with pytest.warns(TrainingAlarm) as caught:
        trainer.fit()
    trainer.close()
    alarms = read_metrics(tmp_path / "out", "alarm")
    lam = [a for a in alarms if a["what"] == "lambda"]
    assert {a["layer"] for a in lam} == {0, 1} and all(abs(a["lambda"]) > 1e-6 for a in lam)
    assert all(a["step"] > 10 for a in alarms if a["what"] == "grad_norm")
    assert any(a["what"] == "grad_norm" for a in alarms)  # some norm exceeds half the median
    assert any("lambda" in str(w.message) for w in caught) and any("grad norm" in str(w.message) for w in caught)


def test_alarms_print_as_one_clean_line_on_the_command_line(corpus, tmp_path):
    """Under `diffattn train` an alarm is one log line (step, what, value), not a Python warning with its
    source line and path."""
    cfg = config(tmp_path, corpus, max_steps=12, checkpoint_every=0, lambda_alarm=1e-6)
    proc = subprocess.run([sys.executable, "-m", "diffattn.cli", "train", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "exceeds" in ln]
    assert lines and all(re.fullmatch(r"diffattn train: alarm: step \d+: layer \d+ lambda \S+ exceeds \|1e-06\|", ln)
                         for ln in lines), lines
    assert "TrainingAlarm" not in proc.stderr and "warnings.warn" not in proc.stderr and ".py:" not in proc.stderr


def test_guard_spike_rule():
    g = NumericsGuard(0, 0.0, 10.0)
    for _ in range(10):
        assert g.watch_grad(1, 1.0) == []
    with pytest.warns(TrainingAlarm):
        assert g.watch_grad(11, 10.5)[0]["running_median"] == 1.0
    assert g.watch_grad(12, 9.0) == []


# ---------------------------------------------------------------------- disk full / unwritable
def test_disk_full_during_checkpoint_write(finished, corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for _, path in list_checkpoints(out)[1:]:
        shutil.rmtree(path)  # keep step 2; resume writes step 4 -> disk full

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]) if len(args) > 1 else None)

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    rc, _, err = cli(capsys, "--config", config(tmp_path, corpus), "--resume")
    assert rc == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "cannot write checkpoint" in last and "No space left on device" in last
    assert "previous checkpoint step-000002 is intact" in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no temporaries
    assert verify_checksums(out / "checkpoints" / "step-000002")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_checkpoint_directory(finished, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for _, path in list_checkpoints(out)[1:]:
        shutil.rmtree(path)
    os.chmod(out / "checkpoints", 0o555)
    try:
        rc, _, err = cli(capsys, "--config", config(tmp_path, corpus), "--resume")
    finally:
        os.chmod(out / "checkpoints", 0o755)
    assert rc == 1 and "Traceback" not in err
    assert "cannot write checkpoint" in err.strip().splitlines()[-1] and "Permission denied" in err
    assert [s for s, _ in list_checkpoints(out)] == [2] and verify_checksums(out / "checkpoints" / "step-000002")


def test_checkpoint_write_error_leaves_earlier_checkpoints(finished, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    _, state, optim, train_state = load_checkpoint(out / "checkpoints" / "step-000006")
    config_ = load_model(out / "checkpoints" / "step-000006").config
    monkeypatch.setattr(ckpt_mod, "write_checksums", lambda d: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(CheckpointWriteError, match="previous checkpoint step-000006 is intact"):
        ckpt_mod.save_checkpoint(out, 8, model_config=config_, model_state=state, optimizer_state=optim,
                                 train_state=train_state, keep=1)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]  # nothing pruned, nothing partial
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------- concurrency
def test_second_process_on_the_same_out_is_refused(corpus, tmp_path, capsys):
    import fcntl

    cfg = config(tmp_path, corpus)
    (tmp_path / "out").mkdir()
    fd = os.open(tmp_path / "out" / ".diffattn.lock", os.O_RDWR | os.O_CREAT)  # as another process would
    os.write(fd, b"pid 4242 on elsewhere\n")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        rc, _, err = cli(capsys, "--config", cfg)
        assert "pid 4242 on elsewhere" in err
    finally:
        os.close(fd)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "is in use by another diffattn train (pid" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".diffattn.lock"]  # nothing else written
    rc, _, err = cli(capsys, "--config", cfg)  # released: the run goes ahead
    assert rc == 0, err


def test_two_real_processes(corpus, tmp_path, capsys):
    cfg = config(tmp_path, corpus)
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: "120@model-written"}
    first = subprocess.Popen([sys.executable, "-m", "diffattn", "train", "--config", str(cfg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in first.stderr:  # paused inside its first checkpoint write, lock held
            if line.startswith("diffattn-test: checkpoint-write"):
                break
        else:
            raise AssertionError(f"first process ended: rc {first.wait()}")
        rc, _, err = cli(capsys, "--config", cfg)
        assert rc == 2 and f"pid {first.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rc, _, err = cli(capsys, "--config", cfg)  # the dead holder's lock is gone with it (no checkpoint yet)
    assert rc == 0, err


def test_disk_full_outside_checkpoints_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    """ENOSPC anywhere else (here: appending to metrics.jsonl) is one line and exit 1 too, not a traceback."""
    from diffattn.train import metrics

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(metrics.MetricsLog, "write", full)
    rc, _, err = cli(capsys, "--config", config(tmp_path, corpus))
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("diffattn train: error: [Errno 28] No space left on device")
