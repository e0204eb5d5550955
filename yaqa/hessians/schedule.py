"""Which passes over the data a request needs, and how the data is cut into micro-batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

Batches = Tensor | Iterable[Tensor]


def pass_kinds(sketch: str, power_iters: int) -> list[str]:
    """The passes over the data a request needs, in order.

    Sketch B: one pass per ALS step; the first starts both factors from identity.
    Sketch A: pass 0 is forward-only (H_in = E[x^T x]); then ``power_iters`` updates of H_out
    with an H_in update between consecutive ones: 2·power_iters passes in all (the reference's
    6 passes are power_iters=3). The final pair is (H_in of the last even pass, H_out of the last).
    """
    if sketch == "hx":
        return ["hx"]
    if power_iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {power_iters}")
    if sketch == "B":
        return ["b"] + ["b_iter"] * (power_iters - 1)
    if sketch == "A":
        return ["hx"] + ["a_out", "a_in"] * (power_iters - 1) + ["a_out"]
    raise ValueError(f"sketch must be 'A', 'B' or 'hx', got {sketch!r}")



def _micro_batches(batches: Batches, batch_size: int) -> Iterator[Tensor]:
    if isinstance(batches, Tensor):
        if batches.dim() != 2:
            raise ValueError(f"token ids must be [N, T], got shape {tuple(batches.shape)}")
        yield from batches.split(batch_size)
        return
    for b in batches:
        if not isinstance(b, Tensor) or b.dim() not in (1, 2):
            raise ValueError("each batch must be a LongTensor of token ids [b, T]")
        yield b if b.dim() == 2 else b[None]


def _count_tokens(batches: Batches) -> int | None:
    if isinstance(batches, Tensor):
        return batches.numel()
    if isinstance(batches, (list, tuple)):
        return sum(b.numel() for b in batches)
    return None


def _hash_update(h: "hashlib._Hash", ids: Tensor) -> None:
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.detach().to("cpu", torch.int64).numpy().tobytes())
