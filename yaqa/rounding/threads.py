"""Intra-op threading for small CPU problems."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Below this size the kernels of one rounding call (thousands of small ops, LDL of factors up to
# 4096²) are too small to amortise OpenMP fork/join, and on a shared CPU the barrier waits
# dominate: 576x1536 YAQA took 5 s with 2 threads vs 0.8 s with 1 at load 5 on 2 cores.
# Larger CPU problems keep all threads.
SMALL_CPU_WEIGHT = 4 * 1024 * 1024
SMALL_CPU_FACTOR = 4096


def is_small_cpu_problem(shape: tuple[int, int], device: torch.device | str) -> bool:
    return (torch.device(device).type == "cpu" and shape[0] * shape[1] <= SMALL_CPU_WEIGHT
            and max(shape) <= SMALL_CPU_FACTOR)


@contextlib.contextmanager
def small_cpu_problem_threads(W: torch.Tensor | None = None, *,
                              shapes: list[tuple[int, int]] | None = None,
                              device: torch.device | str | None = None) -> Iterator[None]:
    """Use one intra-op thread while rounding small CPU matrices (restored afterwards).

    Entered once per entry point: :func:`yaqa.rounding.round_weight` for one matrix ``W``, or
    :func:`yaqa.quantize` for all of a model's ``shapes`` at once (only when every layer is
    small), never inside the rounding loops.  torch's thread count is process-wide, so other
    threads running torch ops meanwhile also see one thread for the duration.
    """
    if W is not None:
        shapes, device = [tuple(W.shape)], W.device
    with single_thread_if(bool(shapes) and all(is_small_cpu_problem(s, device) for s in shapes)):
        yield


@contextlib.contextmanager
def single_thread_if(condition: bool) -> Iterator[None]:
    """One intra-op thread inside the block when ``condition`` holds (restored afterwards)."""
    if not condition or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
