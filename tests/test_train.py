# .venv/bin/python -m pytest tests/test_train.py -q
"""Training (src/diffattn/train): run files and overrides, TrainConfig validation, the LR schedule,
the weight-decay partition, a tiny model that learns, exact resume, checkpoints that reload into an
identical model, graceful stop, and bad input -> exit 2 with one line and nothing written."""

import json
import math
import os
import signal
import shutil
from pathlib import Path

import pytest
import torch

from diffattn import build_model
from diffattn.checkpoint import load_model
from diffattn.cli import main
from diffattn.config import ModelConfig
from diffattn.train import RECIPES, TrainConfig, Trainer, load_run_file, plan_run, resolve_model_config, train
from diffattn.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from diffattn.train.metrics import flops_per_token, read_metrics
from diffattn.train.optim import param_groups
from helpers import MODEL, VOCAB, make_corpus, write_config  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *args):
    rc = main(["train", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "shards")


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """20 uninterrupted steps through the Python API; returns (trainer, run dir)."""
    d = tmp_path_factory.mktemp("straight")
    tables = load_run_file(write_config(d / "run.toml", corpus, d / "out", max_steps=20))
    plan = plan_run(tables)
    trainer = Trainer(plan)
    trainer.fit()
    return trainer, d / "out"


# ---------------------------------------------------------------------- configuration
def test_run_file_overrides_and_presets(corpus, tmp_path):
    path = write_config(tmp_path / "r.toml", corpus, tmp_path / "o", model={"preset": "tiny", "attention": "diff_v1"},
                        max_steps=7)
    tables = load_run_file(path, ["train.lr=1e-3", "model.n_layer=4", "parallel=fsdp", "train.compile=true",
                                  "kernel=eager", 'train.out="a b"'])
    cfg = TrainConfig.from_dict(tables["train"])
    assert (cfg.lr, cfg.parallel, cfg.compile, cfg.out, cfg.max_steps) == (1e-3, "fsdp", True, "a b", 7)
    model = resolve_model_config(tables["model"], data_vocab_size=VOCAB)
    # preset + variant, parameter-matched (tiny has 6 baseline heads -> 3 DIFF heads); vocab from the data
    assert (model.attention, model.n_head, model.n_layer, model.vocab_size, model.kernel) == ("diff_v1", 3, 4, VOCAB, "eager")
    assert resolve_model_config({"preset": "tiny", "vocab_size": 100}, VOCAB).vocab_size == 100  # explicit wins
    assert resolve_model_config(dict(MODEL), VOCAB) == ModelConfig(**MODEL, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="both|neither"):
        load_run_file(path, ["nonsense=1"])
    with pytest.raises(ValueError, match="must start with 'model.' or 'train.'"):
        load_run_file(path, ["optim.lr=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_run_file(path, ["train.lr"])


@pytest.mark.parametrize("changes,field", [
    ({"lr": "fast"}, "lr"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"warmup_steps": -1}, "warmup_steps"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 6, "grad_accum": 4}, "grad_accum"), ({"beta2": 1.0}, "beta2"),
    ({"schedule": "exp"}, "schedule"), ({"parallel": "tp"}, "parallel"), ({"compile": "yes"}, "compile"),
    ({"max_steps": None}, "max_steps"), ({"min_lr": 1.0}, "min_lr"), ({"keep_checkpoints": 0}, "keep_checkpoints"),
    ({"max_steps": 2.5}, "max_steps"), ({"data": ""}, "data"), ({"dtype": "fp16"}, "dtype"),
])
def test_train_config_validation_names_the_field(changes, field):
    base = {"data": "d", "out": "o", "max_steps": 10}
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}: "):
        TrainConfig.from_dict({**base, **changes})


def test_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown key 'lrr' \(did you mean 'lr'\?\)"):
        TrainConfig.from_dict({"data": "d", "out": "o", "max_steps": 1, "lrr": 1})
    with pytest.raises(ValueError, match=r"TrainConfig.out: required"):
        TrainConfig.from_dict({"data": "d", "max_steps": 1})
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig.from_dict({"data": "d", "out": "o", "max_steps": 1, "recipe": "gpt3"})


def test_recipes_are_the_papers_settings():
    cfg = TrainConfig.from_dict({"data": "d", "out": "o", "max_steps": 5000, "recipe": "diff-3b"})
    # DIFF-3B, methods.md §1.8: AdamW (0.9, 0.95), 3.2e-4, 1000 warm-up, linear decay to 1.28e-5, WD 0.1
    assert (cfg.beta1, cfg.beta2, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.schedule, cfg.weight_decay) == \
        (0.9, 0.95, 3.2e-4, 1.28e-5, 1000, "linear", 0.1)
    cfg = TrainConfig.from_dict({"data": "d", "out": "o", "max_steps": 1000, "recipe": "diff-scaling", "lr": 1e-3})
    assert (cfg.beta2, cfg.lr, cfg.warmup_steps, cfg.weight_decay) == (0.98, 1e-3, 375, 0.05)  # explicit key wins
    assert RECIPES["diff-scaling-large"]["lr"] == 7.5e-4


def test_lr_schedules():
    cfg = TrainConfig(data="d", out="o", max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert [cfg.lr_at(s, 110) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up, step s uses (s+1)/W
    assert cfg.lr_at(10, 110) == 1.0
    assert cfg.lr_at(60, 110) == pytest.approx(0.55)  # cosine half-way: (max + min) / 2
    assert cfg.lr_at(110, 110) == pytest.approx(0.1) == cfg.lr_at(500, 110)
    lin = cfg.replace(schedule="linear")
    assert lin.lr_at(35, 110) == pytest.approx(1.0 - 0.9 * 0.25) and lin.lr_at(110, 110) == pytest.approx(0.1)
    assert cfg.replace(schedule="constant").lr_at(100, 110) == 1.0
    # stop by tokens: ceil(tokens / (batch * seq_len)), the smaller of the two limits wins
    tok = TrainConfig(data="d", out="o", max_tokens=10_000, batch_size=4)
    assert tok.total_steps(seq_len=100) == 25
    assert tok.replace(max_steps=7).total_steps(100) == 7


@pytest.mark.parametrize("attention", ["standard", "diff_v1", "diff_v2", "shared_diff"])
def test_weight_decay_partition(attention):
    from diffattn import presets

    model = build_model(presets.get("tiny", attention, tie_embeddings=attention == "standard"))
    cfg = TrainConfig(data="d", out="o", max_steps=1)
    named = dict(model.named_parameters())
    groups = param_groups(model, cfg)
    ids = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    no_decay = {n for n, p in named.items() if id(p) in ids["no_decay"]}
    decay = {n for n, p in named.items() if id(p) in ids["decay"]}
    assert no_decay | decay == set(named) and not no_decay & decay
    assert groups[0]["weight_decay"] == cfg.weight_decay and groups[1]["weight_decay"] == 0.0
    for name in no_decay:  # embeddings, norm gains, λ
        assert name == "embed.weight" or "norm" in name or ".lambda_" in name, name
    for name in decay:  # every projection matrix, the output head, Shared DIFF's low-rank factors
        assert named[name].dim() >= 2 and "lambda" not in name and name != "embed.weight", name
    if attention == "diff_v2":
        assert "layers.0.attn.lambda_proj.weight" in no_decay
        groups = param_groups(model, cfg.replace(decay_lambda_proj=True))
        assert any(p is named["layers.0.attn.lambda_proj.weight"] for p in groups[0]["params"])
    if attention == "diff_v1":
        assert {"layers.0.attn.lambda_q1", "layers.1.attn.lambda_k2"} <= no_decay


def test_shipped_configs_parse(tmp_path):
    for path in sorted((REPO / "configs").glob("train-*.toml")):
        tables = load_run_file(path)
        cfg = TrainConfig.from_dict(tables["train"])
        model = resolve_model_config(tables["model"], data_vocab_size=8192)
        assert cfg.resolved_seq_len(model) <= model.max_seq_len
        assert cfg.batch_size % cfg.grad_accum == 0


# ---------------------------------------------------------------------- training
def test_tiny_model_trains_and_val_loss_falls(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "r.toml", corpus, out, max_steps=50, checkpoint_every=20, keep_checkpoints=2,
                       peak_tflops=1.0)
    rc, stdout, err = cli(capsys, "--config", cfg)
    assert rc == 0, err
    assert "finished at step 50" in stdout
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == list(range(0, 51, 10))
    # at init (the default `scaled`: output head N(0, 1/d) on an RMS-normalised state) the logits are ~N(0, 1) and
    # independent of the target, so the loss is E[logsumexp] - E[logit] ≈ ln V + σ²/2 with σ² = 1
    assert evals[0]["val_loss"] == pytest.approx(math.log(VOCAB) + 0.5, abs=0.3)
    assert evals[-1]["val_loss"] < 0.7 * evals[0]["val_loss"]
    train = read_metrics(out, "train")
    assert [r["step"] for r in train] == list(range(5, 51, 5))
    assert all(len(r["lambda"]) == MODEL["n_layer"] for r in train)  # λ of every DIFF layer
    assert all(r["tokens"] == r["step"] * 8 * 32 for r in train + evals)
    r = train[-1]  # MFU = achieved FLOP/s over the peak (given here as 1 TFLOP/s)
    fpt = flops_per_token(build_model(resolve_model_config(MODEL, VOCAB)), resolve_model_config(MODEL, VOCAB), 32)
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12)
    # the last K=2 checkpoints are kept: step 40 and the final step 50; no temporary directories
    assert [s for s, _ in list_checkpoints(out)] == [40, 50]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000040", "step-000050"]
    ckpt = out / "checkpoints" / "step-000050"
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_state.json", "train_state.safetensors"} \
        <= {p.name for p in ckpt.iterdir()}
    assert (ckpt / "tokenizer.json").read_bytes() == (corpus / "tokenizer.json").read_bytes()
    run = json.loads((out / "run.json").read_text())
    assert run["train_config"]["max_steps"] == 50 and run["model_config"]["attention"] == "diff_v1"


def test_exact_resume_is_bit_identical(straight, corpus, tmp_path, capsys):
    ref, ref_out = straight
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "r.toml", corpus, out, max_steps=20)
    rc, stdout, _ = cli(capsys, "--config", cfg, "--stop-at-step", "10")
    assert rc == 0 and "stopped (continue with --resume) at step 10" in stdout
    assert [s for s, _ in list_checkpoints(out)] == [10]
    rc, stdout, err = cli(capsys, "--config", cfg, "--resume")
    assert rc == 0 and "finished at step 20" in stdout, err
    _, weights, optim, state = load_checkpoint(latest_checkpoint(out))
    ref_weights = ref.raw.state_dict()
    assert weights.keys() == ref_weights.keys()
    for k in weights:  # bitwise: resume is deterministic (same data order, RNG, optimizer state, one machine)
        assert torch.equal(weights[k], ref_weights[k]), k
    _, _, ref_optim, ref_state = load_checkpoint(latest_checkpoint(ref_out))
    for name, entry in ref_optim["state"].items():
        for key, value in entry.items():
            assert torch.equal(optim["state"][name][key], value), (name, key)
    assert state["step"] == 20 and state["tokens"] == 20 * 8 * 32 and state["data"]["next_step"] == 20
    # the metrics of the resumed run are those of the uninterrupted one (no duplicated or missing records)
    strip = lambda rs: [(r["kind"], r["step"], r.get("loss"), r.get("val_loss"), r.get("lambda")) for r in rs]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(ref_out))
    # resuming a finished run does nothing
    rc, stdout, _ = cli(capsys, "--config", cfg, "--resume")
    assert rc == 0 and "finished at step 20" in stdout
    assert len(read_metrics(out)) == len(read_metrics(ref_out))
    # training fields may change on resume (here: train longer); the change is reported
    rc, stdout, err = cli(capsys, "--config", cfg, "--resume", "--set", "train.max_steps=22")
    assert rc == 0 and "finished at step 22" in stdout and "changed since the checkpoint: max_steps" in err


def test_checkpoint_reloads_into_an_identical_model(straight):
    trainer, out = straight
    ckpt = latest_checkpoint(out)
    model = load_model(ckpt)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    trainer.raw.eval()
    with torch.no_grad():
        # bitwise: load_model copies the saved bytes into fresh memory (checkpoint.own_memory): same values, kernels
        assert torch.equal(model(ids), trainer.raw(ids))
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["format"] == "diffattn-train-state-v1"
    assert state["train_config"]["max_steps"] == 20 and state["scheduler"]["total_steps"] == 20
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"torch", "python", "numpy"}
    assert [g["params"] for g in state["optimizer"]["param_groups"]][1][0] == "embed.weight"


def test_graceful_stop_on_sigint_then_resume(straight, corpus, tmp_path):
    """SIGINT finishes the current step, checkpoints, returns; --resume then reproduces the straight run."""
    ref, _ = straight
    tables = load_run_file(write_config(tmp_path / "r.toml", corpus, tmp_path / "out", max_steps=20))

    class Interrupted(Trainer):
        def train_step(self, step):
            result = super().train_step(step)
            if step == 6:
                os.kill(os.getpid(), signal.SIGINT)
            return result

    plan = plan_run(tables)
    summary = Interrupted(plan).fit()
    assert summary["step"] == 7 and not summary["finished"]
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [7]
    plan = plan_run(tables, resume=True)
    trainer = Trainer(plan)
    assert trainer.fit()["finished"]
    for k, v in ref.raw.state_dict().items():  # bitwise: deterministic resume (same data, RNG, optimizer state)
        assert torch.equal(trainer.raw.state_dict()[k], v), k


def test_resume_of_a_run_killed_before_its_final_evaluation_completes_it(corpus, tmp_path, capsys):
    """Killed after the final checkpoint (step 10) but before the final evaluation: `--resume` evaluates the final
    weights, logs the missing row and prints the true val_loss (it printed the stale one and wrote nothing)."""
    cfg = write_config(tmp_path / "r.toml", corpus, tmp_path / "out", max_steps=10, checkpoint_every=5, eval_every=4)
    rc, stdout, err = cli(capsys, "--config", cfg)
    assert rc == 0, err
    metrics = tmp_path / "out" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    final = json.loads(lines[-1])
    assert final["kind"] == "eval" and final["step"] == 10
    metrics.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:7])  # the row never written, a torn line instead
    stale = json.loads((latest_checkpoint(tmp_path / "out") / "train_state.json").read_text()).get("val_loss")
    assert stale == final["val_loss"]  # the final checkpoint is written after the final evaluation (not step 8's)
    rc, stdout, err = cli(capsys, "--config", cfg, "--resume")
    assert rc == 0, err
    assert f"val_loss {final['val_loss']:.4f}" in stdout
    evals = read_metrics(tmp_path / "out", "eval")
    assert [r["step"] for r in evals] == [0, 4, 8, 10] and evals[-1]["val_loss"] == pytest.approx(final["val_loss"])
    rc, stdout2, _ = cli(capsys, "--config", cfg, "--resume")  # complete now: nothing more is written
    assert rc == 0 and read_metrics(tmp_path / "out", "eval") == evals


def test_ctrl_c_on_the_command_line_saves_and_exits_130(corpus, tmp_path):
    """Ctrl-C (SIGINT) under `diffattn train`: the step finishes, a checkpoint is written, and the exit status is
    130 as shells expect (it was 0)."""
    import subprocess
    import sys
    import time

    cfg = write_config(tmp_path / "r.toml", corpus, tmp_path / "out", max_steps=100000, checkpoint_every=0,
                       log_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "diffattn.cli", "train", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT (continue with --resume)" in out and "Traceback" not in err
    assert "\r" not in err and "step/s" not in err  # no progress bar when stderr is not a terminal
    assert list_checkpoints(tmp_path / "out")


def test_activation_checkpointing_gives_the_same_step(corpus, tmp_path):
    tables = load_run_file(write_config(tmp_path / "r.toml", corpus, tmp_path / "o", max_steps=5), ["grad_accum=2"])
    plan = plan_run(tables)
    a = Trainer(plan)
    b = Trainer(plan.with_train(activation_checkpointing=True))
    for step in range(2):
        ra, rb = a.train_step(step), b.train_step(step)
        # bitwise: checkpointing recomputes the same forward with the same kernels on the same tensors
        assert torch.equal(ra.loss, rb.loss) and torch.equal(ra.grad_norm, rb.grad_norm)
    for (k, pa), pb in zip(a.raw.named_parameters(), b.raw.parameters()):
        assert torch.equal(pa, pb), k
    assert set(a.raw.state_dict()) == set(b.raw.state_dict())  # parameter names unchanged


def test_flops_per_token_standard_is_palm():
    cfg = ModelConfig(vocab_size=100, d_model=64, n_layer=3, n_head=4, max_seq_len=128)
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters()) - 100 * 64  # without the embedding lookup
    assert flops_per_token(model, cfg, 128) == 6 * n + 12 * 3 * 4 * 16 * 128  # 6N + 12·L·H·d·T


def test_save_checkpoint_is_atomic_and_prunes(tmp_path):
    cfg = ModelConfig(vocab_size=16, d_model=16, n_layer=1, n_head=2, max_seq_len=8)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    from diffattn.train.distributed import full_model_state, full_optimizer_state

    kwargs = dict(model_config=cfg, model_state=full_model_state(model),
                  optimizer_state=full_optimizer_state(model, opt), train_state={"tokens": 0}, keep=2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, **kwargs)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]

    bad = dict(kwargs, train_state={"tokens": object()})  # not JSON-serialisable: fails mid-write
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 4, **bad)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    # an incomplete directory (e.g. copied by hand) is never taken for a checkpoint
    partial = tmp_path / "checkpoints" / "step-000009"
    shutil.copytree(tmp_path / "checkpoints" / "step-000003", partial)
    (partial / "train_state.json").unlink()
    assert latest_checkpoint(tmp_path).name == "step-000003"


# ---------------------------------------------------------------------- bad input
BAD_INPUTS = [
    # (id, extra train keys or None, --set items, extra CLI args, expected text in the one-line error)
    ("unknown key", {"lrr": 1e-3}, [], [], "unknown key 'lrr' (did you mean 'lr'?)"),
    ("wrong type", {"lr": "fast"}, [], [], "TrainConfig.lr: must be a finite number"),
    ("out of range", {}, ["train.warmup_steps=-5"], [], "TrainConfig.warmup_steps: must be in"),
    ("model out of range", {}, ["model.n_layer=0"], [], "ModelConfig.n_layer"),
    ("unknown model key", {}, ["model.n_layers=3"], [], "unknown key 'n_layers'"),
    ("missing data", {"data": "/nonexistent/shards"}, [], [], "data directory not found: /nonexistent/shards"),
    ("resume without checkpoint", {}, [], ["--resume"], "no complete checkpoint"),
    ("bad override", {}, ["train.lr"], [], "expected key=value"),
    ("not divisible", {"grad_accum": 3, "batch_size": 8}, [], [], "TrainConfig.grad_accum: must divide"),
    ("seq_len too long", {"seq_len": 65}, [], [], "max_seq_len=64"),
    ("small vocab", {}, ["model.vocab_size=10"], [], "ModelConfig.vocab_size: 10 is smaller"),
    ("stop at 0", {}, [], ["--stop-at-step", "0"], "--stop-at-step must be a positive"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, corpus, tmp_path, capsys):
    _, train, sets, args, expected = case
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", corpus, out, max_steps=5, **train)
    rc, stdout, err = cli(capsys, "--config", cfg, *[a for s in sets for a in ("--set", s)], *args)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("diffattn train: error: "), err
    assert expected in err, err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()


def test_bad_run_files(corpus, tmp_path, capsys):
    cases = [("[model]\n[optim]\nlr = 1\n", "unknown key 'optim'"), ("[train\n", "not valid TOML"),
             ("model = 3\n", "model must be a table")]
    for text, expected in cases:
        (tmp_path / "r.toml").write_text(text)
        rc, _, err = cli(capsys, "--config", tmp_path / "r.toml")
        assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = cli(capsys, "--config", tmp_path / "missing.toml")
    assert rc == 2 and "config file not found" in err


def test_existing_checkpoints_need_resume_and_the_same_model(straight, corpus, tmp_path, capsys):
    _, ref_out = straight
    before = sorted(p.name for p in (ref_out / "checkpoints").iterdir())
    cfg = write_config(tmp_path / "r.toml", corpus, ref_out, max_steps=20)
    rc, _, err = cli(capsys, "--config", cfg)
    assert rc == 2 and "already holds checkpoints" in err and "--resume" in err
    rc, _, err = cli(capsys, "--config", cfg, "--resume", "--set", "model.n_layer=3")
    assert rc == 2 and "model config differs" in err and "n_layer" in err
    assert sorted(p.name for p in (ref_out / "checkpoints").iterdir()) == before


def test_tensorboard_scalars_when_installed(corpus, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tables = load_run_file(write_config(tmp_path / "r.toml", corpus, tmp_path / "o", max_steps=10))
    train(tables)
    events = EventAccumulator(str(tmp_path / "o" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "eval/val_loss", "lambda/layer_0", "lambda/layer_1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/val_loss")] == [r["step"] for r in read_metrics(tmp_path / "o", "eval")]


@pytest.mark.slow
def test_compiled_training_matches_eager(corpus, tmp_path):
    """torch.compile (per block) and activation checkpointing change the numerics at most slightly."""
    tables = load_run_file(write_config(tmp_path / "r.toml", corpus, tmp_path / "o", max_steps=3))
    plan = plan_run(tables)
    eager = Trainer(plan)
    compiled = Trainer(plan.with_train(compile=True, activation_checkpointing=True))
    for step in range(3):
        a, b = eager.train_step(step), compiled.train_step(step)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)
    for (k, pa), pb in zip(eager.raw.named_parameters(), compiled.raw.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_resume_of_a_finished_run_reports_its_final_evaluation(corpus, tmp_path, capsys):
    """The last checkpoint step is also an evaluation step of neither schedule (eval_every=15): the message of
    --resume is the final evaluation, the record metrics.jsonl has, not the step-15 one."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "r.toml", corpus, out, max_steps=20, checkpoint_every=10, eval_every=15)
    rc, stdout, err = cli(capsys, "--config", cfg)
    assert rc == 0, err
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 15, 20] and f"{evals[-1]['val_loss']:.4f}" != f"{evals[1]['val_loss']:.4f}"
    final = f"finished at step 20 ({20 * 8 * 32:,} tokens), val_loss {evals[-1]['val_loss']:.4f}"
    assert final in stdout
    # the final checkpoint was written after the final evaluation and carries it
    _, _, _, state = load_checkpoint(latest_checkpoint(out))
    assert state["val_loss"] == evals[-1]["val_loss"]
    rc, stdout, err = cli(capsys, "--config", cfg, "--resume")
    assert rc == 0 and final in stdout, (stdout, err)
    assert len(read_metrics(out, "eval")) == 3  # nothing re-evaluated


def test_progress_lines_when_stderr_is_not_a_terminal(corpus, tmp_path, capsys):
    """`diffattn train ... > log 2>&1`: no bar (not a terminal) but one plain line per log_every steps (step, loss,
    tokens/s, λ summary, ETA) and one per phase (loading, each evaluation) with its duration."""
    import re

    cfg = write_config(tmp_path / "r.toml", corpus, tmp_path / "out", max_steps=20, progress=True)
    rc, stdout, err = cli(capsys, "--config", cfg)
    assert rc == 0 and "finished at step 20" in stdout
    lines = err.splitlines()
    steps = [line for line in lines if line.startswith("train diff_v1: step ")]
    assert [int(re.search(r"step (\d+)/20", line).group(1)) for line in steps] == [5, 10, 15, 20]
    pattern = r"train diff_v1: step \d+/20 loss \d+\.\d{4} [\d,]+ tok/s λ \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]"
    assert all(re.match(pattern, line) for line in steps), steps
    assert all(" eta " in line for line in steps[:-1]) and " eta " not in steps[-1]
    train = read_metrics(tmp_path / "out", "train")
    assert f"loss {train[1]['loss']:.4f}" in steps[1]  # the line says what metrics.jsonl says
    assert re.match(r"loading: \d+\.\d s \(new, [\d,]+ parameters\)$", lines[1]), lines[:2]
    evals = [line for line in lines if line.startswith("evaluation at step")]
    assert [line.split()[3].rstrip(":") for line in evals] == ["0", "10", "20"]
    assert all(re.search(r"val_loss \d+\.\d{4} \(\d+\.\d s\)$", line) for line in evals)
    assert "\r" not in err and "it/s" not in err  # no progress bar in a file
    # progress = false: the header and the last line only
    cfg = write_config(tmp_path / "q.toml", corpus, tmp_path / "quiet", max_steps=10)
    rc, stdout, err = cli(capsys, "--config", cfg)
    assert rc == 0 and len(err.splitlines()) == 1 and err.startswith("diffattn train:")
