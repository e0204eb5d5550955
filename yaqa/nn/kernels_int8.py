"""Triton GEMV for int8 weights with one float32 scale per output row (the int8 LM head).

At batch 1 the head of a large-vocabulary model is one of the biggest reads of a decode step
(Llama-3.1-8B: 128,256 x 4,096, 1.05 GB in bf16).  Stored int8 it is half that, but
dequantizing it to a float block and calling a GEMM reads the int8 bytes and then writes and
reads the float block again.  This kernel reads each weight byte once: a program streams
``BLOCK_N`` rows as int32 words (4 codes each), accumulates ``Σ q·x`` in fp32 and multiplies by
the row's scale once at the end, so ``y[r] = scale[r] · Σ_k q[r, k] x[k]``.

Module-level ``@triton.jit``, imported only once Triton is known to be present (the interpreter
sees no closure variables).  :func:`int8_matmul` is the entry point (a ``torch.library`` custom
op, opaque to ``torch.compile`` and free of host synchronisation, so CUDA graphs capture it).
"""

from __future__ import annotations

import functools

import torch

from . import kernels
from .int8 import CPU_BLOCK, CUDA_BLOCK, dequantize_rows

# (BLOCK_N, BLOCK_K, warps, stages): the autotuner's candidates on large heads.  The head has
# enough rows to fill the GPU without splitting K (128,256 rows / 16 = 8,016 programs).
INT8_CONFIGS = ((16, 512, 4, 1), (32, 256, 4, 1), (32, 512, 4, 1), (64, 256, 4, 1),
                (16, 1024, 4, 1), (32, 512, 8, 2), (64, 512, 8, 1), (16, 512, 4, 3))
_TUNED: set[tuple] = set()


def default_tile(m: int, n: int) -> tuple[int, int, int, int]:
    """The shape rule for small heads, the interpreter and untuned captures."""
    bn = 16 if m >= 4096 else 8
    bk = 512 if n >= 512 else 256 if n >= 256 else 128
    return bn, bk, 4, 1


def supports(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the kernel can read ``weight`` as int32 words (rows of whole words) with one
    float32 ``scale`` per row. The word alignment of the storage is checked inside
    :func:`int8_matmul`, where torch.compile does not trace it (``storage_offset`` breaks a
    fullgraph capture)."""
    return (weight.dtype == torch.int8 and weight.dim() == 2 and weight.is_contiguous()
            and weight.shape[1] % 4 == 0
            and scale.dtype == torch.float32 and scale.shape == weight.shape[:1]
            and scale.is_contiguous())


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, stride_x, stride_y, K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        # Program (n, row): BLOCK_N output rows of activation row `row`.  Byte j of a word holds
        # code 4w + j (little-endian).  XOR 0x80808080 makes every byte q + 128 in [1, 255],
        # which becomes a float through its bits (2^23 + b minus 2^23 + 128, exact): an OR and
        # an add instead of an int-to-float conversion (quarter rate on H100).  The products
        # accumulate in a 2-D tile; one cross-thread sum at the end.
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
        BW: tl.constexpr = BLOCK_K // 4
        KW: tl.constexpr = K // 4
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        wrow = w_ptr + rows[:, None].to(tl.int64) * KW
        xrow = x_ptr + row * stride_x
        acc = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
        for t in range(0, tl.cdiv(KW, BW)):
            words = t * BW + tl.arange(0, BW)
            if EVEN_K:  # no mask along K: the row mask alone keeps the loads 128-bit vectors
                kmask = tl.full((BW,), 1, tl.int1)
                w = tl.load(wrow + words[None, :], mask=rmask[:, None], other=0)
            else:
                kmask = words < KW
                w = tl.load(wrow + words[None, :], mask=rmask[:, None] & kmask[None, :],
                            other=0)
            w = w ^ -2139062144  # 0x80808080 as an int32
            for j in tl.static_range(4):
                xj = tl.load(xrow + words * 4 + j, mask=kmask, other=0.0).to(tl.float32)
                b = ((w >> (8 * j)) & 0xFF) | 0x4B000000
                acc += (b.to(tl.float32, bitcast=True) - 8388736.0) * xj[None, :]
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
        y = tl.sum(acc, axis=1) * s
        tl.store(y_ptr + row * stride_y + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)

    return triton, int8_gemv, kernels.autotuned_rows(triton, int8_gemv, INT8_CONFIGS)


def int8_gemv(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              tile: tuple | None = None) -> torch.Tensor:
    """``x2 @ (weight · scale)^T`` for a contiguous ``(rows, n)`` activation, in ``x2.dtype``.

    ``weight``: ``m x n`` int8 (:func:`supports`); ``scale``: ``m`` float32.  ``tile``: force one
    ``(BLOCK_N, BLOCK_K, warps, stages)`` config; otherwise large heads on CUDA are autotuned
    (outside a CUDA-graph capture, or once tuned), smaller ones use :func:`default_tile`."""
    _, plain, tuned = _kernels()
    m, n = weight.shape
    rows = x2.shape[0]
    y = torch.empty(rows, m, dtype=x2.dtype, device=x2.device)
    w32 = weight.view(torch.int32)
    return launch_rows(plain, tuned, x2, (w32, scale), y, n, ("int8", m, n, rows, x2.dtype), tile)


def launch_rows(plain, tuned, x2: torch.Tensor, weights: tuple, y: torch.Tensor, n: int,
                shape_key: tuple, tile: tuple | None) -> torch.Tensor:
    """Launch a row-streaming head GEMV (this module's, or one with its signature and configs,
    :mod:`.kernels_dense`) into ``y`` ``(rows, m)``: autotuned for large heads on CUDA, else at
    ``tile`` or :func:`default_tile`.  ``weights``: the operands between activation and output."""
    rows, m = y.shape
    if tile is None and kernels._use_tuned(x2, m, n, shape_key):
        tuned[lambda meta: (-(-m // meta["BLOCK_N"]), rows)](
            x2, *weights, y, m, x2.stride(0), y.stride(0), K=n)
        kernels._TUNED.add(shape_key)
        return y
    bn, bk, w, st = tile or default_tile(m, n)
    plain[(-(-m // bn), rows)](x2, *weights, y, m, x2.stride(0), y.stride(0), K=n,
                               BLOCK_N=bn, BLOCK_K=bk, EVEN_K=n % bk == 0, num_warps=w,
                               num_stages=st)
    return y


def int8_config(m: int, n: int) -> dict | None:
    """The config the autotuner picked for an ``m x n`` head (after its first call), for reports."""
    return tuned_config(_kernels()[2], m, n)


def tuned_config(tuned, m: int, n: int) -> dict | None:
    """The config autotuner ``tuned`` picked for an ``m x n`` head, if it ran."""
    for k, cfg in getattr(tuned, "cache", {}).items():
        if tuple(k[:2]) == (m, n):
            return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return None


@torch.library.custom_op("yaqa::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight · scale[:, None])^T`` for few activation rows, by the int8 GEMV; x: (..., n)."""
    m, n = weight.shape
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()

    def blocks():  # a machine where the kernel does not build: Int8Linear's row blocks
        block = CUDA_BLOCK if x2.is_cuda else CPU_BLOCK
        return kernels.row_block_matmul(
            x2, m, n, lambda r0, r1: dequantize_rows(weight[r0:r1], scale[r0:r1]),
            max(1, block // n))

    if weight.storage_offset() % 4:  # a view off a word boundary: no int32 reads
        return blocks().reshape(*x.shape[:-1], m)
    y = kernels._guarded("int8_gemv", (m, n, x.dtype), lambda: int8_gemv(x2, weight, scale),
                         blocks)
    return y.reshape(*x.shape[:-1], m)


@int8_matmul.register_fake
def _(x, weight, scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
