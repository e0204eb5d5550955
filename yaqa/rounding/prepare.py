"""Turn raw Hessian factors into the feedback matrices that LDLQ and YAQA consume.

Steps per factor (yaqa-notes §3.1, §8.2): validate → symmetrise → fix dead channels → normalise to
unit mean diagonal → (optionally rotate) → damp with σ·I, doubling σ until a Cholesky succeeds →
block LDL ``H = L D L^T`` with unit block-lower ``L``.  The feedback matrix is ``A = L - I``.
All factor arithmetic runs in float64: the LDL of an ill-conditioned 14336² factor in fp32 loses
most of its digits, and the cost is small next to the rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

__all__ = [
    "PreparedFactor",
    "validate_weight",
    "validate_factor",
    "normalize_factor",
    "damped_cholesky",
    "block_ldl",
    "prepare_factor",
]


def validate_weight(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features × in_features), got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError("weight is empty")
    if not W.is_floating_point():
        raise TypeError(f"weight must be floating point, got {W.dtype}")
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf")


def validate_factor(H: torch.Tensor, size: int, name: str, sym_rtol: float = 1e-3) -> None:
    """Shape, finiteness and symmetry of one Kronecker factor (``name`` is used in messages)."""
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(H).__name__}")
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(H.shape)}")
    if H.shape[0] != size:
        raise ValueError(
            f"{name} is {H.shape[0]}×{H.shape[1]} but the weight needs {size}×{size} "
            "(H_in matches in_features = W.shape[1], H_out matches out_features = W.shape[0])"
        )
    if not H.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {H.dtype}")
    if not torch.isfinite(H).all():
        raise ValueError(f"{name} contains NaN or Inf")
    Hd = H.double()
    scale = Hd.abs().max().item()
    asym = (Hd - Hd.T).abs().max().item()
    # fp32 accumulation leaves ~1e-7 relative asymmetry; anything near 1e-3 is a wrong matrix.
    if asym > sym_rtol * scale:
        raise ValueError(
            f"{name} is not symmetric: max |H - H^T| = {asym:.3g} vs max |H| = {scale:.3g} "
            f"(tolerance {sym_rtol:g} relative); pass the full symmetric factor, not a triangle"
        )


def normalize_factor(H: torch.Tensor, name: str = "factor") -> torch.Tensor:
    """Symmetrised float64 copy with unit mean diagonal; dead channels get the mean live diagonal.

    A zero diagonal entry means a channel that never carries signal (GPTQ's "dead" inputs).  Its
    weights do not matter, so any positive curvature is right; the mean of the live entries keeps
    the normalisation (and hence what σ means) the same as if the channel were absent.
    """
    Hd = H.detach().to(torch.float64)
    Hd = 0.5 * (Hd + Hd.T)
    diag = torch.diagonal(Hd)
    live = diag > 0
    n_dead = int((~live).sum())
    if n_dead == Hd.shape[0]:
        log.warning("%s has no positive diagonal entry; using the identity", name)
        return torch.eye(Hd.shape[0], dtype=torch.float64, device=Hd.device)
    if n_dead:
        fill = diag[live].mean()
        log.info("%s: %d dead channel(s) (diagonal <= 0), diagonal set to %.3g", name, n_dead, float(fill))
        Hd = Hd.clone()
        idx = torch.nonzero(~live).squeeze(1)
        Hd[idx, :] = 0.0
        Hd[:, idx] = 0.0
        Hd[idx, idx] = fill
    return Hd / torch.diagonal(Hd).mean()


def damped_cholesky(
    H: torch.Tensor, sigma: float = 0.01, *, max_sigma: float = 1e3, name: str = "factor"
) -> tuple[torch.Tensor, float]:
    """Cholesky of ``H + σ I`` with σ doubled until it succeeds; returns (lower C, final σ).

    ``H`` should already have unit mean diagonal, so σ = 0.01 means 1 % of the average curvature.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    s = float(sigma)
    while True:
        Hs = H.clone()
        Hs.diagonal().add_(s)
        C, info = torch.linalg.cholesky_ex(Hs)
        ok = int(info.item()) == 0 and bool(torch.isfinite(torch.diagonal(C)).all())
        if ok:
            if s != sigma:
                log.info("%s: damping raised from %g to %g to make it positive definite", name, sigma, s)
            return C, s
        if s >= max_sigma:
            raise RuntimeError(
                f"{name} is not positive definite even with damping σ = {s:g} (relative to its mean "
                "diagonal); the factor is probably broken (check how it was accumulated)"
            )
        # Start from a tiny σ when the caller asked for none, then escalate geometrically.
        s = max(2.0 * s, 1e-6)


def block_ldl(C: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDL from a lower Cholesky factor ``C`` (``H = C C^T``): returns ``(L, D)``.

    ``L`` is unit block-lower triangular (identity diagonal blocks of size ``block``; the last
    block may be smaller) and ``D`` holds the diagonal blocks, shape ``(nblocks, block, block)``
    (zero-padded past ``n``), so that ``H = L blockdiag(D) L^T``.
    """
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    n = C.shape[0]
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        # Padding with an identity block leaves the real part of the factorisation unchanged.
        Cp = torch.zeros(nb * block, nb * block, dtype=C.dtype, device=C.device)
        Cp[:n, :n] = C
        Cp[n:, n:] = torch.eye(pad, dtype=C.dtype, device=C.device)
    else:
        Cp = C
    idx = torch.arange(nb, device=C.device)
    Cb = Cp.view(nb, block, nb, block)
    Ckk = Cb[idx, :, idx, :]  # (nb, block, block) diagonal blocks
    # L[:, k] = C[:, k] C_kk^{-1}, batched over block columns as triangular solves.
    cols = Cp.view(nb * block, nb, block).permute(1, 0, 2)  # (nb, N, block)
    Lcols = torch.linalg.solve_triangular(Ckk, cols, upper=False, left=False)
    L = Lcols.permute(1, 0, 2).reshape(nb * block, nb * block)
    D = Ckk @ Ckk.transpose(-1, -2)
    # Diagonal blocks are exactly I by construction; make them so despite rounding.
    Lb = L.view(nb, block, nb, block)
    Lb[idx, :, idx, :] = torch.eye(block, dtype=C.dtype, device=C.device)
    L = torch.tril(L)
    return L[:n, :n].contiguous(), D


@dataclass
class PreparedFactor:
    """A factor ready for rounding: normalised (undamped) ``H``, feedback ``A = L - I``, σ, D."""

    H: torch.Tensor  # float64, unit mean diagonal, undamped (for the proxy loss)
    A: torch.Tensor  # float64, strictly block-lower
    D: torch.Tensor  # float64 (nblocks, block, block)
    sigma: float
    block: int


def prepare_factor(
    H: torch.Tensor, block: int, sigma: float = 0.01, *, name: str = "factor",
    max_sigma: float = 1e3, rotate=None, device: torch.device | None = None,
) -> PreparedFactor:
    """Normalise, optionally rotate (``rotate(H) -> H'``), damp and block-LDL one factor."""
    Hn = normalize_factor(H.to(device) if device is not None else H, name)
    if rotate is not None:
        Hn = rotate(Hn)
        Hn = 0.5 * (Hn + Hn.T)
    C, s = damped_cholesky(Hn, sigma, max_sigma=max_sigma, name=name)
    L, D = block_ldl(C, block)
    A = L - torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return PreparedFactor(H=Hn, A=A, D=D, sigma=s, block=block)
