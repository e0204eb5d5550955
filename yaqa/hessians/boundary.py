"""Hidden states and their gradients at the pass boundaries: each block group runs only its own
blocks.

When the blocks are collected in several groups (``blocks_per_pass``), every pass of a group
needs the hidden state entering its first block (a forward through all earlier blocks) and the
loss gradient leaving its last block (a forward and a backward through all later blocks and the
head). :class:`BoundaryCache` keeps both, per micro-batch:

* the groups are collected top-down; the top group's first pass runs the whole model, and its
  forward keeps the hidden state entering every lower group's first block;
* every group's backward keeps the gradient at its own first block (its leaf), which is the
  gradient leaving the last block of the group below;
* a lower group then injects its cached state at its first block (the blocks before it are
  skipped), stops the forward after its last block and starts the backward there from the
  cached gradient: no logits, no labels, no other blocks.

The values are the very ones the full forward and backward give (the same kernels on the same
inputs; the sampled labels are seeded per sequence), so the factors are those of a run without
the cache, bit for bit on CPU. At its peak (during the top group) the cache holds one state per
lower group and one gradient: ``groups × tokens × hidden`` values in the model's dtype.

Storage: one flat [tokens, hidden] array per entry, in host memory, or in files under the
output directory (``torch.from_file``, shared: the page cache holds what fits, and a resumed
command finds the entries of the interrupted one). A per-micro-batch flag array says which
entries are complete; a flag is set only after its entry is copied, so an interrupted copy is
recomputed, never read. A missing entry only costs time: that micro-batch runs the model from
the embeddings to the head, as without the cache. On CUDA, entries leave and reach the device
through pinned staging buffers (asynchronous copies, waited for at the end of the micro-batch).
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
HOST_SHARE = 0.6


@dataclass
class BoundaryChoice:
    """Where the boundary cache goes, and a one-line reason (printed by the plan)."""

    mode: str          # "memory", "disk" or "off"
    bytes: int         # size of the whole cache (0 when there is no later group)
    reason: str


def boundary_bytes(n_tokens: int, hidden: int, dtype_bytes: int, n_boundaries: int) -> int:
    return n_tokens * hidden * dtype_bytes * n_boundaries


def host_available_bytes() -> int | None:
    """The host memory available to a new allocation (MemAvailable), or None where
    /proc/meminfo cannot be read."""
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
    takes at most 60% of what is available, else disk if there is room, else none."""
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
            f", over {HOST_SHARE:.0%} of the host memory available ({g(host_bytes or 0)})")
        return BoundaryChoice("disk", cache_bytes, f"{g(cache_bytes)} of hidden states on disk "
                              f"({g(disk_bytes)} free){why}")
    where = {"memory": f"host memory ({g(host_bytes or 0)} available)",
             "disk": f"disk ({g(disk_bytes or 0)} free)" if disk_bytes is not None
             else "disk (no output directory)",
             "auto": f"{HOST_SHARE:.0%} of the host memory ({g(host_bytes or 0)} available) or the disk ("
                     + (f"{g(disk_bytes)} free)" if disk_bytes is not None
                        else "no output directory)")}[requested]
    return BoundaryChoice("off", cache_bytes, f"{g(cache_bytes)} of hidden states do not fit "
                          f"{where}: later passes recompute the forward through earlier blocks")


class BoundaryCache:
    """Per micro-batch, the hidden states entering blocks ``starts`` and the loss gradients with
    respect to the hidden states entering blocks ``grads``, for the micro-batches of this rank.

    Args:
        starts: first blocks of the later groups (boundary block indices, all > 0).
        mb_tokens: tokens of every micro-batch of the data, in order (all ranks').
        hidden, dtype: the hidden state's width and dtype.
        mode: "memory" or "disk".
        grads: boundaries whose gradient is kept (the first block of every group but the top
            one, which groups are collected top-down: the group above leaves it behind).
        directory: for "disk", where the files go (created; wiped when ``key`` differs).
        key: identity of the data, model and split (a stale directory is discarded).
        rank, world: this rank takes micro-batches ``rank, rank + world, ...``.
    """

    def __init__(self, starts: list[int], mb_tokens: list[int], hidden: int, dtype: torch.dtype,
                 mode: str, *, grads: list[int] = (), directory: Path | None = None,
                 key: str = "", rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu"):
        if mode not in ("memory", "disk"):
            raise ValueError(f"mode must be 'memory' or 'disk', got {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("a disk boundary cache needs a directory")
        self.starts = sorted(set(starts))
        self.grads = sorted(set(grads))
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
        self._store: dict[tuple[str, int], Tensor] = {}
        self._flags: dict[tuple[str, int], Tensor] = {}
        self._pending: list[tuple[tuple[str, int] | None, int, Tensor, Any]] = []
        self._staging: list[Tensor] = []
        self.returns_tuple: bool | None = None  # decoder blocks' output form, learnt on a call
        self._meta: dict[str, Any] = {}
        self.hits = 0       # micro-batches started from a cached state (tests, logs)
        self.grad_hits = 0  # micro-batches whose backward started from a cached gradient
        self.writes = 0
        if mode == "disk":
            self._open_dir(key, rank)
        for k in [("h", s) for s in self.starts] + [("g", s) for s in self.grads]:
            self._store[k], self._flags[k] = self._allocate(k, rank)

    # -- storage -------------------------------------------------------------------------------
    def _open_dir(self, key: str, rank: int) -> None:
        d = self.directory
        meta_path = d / f"meta-rank{rank}.json"
        meta = {"key": key, "tokens": self.tokens, "hidden": self.hidden,
                "dtype": str(self.dtype),
                "offsets": json.loads(json.dumps(sorted(self._offset.items())))}
        old = None
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                old = None
        if old is not None and any(old.get(k) != v for k, v in meta.items()):
            log.info("boundary cache in %s is from another request: discarded", d)
            for p in d.glob(f"*-rank{rank}.*"):
                p.unlink()
            old = None
        d.mkdir(parents=True, exist_ok=True)
        self.returns_tuple = (old or {}).get("returns_tuple")
        self._meta, self._meta_path = meta, meta_path
        self._write_meta()

    def _write_meta(self) -> None:
        self._meta["returns_tuple"] = self.returns_tuple
        tmp = self._meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._meta))
        os.replace(tmp, self._meta_path)

    def _allocate(self, k: tuple[str, int], rank: int) -> tuple[Tensor, Tensor]:
        n, nmb = self.tokens * self.hidden, len(self._index)
        if self.mode == "memory":
            # plain (pageable) memory: pages are committed only when an entry is written
            return (torch.empty(self.tokens, self.hidden, dtype=self.dtype),
                    torch.zeros(nmb, dtype=torch.uint8))
        data, flags = self._paths(k, rank)
        for p, size in ((data, n * _itemsize(self.dtype)), (flags, nmb)):
            if not p.exists() or p.stat().st_size != size:
                with open(p, "wb") as f:  # sparse: no disk blocks until written
                    f.truncate(size)
        store = torch.from_file(str(data), shared=True, size=n, dtype=self.dtype)
        fl = torch.from_file(str(flags), shared=True, size=nmb, dtype=torch.uint8)
        return store.view(self.tokens, self.hidden), fl

    def _paths(self, k: tuple[str, int], rank: int) -> tuple[Path, Path]:
        stem = f"{'state' if k[0] == 'h' else 'grad'}{k[1]:04d}-rank{rank}"
        return self.directory / f"{stem}.bin", self.directory / f"{stem}.flags"

    # -- queries -------------------------------------------------------------------------------
    def has(self, start: int, gi: int, kind: str = "h") -> bool:
        k = (kind, start)
        return k in self._flags and gi in self._index and bool(self._flags[k][self._index[gi]])

    def missing(self, start: int, kind: str = "h", first: int = 0) -> list[int]:
        """This rank's micro-batches from ``first`` on whose entry at ``start`` is not cached."""
        return [gi for gi in self._index if gi >= first and not self.has(start, gi, kind)]

    def best_start(self, lo: int, gi: int) -> int | None:
        """The deepest boundary at or before block ``lo`` cached for micro-batch ``gi``."""
        ok = [s for s in self.starts if s <= lo and self.has(s, gi)]
        return max(ok) if ok else None

    def wanted(self, gi: int, after: int) -> list[int]:
        """Boundaries past block ``after`` (where this micro-batch's forward starts) whose state
        is not cached yet for ``gi``."""
        return [s for s in self.starts if s > after and gi in self._index and not self.has(s, gi)]

    # -- copies ----------------------------------------------------------------------------------
    def get(self, start: int, gi: int, device: torch.device, kind: str = "h") -> Tensor:
        """The cached entry [tokens, hidden] of ``gi`` at ``start``, on ``device``."""
        off, n = self._offset[gi]
        src = self._store[(kind, start)][off:off + n]
        if kind == "h":
            self.hits += 1
        else:
            self.grad_hits += 1
        if device.type != "cuda":
            return src.to(device, copy=True)
        buf = self._stage(n)
        buf[:n].copy_(src)
        out = buf[:n].to(device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._pending.append((None, -1, buf, ev))  # the buffer is reused once the copy is done
        return out

    def put(self, start: int, gi: int, h: Tensor, kind: str = "h") -> None:
        """Keep ``h`` (the state entering block ``start``, or its gradient) for ``gi``; the copy
        completes in :meth:`commit`."""
        off, n = self._offset[gi]
        k = (kind, start)
        h = h.detach().reshape(-1, self.hidden)
        if h.shape[0] != n or h.dtype != self.dtype:
            raise ValueError(f"hidden state of shape {tuple(h.shape)} and dtype {h.dtype} does not"
                             f" fit the boundary cache ({n} x {self.hidden}, {self.dtype})")
        if k not in self._store:
            return
        if h.device.type != "cuda":
            self._store[k][off:off + n].copy_(h)
            self._flag(k, gi)
            return
        buf = self._stage(n)
        buf[:n].copy_(h, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._pending.append((k, gi, buf, ev))

    def commit(self) -> None:
        """Finish the copies of :meth:`put` and :meth:`get`: entries become readable."""
        pending, self._pending = self._pending, []
        for k, gi, buf, ev in pending:
            ev.synchronize()
            if k is not None and k in self._store:
                off, n = self._offset[gi]
                self._store[k][off:off + n].copy_(buf[:n])
                self._flag(k, gi)
            self._staging.append(buf)

    def forget(self, gi: int, kind: str = "h") -> None:
        """Mark ``gi``'s entries of ``kind`` missing (benchmarks time a first pass repeatedly)."""
        for k, fl in self._flags.items():
            if k[0] == kind and gi in self._index:
                fl[self._index[gi]] = 0

    def _flag(self, k: tuple[str, int], gi: int) -> None:
        self._flags[k][self._index[gi]] = 1
        self.writes += 1

    def _stage(self, n: int) -> Tensor:
        """A pinned buffer of at least ``n`` rows, free (its last copy has completed)."""
        for i, b in enumerate(self._staging):
            if b.shape[0] >= n:
                return self._staging.pop(i)
        return torch.empty(n, self.hidden, dtype=self.dtype, pin_memory=True)

    def drop(self, start: int, kind: str = "h") -> None:
        """No later group needs this entry: free (or delete) it."""
        self.commit()
        k = (kind, start)
        self._store.pop(k, None)
        self._flags.pop(k, None)
        lst = self.starts if kind == "h" else self.grads
        if start in lst:
            lst.remove(start)
        if self.mode == "disk":
            for p in self._paths(k, self.rank):
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
