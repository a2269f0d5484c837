"""Whether torch.compile can build CPU kernels on this machine: inductor compiles C++ with the
host's compiler against Python's headers. Tests that assert a model was compiled need both;
where either is missing the product runs uncompiled (tested on its own), and they are skipped
saying which is missing."""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import pytest


@functools.cache
def cannot_compile() -> str | None:
    """Why inductor cannot build CPU kernels here, or None where it can."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # torch's InvalidCxxCompiler, or a compiler that does not run
        return f"no working C++ compiler for torch.compile ({type(err).__name__})"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"no Python headers for torch.compile ({headers}: install python3-dev)"
    return None


needs_a_compiler = pytest.mark.skipif(
    cannot_compile() is not None, reason=cannot_compile() or "torch.compile works here"
)
