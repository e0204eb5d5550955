"""How close a quantized model stays to its original: KL, perplexity, top-1 agreement.

Conventions (for windows ``[N, T]``):

- KL and top-1 agreement are averaged over every position of every window (N·T tokens): each
  position is a next-token distribution of both models, whether or not its target is known.
- Perplexity is ``exp`` of the mean next-token negative log-likelihood over the N·(T-1)
  positions that have a target (position t predicts token t+1), GPTQ style: one mean over all
  tokens of all windows, not a mean of per-window perplexities.
- Log-softmax is taken in float32 for both models whatever their dtype, so the metric measures
  the weights, not half-precision softmax noise.

``compare`` does everything in one pass (each batch through both models); ``compare_many`` does
it for several models at once, running the original once per batch for all of them.  To compare
models one at a time against one original, a :class:`ReferenceCache` holds the original's side.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Batches = Iterable[torch.Tensor] | torch.Tensor
# Positions per log-softmax chunk: bounds the float32 temporaries at ~chunk × vocab × 4 bytes.
_CHUNK = 1024


@dataclass
class EvalResult:
    """``kl``: mean per-token KL(ref ‖ model) in nats; ``kl_p99``: its 99th percentile over
    tokens; ``ppl`` / ``ref_ppl``: perplexities of the model and of the reference; ``top1``:
    fraction of positions where both models' most likely next token agree; ``n_tokens``:
    positions the KL is averaged over."""

    kl: float
    kl_p99: float
    ppl: float
    ref_ppl: float
    top1: float
    n_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class ReferenceCache:
    """The reference model's next-token distributions on fixed windows, kept on the CPU.

    ``top_k=None`` keeps full log-probabilities: N·T·vocab·bytes(dtype) of memory (for
    SmolLM2's 49,152-token vocabulary, 64 windows of 512 tokens in float32 are 6.4 GB; float16
    halves that and perturbs the KL by ~1e-4 nats).  KL is then exact (float32) or renormalised
    (lower precision).

    ``top_k=k`` keeps the k most likely tokens per position plus the remaining mass (≈ 8 bytes ×
    k per position).  KL is then computed between the two distributions coarse-grained to "k
    tokens + everything else", which by the data-processing inequality is a lower bound of the
    true KL, exact when the reference puts no mass outside its top k.  Top-1 agreement and the
    reference perplexity stay exact.
    """

    def __init__(self, ref_model: nn.Module, batches: Batches, *, batch_size: int = 8,
                 top_k: int | None = None, dtype: torch.dtype = torch.float32,
                 progress: bool = True) -> None:
        self.top_k, self.dtype = top_k, dtype
        self.ids: list[torch.Tensor] = []
        self.entries: list[tuple[torch.Tensor, ...]] = []
        self.target_logp: list[torch.Tensor] = []
        self.nbytes = 0
        dev = _device(ref_model)
        with torch.inference_mode():
            for ids in _iterate(batches, batch_size, progress, "caching reference"):
                lp = torch.log_softmax(_logits(ref_model, ids).float(), dim=-1)
                tgt = _target_logp(lp, ids.to(dev)).cpu()
                if top_k is None:
                    entry: tuple[torch.Tensor, ...] = (lp.to(dtype).cpu(),)
                else:
                    vals, idx = lp.topk(top_k, dim=-1)
                    # The tail mass from a logsumexp, not 1 - sum(top k): that difference loses
                    # everything below float32 rounding of the sum and skews the tail term.
                    rest = _logsumexp_outside(lp, idx)
                    entry = (vals.cpu(), idx.to(torch.int32).cpu(), rest.cpu())
                del lp
                self.ids.append(ids.cpu())
                self.entries.append(entry)
                self.target_logp.append(tgt)
                self.nbytes += sum(t.numel() * t.element_size() for t in entry)
        log.info("reference cache: %d windows, %.1f MB", sum(len(i) for i in self.ids),
                 self.nbytes / 2**20)

    @property
    def windows(self) -> torch.Tensor:
        return torch.cat(self.ids)


def compare(ref_model: nn.Module | ReferenceCache, model: nn.Module, batches: Batches | None = None,
            *, batch_size: int = 8, device: str | torch.device | None = None,
            progress: bool = True) -> EvalResult:
    """KL(ref ‖ model), both perplexities and top-1 agreement in one pass over ``batches``.

    ``batches``: an iterable of LongTensors ``[b, T]`` or one ``[N, T]`` tensor (cut into
    ``batch_size`` rows).  With a :class:`ReferenceCache` as reference, ``batches`` may be
    omitted (the cached windows are used) and must otherwise equal them.  The two models may
    live on different devices; the comparison runs on ``device`` (default: ``model``'s).
    """
    return compare_many(ref_model, [model], batches, batch_size=batch_size, device=device,
                        progress=progress).results[0]


@dataclass
class JointComparison:
    """What :func:`compare_many` measured: one :class:`EvalResult` per model, in order;
    ``seconds``: each model's own forward passes and statistics; ``reference_seconds``: the
    reference's forward passes and log-softmax, shared by all models."""

    results: list[EvalResult]
    seconds: list[float]
    reference_seconds: float


def compare_many(ref_model: nn.Module | ReferenceCache, models: Sequence[nn.Module],
                 batches: Batches | None = None, *, batch_size: int = 8,
                 device: str | torch.device | None = None,
                 progress: bool = True) -> JointComparison:
    """:func:`compare` for several models in one sweep over the windows.

    Each batch goes through the reference once; its log-probabilities and most likely tokens
    serve every model, so k models cost k + 1 forward passes instead of 2k.  Each model's
    numbers are exactly those :func:`compare` gives it alone (same batches, same arithmetic).
    Every model stays resident for the whole sweep: for models that do not fit together,
    call :func:`compare` once per model.  ``device`` (default: the first model's) is where the
    statistics are computed.
    """
    if not models:
        raise ValueError("no models to compare")
    dev = torch.device(device) if device is not None else _device(models[0])
    tallies = [_Tally() for _ in models]
    ref_seconds = 0.0
    with torch.inference_mode():
        t = time.perf_counter()
        for ids, ref in _reference_stream(ref_model, batches, batch_size, progress):
            ids_d = ids.to(dev)
            targets = _next_tokens(ids_d)
            tgt_parts: list[torch.Tensor] = []
            chunks = _reference_chunks(ref, dev, targets, tgt_parts)
            ref_nll = None
            if len(models) > 1:  # every model reads the same chunks: make them all once
                chunks = list(chunks)
                ref_nll = _reference_nll(ref, tgt_parts)
                del ref  # the reference logits: only their per-chunk log-probs are needed
            # One model: its logits first, then each reference chunk is made and used in turn,
            # so no batch-sized float32 copy of the reference's log-probabilities is ever held.
            ref_seconds += time.perf_counter() - t
            for model, tally in zip(models, tallies):
                t = time.perf_counter()
                logits = _logits(model, ids).to(dev)
                kl, top1, tgt = _model_stats(chunks, logits, targets)
                del logits
                if ref_nll is None:
                    ref_nll = _reference_nll(ref, tgt_parts)
                    del ref
                tally.add(kl, top1, -tgt.double().sum().item(), ref_nll, ids)
                tally.seconds += time.perf_counter() - t
            del chunks
            t = time.perf_counter()
    return JointComparison([tl.result() for tl in tallies], [tl.seconds for tl in tallies],
                           ref_seconds)


def kl_divergence(ref_model: nn.Module | ReferenceCache, model: nn.Module,
                  batches: Batches | None = None, *, batch_size: int = 8,
                  device: str | torch.device | None = None, progress: bool = True) -> float:
    """Mean per-token KL(p_ref ‖ p_model) in nats over all positions (see :func:`compare`)."""
    return compare(ref_model, model, batches, batch_size=batch_size, device=device,
                   progress=progress).kl


def top1_agreement(ref_model: nn.Module | ReferenceCache, model: nn.Module,
                   batches: Batches | None = None, *, batch_size: int = 8,
                   device: str | torch.device | None = None, progress: bool = True) -> float:
    """Fraction of positions where both models' most likely next token is the same."""
    return compare(ref_model, model, batches, batch_size=batch_size, device=device,
                   progress=progress).top1


def perplexity(model: nn.Module, batches: Batches, *, batch_size: int = 8,
               progress: bool = True) -> float:
    """``exp(mean next-token NLL)`` over all N·(T-1) targets of all windows (GPTQ convention:
    cross-entropy of position t against token t+1, float32, one mean over every token)."""
    nll_sum, n_tgt = 0.0, 0
    with torch.inference_mode():
        for ids in _iterate(batches, batch_size, progress, "perplexity"):
            logits = _logits(model, ids)
            ids_d = ids.to(logits.device)
            nll_sum += -_target_logp_chunked(logits, ids_d).double().sum().item()
            n_tgt += ids.shape[0] * (ids.shape[1] - 1)
    if n_tgt == 0:
        raise ValueError("no batches (or windows of one token) to evaluate")
    return math.exp(nll_sum / n_tgt)


class _Tally:
    """Running sums of one model's comparison (the order of the sums fixes the result)."""

    def __init__(self) -> None:
        self.kl_sum = self.nll_sum = self.ref_nll_sum = self.seconds = 0.0
        self.agree = self.n_pos = self.n_tgt = 0
        self.kl_tokens: list[np.ndarray] = []

    def add(self, kl: torch.Tensor, top1: torch.Tensor, nll: float, ref_nll: float,
            ids: torch.Tensor) -> None:
        self.kl_tokens.append(kl.cpu().numpy())
        self.kl_sum += kl.double().sum().item()
        self.agree += int(top1.sum().item())
        self.nll_sum += nll
        self.ref_nll_sum += ref_nll
        self.n_pos += kl.numel()
        self.n_tgt += ids.shape[0] * (ids.shape[1] - 1)

    def result(self) -> EvalResult:
        if self.n_pos == 0:
            raise ValueError("no batches to evaluate")
        all_kl = np.concatenate(self.kl_tokens)
        return EvalResult(kl=self.kl_sum / self.n_pos, kl_p99=float(np.percentile(all_kl, 99)),
                          ppl=math.exp(self.nll_sum / self.n_tgt),
                          ref_ppl=math.exp(self.ref_nll_sum / self.n_tgt),
                          top1=self.agree / self.n_pos, n_tokens=self.n_pos)


def _next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """``[b, T]`` -> flat ``[b·T]``: the token each position predicts (the last position of each
    window predicts nothing; it gets a placeholder that :func:`_targets_only` drops)."""
    return torch.cat([ids[:, 1:], ids[:, :1]], 1).reshape(-1)


def _targets_only(per_position: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Flat ``[b·T]`` per-position values -> flat ``[b·(T-1)]`` of the positions with a target."""
    return per_position.reshape(ids.shape[0], -1)[:, :-1].reshape(-1)


def _reference_chunks(ref: tuple, dev: torch.device, targets: torch.Tensor,
                      tgt_parts: list[torch.Tensor]) -> Iterator[tuple]:
    """The reference's side of each ``_CHUNK``-position slice of one batch, one at a time:
    ``("p", log-probs, argmax)`` or ``("topk", values, indices, rest, argmax)``.  From logits,
    each chunk's log-probabilities of the targets go to ``tgt_parts`` (see
    :func:`_reference_nll`)."""
    kind = ref[0]
    if kind == "topk":
        k = ref[1].shape[-1]
        vals, idx, rest = ref[1].reshape(-1, k), ref[2].reshape(-1, k), ref[3].reshape(-1)
        for s in range(0, vals.shape[0], _CHUNK):
            i = idx[s: s + _CHUNK].to(dev).long()
            yield ("topk", vals[s: s + _CHUNK].to(dev), i, rest[s: s + _CHUNK].to(dev), i[:, 0])
        return
    vocab = ref[1].shape[-1]
    flat = ref[1].reshape(-1, vocab)
    for s in range(0, flat.shape[0], _CHUNK):
        lp = flat[s: s + _CHUNK].to(dev).float()
        if kind == "logits" or ref[1].dtype != torch.float32:
            # logits, or cached log-probs that rounding left unnormalised
            lp = torch.log_softmax(lp, dim=-1)
        if kind == "logits":  # a cache brings its own (exact, float32) target log-probs
            tgt_parts.append(lp.gather(-1, targets[s: s + _CHUNK, None]).squeeze(-1))
        yield ("p", lp, lp.argmax(-1))


def _reference_nll(ref: tuple, tgt_parts: list[torch.Tensor]) -> float:
    """The reference's summed NLL of one batch's targets, once :func:`_reference_chunks` has
    gone through every chunk."""
    if ref[0] == "logits":
        tgt = _targets_only(torch.cat(tgt_parts), ref[2])
    else:
        tgt = ref[-1].reshape(-1)
    return -tgt.double().sum().item()


def _model_stats(chunks: list[tuple], logits: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position KL(ref ‖ model) and top-1 agreement (flattened) of one batch, and the
    model's log-probabilities of the targets (flat, as :func:`_target_logp`), all from one
    log-softmax of each chunk."""
    flat_q = logits.reshape(-1, logits.shape[-1])
    kls, agrees, tgt = [], [], []
    for s, chunk in zip(range(0, flat_q.shape[0], _CHUNK), chunks):
        lq = torch.log_softmax(flat_q[s: s + _CHUNK].float(), dim=-1)
        if chunk[0] == "p":
            kls.append(_kl_rows(chunk[1], lq))
        else:
            kls.append(_kl_topk(chunk[1], chunk[2], chunk[3], lq))
        agrees.append(chunk[-1] == lq.argmax(-1))
        tgt.append(lq.gather(-1, targets[s: s + _CHUNK, None]).squeeze(-1))
    return torch.cat(kls), torch.cat(agrees), _targets_only(torch.cat(tgt), logits)


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    # xlogy-style guard: where p underflows to 0, the term is 0 even if lp is -inf.  In place on
    # one temporary: a chunk is ~200 MB for a 49k vocabulary, so each extra pass costs.
    p = lp.exp()
    term = (lp - lq).mul_(p)
    return term.masked_fill_(~(p > 0), 0.0).sum(-1)


def _kl_topk(vals: torch.Tensor, idx: torch.Tensor, rest: torch.Tensor,
             lq: torch.Tensor) -> torch.Tensor:
    """KL between both distributions coarse-grained to (top-k tokens of p, all other tokens)."""
    p = vals.exp()
    head = torch.where(p > 0, p * (vals - lq.gather(-1, idx)), torch.zeros_like(p)).sum(-1)
    q_rest = _logsumexp_outside(lq, idx)
    p_rest = rest.exp()
    tail = torch.where(p_rest > 0, p_rest * (rest - q_rest), torch.zeros_like(p_rest))
    return head + tail


def _logsumexp_outside(lp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside the tokens ``idx`` (−inf when there is none)."""
    return lp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def _target_logp(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of token t+1 at position t, from full log-probs ``[b, T, V]``."""
    return lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def _target_logp_chunked(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    flat = logits[:, :-1].reshape(-1, vocab)
    tgt = ids[:, 1:].reshape(-1)
    out = [-F.cross_entropy(flat[s: s + _CHUNK].float(), tgt[s: s + _CHUNK], reduction="none")
           for s in range(0, flat.shape[0], _CHUNK)]
    return torch.cat(out) if out else flat.new_zeros(0, dtype=torch.float32)


def _reference_stream(ref: nn.Module | ReferenceCache, batches: Batches | None, batch_size: int,
                      progress: bool) -> Iterator[tuple[torch.Tensor, tuple]]:
    """(ids, reference entry) per batch: ``("logits", logits, ids)`` for a live reference, else
    the cache's kind and entry followed by its target log-probs."""
    if isinstance(ref, ReferenceCache):
        if batches is not None:
            given = torch.cat(list(_iterate(batches, batch_size, False, "")))
            if not torch.equal(given.cpu(), ref.windows):
                raise ValueError("batches differ from the windows the ReferenceCache was built "
                                 "on; pass batches=None to use the cached windows")
        kind = "full" if ref.top_k is None else "topk"
        for ids, entry, tgt in tqdm(list(zip(ref.ids, ref.entries, ref.target_logp)),
                                    desc="evaluating", disable=not progress):
            yield ids, (kind, *entry, tgt)
        return
    if batches is None:
        raise ValueError("batches are required unless the reference is a ReferenceCache")
    for ids in _iterate(batches, batch_size, progress, "evaluating"):
        # the entry's last element: the ids, whose targets _reference_chunks gathers from the
        # log-softmax it takes anyway (cross-entropy would take a second one)
        yield ids, ("logits", _logits(ref, ids), ids)


def _iterate(batches: Batches, batch_size: int, progress: bool,
             desc: str) -> Iterator[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        if batches.dim() != 2:
            raise ValueError(f"windows must be [N, T], got shape {tuple(batches.shape)}")
        chunks: Iterable[torch.Tensor] = list(batches.split(batch_size))
    else:
        chunks = batches
    total = len(chunks) if hasattr(chunks, "__len__") else None
    for ids in tqdm(chunks, desc=desc, total=total, disable=not progress):
        if ids.dim() != 2:
            raise ValueError(f"each batch must be [b, T], got shape {tuple(ids.shape)}")
        yield ids


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(_device(model)), use_cache=False).logits
