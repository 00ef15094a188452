"""Runs tests/test_triton_diff.py in a fresh process when this session cannot run the Triton
interpreter: TRITON_INTERPRET=1 only takes effect if it is set before triton is first imported, and
in a full test session another module (anything importing torch._dynamo) may import triton first.
Skips when test_triton_diff.py already ran here (interpreter active, or a GPU).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is an optional package (pip install 'diffattn[triton]')")


def test_triton_kernel_tests_in_a_fresh_interpreter_process(request):
    from diffattn.model import triton_diff

    if torch.cuda.is_available() or triton_diff.INTERPRET:
        pytest.skip("not needed: tests/test_triton_diff.py runs in this process itself (a CUDA GPU, or TRITON_INTERPRET=1 "
                    "set before triton was imported)")
    target = Path(__file__).with_name("test_triton_diff.py")
    markexpr = request.config.getoption("markexpr") or "not slow"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", markexpr, str(target)],
                          cwd=target.parent.parent, env=env, capture_output=True, text=True, timeout=1800)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
    assert proc.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
