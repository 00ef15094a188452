"""``needle``: multi-needle retrieval (DIFF V1 §3.4, methods.md §5 P3; generator after the MSR
group's YOCO ``multi_needle.py``, rewritten).

Prompt (token ids of the model's own tokenizer; the tokenizer's BOS, if any, first)::

    There is a special magic number inside a lot of irrelevant text. Find it and memorize them. I will
    quiz you about the magic number there.
    <filler> \\nThe special magic {city} number is: {number}\\n <filler> ... <filler>
    \\nWhat is the special magic {city} number? The special magic {city} number is

* **Haystack**: held-out natural text (``--data``), encoded once into one token stream; each trial
  reads a contiguous run of it from a seeded random offset, cut into the segments between needles.
  Because the pieces are encoded separately and the filler is cut at token level, a prompt has
  **exactly** the requested number of tokens and every needle's token span is known.
* **Needles**: N cities sampled without replacement from a fixed list of distinct cities, numbers in
  [1, 50000] (YOCO), all distinct and none a substring of another (so a distractor's number can
  never count as the answer).
* **Placement**: the *pinned* answer needle sits after ``round(F·depth/100)`` of the F filler tokens
  (depth 0 = first thing after the instruction, 100 = right before the question); the N−1
  distractors at uniformly random filler offsets before and after it (YOCO: random partition).
* **R queried needles** (how the paper poses and scores R = 2 is UNCONFIRMED): the pinned needle
  and R−1 of the distractors are asked about, **one question per prompt** over the same haystack
  (methods.md's suggested reading). Reported: ``accuracy`` (mean over all R questions),
  ``pinned_accuracy`` (the question whose answer sits at the requested depth; the heat-map),
  ``all_correct`` (all R answered in a trial).
* **Decoding and scoring**: greedy, ``max_new_tokens`` (20, as YOCO) tokens. ``match="contains"``
  (default): correct if the answer occurs as a whole number in the generated text (YOCO's test
  without its substring false positives); ``"substring"``: YOCO's literal ``answer in text``;
  ``"first"``: the first number generated must be the answer.
* **Grid**: (N, R) in ``nr`` (paper at 4K: 1/1, 2/2, 4/2, 6/2), prompt lengths (default: powers of
  two from 512 up to the longest that leaves room for the answer, plus that longest), depths
  {0, 25, 50, 75, 100}; ``samples`` trials per (N, R, length, depth) cell (paper: 50).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from .common import (start_task, TaskOptions, TaskResult, UsageError, check_choice, check_int, finish, markdown_table,
                     mean, new_figure, opt, parse_nr, seeded)
from .datasets import load_corpus

INTRO = ("There is a special magic number inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the magic number there.")
NEEDLE = "The special magic {city} number is: {number}"
QUESTION = "What is the special magic {city} number? The special magic {city} number is"
CITIES = [
    "Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Mexico City", "Seattle", "Lagos",
    "Amsterdam", "Belgrade", "Cairo", "Baghdad", "Damascus", "Kigali", "Dakar", "Sofia", "Victoria", "Tashkent",
    "Mumbai", "Barcelona", "Amman", "Toronto", "Bratislava", "Johannesburg", "Thimphu", "Bangkok", "Santiago",
    "San Francisco", "Paris", "Rabat", "Copenhagen", "Madrid", "Ho Chi Minh City", "Sarajevo", "Delhi", "Istanbul",
    "Khartoum", "Helsinki", "Doha", "Kuala Lumpur", "Budapest", "Shanghai", "Moscow", "Los Angeles", "Oslo",
    "Berlin", "Bangalore", "Tokyo", "Melbourne", "Port Louis", "Lisbon", "Nairobi", "Kampala", "Lima", "Maputo",
    "Vancouver", "Dubai", "Jakarta", "Yerevan", "Beirut", "Athens", "Bucharest", "Brussels", "Tunis", "Astana",
    "Seoul", "Buenos Aires", "Vienna", "Prague", "Warsaw", "Dublin", "Edinburgh", "Reykjavik", "Tallinn", "Riga",
    "Vilnius", "Kyiv", "Tbilisi", "Baku", "Tehran", "Karachi", "Dhaka", "Kathmandu", "Hanoi", "Manila", "Taipei",
    "Osaka", "Beijing", "Singapore", "Perth", "Auckland", "Honolulu", "Denver", "Boston", "Havana", "Bogota",
    "Quito", "Caracas", "Montevideo", "Accra", "Addis Ababa", "Lusaka", "Harare", "Windhoek", "Casablanca",
]
MATCH_MODES = ("contains", "substring", "first")
DEPTHS = [0, 25, 50, 75, 100]


@dataclass
class Needle:
    city: str
    number: int
    pinned: bool       # the needle placed at the requested depth
    queried: bool      # one of the R needles asked about
    start: int = 0     # token span [start, end) in the prompt
    end: int = 0
    number_start: int = 0  # token span of the number (the needle's trailing digits)


@dataclass
class NeedlePrompt:
    ids: list[int]
    answer: Needle                 # the needle this prompt asks about
    needles: list[Needle]          # all N, in prompt order (spans for this prompt)
    depth: float                   # requested depth of the pinned needle (percent)
    filler_total: int              # F, filler tokens in the prompt
    filler_before_answer: int      # filler tokens before the asked needle
    spans: dict = field(default_factory=dict)  # "bos", "intro", "question": (start, end)

    @property
    def length(self) -> int:
        return len(self.ids)


class NeedleGenerator:
    """Builds needle prompts of an exact token length from a haystack token stream (seeded)."""

    def __init__(self, tokenizer, haystack_texts: Sequence[str], *, number_range=(1, 50000),
                 cities: Sequence[str] = CITIES):
        self.tok = tokenizer
        self.cities = list(cities)  # the comparison study's training mix uses a disjoint list
        texts = [t.strip() for t in haystack_texts if t and t.strip()]
        if not texts:
            raise ValueError("the haystack (--data) has no text")
        stream: list[int] = []
        for ids in tokenizer.encode_batch([" ".join(t.split()) + " " for t in texts]):
            stream.extend(ids)
        if len(stream) < 16:
            raise ValueError(f"the haystack (--data) is too short ({len(stream)} tokens)")
        self.stream = stream
        self.bos = list(tokenizer.prefix_ids)
        self.intro = tokenizer.encode(INTRO)
        self.number_range = number_range
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok.encode(text)
        return self._cache[text]

    def needle_ids(self, city: str, number: int) -> tuple[list[int], int]:
        """Token ids of one needle line and the offset where its number's tokens start."""
        head = self._enc("\n" + NEEDLE.format(city=city, number="").rstrip())
        full = self._enc("\n" + NEEDLE.format(city=city, number=number) + "\n")
        common = 0
        while common < min(len(head), len(full)) and head[common] == full[common]:
            common += 1
        return full, common

    def question_ids(self, city: str) -> list[int]:
        return self._enc("\n" + QUESTION.format(city=city))

    def min_length(self, n: int) -> int:
        """A safe lower bound on the prompt length that leaves room for N needles and some filler."""
        longest_city = max(self.cities, key=lambda c: len(self._enc(c)))
        needle = len(self.needle_ids(longest_city, 55555)[0])
        return len(self.bos) + len(self.intro) + n * needle + len(self.question_ids(longest_city)) + 2 * n + 8

    def _numbers(self, rng, n: int) -> list[int]:
        lo, hi = self.number_range
        out: list[int] = []
        while len(out) < n:
            x = rng.randint(lo, hi)
            s = str(x)
            if all(s not in str(y) and str(y) not in s for y in out):
                out.append(x)
        return out

    def trial(self, length: int, depth: float, n: int, r: int, seed: int, *salt) -> list[NeedlePrompt]:
        """R prompts (one per queried needle) of exactly ``length`` tokens sharing one haystack layout."""
        if n < r or r < 1:
            raise UsageError(f"needle trial needs N >= R >= 1, got N={n}, R={r}")
        if not 0 <= depth <= 100:
            raise UsageError(f"depth {depth} outside 0..100")
        if n > len(self.cities):
            raise UsageError(f"N={n} needles: at most {len(self.cities)} distinct cities are available")
        rng = seeded(seed, "needle", length, depth, n, r, *salt)
        cities = rng.sample(self.cities, n)
        numbers = self._numbers(rng, n)
        # fractional filler positions: needle 0 is pinned at the depth, the others uniform
        fracs = [depth / 100.0] + [rng.random() for _ in range(n - 1)]
        queried = {0, *rng.sample(range(1, n), r - 1)} if r > 1 else {0}
        start = rng.randrange(len(self.stream))
        prompts = []
        for q in sorted(queried):
            prompts.append(self._build(length, depth, cities, numbers, fracs, queried, q, start))
        return prompts

    def _build(self, length, depth, cities, numbers, fracs, queried, asked, stream_start) -> NeedlePrompt:
        n = len(cities)
        needle_pieces = [self.needle_ids(c, x) for c, x in zip(cities, numbers)]
        question = self.question_ids(cities[asked])
        fixed = len(self.bos) + len(self.intro) + sum(len(p[0]) for p in needle_pieces) + len(question)
        filler = length - fixed
        if filler < 0:
            raise UsageError(f"prompt length {length} is too short for N={n} needles and the template "
                             f"(needs more than {fixed} tokens)")
        offsets = [round(f * filler) for f in fracs]
        # order by filler offset; on a tie the pinned needle keeps the extreme side its depth asks for
        tie = (lambda i: -1 if i == 0 else 0) if depth < 50 else (lambda i: 1 if i == 0 else 0)
        order = sorted(range(n), key=lambda i: (offsets[i], tie(i), i))
        fill = [self.stream[(stream_start + k) % len(self.stream)] for k in range(filler)]
        ids = list(self.bos) + list(self.intro)
        spans = {"bos": (0, len(self.bos)), "intro": (len(self.bos), len(ids))}
        needles: list[Needle] = [None] * n  # type: ignore[list-item]
        prev = 0
        answer_filler = 0
        for i in order:
            ids.extend(fill[prev:offsets[i]])
            prev = offsets[i]
            piece, num_off = needle_pieces[i]
            s = len(ids)
            ids.extend(piece)
            needles[i] = Needle(cities[i], numbers[i], i == 0, i in queried, s, len(ids), s + num_off)
            if i == asked:
                answer_filler = offsets[i]
        ids.extend(fill[prev:])
        q0 = len(ids)
        ids.extend(question)
        spans["question"] = (q0, len(ids))
        assert len(ids) == length, (len(ids), length)
        return NeedlePrompt(ids, needles[asked], [needles[i] for i in order], depth, filler, answer_filler, spans)


# --------------------------------------------------------------------------- scoring

_NUM_RE = re.compile(r"\d+")


def is_correct(generated: str, answer: int, match: str = "contains") -> bool:
    """Whether generated text answers ``answer`` under the ``match`` rule (see module docstring)."""
    target = str(answer)
    if match == "substring":
        return target in generated
    numbers = _NUM_RE.findall(generated)
    if match == "first":
        return bool(numbers) and numbers[0] == target
    return target in numbers


@dataclass(frozen=True, kw_only=True)
class NeedleOptions(TaskOptions):
    data: str | None = opt(None, "haystack: held-out text (shard dir val split, text file/dir, .jsonl, source name)")
    nr: list[str] = opt(["1/1", "2/2", "4/2", "6/2"], "N/R pairs: N needles, R of them queried")
    lengths: list[int] | None = opt(None, "prompt lengths in the model's tokens (default: 512, 1024, ... up to the context)")
    depths: list[float] = opt(list(DEPTHS), "depths (percent) of the pinned answer needle")
    samples: int = opt(10, "trials per (N, R, length, depth) cell (the paper used 50)")
    max_new_tokens: int = opt(20, "greedy tokens generated per question")
    match: str = opt("contains", "scoring: contains (whole number in the output), substring (YOCO), first")

    def check(self):
        parse_nr(self.nr)
        if self.lengths is not None:
            if not self.lengths:
                raise UsageError("--lengths: give at least one length")
            for x in self.lengths:
                check_int("lengths", x, 1)
        if not self.depths:
            raise UsageError("--depths: give at least one depth")
        for d in self.depths:
            if not 0 <= d <= 100:
                raise UsageError(f"--depths: {d} is outside 0..100 (percent)")
        check_int("samples", self.samples, 1)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_choice("match", self.match, MATCH_MODES)
        if max(n for n, _ in parse_nr(self.nr)) > len(CITIES):
            raise UsageError(f"--nr: at most {len(CITIES)} needles")

    def check_model(self, adapter):
        if self.data is None:
            raise UsageError("--data is required: the haystack text (a shard dir, text file/dir, .jsonl, source name)")
        room = adapter.max_len - self.max_new_tokens
        for x in self.lengths or []:
            if x > room:
                raise UsageError(f"--lengths {x}: prompt + {self.max_new_tokens} generated tokens is above the "
                                 f"model's context ({adapter.max_len} tokens); the longest prompt is {room}")

    def resolved_lengths(self, adapter) -> list[int]:
        if self.lengths is not None:
            return sorted(set(self.lengths))
        return auto_lengths(adapter.max_len - self.max_new_tokens)


def auto_lengths(longest: int) -> list[int]:
    out = {longest}
    p = 512
    while p < longest:
        out.add(p)
        p *= 2
    return sorted(out)


def generate_answer(adapter, tokenizer, prompt: NeedlePrompt, max_new_tokens: int) -> str:
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out = adapter.greedy(prompt.ids, max_new_tokens, stop_ids=stop)
    return tokenizer.decode([t for t in out if t not in stop])


def evaluate_needles(adapter, tokenizer, generator: NeedleGenerator, nr, lengths, depths, samples, max_new_tokens,
                     match, seed) -> tuple[list[dict], list[dict]]:
    """Run the grid; returns (cells, trials)."""
    cells, trials = [], []
    for n, r in nr:
        for length in lengths:
            for depth in depths:
                accs, pinned, allc = [], [], []
                for s in range(samples):
                    prompts = generator.trial(length, depth, n, r, seed, s)
                    ok_all = True
                    for p in prompts:
                        text = generate_answer(adapter, tokenizer, p, max_new_tokens)
                        ok = is_correct(text, p.answer.number, match)
                        accs.append(float(ok))
                        if p.answer.pinned:
                            pinned.append(float(ok))
                        ok_all &= ok
                        trials.append({"n": n, "r": r, "length": length, "depth": depth, "sample": s,
                                       "city": p.answer.city, "answer": p.answer.number, "pinned": p.answer.pinned,
                                       "prompt_tokens": p.length, "output": text, "correct": ok})
                    allc.append(float(ok_all))
                cells.append({"n": n, "r": r, "length": length, "depth": depth, "trials": samples,
                              "accuracy": mean(accs), "pinned_accuracy": mean(pinned), "all_correct": mean(allc)})
    return cells, trials


def summarise_cells(cells: list[dict]) -> tuple[list[dict], list[dict]]:
    by_nr, by_nr_len = [], []
    keys = sorted({(c["n"], c["r"]) for c in cells})
    for n, r in keys:
        cs = [c for c in cells if (c["n"], c["r"]) == (n, r)]
        by_nr.append({"n": n, "r": r, "accuracy": mean([c["accuracy"] for c in cs]),
                      "pinned_accuracy": mean([c["pinned_accuracy"] for c in cs]),
                      "all_correct": mean([c["all_correct"] for c in cs])})
        for length in sorted({c["length"] for c in cs}):
            cl = [c for c in cs if c["length"] == length]
            by_nr_len.append({"n": n, "r": r, "length": length, "accuracy": mean([c["accuracy"] for c in cl]),
                              "pinned_accuracy": mean([c["pinned_accuracy"] for c in cl])})
    return by_nr, by_nr_len


def heatmaps(cells: list[dict], title: str):
    import numpy as np

    keys = sorted({(c["n"], c["r"]) for c in cells})
    fig, axes = new_figure(4.2 * len(keys), 3.8, ncols=len(keys))
    axes = axes if isinstance(axes, list) else [axes]
    for ax, (n, r) in zip(axes, keys):
        cs = [c for c in cells if (c["n"], c["r"]) == (n, r)]
        lengths = sorted({c["length"] for c in cs})
        depths = sorted({c["depth"] for c in cs})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in cs:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["pinned_accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("answer depth")
        ax.set_title(f"N={n}, R={r}")
    fig.colorbar(im, ax=axes, shrink=0.8, label="exact-match accuracy")
    fig.suptitle(title)
    return fig


def run_needle(adapter, tokenizer, options: NeedleOptions, out_dir=None) -> dict:
    """Multi-needle retrieval over the (N/R, length, depth) grid; heat-map per N/R."""
    started = start_task(adapter, options)
    corpus = load_corpus(options.data, tokenizer)
    gen = NeedleGenerator(tokenizer, corpus.texts())
    nr = parse_nr(options.nr)
    lengths = options.resolved_lengths(adapter)
    need = max(gen.min_length(n) for n, _ in nr)
    for x in lengths:
        if x < need:
            raise UsageError(f"--lengths {x}: too short for N={max(n for n, _ in nr)} needles and the template "
                             f"(use at least {need} tokens)")
    cells, trials = evaluate_needles(adapter, tokenizer, gen, nr, lengths, options.depths, options.samples,
                                     options.max_new_tokens, options.match, options.seed)
    by_nr, by_nr_len = summarise_cells(cells)
    data = {"lengths": lengths, "depths": options.depths, "nr": [f"{n}/{r}" for n, r in nr],
            "by_nr": by_nr, "by_nr_length": by_nr_len, "cells": cells, "trials": trials,
            "haystack": {"spec": corpus.spec, "kind": corpus.kind, "stream_tokens": len(gen.stream)}}
    md = "## Accuracy by N/R (mean over lengths and depths)\n\n" + markdown_table(
        ["N", "R", "accuracy (all R questions)", "pinned accuracy", "all R correct"],
        [[b["n"], b["r"], b["accuracy"], b["pinned_accuracy"], b["all_correct"]] for b in by_nr])
    md += "\n\n## Accuracy by N/R and length (mean over depths)\n\n" + markdown_table(
        ["N", "R", "length", "accuracy", "pinned accuracy"],
        [[b["n"], b["r"], b["length"], b["accuracy"], b["pinned_accuracy"]] for b in by_nr_len])
    depth_rows = []
    for (n, r) in sorted({(c["n"], c["r"]) for c in cells}):
        for d in options.depths:
            cs = [c for c in cells if (c["n"], c["r"], c["depth"]) == (n, r, d)]
            depth_rows.append([n, r, f"{d:g}%"] + [c["pinned_accuracy"] for c in sorted(cs, key=lambda c: c["length"])])
    md += "\n\n## Pinned-answer accuracy by depth (columns: lengths " + ", ".join(map(str, lengths)) + ")\n\n"
    md += markdown_table(["N", "R", "depth", *[str(x) for x in lengths]], depth_rows)
    fig = heatmaps(cells, f"{adapter.name}: multi-needle retrieval")
    notes = [f"R>1: one question per queried needle over the same haystack (UNCONFIRMED reading); "
             f"match={options.match}"]
    result = TaskResult("needle", data, md, {"needle_heatmap.png": fig}, notes)
    return finish(result, adapter, tokenizer, options, out_dir, started)


__all__ = ["NeedleOptions", "NeedleGenerator", "NeedlePrompt", "Needle", "run_needle", "is_correct", "CITIES",
           "evaluate_needles", "auto_lengths"]
