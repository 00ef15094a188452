"""``DiffAttnForCausalLM``: a transformers ``PreTrainedModel`` + ``GenerationMixin`` around ``DecoderLM``.

The wrapper holds the core model as ``self.model`` and adds no model math of its own: ``forward``
calls :class:`diffattn.model.DecoderLM`, so the state-dict keys are ``model.<DecoderLM key>`` — the
layout of :func:`diffattn.checkpoint.save_model` — and ``save_pretrained`` / ``from_pretrained``
read and write the same directories as the checkpoint module (safetensors only).

Generation. ``generate()`` decodes with diffattn's own static :class:`~diffattn.model.KVCache`
through the transformers ``Cache`` interface: :class:`DiffAttnCache` is a ``Cache`` subclass that
owns a KVCache (allocated on the first forward, grown by doubling up to ``max_seq_len``), reports
its length to the generation loop and supports the batch re-orderings of beam search. The model
declares that the default ``DynamicCache`` does not fit it, so ``generate`` lets the model create its
own cache on the first forward and then hands it back on every step (the mechanism transformers
5.17-5.23 use for models with their own cache type). Rotary positions count real tokens, so
left-padded batches decode as each row would alone, as ``DecoderLM.generate`` does.

Loading is strict: before transformers reads a local directory, :func:`validate_model_dir` checks
``config.json`` against the safetensors header and refuses, naming the tensor or the field, any
missing, unexpected or wrongly shaped tensor — transformers would otherwise initialise missing
tensors at random and return a partial model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..fsutil import read_json
from ..checkpoint import CONFIG_NAME, WEIGHT_PREFIX, WEIGHTS_NAME, own_memory
from ..model import DecoderLM, KVCache, build_model
from ..utils.integrity import verify_checksums
from .configuration import MODEL_TYPE, DiffAttnConfig

INDEX_NAME = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------
class DiffAttnCache(Cache):
    """A transformers ``Cache`` backed by diffattn's static :class:`KVCache`.

    The KVCache is created on the first forward (its batch size, device and the number of cached
    tensors per layer follow the model) with room for the prompt plus ``reserve`` tokens, and is
    re-allocated at twice the size (at most ``max_seq_len``) when a step would overflow it.
    """

    def __init__(self, reserve: int = 256) -> None:
        super().__init__(layers=[])
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ValueError(f"DiffAttnCache reserve must be an integer >= 0, got {reserve!r}")
        self.reserve = reserve
        self.kv: KVCache | None = None

    def __repr__(self) -> str:
        state = "empty" if self.kv is None else f"length={self.kv.length}, capacity={self.kv.max_len}"
        return f"DiffAttnCache({state})"

    # --- used by the model -----------------------------------------------------------------
    def for_step(self, model: DecoderLM, batch_size: int, n_new: int) -> KVCache:
        """The KVCache to use for a forward of ``n_new`` tokens, grown if it would overflow."""
        limit = model.config.max_seq_len
        if self.kv is None:
            self.kv = KVCache.for_model(model, batch_size, min(limit, n_new + self.reserve))
        elif self.kv.length + n_new > self.kv.max_len and self.kv.max_len < limit:
            self.kv = _grown(self.kv, min(limit, max(2 * self.kv.max_len, self.kv.length + n_new)))
        return self.kv  # an overflow past max_seq_len is reported by DecoderLM / KVCache

    # --- the transformers Cache interface ----------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return 0 if self.kv is None else self.kv.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows on demand

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return -1 if self.kv is None else self.kv.batch_size

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError("DiffAttnCache is written by diffattn's attention layers, not through update()")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("DiffAttnCache cannot be cropped (assisted/speculative decoding is not supported)")

    def reset(self) -> None:
        self.kv = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        kv = self.kv
        if kv is None:
            return
        # KVCache keeps per-row state in valid, n_real and the per-layer buffers (B first everywhere).
        kv.valid = fn(kv.valid)
        kv.n_real = fn(kv.n_real)
        kv._buffers = [None if bufs is None else tuple(fn(b) for b in bufs) for bufs in kv._buffers]
        kv.batch_size = kv.valid.shape[0]


def _grown(old: KVCache, max_len: int) -> KVCache:
    """A copy of ``old`` with room for ``max_len`` positions (same committed state)."""
    new = KVCache(old.n_layer, old.batch_size, max_len, device=old.valid.device)
    n = old.length
    new.length = n
    new.valid[:, :n] = old.valid[:, :n]
    new.n_real.copy_(old.n_real)
    new._written = list(old._written)
    bufs_new = []
    for bufs in old._buffers:
        if bufs is None:
            bufs_new.append(None)
            continue
        grown = []
        for b in bufs:
            g = b.new_zeros(b.shape[0], b.shape[1], max_len, b.shape[3])
            g[:, :, :n] = b[:, :, :n]
            grown.append(g)
        bufs_new.append(tuple(grown))
    new._buffers = bufs_new
    return new


# ---------------------------------------------------------------------------------------------
# Strict directory validation
# ---------------------------------------------------------------------------------------------
def _weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header(s) of ``directory`` (no tensor data read)."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
    else:
        bins = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        extra = f" (found {bins[0]}: pickle weights are not loaded, convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{extra}")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in {INDEX_NAME} but missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    shapes[key] = tuple(sf.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{f}: cannot read safetensors ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return shapes


def expected_shapes(model_config) -> dict[str, tuple[int, ...]]:
    """Saved tensor name -> shape for a model of ``model_config`` (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(model_config)
    return {WEIGHT_PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights(shapes: dict[str, tuple[int, ...]], model_config, source: str) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped tensor."""
    want = expected_shapes(model_config)
    missing = [k for k in want if k not in shapes]
    unexpected = sorted(k for k in shapes if k not in want)
    cfg = f"attention={model_config.attention!r}, n_layer={model_config.n_layer}"
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{source}: missing tensor {missing[0]!r}{more} required by config.json ({cfg})")
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r}{more} not in a model of config.json ({cfg})")
    for k, shape in want.items():
        if shapes[k] != shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {list(shapes[k])} but config.json implies "
                             f"{list(shape)}")


def validate_model_dir(directory: str | os.PathLike, config: DiffAttnConfig | None = None) -> DiffAttnConfig:
    """Check a diffattn model directory (checksums when it has them, config, weight shapes) without loading
    tensors; return its config."""
    directory = Path(directory)
    # a training checkpoint's checksums.json: a corrupt file is refused here as the command line refuses it
    verify_checksums(directory)
    if config is None:
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        data = read_json(path)
        if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
            got = data.get("model_type") if isinstance(data, dict) else None
            raise ValueError(f"{path}: model_type is {got!r}, not {MODEL_TYPE!r}")
        config = DiffAttnConfig(**{k: v for k, v in data.items() if k != "model_type"})
    check_weights(_weight_shapes(directory), config.to_model_config(), str(directory))
    return config


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class DiffAttnPreTrainedModel(PreTrainedModel):
    config_class = DiffAttnConfig
    config: DiffAttnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to do: DecoderLM initialises every tensor in its constructor (DecoderLM.init_weights,
        the one place that does), and from_pretrained refuses directories with missing tensors, so
        transformers never has a tensor left to initialise. Re-initialise with ``model.model.init_weights()``."""


class DiffAttnForCausalLM(DiffAttnPreTrainedModel, GenerationMixin):
    """A diffattn :class:`DecoderLM` (``self.model``) as a transformers causal LM."""

    # Harmless keyword arguments transformers may pass to forward; anything else truthy is an error.
    _ignored_kwargs = frozenset({"cache_position", "num_items_in_batch", "output_router_logits", "is_first_iteration"})

    def __init__(self, config: DiffAttnConfig):
        super().__init__(config)
        self.model = DecoderLM(config.to_model_config())
        self.post_init()

    # --- transformers plumbing ---------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not create a DynamicCache; forward creates a DiffAttnCache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``, after a strict check of a local directory (see module doc)."""
        if pretrained_model_name_or_path is not None:
            local = Path(os.fspath(pretrained_model_name_or_path))
            subfolder = kwargs.get("subfolder") or ""
            if (local / subfolder).is_dir():
                config = kwargs.get("config")
                validate_model_dir(local / subfolder, config if isinstance(config, DiffAttnConfig) else None)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # transformers may leave the tensors in the file's buffers: copy them out (checkpoint.own_memory says why)
        own_memory(loaded[0] if isinstance(loaded, tuple) else loaded)  # output_loading_info=True: a tuple
        return loaded

    @classmethod
    def from_decoder(cls, model: DecoderLM, **config_kwargs: Any) -> "DiffAttnForCausalLM":
        """Wrap an existing DecoderLM (its tensors are shared, not copied)."""
        if not isinstance(model, DecoderLM):
            raise TypeError(f"expected a DecoderLM, got {type(model).__name__}")
        with torch.device("meta"):
            hf = cls(DiffAttnConfig.from_model_config(model.config, **config_kwargs))
        hf.model = model
        return hf.train(model.training)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.model.lm_head

    # --- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits of ``input_ids`` (B, T); with a cache, ``input_ids`` are the new tokens only.

        attention_mask: (B, T) or (B, past + T), 1 for real tokens; only the last T columns are
            read (earlier positions' padding is remembered by the cache).
        position_ids: not accepted (not in the signature, so ``generate`` does not make them): rotary
            positions are counted from ``attention_mask``, as ``DecoderLM`` does.
        output_attentions: the effective (differential) maps of each layer; needs kernel "eager".
        """
        self._check_forward_arguments(input_ids, inputs_embeds, output_hidden_states, kwargs)
        output_attentions = bool(output_attentions)
        return_dict = self.config.return_dict if return_dict is None else return_dict

        b, t = input_ids.shape[0], input_ids.shape[-1]
        past_key_values, use_cache = self._step_cache(past_key_values, use_cache)
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        new_mask = self._new_tokens_mask(attention_mask, b, t, past)

        kv = past_key_values.for_step(self.model, b, t) if past_key_values is not None else None
        out = self.model(input_ids, attention_mask=new_mask, cache=kv, return_maps=output_attentions)
        logits, maps = (out[0], out[1]) if output_attentions else (out, None)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = logits[:, logits_to_keep]
        attentions = tuple(m.effective for m in maps) if maps is not None else None
        result = CausalLMOutputWithPast(loss=loss, logits=logits,
                                        past_key_values=past_key_values if use_cache else None,
                                        attentions=attentions)
        return result if return_dict else result.to_tuple()

    def _check_forward_arguments(self, input_ids, inputs_embeds, output_hidden_states, kwargs: dict) -> None:
        """Refuse what :meth:`forward` does not support (position_ids, inputs_embeds, hidden states, unknown
        keyword arguments) with an error that says so."""
        if kwargs.get("position_ids") is not None:
            raise ValueError("position_ids is not supported: diffattn counts rotary positions from attention_mask "
                             "(left padding is handled); pass attention_mask instead")
        unknown = sorted(k for k, v in kwargs.items() if k not in self._ignored_kwargs and v is not None and v is not False)
        if unknown:
            raise TypeError(f"DiffAttnForCausalLM.forward got unsupported argument(s): {', '.join(unknown)}")
        if inputs_embeds is not None:
            raise ValueError("DiffAttnForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if output_hidden_states:
            raise ValueError("output_hidden_states is not supported by DiffAttnForCausalLM")

    @staticmethod
    def _step_cache(past_key_values, use_cache: bool | None) -> tuple[DiffAttnCache | None, bool]:
        """The cache of this call and whether to return it: a DiffAttnCache as given, a new one when ``use_cache``
        (an empty cache of another type is replaced by ours; a filled one is an error)."""
        if past_key_values is not None and not isinstance(past_key_values, DiffAttnCache):
            if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0:
                past_key_values = None  # an empty cache of another type: replace it with ours
                use_cache = True
            else:
                raise ValueError(f"past_key_values must be a DiffAttnCache, got {type(past_key_values).__name__}")
        if use_cache is None:
            use_cache = past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = DiffAttnCache()
        return past_key_values, use_cache

    @staticmethod
    def _new_tokens_mask(attention_mask, b: int, t: int, past: int) -> torch.Tensor | None:
        """The padding mask of the T new tokens (the last T columns of ``attention_mask``), or None when there is
        none or every new token is real (the fused causal fast path)."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] not in (t, past + t):
            raise ValueError(f"attention_mask must have shape ({b}, {t}) or ({b}, {past + t}), "
                             f"got {tuple(attention_mask.shape)}")
        new_mask = attention_mask[:, -t:]
        return None if bool(new_mask.all()) else new_mask


__all__ = ["DiffAttnCache", "DiffAttnForCausalLM", "DiffAttnPreTrainedModel", "check_weights",
           "expected_shapes", "validate_model_dir"]
