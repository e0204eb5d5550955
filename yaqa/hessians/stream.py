"""Streaming finished factors: packed on the device, written from host memory in the background,
and read back one decoder block at a time for rounding.

Collection hands each finished group of blocks to :class:`BackgroundWriter`: the factors are
packed to lower triangles where they were computed, copied to host memory (which frees the
device for the next group at once) and written to disk by a worker thread while the next group
collects. Rounding reads them through :class:`StreamedHessians`, a read-only mapping that keeps
one block's factors in memory, so the whole model's factors are never resident.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from .packed import PACKED_DTYPES, pack_lower, unpack_lower

log = logging.getLogger(__name__)

FACTOR_KEYS = ("H_in", "H_out", "H_x")


def storage_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"storage dtype must be 'float32' or 'bfloat16', got {name!r}")
    return PACKED_DTYPES[name]


def pack_factors(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Every 2-D factor (key ending in .H_in/.H_out/.H_x) as a packed triangle in ``dtype``,
    copied to host memory; other tensors copied unchanged."""
    out = {}
    for k, v in tensors.items():
        if k.rsplit(".", 1)[-1] in FACTOR_KEYS and v.dim() == 2:
            v = pack_lower(v.detach(), dtype)
        out[k] = v.detach().to("cpu", non_blocking=False).contiguous()
    return out


def unpack_factor(t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A stored factor as a full symmetric matrix: packed triangles (this format) or full
    matrices (files written before it) both load."""
    return unpack_lower(t, dtype) if t.dim() == 1 else t.to(dtype)


class BackgroundWriter:
    """Writes block files on one worker thread; :meth:`wait` re-raises the first failure."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yaqa-writer")
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    def submit(self, fn, *args: Any) -> None:
        with self._lock:
            self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


class StreamedHessians(Mapping):
    """``{full linear name: LayerHessian}`` over a Hessian directory, one block in memory.

    Looking up a layer of another block drops the current block's factors and reads the new
    block's file (factors unpacked to fp32 on ``device``). Built by
    :func:`yaqa.hessians.load_hessians` with ``stream=True``.
    """

    def __init__(self, files: dict[int, Path], names: dict[str, int], meta: dict[str, Any],
                 device: str | torch.device = "cpu") -> None:
        self._files, self._names, self._meta = files, names, meta
        self.device = device
        self._block: int | None = None
        self._cache: dict[str, Any] = {}
        self.reads = 0  # block files read so far (tests and logs)

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        b = self._names[name]
        if b != self._block:
            from .storage import read_block_hessians

            self._cache = {}  # drop the previous block before reading the next
            self._cache = read_block_hessians(self._files[b], self._meta, self.device)
            self._block = b
            self.reads += 1
        return self._cache[name]

    def identities(self) -> set[str]:
        """The collection identity every factor here carries (see LayerHessian.identity)."""
        from .storage import identity_hash, run_identity

        return {identity_hash(run_identity(self._meta))}

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def block_layer_names(path: Path) -> list[str]:
    """Full linear names stored in one block file, from its header only."""
    import json

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = json.loads((f.metadata() or {}).get("yaqa", "{}"))
    prefix = meta.get("block_prefix", "")
    return [f"{prefix}{rel}" for rel in meta.get("layers", {})]

