"""``diffattn generate`` on a saved diffattn model directory with a real (tiny) tokenizer."""

import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

from diffattn import build_model, presets
from diffattn.checkpoint import save_model
from diffattn.cli import main


def make_model_dir(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(tmp_path / "tok.json"))
    torch.manual_seed(0)
    model = build_model(presets.get("tiny", "diff_v1", vocab_size=tok.get_vocab_size(), max_seq_len=64))
    save_model(model, tmp_path / "m", tokenizer_file=tmp_path / "tok.json")
    return model, tok, tmp_path / "m"


def test_generate_cli_matches_library_greedy(tmp_path, capsys):
    model, tok, d = make_model_dir(tmp_path)
    assert main(["generate", "--model", str(d), "--prompt", "the quick", "--max-new-tokens", "6", "--json",
                 "--stop", "nonexistent-token"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = tok.encode("the quick").ids
    expected = model.eval().generate(torch.tensor([ids]), 6)[0, len(ids):].tolist()
    assert out["token_ids"] == expected
    assert out["completion"] == tok.decode(expected)


def test_generate_cli_bad_input(tmp_path, capsys):
    _, _, d = make_model_dir(tmp_path)
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt", "the", "--max-new-tokens", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds the model's max_seq_len 64" in err[0]
    assert main(["generate", "--model", str(d), "--prompt", "the", "--max-new-tokens", "3", "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_generate_refuses_hostile_model_directories_with_one_line(tmp_path, capsys):
    """Issue #18: each case is one line naming the problem, exit 2, never a traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, d = make_model_dir(tmp_path)

    def case(name, edit):
        bad = tmp_path / name
        shutil.copytree(d, bad)
        edit(bad)
        rc = main(["generate", "--model", str(bad), "--prompt", "the", "--max-new-tokens", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
        return err[0]

    # config.json that is valid JSON but not an object
    assert "config.json: expected a JSON object, got list" in case("list", lambda p: (p / "config.json").write_text("[1]"))
    # invalid JSON names the file
    assert str(tmp_path / "broken" / "config.json") + ": not valid JSON" in case(
        "broken", lambda p: (p / "config.json").write_text("{nope"))

    # tensor shapes that do not match config.json name the tensor
    def reshape(p):
        tensors = load_file(str(p / "model.safetensors"))
        key = next(k for k in tensors if k.endswith("embed.weight"))
        tensors[key] = tensors[key][:, :-2].contiguous()
        save_file(tensors, str(p / "model.safetensors"), metadata={"format": "pt"})
    msg = case("shapes", reshape)
    assert "embed.weight" in msg and "weights do not match config.json" in msg


def test_generate_refuses_a_non_utf8_prompt(tmp_path):
    """A prompt that is not UTF-8 (arrives as lone surrogates) is one line and exit 2, before any model loads."""
    import subprocess
    import sys

    _, _, d = make_model_dir(tmp_path)
    proc = subprocess.run([sys.executable.encode(), b"-m", b"diffattn.cli", b"generate", b"--model", str(d).encode(),
                           b"--prompt", b"caf\xe9 \xff"], capture_output=True, timeout=120)
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 2 and err == ["diffattn generate: error: --prompt is not valid UTF-8 text"], err


def test_hf_directories_that_must_not_reach_transformers(tmp_path, capsys):
    """Pickle-only weights and diffattn weights labelled as another model_type are refused with one line before
    transformers' slow load, by `generate` and by the eval loader."""
    import shutil
    import time

    import pytest

    from diffattn.eval import load as load_eval

    _, _, d = make_model_dir(tmp_path)
    relabelled = tmp_path / "llama"
    shutil.copytree(d, relabelled)
    cfg = json.loads((relabelled / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    for directory, words in ((relabelled, "but the weights are a diffattn model's"), (pickled, "only pickle weights")):
        t0 = time.time()
        assert main(["generate", "--model", str(directory), "--prompt", "the", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and time.time() - t0 < 10, err
        with pytest.raises(ValueError, match=words):
            load_eval(directory)
