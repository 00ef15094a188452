"""Cheap checks of a Hugging Face model directory before transformers' (slow) load.

``diffattn generate`` and ``diffattn eval`` hand directories whose ``model_type`` is not diffattn to
``AutoModelForCausalLM.from_pretrained``. Two kinds of directory must not get that far:

* **pickle-only weights** (``pytorch_model.bin``, ``*.pt``, ``*.pth`` and no ``*.safetensors``): the README
  promises that nothing is ever unpickled, so they are refused with the same one line as ``diffattn import``;
* **diffattn weights under another model_type** (a ``config.json`` edited to ``"llama"``): the tensor names
  are read from the safetensors header (no tensor data) and the directory is refused before a load that
  would take minutes and end in a traceback.
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# names only diffattn's DecoderLM gives its tensors (checkpoint.WEIGHT_PREFIX + module paths)
_DIFFATTN_MARKERS = ("model.embed.weight", ".attn.q_proj.weight", ".attn.o_proj.weight", ".ffn.down.weight")


def check_hf_directory(directory: str | Path, model_type: str | None) -> None:
    """Raise ValueError / FileNotFoundError (one line) when ``directory`` must not reach transformers."""
    directory = Path(directory)
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES) if directory.is_dir() else []
        if pickles:
            raise ValueError(f"{directory}: only pickle weights ({pickles[0]}); diffattn never unpickles files: "
                             "convert them to safetensors (save_pretrained(safe_serialization=True)) first")
        return  # nothing to check here (e.g. a GGUF base): transformers reports what is missing
    from safetensors import safe_open

    try:
        with safe_open(str(shards[0]), framework="pt") as f:
            names = list(f.keys())
    except Exception as e:  # safetensors' own error types for truncated or corrupt files
        raise ValueError(f"{shards[0]}: cannot read safetensors ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if any(n == _DIFFATTN_MARKERS[0] or any(n.endswith(m) and ".layers." in n for m in _DIFFATTN_MARKERS[1:])
           for n in names):
        raise ValueError(f"{directory}: config.json says model_type {model_type!r}, but the weights are a diffattn "
                         "model's (set model_type to \"diffattn\", or convert with `diffattn export`)")


__all__ = ["check_hf_directory"]
