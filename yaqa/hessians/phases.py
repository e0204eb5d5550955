"""Peak device memory per phase of a collection, for benchmarks that ask where the peak is.

:func:`run_group <yaqa.hessians.passes.run_group>` marks the start of each phase: ``passes``
(the micro-batches of a pass), ``end_pass`` (sums turned into factors; on the last pass with
streaming also checked, estimated and packed to host memory) and ``writing`` (block files handed
to the writer). Nothing is recorded unless a :class:`PhaseRecorder` is active, so a mark costs
one global lookup.
"""

from __future__ import annotations

import time
from typing import Any

import torch

_active: PhaseRecorder | None = None


def mark(phase: str) -> None:
    """The active recorder's current phase ends here and ``phase`` begins."""
    if _active is not None:
        _active.mark(phase)


class PhaseRecorder:
    """``with PhaseRecorder(device) as rec: ...``: then ``rec.peaks[phase]`` is the largest
    ``torch.cuda.max_memory_allocated`` over that phase's spans (bytes; None off CUDA) and
    ``rec.seconds[phase]`` their total wall time. Phases before the first mark count as
    ``"other"``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peaks: dict[str, int | None] = {}
        self.seconds: dict[str, float] = {}
        self._phase = "other"
        self._t0 = 0.0

    def __enter__(self) -> PhaseRecorder:
        global _active
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._phase, self._t0 = "other", time.monotonic()
        _active = self
        return self

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        old = self.peaks.get(self._phase)
        self.peaks[self._phase] = peak if old is None else max(old, peak or 0)
        self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._t0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._phase, self._t0 = phase, now

    def __exit__(self, *exc: Any) -> None:
        global _active
        self.mark("other")
        _active = None

    def to_dict(self) -> dict[str, Any]:
        gib = 1 << 30
        return {p: {"peak_gib": None if self.peaks[p] is None else round(self.peaks[p] / gib, 2),
                    "seconds": round(self.seconds[p], 2)} for p in self.peaks}
