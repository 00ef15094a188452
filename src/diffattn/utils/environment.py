"""The one record of where a result was measured: date, command, versions, CPU and GPU. The comparison study
(``results.json`` → ``environment``), the init study's document, the DEX study (``study.json`` → ``environment``),
``diffattn bench`` (``--json`` → ``env``) and the GPU check (``1_env.json``) all write it; the report,
``benchmarks/to_markdown.py`` and ``benchmarks/gpu_results_to_docs.py`` read it.

It needs only torch, ``platform`` and the standard library (the GPU check runs it from the source tree on a
machine where nothing is installed); torch is imported when it is called, not when this module is imported.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def version_of(module: str) -> str | None:
    """``module.__version__``, or None when it cannot be imported (or has no version)."""
    try:
        return __import__(module).__version__
    except Exception:
        return None


def command_line() -> str:
    """The command being run: ``diffattn ARGS`` under the console script, else the interpreter's argv."""
    if sys.argv and Path(sys.argv[0]).stem == "diffattn":
        return "diffattn " + " ".join(sys.argv[1:])
    return " ".join(sys.argv)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi`` (None when it is absent or fails)."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None


def _gpu(torch, index: int) -> dict[str, Any]:
    """The GPU fields of the record, for CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    return {"gpu": torch.cuda.get_device_name(index), "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
            "driver": _driver_version()}


def environment(device: str | None = None) -> dict[str, Any]:
    """Where a result was measured. ``device``: what the run computes on (``cpu``, ``cuda``, ``cuda:N``; None or
    ``auto``: CUDA when available, else the CPU). ``device`` in the record is the GPU's name, else the device type
    (``cpu``); the GPU fields (``gpu``, ``gpu_count``, ``gpu_memory_gib``, ``capability``, ``driver``) are there
    only when the run's device is a GPU. A package that is not installed has the version None."""
    import torch

    from .._version import __version__

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on = torch.device(device)
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command_line(),
        "diffattn": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": version_of("transformers"), "triton": version_of("triton"),
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        env["load_average_1m"] = round(os.getloadavg()[0], 2)
    if on.type == "cuda":
        env.update(_gpu(torch, on.index or 0))
    env["device"] = env["gpu"] if on.type == "cuda" else on.type
    return env


__all__ = ["environment", "version_of", "command_line", "cpu_name"]
