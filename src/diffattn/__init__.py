"""diffattn: the differential-attention family of Transformers (DIFF V1, DIFF V2, Shared DIFF, DEX)
under one interface, with training, evaluation and benchmark tooling."""

from . import presets
from .config import ATTENTION_VARIANTS, KERNELS, ModelConfig
from .model import DecoderLM, KVCache, build_model

__version__ = "0.1.0"

__all__ = ["ATTENTION_VARIANTS", "KERNELS", "DecoderLM", "KVCache", "ModelConfig", "build_model", "presets",
           "__version__"]
