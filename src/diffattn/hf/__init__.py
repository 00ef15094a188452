"""Hugging Face integration: transformers config/model wrapper, DiffLlama and Llama converters, lm-eval.

* :class:`DiffAttnConfig`, :class:`DiffAttnForCausalLM`, :class:`DiffAttnCache` (``modeling.py``):
  a diffattn model as a transformers ``PreTrainedModel`` with ``generate()``; registered with
  ``AutoConfig`` / ``AutoModelForCausalLM`` when ``diffattn`` is imported (``autoregister.py``).
* ``convert.py``: exact weight mappings diff_v1 <-> ``DiffLlamaForCausalLM`` and
  standard <-> ``LlamaForCausalLM``, used by ``diffattn export`` / ``diffattn import``.
* ``lm_eval.py``: the ``diffattn`` model adapter for lm-evaluation-harness.

Names are resolved lazily so that ``import diffattn`` does not import transformers.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "DiffAttnConfig": "configuration",
    "DiffAttnForCausalLM": "modeling",
    "DiffAttnPreTrainedModel": "modeling",
    "DiffAttnCache": "modeling",
    "validate_model_dir": "modeling",
    "register": "autoregister",
    "export_model": "convert",
    "import_model": "convert",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
