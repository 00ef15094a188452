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
