"""Labels sampled from the model's own predictive distribution, and the loss gradient they give.

The Fisher (= Hessian of the KL at the original weights) needs labels drawn from the model,
not the data's next tokens. Each sequence gets its own generator seed derived from (seed, global
sequence index), so a sequence's labels do not depend on micro-batch size, data-parallel rank,
the pass of a multi-pass sketch, or where an interrupted run resumed.
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


def sample_labels(logits: Tensor, seq_indices: Sequence[int], seed: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Labels [b, T] drawn from softmax(logits [b, T, V]), seeded per global sequence index."""
    gen = generator or torch.Generator(device=logits.device)
    return torch.stack([_draw(_probs(logits[i]), sequence_seed(seed, int(s)), gen)
                        for i, s in enumerate(seq_indices)])


def sampled_label_grad(logits: Tensor, seq_indices: Sequence[int], seed: int,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """d/d logits of Σ_positions CE(logits, sampled labels) = softmax − onehot, per sequence.

    Summing over positions (not averaging) makes each sequence's gradient independent of the
    micro-batch it sits in. Sequences are processed one at a time so the fp32 probabilities and
    CDF of only one [T, V] slice are alive at once.
    """
    gen = generator or torch.Generator(device=logits.device)
    grad = torch.empty_like(logits)
    labels = torch.empty(logits.shape[:2], dtype=torch.long, device=logits.device)
    rows = torch.arange(logits.shape[1], device=logits.device)
    for i, s in enumerate(seq_indices):
        p = _probs(logits[i])
        lab = _draw(p, sequence_seed(seed, int(s)), gen)
        p[rows, lab] -= 1
        grad[i] = p
        labels[i] = lab
    return grad, labels
