# .venv/bin/python -m pytest tests/test_reliability_kill.py -q
"""Kill at any moment (docs/reliability.md): ``python -m diffattn train`` in a subprocess is
SIGKILLed at >= 10 random points — before the first checkpoint, in the middle of training steps
and *inside* checkpoint writes (paused there by the test hook
``DIFFATTN_TEST_PAUSE_IN_CHECKPOINT_WRITE``) — and resumed with ``--resume`` each time; the final
weights and optimizer state equal an uninterrupted run's bit for bit (``torch.equal``, CPU), the
metrics log reads as one run, and no partial checkpoint or temporary directory is left.

The kill plan is drawn from a random seed printed on failure (``DIFFATTN_KILL_SEED`` replays one).
"""

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffattn.train.checkpoint import list_checkpoints, load_checkpoint
from diffattn.train.faults import PAUSE_ENV
from diffattn.train.metrics import read_metrics
from helpers import make_corpus  # the tiny learnable corpus (tests/ is on sys.path)

STEPS, EVERY = 40, 2
MODEL = {"attention": "diff_v1", "d_model": 32, "n_layer": 2, "n_head": 2, "max_seq_len": 32}
TRAIN = {"seq_len": 32, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "max_steps": STEPS, "eval_every": 0,
         "eval_tokens": 64, "log_every": 1, "checkpoint_every": EVERY, "keep_checkpoints": 2, "progress": False,
         "tensorboard": False, "device": "cpu"}
POINTS = ("model-written", "optimizer-written", "state-written", "before-rename", "renamed", "pruning")


def write_run(path: Path, data: Path, out: Path) -> Path:
    def table(name, d):
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())

    path.write_text(table("model", MODEL) + "\n" + table("train", {"data": str(data), "out": str(out), **TRAIN}))
    return path


def env(**extra):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    e.pop(PAUSE_ENV, None)
    e.update(extra)
    return e


class Run:
    """One ``python -m diffattn train`` process whose stderr lines arrive on a queue."""

    def __init__(self, config: Path, resume: bool, **extra_env):
        args = [sys.executable, "-m", "diffattn", "train", "--config", str(config)] + (["--resume"] if resume else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env(**extra_env))
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)

    def wait_line(self, prefix: str, timeout: float = 120.0) -> str | None:
        """The next stderr line starting with ``prefix``; None when the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.01)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    return None
                continue
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line within {timeout} s; stderr: {''.join(self.err)[-2000:]}")

    def kill(self) -> bool:
        """SIGKILL; True when the process was still running (a real kill)."""
        if self.proc.poll() is not None:
            return False
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return self.proc.returncode == -signal.SIGKILL


def kill_plan(rng: random.Random) -> list[tuple]:
    """12 kills in run order: ("start", delay) right after launch, ("step", checkpoint step, delay)
    some time after a checkpoint appears (mid-step), ("write", point, step) paused inside a write."""
    plan = [("start", rng.uniform(0.0, 0.3))]
    timed = sorted(rng.sample(range(2, 34, 2), 6))
    writes = sorted(rng.sample(range(4, 38, 2), 4))
    events = [("step", s, rng.uniform(0.0, 0.03)) for s in timed]
    events += [("write", rng.choice(POINTS), s) for s in writes]
    events.sort(key=lambda e: e[1] if e[0] == "step" else e[2])
    # the last one inside the final checkpoint's write (the end-of-run save, after the final eval)
    return plan + events + [("write", rng.choice(POINTS[:5]), STEPS)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("kill-corpus") / "shards", n_train=200, n_val=10)


def test_sigkill_at_random_points_then_resume_is_bit_identical(corpus, tmp_path):
    seed = int(os.environ.get("DIFFATTN_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    plan = kill_plan(rng)
    ref_cfg = write_run(tmp_path / "ref.toml", corpus, tmp_path / "ref")
    cfg = write_run(tmp_path / "killed.toml", corpus, tmp_path / "killed")
    out = tmp_path / "killed"
    reference = subprocess.Popen([sys.executable, "-m", "diffattn", "train", "--config", str(ref_cfg)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    kills, log = 0, []
    try:
        for event in plan:
            resume = bool(list_checkpoints(out))
            if event[0] == "write":
                _, point, step = event
                run = Run(cfg, resume, **{PAUSE_ENV: f"120@{point}>={step}"})
                line = run.wait_line("diffattn-test: checkpoint-write")
                assert line is not None, f"seed {seed}: run ended before {event}: {''.join(run.err)[-1500:]}"
            else:
                run = Run(cfg, resume)
                if event[0] == "start":
                    assert run.wait_line("diffattn train:") is not None, "".join(run.err)
                    time.sleep(event[1])
                else:
                    _, step, delay = event
                    while run.proc.poll() is None and not any(s >= step for s, _ in list_checkpoints(out)):
                        time.sleep(0.005)
                    time.sleep(delay)
            killed = run.kill()
            assert killed, f"seed {seed}: run exited (rc {run.proc.returncode}) before kill {event}: " \
                           f"{''.join(run.err)[-1500:]}"
            kills += 1
            log.append((event, [s for s, _ in list_checkpoints(out)]))
        final = Run(cfg, True)
        assert final.proc.wait(timeout=300) == 0, f"seed {seed}: {''.join(final.err)[-2000:]}"
        assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    finally:
        for p in (reference,):
            if p.poll() is None:
                p.kill()
    assert kills >= 10
    ref_ckpt, ckpt = tmp_path / "ref" / "checkpoints" / f"step-{STEPS:06d}", out / "checkpoints" / f"step-{STEPS:06d}"
    _, ref_model, ref_optim, ref_state = load_checkpoint(ref_ckpt)  # also verifies checksums.json
    _, model, optim, state = load_checkpoint(ckpt)
    msg = f"seed {seed}, kills {log}"
    assert ref_model.keys() == model.keys(), msg
    for k in ref_model:
        assert torch.equal(ref_model[k], model[k]), f"{k} differs; {msg}"
    assert ref_optim["state"].keys() == optim["state"].keys(), msg
    for name, entry in ref_optim["state"].items():
        for field, value in entry.items():
            other = optim["state"][name][field]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, \
                f"optimizer {name}/{field} differs; {msg}"
    assert (state["step"], state["tokens"], state["val_loss"]) == (ref_state["step"], ref_state["tokens"],
                                                                   ref_state["val_loss"]), msg
    # the log reads as one run: the same per-step losses, each step once
    key = lambda r: (r["step"], r["loss"], r["grad_norm"], r["lr"])  # noqa: E731
    assert [key(r) for r in read_metrics(out, "train")] == [key(r) for r in read_metrics(tmp_path / "ref", "train")]
    # nothing partial left: only complete step directories (a kill between the final rename and the
    # prune leaves one extra, complete checkpoint: the finished run has nothing left to do on resume)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert [p.name for _, p in list_checkpoints(out)] == names and names[-1] == f"step-{STEPS:06d}", msg
    assert 2 <= len(names) <= 3, msg
