"""Helpers of the fused-kernel tests (test_kivi_triton.py, test_coupled_triton.py): import a kernel module with
Triton's CPU interpreter or compiled for the GPU, and run a test file's kernel tests in a fresh process when this one
imported triton without the interpreter (the switch is read when triton is imported)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from typing import Any, Iterator

import pytest
import torch


def interpreted() -> bool:
    """Whether triton, as imported in this process, runs kernels in its CPU interpreter (decided at its import)."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard._sum_combine, InterpretedFunction)


def _need_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")


def interpreter_module(name: str) -> Iterator[Any]:
    """Body of a module-scoped fixture: module ``name`` imported with the interpreter on (dropped afterwards)."""
    _need_triton()
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton (and each @triton.jit) is imported
    try:
        if not interpreted():
            pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process: "
                        "test_kernel_tests_in_a_fresh_process runs these")
        sys.modules.pop(name, None)
        yield importlib.import_module(name)
    finally:
        sys.modules.pop(name, None)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def compiled_module(name: str, need_gpu: bool = True) -> Any:
    """Module ``name`` imported fresh with compiled (not interpreted) kernels; skips without a GPU (if
    ``need_gpu``), without triton, or when this process interprets."""
    if need_gpu and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _need_triton()
    if interpreted():
        pytest.skip("triton runs in its CPU interpreter in this process")
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def run_in_fresh_process(test_file: str) -> None:
    """When this process imported triton without the interpreter, run ``test_file``'s other tests in a fresh one."""
    _need_triton()
    if "triton" not in sys.modules or interpreted():
        pytest.skip("the kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k",
                        "not fresh_process"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
