"""Model math: layers, kernels, attention variants, the decoder LM, its cache and decoding."""

from .attention import AttentionBase, AttentionMaps, attention_class, build_attention
from .cache import CacheError, KVCache
from .kernels import KERNELS, AttentionKernel, get_kernel
from .lm import Block, DecoderLM, build_model

__all__ = ["AttentionBase", "AttentionKernel", "AttentionMaps", "attention_class", "Block", "CacheError", "DecoderLM", "KERNELS", "KVCache",
           "build_attention", "build_model", "get_kernel"]
