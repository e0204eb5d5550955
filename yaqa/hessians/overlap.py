"""The per-layer statistics on their own CUDA stream, overlapping the model's backward.

The backward hook of every collected linear launches large bf16 GEMMs into fp32 sums; on the
model's stream they run strictly between the model's own kernels, so tensor cores idle through
the backward's norms, rotary, SiLU, residual adds and attention. :class:`StatsStream` moves them
to a second stream:

* the statistics stream waits for an event recorded on the model's (autograd's) stream at the
  hook, so it reads X and dL/dy only once the model has produced them;
* every tensor the update reads that the model's stream allocated gets ``record_stream``: the
  caching allocator then hands its memory to no one until the statistics stream is past it;
* at most ``backlog`` updates are in flight: the hook waits (on the CPU) for the oldest one
  beyond that. That bounds the inputs kept alive past their use by the model (the memory plan
  counts them, :func:`backlog_bytes`), and keeps the CPU from queueing the whole backward;
* :meth:`StatsStream.drain` makes the model's stream wait for every update launched so far,
  wherever the sums are read or replaced (end of a pass, checkpoints, reductions, exit).

Updates run one after another on one stream in the order the hooks launch them, so each sum
receives the same products in the same order as without the stream. On CPU (or with
``YAQA_STATS_STREAM=0``) :meth:`StatsStream.launch` calls the update directly, as before.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

ENV_VAR = "YAQA_STATS_STREAM"
# updates (one per linear layer and micro-batch) in flight at most: a Llama block has 7 linears,
# so about one block's statistics queue behind the model's backward
DEFAULT_BACKLOG = 8
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def stats_stream_enabled(flag: bool | None = None) -> bool:
    """The switch: ``flag`` when given, else ``YAQA_STATS_STREAM`` (default on)."""
    if flag is not None:
        return bool(flag)
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in _ON or value == "":
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{ENV_VAR} must be 1 or 0 (on/off), got {value!r}")


class CudaStreams:
    """The CUDA calls :class:`StatsStream` makes, in one place (tests pass a fake instead)."""

    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def run(self, stream: Any, fn: Callable[[], None]) -> None:
        """Launch ``fn``'s kernels on ``stream`` (the CPU returns once they are queued)."""
        with torch.cuda.stream(stream):
            fn()

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def record_stream(self, t: Tensor, stream: Any) -> None:
        t.record_stream(stream)


class StatsStream:
    """Launches statistics updates on a second stream (CUDA), or calls them directly.

    ``enabled``: None reads ``YAQA_STATS_STREAM``; ignored off CUDA. ``backend``: the stream
    calls (default :class:`CudaStreams` on a CUDA device); given, it is used on any device.
    """

    def __init__(self, device: torch.device | str, enabled: bool | None = None, *,
                 backlog: int = DEFAULT_BACKLOG, backend: Any = None):
        if backlog < 1:
            raise ValueError(f"the statistics backlog must be >= 1, got {backlog}")
        device = torch.device(device)
        on = stats_stream_enabled(enabled)
        if backend is None and on and device.type == "cuda":
            backend = CudaStreams(device)
        self.backend = backend if on else None
        self.stream = self.backend.new_stream() if self.backend is not None else None
        self.backlog = backlog
        self._pending: deque = deque()  # events recorded after each update, oldest first

    @property
    def active(self) -> bool:
        return self.stream is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def launch(self, update: Callable[[], None], *reads: Tensor) -> None:
        """Run ``update`` (which reads the model's tensors ``reads``) after the model's work so
        far, on the statistics stream. ``update`` sets its own precision scope, so the TF32 flag
        it sets is back before the model launches anything again."""
        if self.stream is None:
            update()
            return
        be = self.backend
        ready = be.new_event()
        ready.record(be.current_stream())  # the autograd stream: X and dL/dy are written
        self.stream.wait_event(ready)
        be.run(self.stream, update)
        for t in reads:
            # freed by the model (or autograd) after this, the memory waits for these kernels
            be.record_stream(t, self.stream)
        done = be.new_event()
        done.record(self.stream)
        self._pending.append(done)
        while len(self._pending) > self.backlog:
            self._pending.popleft().synchronize()

    def drain(self) -> None:
        """The model's stream waits for every launched update, and the CPU for their end: the
        sums are complete for whatever the caller launches next (reduction, copy, division),
        and no input of theirs is held any longer."""
        if self.stream is None:
            return
        be = self.backend
        done = be.new_event()
        done.record(self.stream)
        be.current_stream().wait_event(done)
        done.synchronize()
        self._pending.clear()


def backlog_bytes(linears: list[tuple[str, int, int]], tokens: int, dtype_bytes: int,
                  backlog: int = DEFAULT_BACKLOG) -> int:
    """Device memory the statistics stream keeps beyond the model's own use: the X and dL/dy
    of up to ``backlog`` updates in flight (``linears``: (name, m, n) of one block)."""
    worst = max(tokens * (m + n) * dtype_bytes for _, m, n in linears)
    return backlog * worst
