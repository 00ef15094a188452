"""The README's examples point at things that exist: linked files, config files, and the checkpoint paths its
training commands produce (issue #18: an export example read `runs/tiny-standard` while the training example
wrote `runs/tiny-std`, and `step-001000` never existed). No network, nothing is run."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_links_point_inside_the_repository_and_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert links
    for link in links:
        if link.startswith("http"):
            continue
        assert not link.startswith(".."), f"README links outside the repository: {link}"
        assert (ROOT / link).exists(), f"README links a missing file: {link}"


def test_config_files_exist():
    for path in set(re.findall(r"configs/[\w.-]+\.toml", README)):
        assert (ROOT / path).is_file(), path


def test_checkpoint_paths_are_ones_the_training_examples_write():
    """Each runs/NAME/checkpoints/step-N of an example is written by a README training command: NAME is a
    configs/train-*.toml `out` (or a `--set train.out=` of a README command) and N a checkpoint of that run."""
    runs = {}
    for cfg in (ROOT / "configs").glob("train-*.toml"):
        train = tomllib.loads(cfg.read_text())["train"]
        runs[train["out"]] = (cfg, train)
    for line in README.splitlines():
        m = re.search(r"--config (configs/train-[\w.-]+\.toml).*--set train\.out=(runs/[\w.-]+)", line)
        if m:
            runs[m.group(2)] = (ROOT / m.group(1), tomllib.loads((ROOT / m.group(1)).read_text())["train"])
    paths = set(re.findall(r"(runs/[\w.-]+)/checkpoints/step-(\d+)", README))
    assert paths
    for out, step in paths:
        assert out in runs, f"README uses {out}, which no README training command writes"
        train = runs[out][1]
        step = int(step)
        assert step <= train["max_steps"] and (step % train["checkpoint_every"] == 0 or step == train["max_steps"]), \
            f"{out}: step {step} is not a checkpoint of {runs[out][0].name}"
