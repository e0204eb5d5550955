"""LDLQ: one-sided adaptive rounding with block feedback through ``L_in`` (≡ GPTQ).

With ``H_in = L D L^T`` (unit block-lower ``L``, blocks of ``b`` columns) the column blocks are
quantized last to first, each after adding the error feedback of the blocks already done:

    Ŵ_j = Q(W_j + Σ_{k>j} (W_k - Ŵ_k) A[k, j]),   A = L - I,

so that ``(W - Ŵ) L = η`` (the raw quantizer errors) and the proxy loss is ``Σ_j η_j D_j η_j^T``.
With ``b = 1`` this is GPTQ run in reverse column order (QuIP's equivalence).  The running
feedback ``F`` is updated with one GEMM per block, so the total is about ``2 m n²`` flops.
"""

from __future__ import annotations

import torch

from ..quantizers.base import FittedGrid, check_joint


def ldlq_round(
    W: torch.Tensor, grid: FittedGrid, A_in: torch.Tensor | None, block: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``W`` (m × n, already in the basis of ``A_in``) with input-side feedback.

    ``A_in`` is ``L_in - I`` (n × n, strictly block-lower with blocks of ``block``), or None for
    plain rounding.  Returns ``(dequantized Ŵ, int32 codes)``, both m × n, in ``W``'s dtype.
    """
    if A_in is None:
        return grid.round_all(W)
    check_joint(grid, None, block)
    m, n = W.shape
    if A_in.shape != (n, n):
        raise ValueError(f"A_in must be {n}×{n}, got {tuple(A_in.shape)}")
    dev, dt = W.device, W.dtype
    A = A_in.to(device=dev, dtype=dt)
    Q = torch.empty_like(W)
    codes = torch.empty(m, n, dtype=torch.int32, device=dev)
    F = torch.zeros_like(W)  # F[:, c] = feedback already owed to column c
    rows = torch.arange(m, device=dev)
    nb = -(-n // block)
    _ldlq_loop(W, grid, A, block, Q, codes, F, rows, nb)
    return Q, codes


def _ldlq_loop(W, grid, A, block, Q, codes, F, rows, nb) -> None:
    n = W.shape[1]
    cols = torch.arange(n, device=W.device)  # sliced per block: no allocation in the loop
    for j in range(nb - 1, -1, -1):
        c0, c1 = j * block, min((j + 1) * block, n)
        Wj = W[:, c0:c1]
        T = Wj + F[:, c0:c1]
        q, c = grid.round(T, rows, cols[c0:c1])
        Q[:, c0:c1] = q
        codes[:, c0:c1] = c
        if c0 > 0:
            # Kept as a separate product and add (not addmm) so the sums round exactly like the
            # two-sided wavefront's, which makes YAQA with H_out = I bit-identical to this.
            F[:, :c0] += (Wj - q) @ A[c0:c1, :c0]
