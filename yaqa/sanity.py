"""Sanity checks on the reference model, run before any heavy work.

A broken reference makes every number after it meaningless while looking perfectly normal: a
tokenizer converted into a per-character one gave an original perplexity of 37,035 and a full KL
table over garbage, without a word.  Each check here looks for one such failure:

- ``tokenizer``: about one token per character on real text (a per-character or byte fallback
  tokenizer instead of the model's own);
- ``perplexity``: the reference perplexity is absurd for the vocabulary (near uniform guessing,
  or above a couple of thousand);
- ``bos``: the model scores much better with a BOS token than the windows have it (or the other
  way round), or it belongs to a family known to break without BOS and the windows lack it;
- ``vocab``: the tokenizer and the embedding matrix disagree beyond padding;
- ``chat``: an instruction-tuned model without a chat template, a template whose special tokens
  the tokenizer does not know, or no EOS token.

The decisions are pure functions over numbers and strings (``*_finding``), tested directly; the
``measure_*`` helpers extract those numbers from a model and tokenizer.  :func:`enforce` logs each
finding as a loud warning, or with ``strict`` raises one :class:`SanityError` (one line).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

# Real subword tokenizers give 0.2-0.3 tokens per character on English text (SmolLM2 on
# WikiText-2: 0.24); per-character or byte fallback tokenizers give ~1.
TOKENS_PER_CHAR_LIMIT = 0.5
# Above this the reference is no language model of this text (healthy models: 5-100 on real text;
# the per-character tokenizer above gave 37,035).  Small vocabularies use a fraction of uniform.
PERPLEXITY_LIMIT = 2000.0
UNIFORM_FRACTION = 0.25
# Mean next-token NLL gap (nats) with vs without BOS beyond which the windows' choice is wrong.
# Models that merely like a document separator in front gain < 0.05 over a few hundred tokens.
BOS_MARGIN = 0.15
# Embedding rows beyond the tokenizer that still count as padding (to a multiple of 64-1024 rows,
# or reserved ids): Qwen2.5 pads 151,665 to 152,064.
PADDING_ROWS = 1024
PADDING_FRACTION = 0.02

_INSTRUCT_NAME = re.compile(r"(instruct|chat|[-_]it\b|[-_]it[-_]|sft|dpo|rlhf)", re.IGNORECASE)
_TEMPLATE_MARKERS = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<(?:start|end)_of_turn>")


class SanityError(ValueError):
    """The reference failed a sanity check under ``strict`` (one line, every finding)."""


@dataclass(frozen=True)
class Finding:
    """One failed check: ``check`` is its short name, ``message`` what is wrong and what to do."""

    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


# -- decisions (pure) -------------------------------------------------------------------------


def tokens_per_char_finding(n_tokens: int, n_chars: int, *,
                            limit: float = TOKENS_PER_CHAR_LIMIT) -> Finding | None:
    """A tokenizer that spends ``limit`` or more tokens per character is not a subword one."""
    if n_chars <= 0:
        return None
    ratio = n_tokens / n_chars
    if ratio < limit:
        return None
    return Finding("tokenizer", f"{ratio:.2f} tokens per character on real text (subword "
                                "tokenizers give 0.2-0.3): the tokenizer looks per-character or "
                                "byte-level, not the one the model was trained with; pass the "
                                "model's own tokenizer")


def perplexity_finding(ppl: float, vocab_size: int, *, limit: float = PERPLEXITY_LIMIT,
                       uniform_fraction: float = UNIFORM_FRACTION) -> Finding | None:
    """Absurd: NaN/inf, above ``limit``, or above ``uniform_fraction`` of a uniform guess."""
    bound = min(limit, uniform_fraction * vocab_size) if vocab_size > 0 else limit
    if math.isfinite(ppl) and ppl <= bound:
        return None
    return Finding("perplexity", f"the original model's perplexity is {ppl:.4g} with a "
                                 f"{vocab_size}-token vocabulary (uniform guessing gives "
                                 f"{vocab_size}; anything above {bound:.4g} is no language "
                                 "model of this text): check the tokenizer, BOS and the "
                                 "evaluation text")


def bos_finding(nll_with: float | None, nll_without: float | None, windows_have_bos: bool, *,
                family_needs_bos: bool = False, bos_known: bool = True,
                margin: float = BOS_MARGIN) -> Finding | None:
    """Windows with/without BOS against what the model prefers.

    ``nll_with`` / ``nll_without``: the reference's mean NLL over the same text targets, with
    and without a leading BOS (None when unmeasured).  ``family_needs_bos``: the model family is
    known to break without BOS (Gemma).
    """
    if not windows_have_bos and family_needs_bos and not bos_known:
        return Finding("bos", "this model family needs a BOS token, but neither the tokenizer "
                              "nor the model config names one; set bos_token in the tokenizer")
    if nll_with is not None and nll_without is not None:
        gap = nll_without - nll_with
        if not windows_have_bos and gap > margin:
            return Finding("bos", f"the model scores much better with a BOS token (mean NLL "
                                  f"{nll_with:.3f} vs {nll_without:.3f} nats without), but the "
                                  "windows lack it: it was trained with BOS and the tokenizer "
                                  "does not add it; fix add_bos_token in the tokenizer config")
        if windows_have_bos and -gap > margin:
            return Finding("bos", f"the windows start with BOS but the model scores much better "
                                  f"without it (mean NLL {nll_without:.3f} vs {nll_with:.3f} "
                                  "nats with BOS): it was trained without one; set "
                                  "add_bos_token to false in the tokenizer config")
    if not windows_have_bos and family_needs_bos:
        return Finding("bos", "this model family (Gemma) was trained with a BOS token and "
                              "breaks without it, but the windows lack it: the tokenizer does "
                              "not add BOS; fix add_bos_token in the tokenizer config")
    return None


def vocab_finding(tokenizer_size: int, embedding_rows: int, *, padding_rows: int = PADDING_ROWS,
                  padding_fraction: float = PADDING_FRACTION) -> Finding | None:
    """Token ids beyond the embedding, or an embedding far larger than padding explains."""
    if tokenizer_size > embedding_rows:
        return Finding("vocab", f"the tokenizer has {tokenizer_size} tokens but the embedding "
                                f"only {embedding_rows} rows: ids beyond it are garbage or "
                                "crash; this tokenizer belongs to another model")
    extra = embedding_rows - tokenizer_size
    if extra > max(padding_rows, padding_fraction * embedding_rows):
        return Finding("vocab", f"the embedding has {embedding_rows} rows but the tokenizer only "
                                f"{tokenizer_size} tokens ({extra} unused, more than padding "
                                "explains): this tokenizer does not belong to this model")
    return None


def chat_finding(model_name: str, chat_template: str | None,
                 missing_markers: Sequence[str] = (), has_eos: bool = True) -> Finding | None:
    """Chat template and special tokens absent where the model needs them."""
    problems = []
    if not has_eos:
        problems.append("the tokenizer has no EOS token (generation and chat need one)")
    if chat_template is None and _INSTRUCT_NAME.search(model_name or ""):
        problems.append(f"{model_name} looks instruction-tuned but its tokenizer has no chat "
                        "template")
    if missing_markers:
        problems.append("the chat template uses special tokens the tokenizer does not have as "
                        f"single tokens: {', '.join(missing_markers)}")
    if not problems:
        return None
    return Finding("chat", "; ".join(problems) + "; use the tokenizer shipped with the model")


# -- measurements -----------------------------------------------------------------------------


def measure_tokens_per_char(tokenizer, text: str, max_chars: int = 20000) -> tuple[int, int] | None:
    """(tokens, characters) for the start of ``text``; None when the text is not mostly
    Latin-script (Chinese or Japanese legitimately approach one token per character)."""
    sample = text[:max_chars]
    letters = [c for c in sample if not c.isspace()]
    if len(letters) < 200:
        return None
    if sum(ord(c) > 0x24F for c in letters) > 0.3 * len(letters):
        return None
    ids = tokenizer(sample, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return len(ids), len(sample)


@torch.inference_mode()
def measure_bos_effect(model: nn.Module, windows: torch.Tensor, bos_id: int, *,
                       n: int = 2, length: int = 128) -> tuple[float, float]:
    """Mean NLL of the same text targets with and without a leading BOS.

    The text is the first ``length`` non-BOS tokens of up to ``n`` windows.  Both variants score
    text tokens 1..L-1 (text token 0 has no context without BOS), so only the BOS differs.
    """
    text = windows[:n]
    if text.shape[1] > 1 and bool((text[:, 0] == bos_id).all()):
        text = text[:, 1:]
    text = text[:, :length]
    dev = next(model.parameters()).device
    text = text.to(dev)
    bos = torch.full((text.shape[0], 1), bos_id, dtype=text.dtype, device=dev)

    def nll(ids: torch.Tensor, skip: int) -> float:
        logits = model(input_ids=ids, use_cache=False).logits[:, skip:-1].float()
        tgt = ids[:, skip + 1:]
        return float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)))

    return nll(torch.cat([bos, text], 1), 1), nll(text, 0)


def missing_template_markers(tokenizer, chat_template: str | None) -> list[str]:
    """Special-token-looking strings of the template (``<|im_start|>``, ``<start_of_turn>``)
    that the tokenizer would split into several pieces."""
    if not chat_template:
        return []
    missing = []
    for marker in sorted(set(_TEMPLATE_MARKERS.findall(chat_template))):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            missing.append(marker)
    return missing


def static_checks(model: nn.Module, tokenizer, text: str | None = None) -> list[Finding]:
    """Checks that need no forward pass: tokenizer granularity, vocabulary, chat template."""
    findings: list[Finding] = []
    if text:
        counts = measure_tokens_per_char(tokenizer, text)
        if counts is not None:
            findings.append(tokens_per_char_finding(*counts))
    emb = model.get_input_embeddings()
    if emb is not None and hasattr(emb, "num_embeddings"):
        findings.append(vocab_finding(len(tokenizer), emb.num_embeddings))
    template = getattr(tokenizer, "chat_template", None)
    config = getattr(model, "config", None)
    name = " ".join(filter(None, (getattr(config, "_name_or_path", ""),
                                  getattr(tokenizer, "name_or_path", ""))))
    findings.append(chat_finding(name, template, missing_template_markers(tokenizer, template),
                                 getattr(tokenizer, "eos_token_id", None) is not None))
    return [f for f in findings if f is not None]


def bos_check(model: nn.Module, tokenizer, windows: torch.Tensor) -> Finding | None:
    """Measured BOS preference of ``model`` on ``windows``, plus family knowledge."""
    from .data import bos_token_id
    from .models.adapters import needs_bos

    bos = bos_token_id(tokenizer, model)
    have = bos is not None and bool((windows[:, 0] == bos).all())
    measured: tuple[float | None, float | None] = (None, None)
    if bos is not None and windows.shape[1] >= 4:
        measured = measure_bos_effect(model, windows, bos)
    return bos_finding(*measured, have, family_needs_bos=needs_bos(model),
                       bos_known=bos is not None)


def check_reference(model: nn.Module, tokenizer, windows: torch.Tensor | None = None,
                    text: str | None = None) -> list[Finding]:
    """Every check that runs before the reference perplexity is known."""
    findings = static_checks(model, tokenizer, text)
    if windows is not None:
        f = bos_check(model, tokenizer, windows)
        if f is not None:
            findings.append(f)
    return findings


def text_sample(source, max_chars: int = 20000) -> str | None:
    """The start of a text data source, for the tokenizer check (None: not text, unreadable)."""
    from .data import DataError, load_text

    if not isinstance(source, (str, os.PathLike)) or str(source) == "generated":
        return None
    try:
        return load_text(source)[:max_chars]
    except (DataError, OSError, UnicodeDecodeError) as e:
        log.debug("no text sample from %s: %s", source, e)
        return None


def model_vocab_size(model: nn.Module) -> int:
    """Rows of the output (or input) embedding: what a uniform guess is spread over."""
    for get in ("get_output_embeddings", "get_input_embeddings"):
        emb = getattr(model, get, lambda: None)()
        rows = getattr(emb, "out_features", None) or getattr(emb, "num_embeddings", None)
        if rows:
            return int(rows)
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


def enforce(findings: Iterable[Finding | None], strict: bool = False) -> list[Finding]:
    """Warn loudly about each finding, or raise one :class:`SanityError` when ``strict``."""
    findings = [f for f in findings if f is not None]
    if findings and strict:
        raise SanityError("the reference model failed sanity checks (--strict): "
                          + "; ".join(str(f) for f in findings))
    for f in findings:
        log.warning("SANITY CHECK FAILED [%s] %s. Every number below is measured against this "
                    "reference and may be meaningless (--strict makes this an error)",
                    f.check, f.message)
    return findings
