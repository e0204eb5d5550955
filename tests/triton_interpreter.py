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
