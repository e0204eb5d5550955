"""Gradients a resumed group needs from the boundary cache and does not find there.

Under the boundary cache a group below others starts its backward from the loss gradient the
group above left (see :mod:`yaqa.hessians.boundary`), and the memory plan sizes its passes for
that: its own blocks' activations, no head. A command that resumes an interrupted collection
finds no such gradients where the cache lived in the interrupted process's host memory, and
only some where a disk cache was cut off. :func:`refill_gradients` computes the missing ones
before the group's accumulators are allocated, with the blocks above under activation
checkpointing (:meth:`HessianCollector.refill_gradient`), so the group then runs as planned and
the factors are those of an uninterrupted run.
"""

from __future__ import annotations

import logging

from . import distributed as D
from .hooks import HessianCollector
from .interrupt import _GracefulInterrupt
from .schedule import Batches, _micro_batches

log = logging.getLogger(__name__)


def refill_gradients(col: HessianCollector, batches: Batches, batch_size: int, kinds: list[str],
                     start_pass: int, cursor: int, stop: _GracefulInterrupt) -> int:
    """Put into ``col``'s boundary cache the gradients its remaining passes will read and it
    lacks; returns how many micro-batches that took."""
    if not col.needs_gradient_above():
        return 0
    grad_passes = [p for p in range(start_pass, len(kinds)) if kinds[p] != "hx"]
    if not grad_passes:  # forward-only passes stop after the group: no gradient needed
        return 0
    # a pass resumed mid-way runs only the micro-batches from its cursor on
    first = cursor if grad_passes == [start_pass] else 0
    at = col.blocks[-1] + 1
    todo = set(col.boundary.missing(at, "g", first))
    if not todo:
        return 0
    log.info("blocks %d-%d: recomputing the loss gradient entering block %d for %d "
             "micro-batch(es) (the boundary cache lacks it, e.g. it lived in an interrupted "
             "process); the blocks above run under activation checkpointing", col.blocks[0],
             col.blocks[-1], at, len(todo))
    world = D.rank_and_world()[1]
    seq0 = 0
    for gi, ids in enumerate(_micro_batches(batches, batch_size)):
        seq_ids = range(seq0, seq0 + ids.shape[0])
        seq0 += ids.shape[0]
        if gi not in todo:
            continue
        # one rank cannot stop alone (the others would wait for it in the passes' collectives):
        # under torchrun a first Ctrl-C is honoured at the passes' next checkpoint
        if world == 1 and stop.requested:
            raise KeyboardInterrupt("stopped while recomputing cached gradients; the resume "
                                    "state is unchanged")
        col.refill_gradient(ids, seq_ids, gi)
        if col.boundary is None:
            break
    return len(todo)
