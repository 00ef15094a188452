"""Needle-retrieval sequences mixed into the training stream of the comparison study.

At CPU scale a model trained on a few million tokens of prose never meets a "special magic number"
and cannot retrieve one, whatever its attention; the study would then compare two zeros. So a
documented share of the training rows are replaced by complete retrieval sequences in the exact
format of the ``needle`` evaluation (methods.md §5 P3):

    <intro> <haystack with N needles "The special magic {city} number is: {number}">
    <question "What is the special magic {city} number? The special magic {city} number is"> {number}<eos>

What keeps the evaluation honest (it measures retrieval, not memorisation):

* haystack text comes from the **train** split (the evaluation reads the held-out **val** split);
* cities come from :data:`TRAIN_CITIES`, a list disjoint from the evaluation's ``CITIES``;
* numbers are drawn from [50001, 99999]; the evaluation draws from [1, 50000].

Each replaced row is a pure function of (seed, step, row): exact resume, DDP and gradient
accumulation see the same rows as one uninterrupted process, like the underlying WindowSampler.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

import torch

from .needle import CITIES, NeedleGenerator

# Capitals and large towns; those the evaluation also uses are removed below.
_CANDIDATES = [
    "Accra", "Abuja", "Addis Ababa", "Algiers", "Ankara", "Asmara", "Asuncion", "Bamako", "Bangui", "Banjul",
    "Bern", "Bishkek", "Bissau", "Brasilia", "Bridgetown", "Bujumbura", "Canberra", "Caracas", "Castries", "Chisinau",
    "Conakry", "Dili", "Djibouti", "Dodoma", "Dushanbe", "Freetown", "Gaborone", "Georgetown", "Guatemala City",
    "Harare", "Honiara", "Islamabad", "Juba", "Kabul", "Kingston", "Kinshasa", "Kuwait City", "La Paz",
    "Libreville", "Lilongwe", "Ljubljana", "Lome", "Luanda", "Lusaka", "Luxembourg", "Majuro", "Malabo", "Male",
    "Managua", "Manama", "Maseru", "Mbabane", "Minsk", "Mogadishu", "Monrovia", "Montevideo", "Moroni", "Muscat",
    "Nassau", "Ndjamena", "Niamey", "Nicosia", "Nouakchott", "Nukualofa", "Ottawa", "Ouagadougou", "Palikir",
    "Panama City", "Paramaribo", "Phnom Penh", "Podgorica", "Porto Novo", "Praia", "Pretoria", "Pyongyang", "Quito",
    "Riyadh", "Roseau", "San Jose", "San Marino", "San Salvador", "Sanaa", "Skopje", "Suva", "Tegucigalpa",
    "Tirana", "Ulaanbaatar", "Vaduz", "Valletta", "Vientiane", "Windhoek", "Yaounde", "Zagreb", "Funafuti",
    "Apia", "Belmopan", "Gitega", "Naypyidaw", "Sucre", "Tarawa",
]
TRAIN_CITIES = [c for c in _CANDIDATES if c not in set(CITIES)]
TRAIN_NUMBERS = (50001, 99999)


class NeedleMixSampler:
    """Wraps a WindowSampler; replaces a ``share`` of each global batch's rows by retrieval sequences."""

    def __init__(self, base, tokenizer, haystack_texts: Sequence[str], *, share: float, seed: int,
                 max_needles: int = 6, eos_id: int | None = None):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"needle_mix.share must be in [0, 1], got {share}")
        if max_needles < 1:
            raise ValueError(f"needle_mix.max_needles must be >= 1, got {max_needles}")
        self.base = base
        self.share = share
        self.seed = seed
        self.max_needles = max_needles
        self.seq_len = base.seq_len
        self.global_batch = base.global_batch
        self.tok = tokenizer
        self.eos = eos_id if eos_id is not None else tokenizer.eos_id
        self.gen = NeedleGenerator(tokenizer, haystack_texts, number_range=TRAIN_NUMBERS, cities=TRAIN_CITIES)
        # N is capped so that the needles, intro and question leave room for some filler
        while self.max_needles > 1 and self.gen.min_length(self.max_needles) + 8 > self.seq_len:
            self.max_needles -= 1
        if self.gen.min_length(1) + 8 > self.seq_len:
            raise ValueError(f"seq_len {self.seq_len} is too short for a needle-retrieval sequence")

    def _rng(self, step: int, row: int) -> random.Random:
        h = hashlib.sha256(f"needle-mix/{self.seed}/{step}/{row}".encode()).digest()
        return random.Random(int.from_bytes(h[:8], "little"))

    def sequence(self, step: int, row: int) -> list[int] | None:
        """The retrieval sequence (seq_len + 1 tokens) of global row ``row`` at ``step``, or None."""
        rng = self._rng(step, row)
        if rng.random() >= self.share:
            return None
        n = rng.randint(1, self.max_needles)
        depth = rng.uniform(0.0, 100.0)
        answer_probe = self.tok.encode(" " + str(TRAIN_NUMBERS[1]))
        tail = len(answer_probe) + (1 if self.eos is not None else 0)
        prompt = self.gen.trial(self.seq_len + 1 - tail, depth, n, 1, self.seed, "train", step, row)[0]
        ids = list(prompt.ids) + self.tok.encode(" " + str(prompt.answer.number))
        if self.eos is not None:
            ids.append(self.eos)
        ids = ids[: self.seq_len + 1]
        if len(ids) < self.seq_len + 1:  # a shorter number: pad with EOS (it never precedes the answer)
            ids += [self.eos if self.eos is not None else ids[-1]] * (self.seq_len + 1 - len(ids))
        return ids

    def batch(self, step: int, rank: int = 0, world_size: int = 1, micro: int = 0, n_micro: int = 1):
        x, y = self.base.batch(step, rank, world_size, micro, n_micro)
        per = self.global_batch // (world_size * n_micro)
        first = (rank * n_micro + micro) * per  # the WindowSampler's slice of the global batch
        for i in range(per):
            seq = self.sequence(step, first + i)
            if seq is not None:
                t = torch.tensor(seq, dtype=x.dtype)
                x[i], y[i] = t[:-1], t[1:]
        return x, y
