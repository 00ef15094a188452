"""Needle-retrieval rows mixed into a training stream: moved to ``diffattn/eval/needle_mix.py`` (DEX's adaptation
stream uses it too, and eval sits below both); re-exported here for the comparison study."""

from ..eval.needle_mix import TRAIN_CITIES, TRAIN_NUMBERS, NeedleMixSampler  # noqa: F401
