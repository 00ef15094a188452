"""``recall``: a synthetic recall-with-distractors task (multi-query associative recall, after Zoology,
Arora et al. 2023), trained per variant and seed inside ``diffattn compare``.

A sequence is ``BOS | context of C slots | SEP | Q queries``:

* the context holds N key-value pairs at random slots, keys distinct within a sequence. With
  ``pair_tokens = 1`` each pair is **one** token id from a K×V pair vocabulary (retrieval is one
  attention hop from the query key to the pair token); with ``pair_tokens = 2`` a pair is a key token
  followed by a value token in two adjacent slots (Zoology's form, which needs an induction circuit);
* every other context slot is filler: tokens of its own vocabulary (``filler = "noise"``), or
  look-alike pairs whose key is none of the N keys and is never queried (``filler = "lookalike"``);
* each query is two tokens, ``key value``. Loss and accuracy count only the value predicted after
  the key. When N < Q the query block cycles through the N keys; only each key's first query is
  scored (a repeat could be copied from the query block). Chance is 1/V.

Difficulty grows with N: N−1 other pairs compete for the query's attention (the distractors). Training
draws N per batch from ``train_n`` (default 2, 4, …, C/2); evaluation uses fresh sequences (another
random stream) for every N from 1 to C/2, with at least ``eval_queries`` scored queries per N.

Attention allocation: for every layer, at every scored query key position, the row of the effective
map (softmax map; DIFF: A1 − λ·A2, rows normalised to sum 1 as the attention-noise task does, or
``normalize = "abs"``) is split into the answer pair's slot(s), the other pairs' slots, the filler
slots and the rest (BOS, SEP, the query block), averaged over heads, then over queries.

Vocabulary (ids): 0 BOS, 1 SEP, then the K·V pair tokens (``pair_tokens = 1``), the filler vocabulary,
K key tokens and V value tokens. Everything is a pure function of (task, seed): the same seed gives the
same batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..model.loss import lm_loss
from ..variants import BASELINE
from .recall_records import (CATEGORIES, GATE_RULE, Gate, mean_accuracy, steps_or_budget,  # noqa: F401 (re-exported)
                             steps_to, validity_gate)

BOS, SEP = 0, 1
FILLERS = ("noise", "lookalike")
NORMALIZATIONS = ("sum", "abs")
# slot kinds in RecallBatch.kind
REST, PAIR, FILL = 0, 1, 2


@dataclass(frozen=True, kw_only=True)
class RecallTask:
    """The task's shape. See the module docstring for the sequence layout."""

    keys: int = 32  # K: key vocabulary (≥ C/2, and > C/2 for look-alike filler)
    values: int = 16  # V: value vocabulary; chance accuracy is 1/V
    context: int = 32  # C: context slots
    queries: int = 8  # Q: queries per sequence
    pair_tokens: int = 1  # 1: one token per pair (K·V pair vocabulary); 2: key token + value token
    filler: str = "noise"  # "noise" (own vocabulary) or "lookalike" (pairs whose key is never queried)
    filler_vocab: int = 64  # size of the noise filler vocabulary

    def __post_init__(self):
        def bad(name, msg):
            raise ValueError(f"{name}: {msg}")

        for name in ("keys", "values", "context", "queries", "filler_vocab"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, f"must be an integer >= 1, got {v!r}")
        if self.pair_tokens not in (1, 2):
            bad("pair_tokens", f"must be 1 or 2, got {self.pair_tokens!r}")
        if self.filler not in FILLERS:
            bad("filler", f"must be one of {', '.join(FILLERS)}, got {self.filler!r}")
        if self.context < 2 or self.context % 2:
            bad("context", f"must be an even integer >= 2 (N goes up to C/2), got {self.context}")
        if self.keys < self.max_n + (self.filler == "lookalike"):
            need = self.max_n + (self.filler == "lookalike")
            bad("keys", f"must be >= {need} (C/2 distinct keys{' + 1 look-alike key' if need > self.max_n else ''}), "
                        f"got {self.keys}")
        if self.values < 2:
            bad("values", f"must be >= 2, got {self.values}")

    # ---------------------------------------------------------------- layout
    @property
    def max_n(self) -> int:
        return self.context // 2

    @property
    def seq_len(self) -> int:
        return 2 + self.context + 2 * self.queries

    @property
    def pair_base(self) -> int:
        return 2

    @property
    def filler_base(self) -> int:
        return self.pair_base + (self.keys * self.values if self.pair_tokens == 1 else 0)

    @property
    def key_base(self) -> int:
        return self.filler_base + (self.filler_vocab if self.filler == "noise" else 0)

    @property
    def value_base(self) -> int:
        return self.key_base + self.keys

    @property
    def vocab_size(self) -> int:
        return self.value_base + self.values

    def pair_id(self, k, v):
        return self.pair_base + k * self.values + v


@dataclass
class RecallBatch:
    ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) value token id at scored query-key positions, −100 elsewhere
    kind: torch.Tensor  # (B, T) REST / PAIR / FILL of every position (the context slots' contents)
    answer: torch.Tensor  # (B, T, T) bool: for a scored query position p, the answer pair's slot(s)
    n: int
    keys: np.ndarray  # (B, N) the pairs' keys (tests)
    values: np.ndarray  # (B, N) their values
    queried: np.ndarray  # (B, Q) the queried key of each query


def make_batch(task: RecallTask, rng: np.random.Generator, batch: int, n: int) -> RecallBatch:
    """``batch`` sequences with ``n`` key-value pairs each (one draw of ``rng``)."""
    if not 1 <= n <= task.max_n:
        raise ValueError(f"n must be in [1, {task.max_n}] (C/2), got {n}")
    C, Q, K, V = task.context, task.queries, task.keys, task.values
    T = task.seq_len
    ids = np.zeros((batch, T), dtype=np.int64)
    kind = np.zeros((batch, T), dtype=np.int64)
    targets = np.full((batch, T), -100, dtype=np.int64)
    answer = np.zeros((batch, T, T), dtype=bool)
    keys = np.zeros((batch, n), dtype=np.int64)
    values = rng.integers(0, V, size=(batch, n))
    queried = np.zeros((batch, Q), dtype=np.int64)
    ids[:, 0], ids[:, 1 + C] = BOS, SEP
    ctx = 1  # first context position
    width = task.pair_tokens
    cells = C // width  # slots a pair can start at (aligned cells of `width` slots)
    for b in range(batch):
        perm = rng.permutation(K)
        keys[b] = perm[:n]
        spare = perm[n:]  # keys that no pair of this sequence holds: look-alike filler only
        where = np.sort(rng.choice(cells, size=n, replace=False))  # cell of each pair
        pos_of = {}  # key -> its slot positions
        used = np.zeros(C, dtype=bool)
        for i, c in enumerate(where):
            s = ctx + c * width
            if width == 1:
                ids[b, s] = task.pair_id(keys[b, i], values[b, i])
                pos_of[int(keys[b, i])] = [s]
            else:
                ids[b, s], ids[b, s + 1] = task.key_base + keys[b, i], task.value_base + values[b, i]
                pos_of[int(keys[b, i])] = [s, s + 1]
            used[c * width:(c + 1) * width] = True
            kind[b, s:s + width] = PAIR
        free = np.flatnonzero(~used)
        kind[b, ctx + free] = FILL
        if task.filler == "noise":
            ids[b, ctx + free] = task.filler_base + rng.integers(0, task.filler_vocab, size=len(free))
        else:  # look-alike pairs with keys outside this sequence's N keys (never queried)
            fk = spare[rng.integers(0, len(spare), size=len(free))]
            fv = rng.integers(0, V, size=len(free))
            if width == 1:
                ids[b, ctx + free] = task.pair_id(fk, fv)
            else:  # alternate key/value tokens slot by slot (a look-alike may straddle two cells)
                ids[b, ctx + free] = np.where(free % 2 == 0, task.key_base + fk, task.value_base + fv)
        # queries: the N keys in random order, cycled when N < Q; only first occurrences are scored
        order = rng.permutation(n)
        qk = np.resize(order, Q)
        queried[b] = keys[b, qk]
        q0 = 2 + C
        for j in range(Q):
            p = q0 + 2 * j
            ids[b, p], ids[b, p + 1] = task.key_base + keys[b, qk[j]], task.value_base + values[b, qk[j]]
            if j < n:  # the first min(N, Q) queries are the distinct keys
                targets[b, p] = task.value_base + values[b, qk[j]]
                answer[b, p, pos_of[int(keys[b, qk[j]])]] = True
    return RecallBatch(torch.from_numpy(ids), torch.from_numpy(targets), torch.from_numpy(kind),
                       torch.from_numpy(answer), n, keys, values, queried)


# ---------------------------------------------------------------------------------- study options
@dataclass(frozen=True, kw_only=True)
class RecallStudyOptions:
    """The ``[recall]`` table of a compare preset: the task, its baseline model shape and its schedule."""

    seeds: int | list[int] = 3
    task: RecallTask = field(default_factory=RecallTask)
    # the baseline Transformer (variants parameter-matched with presets.matched, like the LM)
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 6
    head_dim: int = 16
    ffn_hidden: int = 192
    # training: AdamW, linear warm-up then cosine to lr/10, N drawn per batch from train_n
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    train_n: list[int] | None = None  # default 2, 4, …, C/2
    eval_queries: int = 512  # at least this many scored queries for every N in 1..C/2
    # learning curves: accuracy at N = 1, C/4 and C/2 on a small fixed evaluation set (its own random
    # stream), measured every steps/curve_points steps; it does not touch training (same model either way)
    curve_points: int = 10
    curve_queries: int = 256  # scored queries per N at each curve point
    # the validity gate and the learning-speed threshold: a recall verdict needs the baseline's median
    # N = 1 accuracy over seeds >= competence; steps to reach `competence` at N = C/4 is the speed metric
    competence: float = 0.9
    normalize: str = "sum"  # signed DIFF rows: divide by the row sum (as attention-noise) or by Σ|a|
    workers: int = 0  # processes for the runs (one thread each); 0: one per CPU core, at most 4

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def train_ns(self) -> list[int]:
        return list(self.train_n) if self.train_n else list(range(2, self.task.max_n + 1, 2))

    @property
    def curve_ns(self) -> list[int]:
        """The N of the learning curves: 1, C/4 (the speed metric's) and C/2, without repeats."""
        return sorted({1, max(1, self.task.max_n // 2), self.task.max_n})

    @property
    def speed_n(self) -> int:
        """N = C/4: where steps-to-competence is measured."""
        return max(1, self.task.max_n // 2)

    @property
    def curve_steps(self) -> list[int]:
        """The training steps after which the curve is measured (evenly spaced, the last one = steps; at most
        one point per step)."""
        points = min(self.curve_points, self.steps)
        return sorted({round(k * self.steps / points) for k in range(1, points + 1)})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "RecallStudyOptions":
        task_keys = {f.name for f in fields(RecallTask)}
        own = {f.name for f in fields(cls)} - {"task"}
        unknown = sorted(set(data) - task_keys - own)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(task_keys | own))}")
        task = RecallTask(**{k: v for k, v in data.items() if k in task_keys})
        opts = cls(task=task, **{k: v for k, v in data.items() if k in own})
        opts.check()
        return opts

    def check(self) -> None:
        s = self.seeds
        if isinstance(s, bool) or not (isinstance(s, int) and 1 <= s <= 100 or isinstance(s, list) and s and all(
                isinstance(x, int) and not isinstance(x, bool) for x in s)):
            raise ValueError(f"seeds must be a count in [1, 100] or a list of integers, got {s!r}")
        for name in ("d_model", "n_layer", "n_head", "head_dim", "ffn_hidden", "steps", "batch_size", "eval_queries",
                     "curve_points", "curve_queries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        c = self.competence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ValueError(f"competence must be a number in (0, 1], got {c!r}")
        for name in ("warmup_steps", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                    name == "lr" and v == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        if self.train_n is not None:
            if not isinstance(self.train_n, list) or not self.train_n or any(
                    isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.task.max_n for n in self.train_n):
                raise ValueError(f"train_n must be a list of integers in [1, {self.task.max_n}] (C/2), got "
                                 f"{self.train_n!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        self.baseline()  # the shape must build (and be matchable: n_head a multiple of 6 covers every variant)

    def baseline(self, **extra):
        """The baseline Transformer of the task (``extra``: other ModelConfig fields, e.g. the study's init)."""
        from ..config import ModelConfig

        return ModelConfig(attention=BASELINE, vocab_size=self.task.vocab_size, d_model=self.d_model,
                           n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim, ffn_hidden=self.ffn_hidden,
                           max_seq_len=self.task.seq_len, **extra)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("task"))
        return d


# ---------------------------------------------------------------------------------- train + evaluate
def _lr_at(step: int, opts: RecallStudyOptions) -> float:
    """Warm-up, then cosine to 10 % of the peak, the floor as a ratio of the peak (train/schedule.py)."""
    from ..train.schedule import lr_at

    return lr_at(step, lr=opts.lr, warmup_steps=opts.warmup_steps, total_steps=opts.steps, min_ratio=0.1)


def recall_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return lm_loss(logits, targets)  # unscored positions carry the target -100


def curve_sets(opts: RecallStudyOptions, seed: int) -> dict[int, list[RecallBatch]]:
    """The fixed evaluation batches of the learning curve, per N (random stream [seed, 3], apart from
    training [seed, 1] and the final evaluation [seed, 2])."""
    rng = np.random.default_rng([seed, 3])
    sets = {}
    for n in opts.curve_ns:
        n_seq = math.ceil(opts.curve_queries / min(n, opts.task.queries))
        sets[n] = [make_batch(opts.task, rng, min(64, n_seq - s), n) for s in range(0, n_seq, 64)]
    return sets


@torch.no_grad()
def batches_accuracy(model, batches: list[RecallBatch]) -> float:
    correct = total = 0
    for batch in batches:
        sel = batch.targets >= 0
        pred = model(batch.ids)[sel].argmax(-1)
        correct += int((pred == batch.targets[sel]).sum())
        total += int(sel.sum())
    return correct / total


def train_model(config, opts: RecallStudyOptions, seed: int, log: Callable[[str], None] | None = None,
                curve: dict | None = None):
    """Train one model on the task; returns (model, per-step losses). Deterministic in (config, opts, seed).

    ``curve``: a dict to fill with the learning curve (``steps`` and ``accuracy`` per N of ``curve_ns``),
    measured in eval mode under no_grad on fixed batches: it draws no random number the training uses, so the
    trained model is the same with or without it."""
    from ..model import build_model
    from ..train.optim import param_groups

    torch.manual_seed(seed)
    model = build_model(config).train()
    opt = torch.optim.AdamW(param_groups(model, weight_decay=opts.weight_decay), lr=opts.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng([seed, 1])  # the training stream; evaluation uses [seed, 2]
    ns = opts.train_ns
    losses = []
    sets = curve_sets(opts, seed) if curve is not None else None
    at = set(opts.curve_steps)
    if curve is not None:
        curve.update(steps=[], accuracy={str(n): [] for n in sets})
    for step in range(opts.steps):
        n = ns[int(rng.integers(0, len(ns)))]
        batch = make_batch(opts.task, rng, opts.batch_size, n)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, opts)
        loss = recall_loss(model(batch.ids), batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        opt.step()
        losses.append(loss.item())
        if curve is not None and step + 1 in at:
            model.eval()
            curve["steps"].append(step + 1)
            for n, batches in sets.items():
                curve["accuracy"][str(n)].append(batches_accuracy(model, batches))
            model.train()
    return model.eval(), losses


def _shares(maps, batch: RecallBatch, normalize: str) -> dict[str, list[float]]:
    """Per layer, the mean share of each category at the scored query positions (see the module doc)."""
    bidx, pos = torch.nonzero(batch.targets >= 0, as_tuple=True)
    kind = batch.kind[bidx]  # (M, T)
    ans = batch.answer[bidx, pos]  # (M, T)
    masks = {"answer": ans, "other_pairs": (kind == PAIR) & ~ans, "filler": kind == FILL}
    masks["rest"] = ~(masks["answer"] | masks["other_pairs"] | masks["filler"])
    out = {c: [] for c in CATEGORIES}
    for m in maps:
        rows = m.effective[bidx, :, pos].double()  # (M, H, S)
        denom = rows.sum(-1, keepdim=True) if normalize == "sum" else rows.abs().sum(-1, keepdim=True)
        rows = rows / torch.where(denom.abs() < 1e-12, torch.ones_like(denom), denom)
        for c in CATEGORIES:
            out[c].append(float((rows * masks[c][:, None, :]).sum(-1).mean()))
    return out


@torch.no_grad()
def evaluate_model(model, opts: RecallStudyOptions, seed: int) -> dict[str, Any]:
    """Accuracy (and loss) for every N in 1..C/2 on fresh sequences; attention shares per layer and N."""
    task = opts.task
    rng = np.random.default_rng([seed, 2])
    eager = model
    if model.config.kernel != "eager":  # the maps need the eager kernel: the same weights in an eager model
        from ..model import build_model

        eager = build_model(model.config.replace(kernel="eager"))
        eager.load_state_dict(model.state_dict())
        eager.eval()
    by_n = []
    for n in range(1, task.max_n + 1):
        scored = min(n, task.queries)
        n_seq = math.ceil(opts.eval_queries / scored)
        correct = total = 0
        loss_sum = 0.0
        shares_acc = None
        for start in range(0, n_seq, 64):
            batch = make_batch(task, rng, min(64, n_seq - start), n)
            logits, maps = eager(batch.ids, return_maps=True)
            sel = batch.targets >= 0
            pred = logits[sel].argmax(-1)
            correct += int((pred == batch.targets[sel]).sum())
            total += int(sel.sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits[sel].float(), batch.targets[sel], reduction="sum"))
            sh = _shares(maps, batch, opts.normalize)
            w = int(sel.sum())
            if shares_acc is None:
                shares_acc = {c: [x * w for x in v] for c, v in sh.items()}
            else:
                for c, v in sh.items():
                    shares_acc[c] = [a + x * w for a, x in zip(shares_acc[c], v)]
        by_n.append({"n": n, "queries": total, "accuracy": correct / total, "loss": loss_sum / total,
                     "shares": {c: [x / total for x in v] for c, v in shares_acc.items()}})
    return {"by_n": by_n, "chance": 1.0 / task.values}


def run_one(config, opts: RecallStudyOptions, seed: int) -> dict[str, Any]:
    """Train and evaluate one (variant config, seed): the record compare stores."""
    t0 = time.time()
    curve: dict = {}
    model, losses = train_model(config, opts, seed, curve=curve)
    t1 = time.time()
    ev = evaluate_model(model, opts, seed)
    ev.update(train_loss=losses, curve=curve, train_s=t1 - t0, eval_s=time.time() - t1,
              params=sum(p.numel() for p in model.parameters()))
    return ev


__all__ = ["RecallTask", "RecallBatch", "RecallStudyOptions", "make_batch", "train_model", "evaluate_model",
           "run_one", "mean_accuracy", "steps_to", "steps_or_budget", "curve_sets", "validity_gate", "Gate", "GATE_RULE",
           "CATEGORIES"]
