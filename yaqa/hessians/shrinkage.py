"""Data-driven shrinkage of Sketch-B factors towards the LDLQ pair (H_out → I, H_in → H_x).

A Sketch-B factor is a mean of per-sequence terms, ``Ĥ = (1/N) Σ_b S_b`` with
``S_b = ∇W_b ∇W_b^T`` (H_out) or ``∇W_b^T ∇W_b`` (H_in). With few sequences the mean is noisy and
YAQA rounds against the noise; LDLQ (``H_out = I``, ``H_in = H_x``) has no such noise. We mix::

    H ← (1 − a)·s·Ĥ + a·F        F = I for H_out, H_x for H_in;  s = tr F / tr Ĥ

with the Ledoit–Wolf amount ``a = E‖Ĥ − H‖²_F / ‖Ĥ − F'‖²_F`` (``F' = F/s`` is the target at
Ĥ's scale), clipped to [0, 1]. The numerator is the variance of the mean, estimated without a
second pass from one extra number per sequence, ``‖S_b‖²_F``::

    E‖Ĥ − H‖²_F ≈ (1/(N(N−1))) Σ_b ‖S_b − Ĥ‖²_F = (mean_b ‖S_b‖²_F − ‖Ĥ‖²_F) / (N − 1)

For Sketch B ``‖∇W_b ∇W_b^T‖_F = ‖∇W_b^T ∇W_b‖_F`` (both are Σσ⁴ of ∇W_b), so one scalar per
sequence serves both factors; through the T×T Grams it is ``tr((X_b X_b^T · G_b G_b^T)²)``.
The noise of ``H_x`` (a per-token mean over N·T tokens) is ignored.

With several label draws per sequence (D > 1) the terms are draw means,
``S_in,b = (1/D) Σ_d ∇W_{b,d}^T ∇W_{b,d}`` and ``S_out,b = (1/D) Σ_d ∇W_{b,d} ∇W_{b,d}^T``, whose
norms differ: each side has its own statistic (``seq_sq_in`` / ``seq_sq_out``), and the
sequences stay the samples (their draws share X_b, so they are not independent).

Limits: no noise (N → ∞) gives ``a = 0`` and returns Ĥ itself, untouched; ``a = 1`` returns the
target tensor itself (``I``, ``H_x``), so YAQA then rounds exactly as LDLQ does. One sequence
carries no evidence of its own noise: ``a = 1``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SETTINGS = ("auto", "auto-out", "off")


@dataclass(frozen=True)
class Shrinkage:
    """How to shrink: ``"auto"`` (both factors by the estimated amounts), ``"auto-out"`` (H_out
    only), ``"off"``, or a fixed amount ``a`` in [0, 1] for both factors (as in measurements.md).
    """

    mode: str = "auto"
    amount: float | None = None

    @classmethod
    def parse(cls, spec: str | float | Shrinkage | None) -> Shrinkage:
        if isinstance(spec, Shrinkage):
            return spec
        if spec is None or spec is False:
            return cls("off")
        if isinstance(spec, str) and spec.strip().lower() in SETTINGS:
            return cls(spec.strip().lower())
        try:
            a = float(spec)
        except (TypeError, ValueError):
            raise ValueError(f"shrinkage must be one of {SETTINGS} or an amount in [0, 1], "
                             f"got {spec!r}") from None
        if not 0.0 <= a <= 1.0 or math.isnan(a):
            raise ValueError(f"a fixed shrinkage amount must lie in [0, 1], got {a}")
        return cls("fixed", a)

    def __str__(self) -> str:
        return f"{self.amount:g}" if self.mode == "fixed" else self.mode


def seq_sq_norms_gram(SX: Tensor, SG: Tensor) -> Tensor:
    """``‖S_b‖²_F`` per sequence from the T×T Grams ``X_b X_b^T`` and ``G_b G_b^T`` ([b, T, T])."""
    dt = torch.promote_types(SX.dtype, torch.float32)
    return seq_sq_norms_of_gram_product(torch.bmm(SX.to(dt), SG.to(dt)))


def seq_sq_norms_of_gram_product(M: Tensor) -> Tensor:
    """``‖S_b‖²_F = tr(M_b²)`` per sequence from ``M_b = X_b X_b^T · G_b G_b^T`` ([b, T, T])."""
    return (M * M.transpose(1, 2)).sum((1, 2), dtype=torch.float64)


def seq_sq_norms_direct(D: Tensor) -> Tensor:
    """``‖S_b‖²_F`` per sequence from the per-sequence gradients ``∇W_b`` ([b, m, n])."""
    D = D.to(torch.promote_types(D.dtype, torch.float32))
    K = torch.bmm(D, D.transpose(1, 2)) if D.shape[1] <= D.shape[2] else \
        torch.bmm(D.transpose(1, 2), D)
    return K.pow(2).sum((1, 2), dtype=torch.float64)


def noise_variance(H: Tensor, mean_sq: float, n_seqs: int) -> float:
    """Unbiased estimate of ``E‖Ĥ − H‖²_F`` for a mean of ``n_seqs`` i.i.d. terms (inf if < 2)."""
    if n_seqs < 2:
        return math.inf
    h2 = float(_f64_copy(H).pow_(2).sum())
    return max(mean_sq - h2, 0.0) / (n_seqs - 1)


def _f64_copy(t: Tensor, device: torch.device | None = None) -> Tensor:
    # a copy even when t is already float64: the callers work on it in place
    return t.to(device=device or t.device, dtype=torch.float64, copy=True)


def _scaled_target(Hd: Tensor, target: Tensor | None) -> Tensor:
    """The target at the trace of ``Hd`` (float64), as a new float64 matrix."""
    tr = float(torch.diagonal(Hd).sum())
    if target is None:
        return torch.eye(Hd.shape[0], dtype=torch.float64, device=Hd.device).mul_(tr / Hd.shape[0])
    Td = _f64_copy(target, Hd.device)
    return Td.mul_(tr / float(torch.diagonal(Td).sum()))


def ledoit_wolf_amount(H: Tensor, target: Tensor | None, mean_sq: float, n_seqs: int) -> float:
    """The amount in [0, 1] that the noise warrants for shrinking ``H`` towards ``target``
    (``None``: the identity), both compared at ``H``'s trace."""
    beta2 = noise_variance(H, mean_sq, n_seqs)
    if math.isinf(beta2):
        return 1.0
    if beta2 == 0.0:
        return 0.0
    # in place: two float64 n×n matrices at most (at the end of a pass, on the device, beside
    # the factors), the same values as out-of-place arithmetic
    d = _f64_copy(H)
    d.sub_(_scaled_target(d, target))
    delta2 = float(d.pow_(2).sum())
    del d
    if delta2 <= 0.0:
        return 0.0  # Ĥ already is the target: any amount gives the same factor
    return min(1.0, beta2 / delta2)


def shrink(H: Tensor, target: Tensor | None, amount: float) -> Tensor:
    """``(1 − a)·s·H + a·target`` at the target's scale; exactly ``H`` at 0, ``target`` at 1."""
    if amount <= 0.0:
        return H
    if target is None:
        target = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    target = target.to(H.device, H.dtype)
    if amount >= 1.0:
        return target
    s = float(torch.diagonal(target.double()).sum()) / float(torch.diagonal(H.double()).sum())
    if not math.isfinite(s) or s <= 0:
        return target  # H carries no curvature at all (e.g. a layer no gradient reached)
    return H * ((1.0 - amount) * s) + target * amount


def estimate_amounts(H_in: Tensor, H_out: Tensor, H_x: Tensor | None, mean_sq: float,
                     n_seqs: int, mean_sq_out: float | None = None) -> dict:
    """The Ledoit–Wolf amounts of a layer and the statistic they came from (JSON-ready).

    ``mean_sq`` describes both factors (one label draw), or H_in alone when ``mean_sq_out``
    (H_out's statistic, several label draws) is given."""
    out = {"n_seqs": int(n_seqs), "mean_sq": float(mean_sq),
           "in": ledoit_wolf_amount(H_in, H_x, mean_sq, n_seqs),
           "out": ledoit_wolf_amount(H_out, None, mean_sq if mean_sq_out is None
                                     else mean_sq_out, n_seqs),
           "in_target": "H_x" if H_x is not None else "identity"}
    if mean_sq_out is not None:
        out["mean_sq_out"] = float(mean_sq_out)
    return out


def shrink_layer(H_in: Tensor, H_out: Tensor, H_x: Tensor | None, estimate: dict | None,
                 setting: Shrinkage) -> tuple[Tensor, Tensor, float | None, float | None]:
    """Apply ``setting`` to one layer's factors; returns (H_in, H_out, a_in, a_out).

    ``estimate``: the dict of :func:`estimate_amounts` (``None`` when the Hessians carry no noise
    statistic: Sketch A, ALS passes, or files from older versions; "auto" then shrinks nothing).
    """
    if setting.mode == "off":
        return H_in, H_out, None, None
    if setting.mode == "fixed":
        a_in = a_out = float(setting.amount)  # type: ignore[arg-type]
    elif estimate is None:
        return H_in, H_out, None, None
    else:
        a_in = float(estimate["in"]) if setting.mode == "auto" else 0.0
        a_out = float(estimate["out"])
    return shrink(H_in, H_x, a_in), shrink(H_out, None, a_out), a_in, a_out


def layer_estimate(factors: dict[str, Tensor], n_seqs: int, sketch: str,
                   power_iters: int) -> dict | None:
    """Amounts for one layer's finished factors, where the statistic describes them.

    Only a single Sketch-B pass has it: ALS steps (power_iters > 1) and Sketch A weight their
    terms by a factor estimated from the same data, which the per-sequence scalar does not cover.
    """
    if sketch != "B" or power_iters != 1:
        return None
    if "seq_sq" in factors:  # one label draw (and every file before several existed)
        return estimate_amounts(factors["H_in"], factors["H_out"], factors.get("H_x"),
                                float(factors["seq_sq"].reshape(-1)[0]), n_seqs)
    if "seq_sq_in" in factors and "seq_sq_out" in factors:
        return estimate_amounts(factors["H_in"], factors["H_out"], factors.get("H_x"),
                                float(factors["seq_sq_in"].reshape(-1)[0]), n_seqs,
                                float(factors["seq_sq_out"].reshape(-1)[0]))
    return None
