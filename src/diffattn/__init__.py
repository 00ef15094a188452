"""diffattn: the differential-attention family of Transformers (DIFF V1, DIFF V2, Shared DIFF, DEX)
under one interface, with training, evaluation and benchmark tooling.

``import diffattn`` is cheap: the model classes (and torch) load on first use of ``DecoderLM``,
``KVCache`` or ``build_model``, so the command line starts without importing torch.
"""

from . import presets, variants
from ._version import __version__
from .config import ATTENTION_VARIANTS, KERNELS, ModelConfig

__all__ = ["ATTENTION_VARIANTS", "KERNELS", "DecoderLM", "KVCache", "ModelConfig", "build_model", "presets",
           "variants", "__version__"]

_LAZY = {"DecoderLM": "model", "KVCache": "model", "build_model": "model"}


def __getattr__(name):
    if name in _LAZY:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'diffattn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# Register "diffattn" with transformers' AutoConfig / AutoModelForCausalLM. Cheap: transformers is not
# imported here; a post-import hook registers when its auto classes load (see hf/autoregister.py).
try:
    from .hf.autoregister import install as _install_hf

    _install_hf()
except Exception as _e:  # never break `import diffattn`
    import warnings

    warnings.warn(f"diffattn: could not register with transformers ({_e})", RuntimeWarning, stacklevel=2)
