"""Labels sampled from the model's own predictive distribution, and the loss gradient they give.

The Fisher (= Hessian of the KL at the original weights) needs labels drawn from the model,
not the data's next tokens. Each sequence gets its own generator seed derived from (seed, global
sequence index), so a sequence's labels do not depend on micro-batch size, data-parallel rank,
the pass of a multi-pass sketch, or where an interrupted run resumed.

With several label draws per sequence (``label_draws`` D > 1), draw 0 keeps that seed and draw
k > 0 gets :func:`draw_seed` (seed, sequence index, k): the draws are as independent of the
batching as the first one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def sequence_seed(seed: int, seq_index: int) -> int:
    """splitmix64 of (seed, index): neighbouring sequences get unrelated generator streams."""
    z = ((seed & 0xFFFFFFFF) << 32 | (seq_index & 0xFFFFFFFF)) ^ (seq_index >> 32 << 7)
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def draw_seed(seed: int, seq_index: int, draw: int) -> int:
    """The generator seed of label draw ``draw`` of a sequence; draw 0 is :func:`sequence_seed`."""
    base = sequence_seed(seed, seq_index)
    if draw == 0:
        return base
    # a second splitmix64 round keyed on the draw: unrelated to every (seed, index) stream
    return sequence_seed((base & 0xFFFFFFFF) ^ (base >> 32), draw + (1 << 32))


def _probs(logits_row: Tensor) -> Tensor:
    # fp32 at least: bf16 probabilities keep ~3 significant digits
    work = torch.float64 if logits_row.dtype == torch.float64 else torch.float32
    return torch.softmax(logits_row.to(work), dim=-1)


def _draw(p: Tensor, seed: int, generator: torch.Generator) -> Tensor:
    """Inverse-CDF sampling: one uniform per position, so the draw is cheap and reproducible."""
    generator.manual_seed(seed)
    u = torch.rand(p.shape[0], 1, generator=generator, device=p.device, dtype=p.dtype)
    cdf = p.cumsum(-1)
    # right=True: a zero-probability token (flat CDF step) can never be chosen
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.clamp_max_(p.shape[-1] - 1).squeeze(-1)


def row_seeds(seq_indices: Sequence[int], seed: int, draws: int = 1) -> list[int]:
    """One generator seed per row of a micro-batch whose sequences are each repeated ``draws``
    times in a row (draw-major within a sequence: rows s·D .. s·D + D − 1 are its draws)."""
    return [draw_seed(seed, int(s), k) for s in seq_indices for k in range(draws)]


def sample_labels(logits: Tensor, seq_indices: Sequence[int], seed: int,
                  generator: torch.Generator | None = None, draws: int = 1) -> Tensor:
    """Labels [b·D, T] drawn from softmax(logits [b·D, T, V]), seeded per global sequence index
    (and per draw, with ``draws`` consecutive copies of each sequence)."""
    gen = generator or torch.Generator(device=logits.device)
    return torch.stack([_draw(_probs(logits[i]), s, gen)
                        for i, s in enumerate(row_seeds(seq_indices, seed, draws))])


def sampled_label_grad(logits: Tensor, seq_indices: Sequence[int], seed: int,
                       generator: torch.Generator | None = None,
                       draws: int = 1) -> tuple[Tensor, Tensor]:
    """d/d logits of Σ_positions CE(logits, sampled labels) = softmax − onehot, per sequence.

    Summing over positions (not averaging) makes each sequence's gradient independent of the
    micro-batch it sits in. Sequences are processed one at a time so the fp32 probabilities and
    CDF of only one [T, V] slice are alive at once. With ``draws`` D > 1 the logits have D
    consecutive rows per sequence, each given its own draw's labels.
    """
    gen = generator or torch.Generator(device=logits.device)
    grad = torch.empty_like(logits)
    labels = torch.empty(logits.shape[:2], dtype=torch.long, device=logits.device)
    rows = torch.arange(logits.shape[1], device=logits.device)
    for i, s in enumerate(row_seeds(seq_indices, seed, draws)):
        p = _probs(logits[i])
        lab = _draw(p, s, gen)
        p[rows, lab] -= 1
        grad[i] = p
        labels[i] = lab
    return grad, labels
