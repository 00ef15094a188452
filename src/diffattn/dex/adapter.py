"""DEX adapter directories: ``adapter_config.json`` + ``adapter.safetensors`` (+ ``metrics.jsonl``).

``adapter.safetensors`` keys (layer l of the base model):

* ``layers.{l}.W_D`` (d×d, or k×d×d with ``f_d="head"``), ``layers.{l}.lambda_learn`` (scalar),
  ``layers.{l}.norm_gain`` (k×d, ``head_norm="rms"``); controls: ``layers.{l}.lora_A``/``lora_B``;
* with ``--train dex+o_proj``: ``layers.{l}.o_proj.weight`` (and ``.bias``) of the adapted layers;
* with ``--train all``: ``model.<name>`` for every base parameter (then the "adapter" is a full model).

``adapter_config.json`` records the base (model type, shapes and a fingerprint of its output
projections, so an adapter is never applied to a different model), the options, the heads, the
schedule position t (λ at inference is λ(t); λ = λ_learn once t ≥ T), and how it was trained.
Writes are atomic (temporary sibling directory, then rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..fsutil import atomic_directory, read_json
from .surgery import (AdapterProjection, DEXOptions, DEXOutputProjection, LoRAOutputProjection, adapter_modules,
                      apply_dex, attention_sites, merge_adapters, model_type_of, set_dex_step)

FORMAT = "diffattn-dex-adapter-v1"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the shapes and float32 bytes of every layer's *original* output projection."""
    h = hashlib.sha256()
    for site in attention_sites(model):
        o = site.attn.o_proj
        w = (o.base if isinstance(o, AdapterProjection) else o).weight.detach().float().cpu().contiguous()
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def base_description(model: nn.Module) -> dict:
    sites = attention_sites(model)
    cfg = model.config
    return {"model_type": model_type_of(model), "architecture": type(model).__name__,
            "n_layer": len(sites), "n_head": sites[0].n_head, "head_dim": sites[0].head_dim,
            "hidden_size": int(cfg.hidden_size), "vocab_size": int(cfg.vocab_size)}


def adapter_state(model: nn.Module, train_mode: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m in adapter_modules(model):
        for name, t in m.adapter_tensors().items():
            out[f"layers.{m.layer_idx}.{name}"] = t.detach()
        if train_mode == "dex+o_proj":
            for name, t in m.base.named_parameters():
                out[f"layers.{m.layer_idx}.o_proj.{name}"] = t.detach()
    if train_mode == "all":
        adapter_ids = {id(p) for m in adapter_modules(model) for p in m.adapter_tensors().values()}
        for name, p in model.named_parameters():
            if id(p) not in adapter_ids:
                out[f"model.{name}"] = p.detach()
    return {k: v.contiguous().cpu().clone() for k, v in out.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, options: DEXOptions, heads: dict,
                 train_mode: str, fingerprint: str, step: int, extra: dict | None = None,
                 extra_files: dict[str, Path] | None = None) -> Path:
    """Write the adapter of ``model`` to ``directory`` atomically; returns the directory."""
    directory = Path(directory)
    mods = adapter_modules(model)
    if not mods and train_mode != "all":  # plain fine-tuning (method finetune) saves the base weights alone
        raise ValueError("the model carries no adapter to save")
    tensors = adapter_state(model, train_mode)
    config = {
        "format": FORMAT, "diffattn_version": __version__,
        "base": {**base_description(model), "fingerprint": fingerprint},
        "options": options.to_dict(),
        "heads": {str(int(k)): sorted(int(h) for h in v) for k, v in sorted(heads.items(), key=lambda kv: int(kv[0]))},
        "lora_ranks": {str(m.layer_idx): m.rank for m in mods if isinstance(m, LoRAOutputProjection)},
        "train_mode": train_mode,
        "step": int(step),
        "lambda": {str(m.layer_idx): _lam(m) for m in mods if isinstance(m, DEXOutputProjection)},
        "adapter_params": int(sum(v.numel() for k, v in tensors.items() if not k.startswith("model.")
                                  and ".o_proj." not in k)),
        "mergeable": options.head_norm == "none",
        **(extra or {}),
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "diffattn": FORMAT})
        (tmp / CONFIG_NAME).write_text(dumps_compact(config) + "\n")
        for name, src in (extra_files or {}).items():
            if Path(src).is_file():
                shutil.copyfile(src, tmp / name)
    return directory


def dumps_compact(obj) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s*([-0-9.eE,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)


def _lam(m: DEXOutputProjection) -> float:
    lam = m.current_lambda()
    return round(float(lam.detach()) if torch.is_tensor(lam) else float(lam), 6)


def read_adapter_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (not a DEX adapter directory)")
    cfg = read_json(path)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} adapter config")
    if not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    for key, kind in (("options", dict), ("heads", dict), ("base", dict)):
        if not isinstance(cfg.get(key), kind):
            raise ValueError(f"{path}: {key!r} must be a JSON object, got {type(cfg.get(key)).__name__}")
    lam = cfg.get("lambda") or {}
    bad = {k: v for k, v in (lam.items() if isinstance(lam, dict) else [("lambda", lam)])
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        k, v = next(iter(bad.items()))
        raise ValueError(f"{path}: lambda of layer {k} must be a finite number, got {v!r}")
    step = cfg.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: step must be an integer >= 0, got {step!r}")
    return cfg


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, check_fingerprint: bool = True) -> dict:
    """Apply the adapter in ``directory`` to a fresh base ``model`` in place; returns its config."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    want, have = cfg["base"], base_description(model)
    for key in ("model_type", "n_layer", "n_head", "head_dim", "hidden_size"):
        if want.get(key) != have.get(key):
            raise ValueError(f"adapter {directory} was made for a {want.get('model_type')} base with "
                             f"{key}={want.get(key)}, this base has {have.get(key)}")
    if adapter_modules(model):
        raise ValueError("the base model already carries an adapter")
    if check_fingerprint and want.get("fingerprint") != base_fingerprint(model):
        raise ValueError(f"adapter {directory} was trained on a different base model (output-projection "
                         f"fingerprint differs)")
    options = DEXOptions.from_dict(cfg["options"])
    heads = {int(k): v for k, v in cfg["heads"].items()}
    if options.method == "lora":
        ranks = {int(k): int(v) for k, v in cfg.get("lora_ranks", {}).items()}
        for layer in heads:
            apply_dex(model, {layer: heads[layer]}, DEXOptions(**{**options.to_dict(), "lora_rank": ranks[layer]}))
    else:
        apply_dex(model, heads, options)
    try:
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except Exception as e:  # safetensors' own error types: truncated or corrupt file
        raise ValueError(f"{directory / WEIGHTS_NAME}: cannot read safetensors "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    mods = {m.layer_idx: m for m in adapter_modules(model)}
    named = dict(model.named_parameters())
    used = set()
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("model."):
                name = key[len("model."):]
                if name not in named:
                    raise ValueError(f"{WEIGHTS_NAME}: {key} does not match a parameter of the base model")
                target = named[name]
            else:
                _, layer, rest = key.split(".", 2)
                m = mods.get(int(layer))
                if m is None:
                    raise ValueError(f"{WEIGHTS_NAME}: {key} names layer {layer}, which carries no adapter")
                if rest.startswith("o_proj."):
                    target = dict(m.base.named_parameters())[rest[len("o_proj."):]]
                else:
                    target = m.adapter_tensors().get(rest)
                    if target is None:
                        raise ValueError(f"{WEIGHTS_NAME}: unexpected tensor {key}")
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{WEIGHTS_NAME}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
            used.add(key)
    missing = [f"layers.{m.layer_idx}.{n}" for m in mods.values() for n in m.adapter_tensors()
               if f"layers.{m.layer_idx}.{n}" not in used]
    if missing:
        raise ValueError(f"{WEIGHTS_NAME}: missing {', '.join(missing[:4])}")
    set_dex_step(model, int(cfg.get("step", 0)))
    return cfg


def save_merged(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, copy_from: Path | None = None) -> Path:
    """Merge the adapter into ``o_proj`` and save a stock model directory (save_pretrained) atomically."""
    out = Path(out)
    merge_adapters(model)
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if copy_from is not None:  # licence / notice files of the base
            for name in ("LICENSE", "GEMMA_TERMS.html", "NOTICE.md"):
                if (copy_from / name).is_file():
                    shutil.copyfile(copy_from / name, tmp / name)
    return out


def apply_to_eval_adapter(hf_adapter, directory: str | os.PathLike) -> None:
    """Apply a DEX adapter directory (``diffattn adapt dex`` output) in place to an evaluation
    ``HFAdapter`` of its base model (registered with ``diffattn.eval.loader`` for ``--adapter``)."""
    from ..eval.adapter import json_sha256, weights_sha256

    cfg = load_adapter(hf_adapter.model, directory)
    hf_adapter.model.eval()
    hf_adapter.differential = True
    hf_adapter.name = f"{hf_adapter.name}+{Path(directory).resolve().name}"
    hf_adapter.dex_adapter = {"path": str(Path(directory).resolve()), "method": cfg["options"].get("method"),
                              "step": cfg.get("step"),
                              "config_sha256": json_sha256(read_json(Path(directory) / CONFIG_NAME)),
                              "weights_sha256": weights_sha256(Path(directory), ("adapter.safetensors",))}
