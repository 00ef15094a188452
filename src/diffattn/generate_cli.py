"""``diffattn generate``: decode text from a model directory with the KV cache.

Works on diffattn model directories (``config.json`` with ``model_type: "diffattn"`` +
``tokenizer.json``) and on any Hugging Face causal LM directory (through transformers' own
``generate``; remote code is never trusted implicitly).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .fsutil import read_json
from .utils.errors import check_text


def _load_tokenizer(directory: Path):
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory} (needed to encode the prompt)")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type on malformed files
        raise ValueError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def _stop_ids(tokenizer, names: list[str]) -> list[int]:
    ids = []
    for name in names:
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            ids.append(tid)
    return ids


def run(args: argparse.Namespace) -> int:
    directory = Path(args.model)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a model directory (no config.json)")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (args.temperature >= 0 and args.temperature != float("inf")):  # also refuses NaN
        raise ValueError(f"temperature must be a finite number >= 0, got {args.temperature} (--temperature)")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {args.top_k} (--top-k)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {args.top_p} (--top-p)")
    check_text(args.prompt, "--prompt")
    data = read_json(directory / "config.json")  # invalid JSON: one line naming the file
    if not isinstance(data, dict):
        raise ValueError(f"{directory / 'config.json'}: expected a JSON object, got {type(data).__name__}")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if data.get("model_type") == "diffattn":
        from .checkpoint import load_model

        model = load_model(directory)
        tok = _load_tokenizer(directory)
        ids = tok.encode(args.prompt).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if len(ids) + args.max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                             f"model's max_seq_len {model.config.max_seq_len}")
        stop = _stop_ids(tok, args.stop or ["<|endoftext|>"])
        out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, stop_tokens=stop, generator=gen)
        new = out[0, len(ids):].tolist()
        text = tok.decode(new)
    else:
        from .hf.precheck import check_hf_directory

        check_hf_directory(directory, data.get("model_type"))  # pickle-only or mislabelled weights: one line, now
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        enc = tok(args.prompt, return_tensors="pt")
        kw = dict(do_sample=args.temperature > 0, max_new_tokens=args.max_new_tokens)
        if args.temperature > 0:
            kw.update(temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0)
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        text = tok.decode(new, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "token_ids": new}))
    else:
        sys.stdout.write(args.prompt + text + "\n")
    return 0


DESCRIPTION = ("Decode a continuation of --prompt with the KV cache (greedy by default).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (diffattn checkpoint or Hugging Face causal LM)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TOKEN",
                   help="stop after this token string (repeatable; default: '<|endoftext|>' when the tokenizer has it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON with the completion and its token ids")
    p.set_defaults(func=run)
