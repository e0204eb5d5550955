"""Triton GEMV for an unquantized 16-bit LM head at batch-1 decode.

The head of a large-vocabulary model is the biggest single read of a 4-bit decode step
(Llama-3.1-8B: 128,256 x 4,096 bf16, 1.05 GB, about 11% of the step).  cuBLAS runs it at about
2.8 TB/s on an H100; the int8 head's GEMV (:mod:`.kernels_int8`), streaming rows the same way,
reaches 3.05 TB/s.  This kernel is that GEMV for bf16/fp16 weights: a program streams ``BLOCK_N``
rows in ``BLOCK_K``-wide 16-byte vector loads, accumulates ``Σ w·x`` in fp32 in a 2-D tile and
reduces it once at the end, so ``y[r] = Σ_k W[r, k] x[k]`` rounded once to the output dtype.

Whether it beats cuBLAS depends on the GPU and the shape, so :func:`faster_than_cublas` times
both once per head shape (``GraphDecoder`` asks it before capturing its graph) and the decoder
uses the faster.  Module-level ``@triton.jit`` inside a builder, imported only once Triton is
known to be present; :func:`dense_matmul` is a ``torch.library`` custom op (opaque to
``torch.compile``, free of host synchronisation, captured by CUDA graphs).
"""

from __future__ import annotations

import functools
import logging

import torch

from . import kernels
from .kernels_int8 import launch_rows, tuned_config

log = logging.getLogger(__name__)

# (BLOCK_N, BLOCK_K, warps, stages): the autotuner's candidates on large heads.  A bf16 row of
# 4096 is 8 KB; 128,256 rows give thousands of programs without splitting K.
DENSE_CONFIGS = ((8, 512, 4, 1), (16, 512, 4, 1), (16, 256, 4, 1), (32, 256, 4, 1),
                 (8, 1024, 4, 1), (16, 512, 8, 2), (32, 512, 8, 1), (16, 512, 4, 3),
                 (8, 512, 4, 3), (4, 1024, 4, 2), (16, 1024, 8, 1), (32, 128, 4, 3))
_DTYPES = (torch.bfloat16, torch.float16)


def supports(weight: torch.Tensor, x: torch.Tensor | None = None) -> bool:
    """A contiguous 2-D bf16/fp16 weight with rows of whole 16-byte vectors, and (if given) an
    activation of the same dtype."""
    return (weight.dtype in _DTYPES and weight.dim() == 2 and weight.is_contiguous()
            and weight.shape[1] % 8 == 0 and (x is None or x.dtype == weight.dtype))


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def dense_gemv(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        # Program (n, row): BLOCK_N output rows of activation row `row`.  Products accumulate
        # in a (BLOCK_N, BLOCK_K) fp32 tile: one cross-thread sum per program, at the end.
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        wrow = w_ptr + rows[:, None].to(tl.int64) * K
        xrow = x_ptr + row * stride_x
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t in range(0, tl.cdiv(K, BLOCK_K)):
            cols = t * BLOCK_K + tl.arange(0, BLOCK_K)
            if EVEN_K:  # no mask along K: the row mask alone keeps the loads 128-bit vectors
                w = tl.load(wrow + cols[None, :], mask=rmask[:, None], other=0.0)
                x = tl.load(xrow + cols)
            else:
                kmask = cols < K
                w = tl.load(wrow + cols[None, :], mask=rmask[:, None] & kmask[None, :],
                            other=0.0)
                x = tl.load(xrow + cols, mask=kmask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + row * stride_y + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)

    return triton, dense_gemv, kernels.autotuned_rows(triton, dense_gemv, DENSE_CONFIGS)


def dense_gemv(x2: torch.Tensor, weight: torch.Tensor, tile: tuple | None = None) -> torch.Tensor:
    """``x2 @ weight^T`` for a contiguous ``(rows, n)`` activation and an ``m x n`` weight of
    its dtype (:func:`supports`).  ``tile``: force one ``(BLOCK_N, BLOCK_K, warps, stages)``
    config; otherwise large heads on CUDA are autotuned (outside a CUDA-graph capture, or once
    tuned), smaller ones use :func:`.kernels_int8.default_tile`."""
    _, plain, tuned = _kernels()
    m, n = weight.shape
    rows = x2.shape[0]
    y = torch.empty(rows, m, dtype=x2.dtype, device=x2.device)
    return launch_rows(plain, tuned, x2, (weight,), y, n, ("dense", m, n, rows, x2.dtype), tile)


def dense_config(m: int, n: int) -> dict | None:
    """The config the autotuner picked for an ``m x n`` head (after its first call), for reports."""
    return tuned_config(_kernels()[2], m, n)


@torch.library.custom_op("yaqa::dense_matmul", mutates_args=())
def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` for few activation rows by the Triton GEMV; x: (..., n)."""
    m, n = weight.shape
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = kernels._guarded("dense_gemv", (m, n, x.dtype), lambda: dense_gemv(x2, weight),
                         lambda: x2 @ weight.T)
    return y.reshape(*x.shape[:-1], m)


@dense_matmul.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# (m, n, dtype, device) -> (Triton faster, Triton µs, cuBLAS µs): one measurement per head shape.
_CHOICES: dict[tuple, tuple[bool, float, float]] = {}


def _graph_time(fn, reps: int = 20) -> float:
    """GPU µs of one ``fn()`` from replays of a CUDA graph of ``reps`` calls (decode replays a
    graph too, so launch overhead is not what is compared)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3 / reps


def faster_than_cublas(weight: torch.Tensor, margin: float = 0.01) -> tuple[bool, float, float]:
    """Whether the Triton GEMV reads this CUDA head faster than cuBLAS at batch 1 (by more than
    ``margin``), with both times in µs; measured once per shape and dtype (about a second, the
    autotune included).  Never from inside a CUDA-graph capture: call it before capturing."""
    m, n = weight.shape
    key = (m, n, weight.dtype, weight.device)
    if key not in _CHOICES:
        x = torch.randn(1, n, device=weight.device, dtype=weight.dtype)
        try:
            t_triton = _graph_time(lambda: dense_matmul(x, weight))
        except Exception as e:  # a machine where the kernel does not build: cuBLAS
            log.warning("dense head GEMV unavailable (%s: %s); using cuBLAS", type(e).__name__, e)
            t_triton = float("inf")
        t_cublas = _graph_time(lambda: torch.nn.functional.linear(x, weight))
        _CHOICES[key] = (t_triton < (1 - margin) * t_cublas, t_triton, t_cublas)
        log.info("LM head %d x %d: Triton GEMV %.1f us, cuBLAS %.1f us", m, n, t_triton, t_cublas)
    return _CHOICES[key]
