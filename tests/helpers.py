"""Shared helpers of the tests (no tests here). Test modules import them with ``from helpers import ...``:
pytest's default ("prepend") import mode puts tests/ (it has no __init__.py) on sys.path, as it does for
conftest.py; the subprocess of test_load_roundtrip.py runs in tests/.
No test module imports another one. Nothing here touches the network.

* shard directories and the tiny learnable training corpus: ``write_raw_shards`` (the shard contract written
  by hand), ``make_corpus``, ``write_config`` and its ``MODEL`` / ``TRAIN`` tables, ``VOCAB``;
* ``WORDS``, a word list for small local text corpora;
* ``tiny`` / ``randomized``: a tiny ModelConfig and non-trivial weights for checkpoint round trips;
* evaluation: a tiny tokenizer trained on the spot, tiny random diffattn / Hugging Face models saved to
  temporary directories, small local datasets, and scripted mock adapters with known behaviour.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from diffattn import ModelConfig
from diffattn.eval.adapter import ModelAdapter


# ------------------------------------------------------------------------ shards and the tiny training corpus
def write_raw_shards(d, train_parts, val_parts, *, vocab_size=300, eos_id=0, dtype="uint16"):
    """A shard directory written by hand from the contract (several files per split)."""
    d.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, parts in (("train", train_parts), ("val", val_parts)):
        entries = []
        for i, tokens in enumerate(parts):
            name = f"{split}-{i:05d}.bin"
            np.asarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tofile(d / name)
            entries.append({"file": name, "tokens": len(tokens), "sha256": "x"})
        splits[split] = entries
    index = {"format": "diffattn-shards-v1", "dtype": dtype, "vocab_size": vocab_size, "eos_id": eos_id,
             "tokenizer": "tokenizer.json", "content_hash": "h", "splits": splits,
             "documents": {"train": 1, "val": 1}, "sources": []}
    (d / "index.json").write_text(json.dumps(index))
    return d


VOCAB = 64  # <eos>=0, <unk>=1, words 2..63
SUBJECTS, OBJECTS, STOP = range(2, 12), range(22, 42), 63


def make_corpus(d: Path, n_train: int = 300, n_val: int = 30, seed: int = 0) -> Path:
    """A small local corpus with learnable structure, as a shard directory + word-level tokenizer.json.

    Each document is a run of sentences "S V O ." where the verb is determined by the subject
    (V = S + 10) and the object is random: a model that learns drives its loss well below ln(64)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    rng = random.Random(seed)

    def doc():
        out = []
        for _ in range(rng.randint(3, 8)):
            s = rng.choice(SUBJECTS)
            out += [s, s + 10, rng.choice(OBJECTS), STOP]
        return out + [0]  # each document followed by EOS

    train = [t for _ in range(n_train) for t in doc()]
    val = [t for _ in range(n_val) for t in doc()]
    write_raw_shards(d, [train], [val], vocab_size=VOCAB, eos_id=0)
    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    return d


MODEL = {"attention": "diff_v1", "d_model": 32, "n_layer": 2, "n_head": 2, "max_seq_len": 64}
TRAIN = {"seq_len": 32, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "eval_every": 10, "log_every": 5,
         "checkpoint_every": 10, "eval_tokens": 256, "progress": False}


def write_config(path: Path, data_dir: Path, out_dir: Path, model=None, **train) -> Path:
    def table(name, d):
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())

    text = table("model", MODEL if model is None else model) + "\n" + table(
        "train", {"data": str(data_dir), "out": str(out_dir), **TRAIN, **train})
    path.write_text(text)
    return path


# ------------------------------------------------------------------------ local text corpora
WORDS = ("the river ran past an old mill where children played until evening came and lamps were lit in every "
         "window of the quiet town while boats drifted slowly toward the harbour beyond hills across fields of "
         "wheat and barley under a grey sky that promised rain before night fell over the valley").split()


# ------------------------------------------------------------------------ checkpoint round trips
def tiny(attention="diff_v1", **kw):
    base = dict(attention=attention, vocab_size=97, d_model=32, n_layer=2, n_head=2, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def randomized(model):
    """Non-trivial values everywhere (λ vectors and norms included), so a wrong tensor changes the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


# ------------------------------------------------------------------------ evaluation
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


def greedy_margin(model, seq: torch.Tensor, start: int) -> float:
    """The smallest gap between the two largest logits at the greedy choices ``seq[:, start:]`` (one full forward,
    teacher-forced on ``seq``). Two computations whose logits differ by less than half this gap choose the same
    tokens, bit for bit, whatever CPU computed them: what lets a test compare greedy token ids exactly."""
    with torch.no_grad():
        top2 = model(seq)[:, start - 1:-1].topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def assert_same_outputs_and_grads(actual, expected, ids: torch.Tensor, *, out_tol: tuple[float, float],
                                  grad_tol: tuple[float, float]) -> None:
    """Two models with the same weights (e.g. two kernels) agree on ``ids`` within ``out_tol`` = (rtol, atol), and,
    after one backward pass of the same random cotangent through each, in every parameter gradient within
    ``grad_tol``."""
    out_a, out_e = actual(ids), expected(ids)
    torch.testing.assert_close(out_a, out_e, rtol=out_tol[0], atol=out_tol[1])
    g = torch.randn_like(out_e)
    (out_a * g).sum().backward()
    (out_e * g).sum().backward()
    for (name, pa), pe in zip(actual.named_parameters(), expected.parameters()):
        torch.testing.assert_close(pa.grad, pe.grad, rtol=grad_tol[0], atol=grad_tol[1], msg=name)
