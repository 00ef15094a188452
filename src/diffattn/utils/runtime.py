"""One device resolver and one dtype vocabulary for every command and library entry point.

Dtype names: the long torch spellings (``float32``, ``bfloat16``, ``float16``) and the short ones
(``fp32``, ``bf16``, ``fp16``) name the same three dtypes everywhere; a command may offer a subset.
"""

from __future__ import annotations

import torch

from .errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str, *, what: str = "--dtype", choices=None) -> torch.dtype:
    """The torch dtype named ``name`` (see :data:`DTYPES`); a :class:`UsageError` naming ``what`` otherwise."""
    valid = tuple(choices) if choices is not None else tuple(DTYPES)
    if name not in valid or name not in DTYPES:
        raise UsageError(f"{what}: unknown dtype {name!r}; valid: {', '.join(valid)}")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None, *, what: str = "--device") -> torch.device:
    """``auto``/None -> cuda when available else cpu; a named device is checked to exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{what}: unknown device {device!r} (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{what} {device}: CUDA is not available on this machine")
    return dev


__all__ = ["DTYPES", "parse_dtype", "resolve_device"]
