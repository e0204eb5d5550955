"""YAQA's two-sided adaptive rounding: tile feedback through both ``L_out`` and ``L_in``.

The (transformed) weight is cut into ``b_o × b_i`` tiles (M tile rows, N tile columns).  Tile
(i, j) is quantized after every tile (a, b) ≠ (i, j) with a ≥ i, b ≥ j, with the target

    T_ij = W_ij + [L_out^T E L_in - E]_ij,    Ŵ_ij = Q(T_ij),    E = W - Ŵ (tiles done so far)

which gives the exact identity ``L_out^T (W - Ŵ) L_in = η`` (η = T - Q(T)) and the proxy loss
``Σ_ij tr(η_ij D_in,j η_ij^T D_out,i)``.  Tiles on one anti-diagonal i + j = s never feed each
other, so they are rounded together, bottom-right corner first.

Instead of recomputing each target from whole sub-matrices (≈ m²n²/b flops) two running
accumulators hold the feedback (yaqa-notes §3.3b), ``T_ij = W_ij + C_ij + F_ij`` with

    C_ij = Σ_{a>i} A_out[a,i]^T E_aj                (output side, kept per column strip)
    F_ij = Σ_{b>j} (E_ib + C_ib) A_in[b,j]           (input side incl. the cross term, per row strip)

After an anti-diagonal is rounded, every tile of it adds its share to the strips above it (C) and
to its left (F) in two batched GEMMs of uniform shape.  Total ≈ 2mn(m+n) flops in M+N-1 steps.

The tiles of a step, in ascending i, have descending j.  C's column strips and A_in's block rows
are therefore stored in reversed j, so that both are contiguous slices in the step's tile order
and the GEMMs accumulate into C and F in place (``baddbmm_``), with no gathered copies of A_in
and no scattered sums into C.
"""

from __future__ import annotations

import torch

from ..quantizers.base import FittedGrid, check_joint
from .ldlq import ldlq_round


def _pad_square(A: torch.Tensor, size: int, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
    A = A.to(device=dev, dtype=dt)
    n = A.shape[0]
    if n == size:
        return A.contiguous()
    # Padded rows/columns get zero feedback, so padded entries never touch real ones.
    out = torch.zeros(size, size, device=dev, dtype=dt)
    out[:n, :n] = A
    return out


def yaqa_round(
    W: torch.Tensor,
    grid: FittedGrid,
    A_in: torch.Tensor | None,
    A_out: torch.Tensor | None,
    block_in: int = 16,
    block_out: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-sided rounding of ``W`` (m × n) given feedback matrices ``A = L - I`` of both factors.

    ``A_in`` (n × n, blocks of ``block_in``) and ``A_out`` (m × m, blocks of ``block_out``) must
    already be in ``W``'s basis.  ``A_out=None`` is one-sided LDLQ (computed by
    :func:`ldlq_round`); ``A_in=None`` is LDLQ along the output dimension.  Returns
    ``(dequantized Ŵ, int32 codes)``, both m × n, in ``W``'s dtype.
    """
    if A_out is None:
        return ldlq_round(W, grid, A_in, block_in)
    m, n = W.shape
    if A_out.shape != (m, m):
        raise ValueError(f"A_out must be {m}×{m}, got {tuple(A_out.shape)}")
    if A_in is not None and A_in.shape != (n, n):
        raise ValueError(f"A_in must be {n}×{n}, got {tuple(A_in.shape)}")
    bo, bi = int(block_out), int(block_in)
    check_joint(grid, bo, bi)
    dev, dt = W.device, W.dtype
    M, N = -(-m // bo), -(-n // bi)
    mp, npad = M * bo, N * bi

    Wp = torch.zeros(mp, npad, device=dev, dtype=dt)
    Wp[:m, :n] = W
    Q = torch.zeros(mp, npad, device=dev, dtype=dt)
    codes = torch.zeros(mp, npad, device=dev, dtype=torch.int32)
    W4, Q4, K4 = (t.view(M, bo, N, bi) for t in (Wp, Q, codes))

    AO_rows = _pad_square(A_out, mp, dev, dt).view(M, bo, mp)  # block row i of A_out
    C = torch.zeros(N, mp, bi, device=dev, dtype=dt)  # C[N-1-j]: column strip j, contiguous
    C4 = C.view(N, M, bo, bi)
    if A_in is not None:
        # AI_rows[N-1-j]: block row j of A_in
        AI_rows = _pad_square(A_in, npad, dev, dt).view(N, bi, npad).flip(0).contiguous()
        F = torch.zeros(M, bo, npad, device=dev, dtype=dt)  # row strip i of F, contiguous
        F4 = F.view(M, bo, N, bi)

    # Index tensors for every step are slices of these (no per-step host→device traffic).
    i_all = torch.arange(M, device=dev)
    j_rev = torch.arange(N - 1, -1, -1, device=dev)
    r_all = torch.arange(N, device=dev)  # reversed-j index of j_rev
    rows_all = (i_all[:, None] * bo + torch.arange(bo, device=dev)).clamp_(max=m - 1)
    cols_rev = (j_rev[:, None] * bi + torch.arange(bi, device=dev)).clamp_(max=n - 1)

    for s in range(M + N - 2, -1, -1):
        i0, i1 = max(0, s - (N - 1)), min(M - 1, s)
        # Tiles ordered by ascending i, hence descending j = s - i.
        it = i_all[i0:i1 + 1]
        r0 = N - 1 - (s - i0)
        jt = j_rev[r0:r0 + (i1 - i0 + 1)]
        K = i1 - i0 + 1
        Wt = W4[it, :, jt]  # (K, bo, bi)
        Ct = C4[r_all[r0:r0 + K], it]
        T = Wt + Ct
        if A_in is not None:
            T = T + F4[it, :, jt]
        q, c = grid.round(T, rows_all[i0:i1 + 1], cols_rev[r0:r0 + (i1 - i0 + 1)])
        Q4[it, :, jt] = q
        K4[it, :, jt] = c
        E = Wt - q
        if i1 > 0:
            # C[a, j] += A_out[i, a]^T E_ij for a < i; rows >= i*bo get exact zeros.
            R = i1 * bo
            C[r0:r0 + K, :R].baddbmm_(AO_rows[i0:i1 + 1, :, :R].transpose(1, 2), E)
        if A_in is not None and s - i0 > 0:
            # F[i, b] += (E_ij + C_ij) A_in[j, b] for b < j; C_ij is final (its sources are done).
            Cc = (s - i0) * bi
            F[i0:i1 + 1, :, :Cc].baddbmm_(E + Ct, AI_rows[r0:r0 + K, :, :Cc])
    return Q[:m, :n].contiguous(), codes[:m, :n].contiguous()
