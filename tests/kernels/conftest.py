"""Kernel tests: where Triton's CPU interpreter is switched on, and how to ask for it.

Triton fixes interpreted versus compiled mode when it is first imported (its own
library functions are ``@triton.jit``-decorated then), so one process runs one mode.
This conftest, imported before the test modules of this folder:

* on a machine without CUDA, sets ``TRITON_INTERPRET=1`` (unless the variable is set
  already), so tests/kernels/test_triton.py runs the kernels on the CPU. The variable
  stays set for the rest of the process; nothing else in the suite runs Triton on CPU
  tensors (``backend="auto"`` never picks Triton for them), so no other test changes;
* on a machine with CUDA, leaves the variable alone: the GPU tests
  (tests/kernels/test_triton_gpu.py) run the compiled kernels and the interpreter
  tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if (not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
        and "triton" not in sys.modules):
    os.environ["TRITON_INTERPRET"] = "1"


def interpreter_ready() -> tuple[bool, str]:
    """Whether Triton runs interpreted in this process, and if not, why."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") != "1":
        if torch.cuda.is_available():
            return False, "a CUDA GPU is present: test_triton_gpu.py runs the compiled kernels"
        return False, ("triton was imported before this conftest could set TRITON_INTERPRET=1; "
                       "run with TRITON_INTERPRET=1 or run tests/kernels on its own")
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(std.max, InterpretedFunction):
        return False, "triton was imported before TRITON_INTERPRET=1 was set"
    return True, ""


@pytest.fixture(scope="session")
def require_interpreter():
    """Skip unless Triton's kernels run interpreted in this process."""
    ok, why = interpreter_ready()
    if not ok:
        pytest.skip(f"Triton interpreter unavailable: {why}")


@pytest.fixture(scope="session")
def require_compiled_triton():
    """Skip unless a CUDA GPU is present and Triton compiles kernels for it."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels run interpreted in this process")
