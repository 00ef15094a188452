"""Helpers for the evaluation tests (no tests here): a tiny tokenizer trained on the spot, tiny
random diffattn / Hugging Face models saved to temporary directories, small local datasets, and
scripted mock adapters with known behaviour. Nothing touches the network."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from diffattn.eval.adapter import ModelAdapter


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and London is the capital of England.",
    "In 2004 the company reported that profits rose by 12 percent in March.",
    "Once upon a time there was a little girl who lived near the forest.",
    "The special magic number is a secret that nobody can remember easily.",
    "Scientists observed the planet through a large telescope at night.",
    "The team won the match after the striker scored two late goals.",
    "What is the special magic city number? Find it and memorize them.",
]


def train_tokenizer(path: Path) -> Path:
    """A byte-level BPE (any text encodes) with <|endoftext|>, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.save(str(path))
    return path


def make_diffattn(directory: Path, tokenizer_file: Path, attention: str = "diff_v1", max_seq_len: int = 256,
                  seed: int = 0) -> Path:
    import diffattn
    from diffattn.checkpoint import save_model
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    heads = 4 if attention == "standard" else 2
    # init="gpt2": the small logits the tasks' tolerances were set on (the N(0, 1)-embedding "torch" init is tested in test_recall)
    cfg = diffattn.ModelConfig(attention=attention, vocab_size=vocab, d_model=32, n_layer=2, n_head=heads,
                               max_seq_len=max_seq_len, init="gpt2")
    torch.manual_seed(seed)
    save_model(diffattn.build_model(cfg), directory, tokenizer_file=tokenizer_file)
    return directory


def _save_hf_tokenizer(directory: Path, tokenizer_file: Path, bos: bool) -> None:
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tokenizer_file))
    if bos:  # a Llama-style tokenizer that puts BOS in front of every text
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(directory)


def make_llama(directory: Path, tokenizer_file: Path, max_seq_len: int = 256, bos: bool = True) -> Path:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_seq_len)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    _save_hf_tokenizer(directory, tokenizer_file, bos)
    return directory


def make_difflama(directory: Path, tokenizer_file: Path, max_seq_len: int = 256) -> Path:
    from tokenizers import Tokenizer
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    torch.manual_seed(0)
    cfg = DiffLlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_seq_len)
    DiffLlamaForCausalLM(cfg).save_pretrained(directory)
    _save_hf_tokenizer(directory, tokenizer_file, bos=False)
    return directory


def write_docs(directory: Path, n: int = 4, words: int = 300) -> Path:
    """A folder of plain-text held-out documents."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = " ".join(SENTENCES).replace(".", "").replace("?", "").split()
    rng = random.Random(1)
    for i in range(n):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(words)) + ".\n")
    return directory


ICL_CLASSES = {"sport": ["The team won the match", "A striker scored a goal", "The coach praised the keeper"],
               "business": ["Shares rose on the market", "The company reported profits", "Oil prices fell"],
               "tech": ["A new phone was released", "The software update fixed bugs", "Chips got faster"]}


def write_icl_jsonl(path: Path, n: int = 40) -> Path:
    rng = random.Random(2)
    with open(path, "w") as f:
        for i in range(n):
            lab = sorted(ICL_CLASSES)[i % 3]
            f.write(json.dumps({"text": f"{rng.choice(ICL_CLASSES[lab])} number {i}", "label": lab}) + "\n")
    return path


GROUNDED = [
    ("London is the capital of England. It has about 9 million people and the River Thames.", "London capital"),
    ("Paris hosts the Louvre museum. Tourists visited it 10 million times in 2019.", "Louvre visitors"),
    ("The BBC reported that oil prices rose by 5 percent in Moscow on Monday.", "Oil prices rise"),
]


def write_grounded_jsonl(path: Path, qa: bool = False, n: int = 6) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            src, ref = GROUNDED[i % len(GROUNDED)]
            rec = {"source": src, "reference": ref}
            if qa:
                rec["question"] = "What is mentioned first?"
            f.write(json.dumps(rec) + "\n")
    return path


class ScriptedAdapter(ModelAdapter):
    """A mock model: ``respond(prompt_text) -> continuation text`` decides what greedy decoding says;
    ``score(prompt_ids) -> (V,) logits`` decides next-token logits (for constrained choice)."""

    kind = "mock"

    def __init__(self, tokenizer, respond=None, score=None, max_len: int = 4096, maps=None):
        super().__init__(max_len=max_len, vocab_size=tokenizer.vocab_size, n_layer=2, name="mock")
        self.tok = tokenizer
        self.respond = respond
        self.score = score
        self.maps = maps
        self.prompts: list[str] = []

    def greedy(self, prompt, max_new_tokens, stop_ids=()):
        text = self.tok.decode(list(prompt))
        self.prompts.append(text)
        return self.tok.encode(self.respond(text))[:max_new_tokens]

    def last_logits(self, ids):
        return torch.as_tensor(self.score(ids[0].tolist()), dtype=torch.float32)[None]

    def attention_maps(self, ids, last_rows=None):
        return self.maps(ids)


def needle_answers(prompt_text: str) -> tuple[str, dict[str, str]]:
    """(asked city, {city: number}) read off a needle prompt."""
    found = dict(re.findall(r"The special magic (.+?) number is: (\d+)", prompt_text))
    asked = re.findall(r"What is the special magic (.+?) number\?", prompt_text)[-1]
    return asked, found


def cli(argv: list[str], monkeypatch) -> int:
    """Run ``diffattn`` with only the eval sub-command registered (others' commands stay out)."""
    import diffattn.cli as c

    monkeypatch.setattr(c, "SUBCOMMANDS", {"eval": c.SUBCOMMANDS["eval"]})
    return c.main(argv)

