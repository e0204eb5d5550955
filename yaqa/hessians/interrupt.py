"""Ctrl-C during a collection: finish the micro-batch, save a checkpoint, stop."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class _GracefulInterrupt:
    """First Ctrl-C: finish the micro-batch in flight, save a checkpoint, then stop.

    An interrupt in the middle of a backward pass would leave some layers' sums with the
    micro-batch and others without it, so it is deferred to the next step boundary.  A second
    Ctrl-C stops at once (losing only what came after the last checkpoint).
    """

    def __init__(self, active: bool) -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_GracefulInterrupt":
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: saving a checkpoint after this micro-batch "
                    "(Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._previous)
