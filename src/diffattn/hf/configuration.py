"""``DiffAttnConfig``: the transformers configuration of a diffattn model (model_type ``"diffattn"``).

It carries every :class:`diffattn.ModelConfig` field under the same name, so its ``config.json`` is
the one :func:`diffattn.checkpoint.save_model` writes (``model_type`` + all ModelConfig fields) plus
transformers' own bookkeeping keys, which :func:`diffattn.checkpoint.read_config` ignores. The
fields are validated by ModelConfig itself when the config is built, so a bad ``config.json``
(unknown attention name, impossible head counts, unknown key) fails at load time with the
ModelConfig error naming the field, before any weight is read.

The usual transformers names (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``max_position_embeddings``, ``tie_word_embeddings``, ``rms_norm_eps``,
``intermediate_size``) are read-only aliases of the ModelConfig fields, for tools such as
lm-evaluation-harness that look them up. ``num_attention_heads`` is ``n_head`` in the variant's
own meaning (DIFF heads for ``diff_v1``/``shared_diff``), see ``diffattn/config.py``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import PretrainedConfig

from .._version import __version__
from ..config import ModelConfig

MODEL_TYPE = "diffattn"
MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ModelConfig) if f.name != "extra")


class DiffAttnConfig(PretrainedConfig):
    """transformers configuration holding one :class:`diffattn.ModelConfig` (all its fields, flat)."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
        "rms_norm_eps": "norm_eps",
        "intermediate_size": "ffn_hidden",
    }

    def __init__(self, **kwargs: Any) -> None:
        # Accept the transformers aliases as input too (e.g. a user passing hidden_size=...).
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name in kwargs and kwargs[name] != value:
                    raise ValueError(f"DiffAttnConfig: {alias}={value!r} contradicts {name}={kwargs[name]!r}")
                kwargs[name] = value
        given = {name: kwargs.pop(name) for name in ModelConfig.field_names() if name in kwargs}
        if given:
            values = ModelConfig.from_dict(given).to_dict()  # validates; fills derived fields
        else:  # an empty config (transformers builds one to find default values); not buildable
            values = dict.fromkeys(MODEL_FIELDS)
        kwargs.setdefault("diffattn_version", __version__)
        super().__init__(**kwargs)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ conversions
    def to_model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` these fields describe (validated again: attributes may have been set)."""
        return ModelConfig.from_dict({name: getattr(self, name) for name in ModelConfig.field_names()
                                      if getattr(self, name, None) is not None})

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> "DiffAttnConfig":
        if not isinstance(config, ModelConfig):
            raise TypeError(f"expected a ModelConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **kwargs)


__all__ = ["DiffAttnConfig", "MODEL_FIELDS", "MODEL_TYPE"]
