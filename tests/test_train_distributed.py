# .venv/bin/python -m pytest tests/test_train_distributed.py -q
"""Multi-process training on CPU with gloo, launched exactly as a user does
(``torchrun --standalone --nproc-per-node 2 -m diffattn train ...``):

* 2-process DDP with global batch B equals 1 process with gradient accumulation to B;
* the same for FSDP2 (``fully_shard``), which runs on gloo in torch 2.11-2.13;
* checkpoints are full: one written by 2 processes resumes in 1, and one written by 1 resumes in 2.

Weights are compared with allclose (rtol 1e-5, atol 1e-6): the ranks sum gradients in another order.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffattn.checkpoint import load_model
from diffattn.train import Trainer, load_run_file, plan_run, train
from diffattn.train.checkpoint import list_checkpoints, read_train_state
from diffattn.train.metrics import read_metrics
from helpers import make_corpus, write_config

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")

STEPS = 6
COMMON = dict(max_steps=STEPS, checkpoint_every=3, keep_checkpoints=5, eval_every=3, log_every=1)


def processes_running(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (Linux /proc; [] elsewhere)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def torchrun(cwd, config, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "diffattn", "train", "--config", str(config), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # every rank exits: no worker is left hanging in process-group teardown (a gloo deadlock we fixed)
    deadline = time.monotonic() + 20
    while processes_running(str(config)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_running(str(config)), "a torchrun worker did not exit"
    return result


def assert_same_weights(ckpt_a, ckpt_b):
    a, b = load_model(ckpt_a).state_dict(), load_model(ckpt_b).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The corpus and the 1-process reference: global batch 8 as 2 accumulated micro-batches of 4."""
    root = tmp_path_factory.mktemp("dist")
    corpus = make_corpus(root / "shards")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_run_file(write_config(root / "single.toml", corpus, root / "single", grad_accum=2, **COMMON)))
    finally:
        torch.set_num_threads(n)
    return root, corpus


def ckpt(out, step):
    return out / "checkpoints" / f"step-{step:06d}"


def test_ddp_two_processes_equal_one_process_with_accumulation(setup):
    root, corpus = setup
    cfg = write_config(root / "ddp.toml", corpus, root / "ddp", grad_accum=1, **COMMON)
    result = torchrun(root, cfg)
    assert "2 x cpu (ddp)" in result.stderr
    assert_same_weights(ckpt(root / "single", STEPS), ckpt(root / "ddp", STEPS))
    single, ddp = read_metrics(root / "single", "train"), read_metrics(root / "ddp", "train")
    assert [r["step"] for r in ddp] == list(range(1, STEPS + 1))  # rank 0 alone writes: one record per step
    for a, b in zip(single, ddp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["lambda"] == pytest.approx(a["lambda"], rel=1e-5)
    state = read_train_state(ckpt(root / "ddp", STEPS))
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    # N -> 1: the 2-process checkpoint at step 3 resumes in one process and lands on the same weights
    out = root / "ddp-to-1"
    shutil.copytree(ckpt(root / "ddp", 3), ckpt(out, 3))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = plan_run(load_run_file(write_config(root / "to1.toml", corpus, out, grad_accum=2, **COMMON)),
                        resume=True, world_size=1)
        Trainer(plan).fit()
    finally:
        torch.set_num_threads(n)
    assert_same_weights(ckpt(root / "single", STEPS), ckpt(out, STEPS))


def test_fsdp2_two_processes_equal_one_process_and_resume_from_one(setup):
    """FSDP2 from scratch, and FSDP2 resuming (1 -> N) a checkpoint written by one process."""
    root, corpus = setup
    cfg = write_config(root / "fsdp.toml", corpus, root / "fsdp", grad_accum=1, parallel="fsdp", **COMMON)
    result = torchrun(root, cfg)
    assert "2 x cpu (fsdp)" in result.stderr
    assert_same_weights(ckpt(root / "single", STEPS), ckpt(root / "fsdp", STEPS))
    assert [s for s, _ in list_checkpoints(root / "fsdp")] == [3, 6]
    assert all(len(r["lambda"]) == 2 for r in read_metrics(root / "fsdp", "train"))  # gathered from shards

    out = root / "one-to-fsdp"
    shutil.copytree(ckpt(root / "single", 3), ckpt(out, 3))
    cfg = write_config(root / "tofsdp.toml", corpus, out, grad_accum=1, parallel="fsdp", **COMMON)
    result = torchrun(root, cfg, "--resume")
    assert "resuming at step 3" in result.stderr
    assert_same_weights(ckpt(root / "single", STEPS), ckpt(out, STEPS))
