"""The randomized Hadamard transform on activations, as a few small dense matmuls.

``Had_n = (Had_K ⊗ H_{2^p}) / sqrt(n)`` (see :mod:`yaqa.incoherence`), and the Sylvester matrix
splits further, ``H_{2^p} = H_{2^a} ⊗ H_{2^b} ⊗ ...``.  So ``Had_n v`` is the row viewed as a small
tensor with one dense factor applied along each axis: 2-3 batched matmuls of order <= 128 for any
supported ``n`` (4096 = 64·64, 14336 = 28·16·32).  That is more multiply-adds than a butterfly
(``n·Σd`` instead of ``n·log n``), but every step is one tensor-core matmul that reads and writes
the activations once, instead of ``log2 n`` elementwise passes; it runs unchanged under
``torch.compile`` and CUDA graphs, on CPU too, and covers the Paley orders without extra code.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..incoherence import _base_hadamard, hadamard_factor

# Largest Sylvester factor: big enough that a 2^15 size needs three factors, small enough that
# the factor matmul stays cheap.
MAX_FACTOR = 64


@functools.lru_cache(maxsize=None)
def kron_factors(n: int) -> tuple[int, ...]:
    """Orders of the dense factors whose Kronecker product is ``Had_n`` (unnormalised)."""
    K, P = hadamard_factor(n)
    dims = [K] if K > 1 else []
    p = P.bit_length() - 1
    if p:
        parts = -(-p // int(math.log2(MAX_FACTOR)))
        base, extra = divmod(p, parts)
        dims += [2 ** (base + (i < extra)) for i in range(parts)]
    return tuple(dims) or (1,)


def _sylvester(d: int) -> np.ndarray:
    H = np.ones((1, 1), dtype=np.int64)
    while H.shape[0] < d:
        H = np.block([[H, H], [H, -H]])
    return H


def factors(n: int, transpose: bool = False, dtype: torch.dtype = torch.float32,
            device=None) -> list[torch.Tensor]:
    """The unnormalised ±1 factors of ``Had_n`` (``transpose``: of ``Had_n^T``), exact in any dtype.

    Modules keep them as buffers: :func:`apply_factors` then runs under ``torch.compile`` and CUDA
    graphs with no host work.
    """
    K = hadamard_factor(n)[0]
    out = []
    for i, d in enumerate(kron_factors(n)):
        H = _base_hadamard(d) if (i == 0 and K > 1) else _sylvester(d)
        if transpose:
            H = H.T
        out.append(torch.tensor(np.ascontiguousarray(H), dtype=dtype, device=device))
    return out


def fast_hadamard(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ Had_n.T`` over the last dim (``transpose=True``: ``x @ Had_n``), orthonormal.

    Equal to :func:`yaqa.incoherence.hadamard_transform` up to float rounding.
    """
    return apply_factors(x, factors(x.shape[-1], transpose, x.dtype, x.device))


def apply_factors(x: torch.Tensor, Hs: list[torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """``Had_n`` given as its ±1 Kronecker factors (:func:`factors`), applied to the rows of ``x``.

    ``normalize=False`` skips the ``1/sqrt(n)`` (for callers that fold it into a sign vector).
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    rows = y.shape[0]
    pre = 1
    for H in Hs:
        d = H.shape[0]
        post = n // (pre * d)
        H = H.to(x.dtype)
        # Row v as a (pre, d, post) tensor: applying H along the middle axis is (I ⊗ H ⊗ I) v.
        if post == 1:  # last axis: one plain GEMM instead of a batch of matrix-vector products
            y = y.reshape(rows * pre, d) @ H.T
        elif rows * pre == 1:  # first axis of a single row (decode): one plain GEMM, no copies
            y = H @ y.reshape(d, post)
        else:
            y = torch.matmul(H, y.reshape(rows * pre, d, post))
        pre *= d
    y = y.reshape(*lead, n)
    return y * (1.0 / math.sqrt(n)) if normalize else y
