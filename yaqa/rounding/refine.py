"""Post-rounding refinement: a monotone local search on the codes of an int-k grid.

LDLQ and YAQA round each entry once, greedily given the errors fed back from entries done
before it.  Afterwards single ±1 code steps can still lower the proxy loss they minimise,

    L(Δ) = tr(Δ H_in Δᵀ H_out),    Δ = W - Ŵ,

(``H_out = I`` for LDLQ).  Keeping ``G = H_out Δ H_in``, moving Ŵ by ``E`` changes the loss by
exactly ``-2⟨E, G⟩ + ⟨E, H_out E H_in⟩``; for one entry moved by one code step ``d`` (scale
``s``) that is ``s² H_out[i,i] H_in[j,j] - 2 d s G_ij``, so the best step is ``d = sign(G_ij)``.

Each round proposes the ``t`` most improving single steps of every row at once, computes the
batch's exact change (one ``H_out E H_in``, which is also G's update) and accepts it only if the
loss goes down; otherwise it halves ``t``, then at one step per row keeps the better half of
the batch by single-step gain, and tries again (the batch size
found is where the next round starts).  A batch of one is a single improving step, so
a round only fails on float noise.  The loss therefore never increases, and ``t`` adapts
(doubling after a success) to how strongly the factors couple entries.  Rows are the natural
unit: with ``H_out = I`` (LDLQ) steps in different rows do not interact at all, so one step per
row is always accepted, and proposing the best of every row moved the proxy several times
further per round than proposing the best steps overall (which crowd into coupled entries).  This is coordinate descent in the spirit of QuantEase,
but for the two-sided Kronecker objective and in parallel over the whole matrix.

That ladder is the ``H_out = I`` path.  With a real ``H_out`` (YAQA) rows interact through its
off-diagonals, and on real Sketch factors batches of one step per row were mostly rejected
(a round then moved a handful of entries after several full-size tries).  There a round builds
the batch instead of guessing it: for one step per row the batch's exact change is a quadratic
in which rows take part, whose ``r × r`` matrix (``r`` ≤ :data:`CANDIDATES` most improving rows)
costs a gather of each factor instead of ``H_out E H_in``; a greedy pass adds a row's step only
when it lowers that quadratic given the steps already in, so every batch is improving by
construction and still checked in float64 (see :func:`_coupled_batch`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..hessians.accumulators import tf32_matmuls
from ..quantizers.base import FittedGrid
from ..quantizers.intk import IntGrid

log = logging.getLogger(__name__)

__all__ = ["RefineStats", "refine_codes", "refine_factor"]

# A batch is accepted only if its exact change is below -RTOL times the size of the terms
# that make it up: float32 sums of ~10⁶ products carry ~1e-6 relative error, and a change
# inside that noise could really be an increase.
RTOL = 1e-5


@dataclass
class RefineStats:
    """What one refinement did: losses are ``tr(Δ H_in Δᵀ H_out)`` with the factors given."""

    rounds: int  # accepted batches
    tries: int  # batches evaluated (accepted or not)
    changed: int  # code steps applied (an entry may move more than once)
    loss_before: float
    loss_after: float
    seconds: float

    @property
    def reduction(self) -> float:
        """Relative reduction of the loss, ``1 - after / before`` (0 when nothing moved)."""
        return 1.0 - self.loss_after / self.loss_before if self.loss_before > 0 else 0.0


def refine_factor(H: torch.Tensor, sigma: float) -> torch.Tensor:
    """The damped factor the rounding minimised against, ``H + σ I``, scaled to unit mean
    diagonal (the scale of the objective does not change its minimiser; with it, an identity
    factor stays exactly the identity)."""
    Hd = H.to(torch.float64).clone()
    Hd.diagonal().add_(sigma)
    return Hd / torch.diagonal(Hd).mean()


def _int_grid(grid: FittedGrid) -> IntGrid:
    if not isinstance(grid, IntGrid):
        raise ValueError(f"refinement needs an int-k grid (codes stepped by ±1, value "
                         f"(code - zero) * scale); got {type(grid).__name__}. Use refine=0 "
                         "with trellis or FP4 quantizers")
    return grid


def refine_codes(
    W: torch.Tensor,
    codes: torch.Tensor,
    grid: FittedGrid,
    H_in: torch.Tensor,
    H_out: torch.Tensor | None = None,
    rounds: int = 8,
) -> tuple[torch.Tensor, RefineStats]:
    """Lower ``tr(Δ H_in Δᵀ H_out)`` (``Δ = W - grid.dequantize(codes)``) by batches of ±1 code
    steps; never raises it.

    ``W`` (m × n), ``codes`` and the factors must be in one basis (the transformed one when
    incoherence is on); pass the damped factors the rounding used (:func:`refine_factor`).
    ``H_out=None`` is the identity (LDLQ).  ``rounds`` bounds the accepted batches; it stops
    earlier when no single step improves.  Works in float32 on ``W``'s device and holds a few
    m × n matrices.  Returns the new int32 codes (a new tensor) and :class:`RefineStats`.
    """
    g = _int_grid(grid)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    m, n = W.shape
    if tuple(codes.shape) != (m, n) or tuple(g.shape) != (m, n):
        raise ValueError(f"codes {tuple(codes.shape)} and grid {tuple(g.shape)} must match the "
                         f"weight's {m}x{n}")
    if tuple(H_in.shape) != (n, n):
        raise ValueError(f"H_in must be {n}x{n}, got {tuple(H_in.shape)}")
    if H_out is not None and tuple(H_out.shape) != (m, m):
        raise ValueError(f"H_out must be {m}x{m}, got {tuple(H_out.shape)}")
    t0 = time.perf_counter()
    # Accepting a batch compares its exact change with ~1e-5 of its terms: TF32 products (1e-3)
    # could accept an increase, so full fp32 here whatever the caller's setting.
    with tf32_matmuls(False):
        state = _search(W, codes, g, H_in, H_out, rounds)
    q, sandwich = state.codes, state.sandwich
    f32 = torch.float32
    # The final loss from scratch, so incremental drift in G never shows up in what we report.
    delta = W.to(f32) - g.dequantize(q)
    with tf32_matmuls(False):
        loss_after = float((delta * sandwich(delta)).sum(dtype=torch.float64))
    stats = RefineStats(rounds=state.rounds, tries=state.tries, changed=state.changed,
                        loss_before=state.loss_before,
                        loss_after=loss_after, seconds=time.perf_counter() - t0)
    log.debug("refine %dx%d: %d rounds (%d tries), %d steps, loss %.4g -> %.4g", m, n,
              stats.rounds, stats.tries, stats.changed, stats.loss_before, loss_after)
    return q, stats


@dataclass
class _State:
    codes: torch.Tensor
    G: torch.Tensor  # H_out Δ H_in, kept up to date incrementally
    loss_before: float
    rounds: int
    tries: int
    changed: int
    sandwich: Callable[[torch.Tensor], torch.Tensor]


def _search(W: torch.Tensor, codes: torch.Tensor, g: IntGrid, H_in: torch.Tensor,
            H_out: torch.Tensor | None, rounds: int) -> _State:
    """The batched ±1 search (see the module docstring); inputs already checked."""
    m, n = W.shape
    dev, f32 = W.device, torch.float32
    Hi = H_in.to(dev, f32)
    Ho = None if H_out is None else H_out.to(dev, f32)
    if Ho is not None and torch.equal(Ho, torch.eye(m, device=dev, dtype=f32)):
        Ho = None  # skip a product by exactly I, so YAQA with H_out = I refines as LDLQ does

    def sandwich(X: torch.Tensor) -> torch.Tensor:
        return (X if Ho is None else Ho @ X) @ Hi

    S = g.scale.to(dev, f32).repeat_interleave(g.group_size, dim=1)  # per-entry step of Ŵ
    diag_out = torch.ones(m, device=dev, dtype=f32) if Ho is None else torch.diagonal(Ho)
    curv = (S * S) * (diag_out[:, None] * torch.diagonal(Hi)[None, :])  # s² H_out,ii H_in,jj
    q = codes.to(dev, torch.int32).clone()
    delta = W.to(f32) - g.dequantize(q)
    G = sandwich(delta)
    loss0 = float((delta * G).sum(dtype=torch.float64))
    del delta
    maxq = g.maxq
    accepted = tries = changed = 0
    if Ho is not None:
        while accepted < rounds:
            batch = _coupled_batch(G, q, S, curv, Hi, Ho, maxq)
            if batch is None:
                break
            tries += batch.tries
            q[batch.rows, batch.cols] += batch.steps
            # H_out E H_in with one step per row: a column gather of H_out times a row gather
            # of H_in, m × r × n instead of two full products
            G -= (Ho[:, batch.rows] * batch.e[None, :]) @ Hi[batch.cols]
            accepted += 1
            changed += int(batch.rows.numel())
        return _State(q, G, loss0, accepted, tries, changed, sandwich)
    # H_out = I.  The batch size is a ladder, kept across rounds: t steps per row (t = ..., 4,
    # 2, 1), then a cap on the count.  A rejected batch steps down one rung, an accepted one up.
    per_row, cap = 4, None
    zero = torch.zeros((), device=dev, dtype=f32)
    while accepted < rounds:
        d = torch.sign(G)
        gain = curv - 2.0 * S * G.abs()
        target = q + d.to(torch.int32)
        ok = (gain < 0) & (d != 0) & (target >= 0) & (target <= maxq)
        if not bool(ok.any()):
            break
        gain = torch.where(ok, gain, zero)
        done = False
        while True:
            tries += 1
            mask = _best_per_row(gain, ok, per_row)
            count = int(mask.sum())
            if cap is not None and cap < count:
                mask = _best_overall(torch.where(mask, gain, zero), mask, cap)
                count = cap
            E = torch.where(mask, d * S, zero)
            HE = sandwich(E)
            lin = float((E * G).sum(dtype=torch.float64))
            quad = float((E * HE).sum(dtype=torch.float64))
            change = quad - 2.0 * lin
            if change < -RTOL * (2.0 * abs(lin) + abs(quad)):
                q = torch.where(mask, target, q)
                G -= HE
                accepted += 1
                changed += count
                if cap is not None:
                    cap = 2 * cap
                else:
                    per_row = min(n, 2 * per_row)
                done = True
                break
            if cap is not None or per_row == 1:
                if count <= 1:
                    break
                cap = math.ceil(count / 2)
            else:
                per_row //= 2
        if not done:
            break  # even the single best step is inside float noise: converged
    return _State(q, G, loss0, accepted, tries, changed, sandwich)


def _best_per_row(gain: torch.Tensor, ok: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` most improving allowed steps of every row (fewer where fewer improve)."""
    idx = torch.topk(gain, min(k, gain.shape[1]), dim=1, largest=False, sorted=False).indices
    mask = torch.zeros_like(ok)
    mask.scatter_(1, idx, True)
    return mask & ok


def _best_overall(gain: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` most improving steps among ``allowed`` (gain 0 elsewhere)."""
    idx = torch.topk(gain.view(-1), k, largest=False, sorted=False).indices
    mask = torch.zeros_like(allowed).view(-1)
    mask[idx] = True
    return mask.view(allowed.shape) & allowed



# Rows whose best step a coupled (H_out ≠ I) batch considers: the exact pairwise matrix is
# CANDIDATES² and the greedy selection walks the candidates one by one.  On SmolLM2 (576 rows)
# 512 and 1024 moved the proxy alike; the 1024 best single steps overall (crowding into few
# rows), or 2-4 steps per row, gained less per round or per second.
CANDIDATES = 1024


@dataclass
class _Batch:
    rows: torch.Tensor
    cols: torch.Tensor
    steps: torch.Tensor  # ±1 code steps, int32
    e: torch.Tensor  # the steps of Ŵ, ``steps * scale``
    change: float  # the batch's exact loss change (< 0)
    tries: int


def _coupled_batch(G: torch.Tensor, q: torch.Tensor, S: torch.Tensor, curv: torch.Tensor,
                   Hi: torch.Tensor, Ho: torch.Tensor, maxq: int,
                   k: int | None = None) -> _Batch | None:
    """One improving batch of single steps, at most one per row, when rows couple through
    ``H_out``; ``None`` when no single step improves beyond float noise.

    For steps ``e_p`` at entries ``(i_p, j_p)`` the batch's exact change is
    ``Σ_p own_p + Σ_{p≠q} C_pq`` with ``C_pq = e_p e_q H_out[i_p,i_q] H_in[j_p,j_q]`` and
    ``own_p = C_pp - 2 e_p G[i_p,j_p]``: over the best step of each of the ``k`` (default
    :data:`CANDIDATES`) most improving rows that is a ``k × k`` matrix, far cheaper than ``H_out E H_in``.  Walking the candidates
    best first, a step joins when its own term plus twice its coupling to the steps already in
    is negative, so every join lowers the loss and the batch's change is the sum of those
    marginals.  The change is then checked in float64 against the noise of its terms, as for
    the uncoupled batches; a batch inside the noise is cut to the first half of its joins.
    """
    dev, dt = G.device, G.dtype
    d = torch.sign(G)
    gain = curv - 2.0 * S * G.abs()
    target = q + d.to(torch.int32)
    ok = (gain < 0) & (d != 0) & (target >= 0) & (target <= maxq)
    gain = torch.where(ok, gain, torch.zeros((), device=dev, dtype=dt))
    best, cols = gain.min(dim=1)
    n_rows = int((best < 0).sum())
    if n_rows == 0:
        return None
    own, rows = torch.topk(best, min(k or CANDIDATES, n_rows), largest=False, sorted=True)
    cols = cols[rows]
    e = d[rows, cols] * S[rows, cols]
    C = Ho[rows][:, rows] * Hi[cols][:, cols] * e[:, None] * e[None, :]
    Cd = C.double()
    joined = torch.as_tensor(_greedy_joins(own.double().cpu().numpy(), Cd.cpu().numpy()),
                             device=dev, dtype=torch.long)
    b = (e * G[rows, cols]).double()
    tries = 0
    while joined.numel() > 0:
        tries += 1
        xs = torch.zeros(own.numel(), dtype=torch.float64, device=dev)
        xs[joined] = 1.0
        lin = float(xs @ b)
        quad = float(xs @ (Cd @ xs))
        change = quad - 2.0 * lin
        if change < -RTOL * (2.0 * abs(lin) + abs(quad)):
            r, c = rows[joined], cols[joined]
            return _Batch(r, c, d[r, c].to(torch.int32), e[joined], change, tries)
        if joined.numel() == 1:
            break
        joined = joined[: math.ceil(joined.numel() / 2)]
    return None


def _greedy_joins(own: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Indices, in order, of the candidates that join: ``p`` joins when ``own[p]`` plus twice
    its coupling ``C[p, q]`` to those already in is negative.  Sequential on purpose (a join
    changes every later marginal), so it runs on the host in numpy (``C`` is at most
    ``CANDIDATES²``): one small transfer instead of thousands of tiny GPU kernels."""
    acc = np.zeros_like(own)
    joined = []
    for p in range(own.shape[0]):
        if own[p] + 2.0 * acc[p] < 0:
            joined.append(p)
            acc += C[p]
    return np.asarray(joined, dtype=np.int64)
