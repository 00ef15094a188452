"""A bidirectional Transformer encoder with each attention variant, via ``diffattn.nn`` (issue #17; docs/nn.md).

Task: topic classification of BBC News articles (5 topics, 2,225 articles, Greene & Cunningham 2006; the
offline registry source ``bbc``), from the first 128 words of the body. Model: word embeddings + learned
positions -> ``torch.nn.TransformerEncoder`` (2 layers, width 96, 6 standard heads of 16, FFN 192, pre-norm) -> mean
pool -> linear. The standard encoder's ``nn.MultiheadAttention`` modules are swapped with
``diffattn.nn.replace_attention`` for each variant: parameter-matched layers, everything else identical (the
same data split, batches and initial non-attention weights per seed).

    python examples/encoder_classification.py                       # 4 variants x 3 seeds, a few minutes on CPU
    python examples/encoder_classification.py --seeds 1 --epochs 1   # a quick look
    python examples/encoder_classification.py --json out.json        # also write every number

Prints test accuracy per variant and seed, and the mean ± sample std over seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter

import torch
from torch import nn

from diffattn import nn as dnn
from diffattn.eval.datasets import bbc_items

VARIANTS = ("standard", "diff_v1", "diff_v2", "shared_diff")


def load_data(max_words: int, vocab_size: int, seed: int = 0):
    """(train, test) lists of (token ids, label), the vocabulary built on the training split only (80/20 split)."""
    items = sorted(bbc_items(), key=lambda it: (it["topic"], it["body"][:64]))
    rng = random.Random(seed)
    rng.shuffle(items)
    topics = sorted({it["topic"] for it in items})
    cut = int(0.8 * len(items))
    words = lambda text: text.lower().split()[:max_words]  # noqa: E731
    counts = Counter(w for it in items[:cut] for w in words(it["body"]))
    vocab = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(vocab_size - 2))}  # 0 pad, 1 unknown

    def encode(it):
        return [vocab.get(w, 1) for w in words(it["body"])], topics.index(it["topic"])

    return [encode(it) for it in items[:cut]], [encode(it) for it in items[cut:]], topics


def batches(data, batch_size: int, max_words: int, rng: random.Random | None):
    order = list(range(len(data)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i:i + batch_size]]
        ids = torch.zeros(len(chunk), max_words, dtype=torch.long)
        for r, (toks, _) in enumerate(chunk):
            ids[r, :len(toks)] = torch.tensor(toks)
        yield ids, torch.tensor([label for _, label in chunk])


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, n_classes: int, max_words: int, width: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_words, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, n_classes)

    def forward(self, ids):
        pad = ids == 0
        h = self.encoder(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))


def run(variant: str, seed: int, train, test, n_classes: int, args) -> dict:
    torch.manual_seed(seed)
    model = Encoder(args.vocab_size, n_classes, args.max_words, args.width, args.heads, args.layers)
    torch.manual_seed(seed + 1000)  # the swapped attention layers' init does not shift the others'
    replaced = dnn.replace_attention(model, variant)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * ((len(train) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    t0 = time.time()
    model.train()
    for _ in range(args.epochs):
        for ids, labels in batches(train, args.batch_size, args.max_words, rng):
            loss = nn.functional.cross_entropy(model(ids), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, labels in batches(test, 256, args.max_words, None):
            correct += int((model(ids).argmax(-1) == labels).sum())
    return {"variant": variant, "seed": seed, "accuracy": correct / len(test), "params": params,
            "attention_layers": len(replaced), "train_s": round(time.time() - t0, 1), "final_loss": float(loss.detach())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-words", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--heads", type=int, default=6, help="heads of the standard encoder (matched layers follow)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    train, test, topics = load_data(args.max_words, args.vocab_size)
    print(f"BBC News topics ({len(topics)}): {len(train)} train / {len(test)} test articles, first {args.max_words} "
          f"words; {args.seeds} seed(s) x {args.epochs} epoch(s)", file=sys.stderr)
    results = []
    for variant in args.variants.split(","):
        for seed in range(args.seeds):
            r = run(variant, seed, train, test, len(topics), args)
            results.append(r)
            print(f"{variant:12s} seed {seed}: accuracy {r['accuracy']:.4f} ({r['params']:,} params, "
                  f"{r['train_s']:.0f} s)", flush=True)
    print()
    print(f"{'variant':12s} {'params':>9s} {'test accuracy (mean ± std over seeds)':>40s}")
    summary = {}
    for variant in args.variants.split(","):
        accs = [r["accuracy"] for r in results if r["variant"] == variant]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary[variant] = {"mean": statistics.mean(accs), "std": sd, "accuracies": accs}
        params = next(r["params"] for r in results if r["variant"] == variant)
        print(f"{variant:12s} {params:>9,} {statistics.mean(accs):>32.4f} ± {sd:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary,
                       "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
