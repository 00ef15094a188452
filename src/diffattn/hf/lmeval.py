"""lm-evaluation-harness adapter: evaluate native diffattn checkpoints with ``lm_eval``.

Exported checkpoints (``diffattn export --to diffllama|llama``) need nothing: they are stock
transformers models, ``lm_eval --model hf --model_args pretrained=DIR`` evaluates them.

Native checkpoints (model_type ``"diffattn"``) need the diffattn classes registered with
transformers, which happens on ``import diffattn`` — a process that never imports diffattn (the plain
``lm_eval`` command) cannot load them, and diffattn never turns on ``trust_remote_code``. This module
provides the two documented routes:

* command line: ``python -m diffattn.hf.lmeval <lm_eval arguments>`` runs lm_eval's own CLI after
  registering, and adds the model name ``diffattn`` (``--model diffattn --model_args pretrained=DIR``;
  ``--model hf`` works as well in that process);
* Python: ``import diffattn.hf.lmeval`` then ``lm_eval.simple_evaluate(model="diffattn", ...)``.

``DiffAttnLM`` is lm_eval's ``HFLM`` (causal backend) — batching, tokenisation and scoring are
lm_eval's; the model is ``DiffAttnForCausalLM``. lm_eval is an optional extra: ``pip install
'diffattn[eval]'``.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError("diffattn.hf.lmeval needs lm-evaluation-harness: pip install 'diffattn[eval]' "
                      f"(or pip install lm_eval) ({e})") from None

from .autoregister import register
from .tokenizer import load_tokenizer

register()


@register_model("diffattn")
class DiffAttnLM(HFLM):
    """lm_eval's HFLM for diffattn checkpoint directories (causal LM backend)."""

    def __init__(self, pretrained, **kwargs):
        register()
        kwargs.setdefault("backend", "causal")
        if isinstance(pretrained, str) and kwargs.get("tokenizer") is None and Path(pretrained).is_dir():
            # a bare tokenizer.json has no EOS for transformers; lm_eval needs one (see hf/tokenizer.py)
            kwargs["tokenizer"] = load_tokenizer(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """``python -m diffattn.hf.lmeval ARGS``: lm_eval's command line with diffattn registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
