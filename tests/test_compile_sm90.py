"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

Runs ``bench/compile_check.py --quick`` in a subprocess (the interpreter mode other test files
select cannot compile).  Skipped without Triton or its bundled ptxas.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Found, not imported: importing Triton here would fix its mode before the interpreter tests
# (collected after this file) could select the interpreter.
SPEC = importlib.util.find_spec("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_decode_kernels_compile_for_sm90_without_spills():
    if SPEC is None or not SPEC.origin:
        pytest.skip("Triton is not installed")
    if not (Path(SPEC.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py"), "--quick"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all kernels compiled" in res.stdout
    lines = [line for line in res.stdout.splitlines() if line.startswith("OK")]
    assert len(lines) >= 9
    assert not [line for line in lines if "spills 0 B" not in line and "regs" in line]
    # The packed words are read as 128-bit vectors on the GPU (alignment as at launch).
    assert all("128-bit loads 0" not in line for line in lines if "gemv_words" in line)
