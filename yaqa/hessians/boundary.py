"""Hidden states at the pass boundaries: later block groups start their forward there.

When the blocks are collected in several groups (``blocks_per_pass``), every pass of group k
needs the hidden state entering its first block. Without this cache, each pass recomputes it by
running the forward through all earlier blocks. :class:`BoundaryCache` keeps, for every
micro-batch, the hidden state entering the first block of each later group, as soon as some pass
computes it (normally the first pass of the first group, which runs through every block).
Later passes inject it at their first block and skip the blocks before it.

The values are the very ones the full forward would give (the same kernels on the same inputs),
and the sampled labels are seeded per sequence, so the factors are those of a run without the
cache.

Storage: one flat [tokens, hidden] array per boundary, in host memory, or in files under the
output directory (``torch.from_file``, shared: the page cache holds what fits, and a resumed
command finds the entries of the interrupted one). A per-micro-batch flag array says which
entries are complete; a flag is set only after its entry is copied, so an interrupted copy is
recomputed, never read. On CUDA, hidden states leave the device through pinned staging buffers
(asynchronous copies, waited for after the micro-batch's backward has been launched).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

BOUNDARY_MODES = ("auto", "memory", "disk", "off")
CACHE_DIR = "boundary-cache"
# "auto" keeps the cache in host memory only up to this share of the memory available when the
# collection starts: finished factors pass through host memory on their way to disk too
HOST_SHARE = 0.5


@dataclass
class BoundaryChoice:
    """Where the boundary cache goes, and a one-line reason (printed by the plan)."""

    mode: str          # "memory", "disk" or "off"
    bytes: int         # size of the whole cache (0 when there is no later group)
    reason: str


def boundary_bytes(n_tokens: int, hidden: int, dtype_bytes: int, n_boundaries: int) -> int:
    return n_tokens * hidden * dtype_bytes * n_boundaries


def host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return info.get("MemAvailable", info.get("MemTotal"))
    except (OSError, ValueError, IndexError):
        return None


def disk_free_bytes(path: str | Path | None) -> int | None:
    if path is None:
        return None
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def choose_boundary_cache(requested: str, cache_bytes: int, *, host_bytes: int | None,
                          disk_bytes: int | None, world: int = 1) -> BoundaryChoice:
    """Decide the cache's place: the requested one if it fits, "auto": host memory if the cache
    takes at most half of what is available, else disk if there is room, else none."""
    if requested not in BOUNDARY_MODES:
        raise ValueError(f"boundary_cache must be one of {BOUNDARY_MODES}, got {requested!r}")
    g = lambda b: f"{b / 1024 ** 3:.1f} GiB"  # noqa: E731
    if cache_bytes == 0:
        return BoundaryChoice("off", 0, "one block group: no pass boundary to cache")
    if requested == "off":
        return BoundaryChoice("off", cache_bytes, "off as asked: later passes recompute the "
                              "forward through earlier blocks")
    # ranks on one host each cache their own micro-batches: the host holds the whole cache
    host_ok = host_bytes is not None and cache_bytes <= HOST_SHARE * host_bytes
    disk_ok = disk_bytes is not None and cache_bytes <= 0.9 * disk_bytes
    if requested in ("auto", "memory") and host_ok:
        return BoundaryChoice("memory", cache_bytes, f"{g(cache_bytes)} of hidden states in host "
                              f"memory ({g(host_bytes)} available)")
    if requested in ("auto", "disk") and disk_ok:
        why = "" if requested == "disk" else (
            f", over half the host memory available ({g(host_bytes or 0)})")
        return BoundaryChoice("disk", cache_bytes, f"{g(cache_bytes)} of hidden states on disk "
                              f"({g(disk_bytes)} free){why}")
    where = {"memory": f"host memory ({g(host_bytes or 0)} available)",
             "disk": f"disk ({g(disk_bytes or 0)} free)" if disk_bytes is not None
             else "disk (no output directory)",
             "auto": f"half the host memory ({g(host_bytes or 0)} available) or the disk ("
                     + (f"{g(disk_bytes)} free)" if disk_bytes is not None
                        else "no output directory)")}[requested]
    return BoundaryChoice("off", cache_bytes, f"{g(cache_bytes)} of hidden states do not fit "
                          f"{where}: later passes recompute the forward through earlier blocks")


class BoundaryCache:
    """Hidden states entering blocks ``starts`` for every micro-batch this rank processes.

    Args:
        starts: first blocks of the later groups (boundary block indices, all > 0).
        mb_tokens: tokens of every micro-batch of the data, in order (all ranks').
        hidden, dtype: the hidden state's width and dtype.
        mode: "memory" or "disk".
        directory: for "disk", where the files go (created; wiped when ``key`` differs).
        key: identity of the data, model and split (a stale directory is discarded).
        rank, world: this rank takes micro-batches ``rank, rank + world, ...``.
    """

    def __init__(self, starts: list[int], mb_tokens: list[int], hidden: int, dtype: torch.dtype,
                 mode: str, *, directory: Path | None = None, key: str = "",
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        if mode not in ("memory", "disk"):
            raise ValueError(f"mode must be 'memory' or 'disk', got {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("a disk boundary cache needs a directory")
        self.starts = sorted(set(starts))
        self.hidden, self.dtype, self.mode = hidden, dtype, mode
        self.device = torch.device(device)
        self.rank = rank
        self.directory = Path(directory) if directory is not None else None
        mine = [gi for gi in range(len(mb_tokens)) if gi % world == rank]
        self._offset: dict[int, tuple[int, int]] = {}
        pos = 0
        for gi in mine:
            self._offset[gi] = (pos, mb_tokens[gi])
            pos += mb_tokens[gi]
        self.tokens = pos
        self._index = {gi: j for j, gi in enumerate(mine)}
        self._store: dict[int, Tensor] = {}
        self._flags: dict[int, Tensor] = {}
        self._pending: list[tuple[int, int, Tensor, Any]] = []
        self._staging: list[Tensor] = []
        self.returns_tuple: bool | None = None  # decoder blocks' output form, learnt on a call
        self._meta: dict[str, Any] = {}
        self.hits = 0      # micro-batches started from a cached state (tests, logs)
        self.writes = 0
        if mode == "disk":
            self._open_dir(key, rank)
        for s in self.starts:
            self._store[s], self._flags[s] = self._allocate(s, rank)

    # -- storage -------------------------------------------------------------------------------
    def _open_dir(self, key: str, rank: int) -> None:
        d = self.directory
        meta_path = d / f"meta-rank{rank}.json"
        meta = {"key": key, "starts": self.starts, "tokens": self.tokens, "hidden": self.hidden,
                "dtype": str(self.dtype),
                "offsets": json.loads(json.dumps(sorted(self._offset.items())))}
        old = None
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                old = None
        if old is not None and (old.get("key") != key or old.get("tokens") != self.tokens
                                or old.get("hidden") != self.hidden
                                or old.get("dtype") != str(self.dtype)
                                or old.get("offsets") != meta["offsets"]):
            log.info("boundary cache in %s is from another request: discarded", d)
            for p in d.glob(f"*-rank{rank}.*"):
                p.unlink()
            old = None
        d.mkdir(parents=True, exist_ok=True)
        meta["starts"] = sorted(set(self.starts) | set(old["starts"] if old else []))
        self.returns_tuple = (old or {}).get("returns_tuple")
        self._meta, self._meta_path = meta, meta_path
        self._write_meta()

    def _write_meta(self) -> None:
        self._meta["returns_tuple"] = self.returns_tuple
        tmp = self._meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._meta))
        os.replace(tmp, self._meta_path)

    def _allocate(self, start: int, rank: int) -> tuple[Tensor, Tensor]:
        n, nmb = self.tokens * self.hidden, len(self._index)
        if self.mode == "memory":
            # plain (pageable) memory: pages are committed only when an entry is written
            return (torch.empty(self.tokens, self.hidden, dtype=self.dtype),
                    torch.zeros(nmb, dtype=torch.uint8))
        data = self.directory / f"block{start:04d}-rank{rank}.bin"
        flags = self.directory / f"block{start:04d}-rank{rank}.flags"
        for p, size in ((data, n * _itemsize(self.dtype)), (flags, nmb)):
            if not p.exists() or p.stat().st_size != size:
                with open(p, "wb") as f:  # sparse: no disk blocks until written
                    f.truncate(size)
        store = torch.from_file(str(data), shared=True, size=n, dtype=self.dtype)
        fl = torch.from_file(str(flags), shared=True, size=nmb, dtype=torch.uint8)
        return store.view(self.tokens, self.hidden), fl

    # -- queries -------------------------------------------------------------------------------
    def has(self, start: int, gi: int) -> bool:
        return (start in self._flags and gi in self._index
                and bool(self._flags[start][self._index[gi]]))

    def best_start(self, lo: int, gi: int) -> int | None:
        """The deepest boundary at or before block ``lo`` cached for micro-batch ``gi``."""
        ok = [s for s in self.starts if s <= lo and self.has(s, gi)]
        return max(ok) if ok else None

    def wanted(self, gi: int, after: int) -> list[int]:
        """Boundaries past block ``after`` (where this micro-batch's forward starts) that are not
        cached yet for ``gi``."""
        return [s for s in self.starts if s > after and gi in self._index and not self.has(s, gi)]

    # -- copies ----------------------------------------------------------------------------------
    def get(self, start: int, gi: int, device: torch.device) -> Tensor:
        """The cached hidden state [tokens, hidden] of ``gi`` at ``start``, on ``device``."""
        off, n = self._offset[gi]
        src = self._store[start][off:off + n]
        self.hits += 1
        if device.type != "cuda":
            return src.to(device, copy=True)
        buf = self._stage(n)
        buf[:n].copy_(src)
        out = buf[:n].to(device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._pending.append((-1, -1, buf, ev))  # the buffer is reused once the copy is done
        return out

    def put(self, start: int, gi: int, h: Tensor) -> None:
        """Keep ``h`` (the hidden state entering block ``start``) for ``gi``; the copy completes
        in :meth:`commit`."""
        off, n = self._offset[gi]
        h = h.detach().reshape(-1, self.hidden)
        if h.shape[0] != n or h.dtype != self.dtype:
            raise ValueError(f"hidden state of shape {tuple(h.shape)} and dtype {h.dtype} does not"
                             f" fit the boundary cache ({n} x {self.hidden}, {self.dtype})")
        if h.device.type != "cuda":
            self._store[start][off:off + n].copy_(h)
            self._flag(start, gi)
            return
        buf = self._stage(n)
        buf[:n].copy_(h, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._pending.append((start, gi, buf, ev))

    def commit(self) -> None:
        """Finish the copies of :meth:`put` and :meth:`get`: entries become readable."""
        pending, self._pending = self._pending, []
        for start, gi, buf, ev in pending:
            ev.synchronize()
            if start >= 0 and start in self._store:
                off, n = self._offset[gi]
                self._store[start][off:off + n].copy_(buf[:n])
                self._flag(start, gi)
            self._staging.append(buf)

    def _flag(self, start: int, gi: int) -> None:
        self._flags[start][self._index[gi]] = 1
        self.writes += 1

    def _stage(self, n: int) -> Tensor:
        """A pinned buffer of at least ``n`` rows, free (its last copy has completed)."""
        for i, b in enumerate(self._staging):
            if b.shape[0] >= n:
                return self._staging.pop(i)
        return torch.empty(n, self.hidden, dtype=self.dtype, pin_memory=True)

    def drop(self, start: int) -> None:
        """Group ``start`` is finished: free (or delete) its entries."""
        self.commit()
        self._store.pop(start, None)
        self._flags.pop(start, None)
        if start in self.starts:
            self.starts.remove(start)
        if self.mode == "disk":
            for p in self.directory.glob(f"block{start:04d}-rank{self.rank}.*"):
                p.unlink(missing_ok=True)

    def close(self, remove: bool) -> None:
        """Release everything; ``remove``: delete the directory (the collection is finished)."""
        self.commit()
        self._store.clear()
        self._flags.clear()
        self._staging.clear()
        if self.mode == "disk" and self.directory is not None:
            if remove:
                shutil.rmtree(self.directory, ignore_errors=True)
            elif self.directory.exists():
                self._write_meta()  # a resumed command skips blocks from its first micro-batch


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
