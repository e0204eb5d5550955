"""Selects Triton's CPU interpreter for a test module, or skips the module.

Triton decorates its own library functions (tl.sum, ...) at import, in the mode the variable
selects then, so it must be set before the first import of triton.  Machines with a GPU skip the
interpreter tests: bench/check_kernels.py covers the kernels there.
"""

import os
import sys

import pytest
import torch


def require_interpreter() -> None:
    """Call at module level, before anything imports triton."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was imported before the interpreter could be selected, or a GPU is "
                    "present (bench/check_kernels.py covers the GPU)", allow_module_level=True)


def kernels_rebuilt(*builders):
    """An autouse fixture for a module: clears the ``functools.lru_cache`` of each kernel
    builder before and after every test, so the kernels are built under the interpreter (and
    no interpreted kernel outlives the module). Assign it to a module-level name."""

    @pytest.fixture(autouse=True)
    def _rebuilt():
        for b in builders:
            b.cache_clear()
        yield
        for b in builders:
            b.cache_clear()

    return _rebuilt
