"""Model math: layers, kernels, attention variants, the decoder LM, its cache and decoding."""

from .attention import ATTENTION_CLASSES, AttentionMaps, build_attention
from .cache import CacheError, KVCache
from .kernels import KERNELS, get_kernel
from .lm import Block, DecoderLM, build_model

__all__ = ["ATTENTION_CLASSES", "AttentionMaps", "Block", "CacheError", "DecoderLM", "KERNELS", "KVCache",
           "build_attention", "build_model", "get_kernel"]
