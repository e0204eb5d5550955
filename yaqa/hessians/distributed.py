"""torch.distributed glue: every rank collects on its own shard, sums meet once per reduction.

Nothing here is called per token: the collection loop reduces factor sums at the end of a pass
(all-reduce, so every rank holds the same factors for the next ALS pass) and at checkpoints
(reduce to rank 0, which writes them; the other ranks restart their partial sums from zero).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed(backend: str | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL when CUDA is available, gloo otherwise. Returns True when running with >1 process.
    """
    if not dist.is_available() or dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) < 1 or "RANK" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(),
             backend)
    return is_distributed()


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def reduce_sum_to_rank0_(tensors: list[Tensor]) -> None:
    """Rank 0 ends with the sum over ranks; the others with zeros (their share is now on 0)."""
    if not is_distributed():
        return
    rank = dist.get_rank()
    for t in tensors:
        dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
        if rank != 0:
            t.zero_()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any of them (keeps collectives in step)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()
