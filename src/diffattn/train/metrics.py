"""Training metrics: ``metrics.jsonl`` (+ TensorBoard when installed), λ per layer, FLOPs and MFU.

Each line of ``OUT/metrics.jsonl`` is one JSON record with ``"kind"``:

* ``"train"``: step, tokens, loss (mean over the steps since the last record, all ranks), lr,
  grad_norm (before clipping), tokens_per_s, elapsed_s, mfu (GPU only), and ``lambda`` — the list
  of λ values of every DIFF V1 / Shared DIFF layer, ``model.layers[i].attn.lambda_full()``
  (DIFF V2's λ is per token, ``sigmoid(x W_λ)``, and is not logged here);
* ``"eval"``: step, tokens, val_loss, val_ppl, val_tokens.

FLOPs per token (for MFU) follow the PaLM appendix-B convention, 6·N + attention, with the attention
term counted per query map as 6·T·(d_qk + d_v) (forward + backward, causal masking not discounted):
standard H maps (d, d); DIFF V1 / Shared DIFF 2H maps (d, 2d) — each softmax map is applied to the
2d-wide values; DIFF V2 2H maps (d, d). N excludes the token embedding (a lookup), includes the
output head.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..fsutil import write_text_atomic
from torch import nn

from ..config import ModelConfig

METRICS_FILE = "metrics.jsonl"

# Dense bf16 tensor-core peaks (TFLOP/s) of common accelerators, by substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def flops_per_token(model: nn.Module, config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward); see the module docstring."""
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed."))
    if config.tie_embeddings:
        n += config.vocab_size * config.d_model  # the tied head is still a matmul
    from ..model.attention import attention_class

    per_layer = sum(attention_class(config.attention).attention_widths(config))  # the variant's score maps
    return 6.0 * n + 6.0 * config.n_layer * seq_len * per_layer


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device (bf16 dense), or None when unknown (no MFU is reported then)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


@torch.no_grad()
def lambda_values(model: nn.Module) -> list[float]:
    """λ of every DIFF V1 / Shared DIFF layer (``attn.lambda_full()``), in layer order; [] otherwise.
    Under FSDP2 the λ vectors are sharded DTensors: every rank must call this (it gathers)."""
    values = []
    for block in getattr(model, "layers", []):
        attn = block.attn
        if hasattr(attn, "lambda_full"):
            lam = attn.lambda_full()
            if hasattr(lam, "full_tensor"):
                lam = lam.full_tensor()
            values.append(float(lam))
    return values


class MetricsLog:
    """Appends records to ``OUT/metrics.jsonl`` (and TensorBoard scalars); a no-op when not ``enabled``."""

    def __init__(self, out: str | os.PathLike, *, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self.fh = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                pass
            else:
                self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.writer is not None:
            kind, step = record.get("kind", "train"), record.get("step", 0)
            for key, value in record.items():
                if key in ("kind", "step") or value is None:
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
                elif key == "lambda":
                    for i, lam in enumerate(value):
                        self.writer.add_scalar(f"lambda/layer_{i}", lam, step)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.writer is not None:
                self.writer.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (written by a run that went past its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def read_metrics(out: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of ``OUT/metrics.jsonl`` (optionally of one kind)."""
    lines = (Path(out) / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


__all__ = ["MetricsLog", "flops_per_token", "peak_flops", "lambda_values", "read_metrics", "METRICS_FILE"]
