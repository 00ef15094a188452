"""diffattn: the differential-attention family of Transformers (DIFF V1, DIFF V2, Shared DIFF, DEX)
under one interface, with training, evaluation and benchmark tooling."""

from . import presets
from .config import ATTENTION_VARIANTS, KERNELS, ModelConfig
from .model import DecoderLM, KVCache, build_model

__version__ = "0.1.0"

__all__ = ["ATTENTION_VARIANTS", "KERNELS", "DecoderLM", "KVCache", "ModelConfig", "build_model", "presets",
           "__version__"]

# Register "diffattn" with transformers' AutoConfig / AutoModelForCausalLM. Cheap: transformers is not
# imported here; a post-import hook registers when its auto classes load (see hf/autoregister.py).
try:
    from .hf.autoregister import install as _install_hf

    _install_hf()
except Exception as _e:  # never break `import diffattn`
    import warnings

    warnings.warn(f"diffattn: could not register with transformers ({_e})", RuntimeWarning, stacklevel=2)
