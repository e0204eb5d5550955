"""Text → token windows, deterministically.

Sources (``source`` arguments):

- a path: one text file, or a directory whose ``*.txt``, ``*.raw`` and ``*.tokens`` files are
  read in sorted order and joined with a blank line;
- ``"wikitext2"`` / ``"wikitext2-test"``: WikiText-2 ``wiki.test.raw`` (evaluation only);
  ``"wikitext2-valid"``: ``wiki.valid.tokens`` (use this one for calibration). Both ship with the
  package (gzip-compressed, CC BY-SA, see ``yaqa/corpora/wikitext-2/README.md``);
  ``$YAQA_DATA_DIR`` and the project's ``../shared/data/wikitext-2`` take precedence;
- ``"hf:<name>[:<config>][:<split>]"``: a Hugging Face dataset (needs ``datasets`` and network),
  rows of its ``text`` column joined with a blank line, as GPTQ does;
- ``"generated"``: text sampled from the model itself, for when no text is at hand;
- a 1-D LongTensor of token ids, already tokenized (no tokenizer needed).

Windows are LongTensors ``[n, ctx]``.  ``add_bos=None`` (the default) follows the tokenizer: BOS
is added exactly when the tokenizer itself prepends one when encoding text (Llama, Gemma do;
SmolLM2 and Qwen, whose BOS is a chat-turn marker or absent, do not).  With ``add_bos`` and a
known BOS id, every window is
BOS followed by ``ctx - 1`` text tokens: each window is then scored as a document start, which
is how models with a BOS token are trained and what keeps Gemma-like models (that break
without BOS) evaluable.  The number of scored tokens per window is ``ctx - 1`` either way.
"""

from __future__ import annotations

import gzip
import importlib.resources
import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

WIKITEXT2_FILES = {"wikitext2": "wiki.test.raw", "wikitext2-test": "wiki.test.raw",
                   "wikitext2-valid": "wiki.valid.tokens"}
TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
_HF_SPLITS = ("train", "test", "validation", "valid")

Source = str | os.PathLike | torch.Tensor


class DataError(ValueError):
    """A data source cannot provide the requested windows."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data source (file, directory, WikiText-2 copy) does not exist."""


def _dev_dirs() -> list[Path]:
    """The project's shared copy beside a development checkout (or the working directory)."""
    rel = Path("..", "shared", "data", "wikitext-2")
    return [Path.cwd() / rel, Path(__file__).resolve().parents[1] / rel]


def packaged_wikitext2() -> Path | None:
    """The compressed WikiText-2 copy inside the installed package, or None if it was left out."""
    root = importlib.resources.files("yaqa") / "corpora" / "wikitext-2"
    path = Path(str(root))
    return path if any((path / f"{f}.gz").is_file() for f in WIKITEXT2_FILES.values()) else None


def find_wikitext2() -> Path | None:
    """Directory holding the WikiText-2 files (plain or ``.gz``), or None.

    Looks at ``$YAQA_DATA_DIR`` (either the ``wikitext-2`` directory itself or its parent), then
    ``../shared/data/wikitext-2`` relative to the working directory and to the repository that
    contains this package (the project's shared data sits next to the checkout), then the copy
    shipped inside the package.
    """
    candidates = []
    env = os.environ.get("YAQA_DATA_DIR")
    if env:
        candidates += [Path(env).expanduser(), Path(env).expanduser() / "wikitext-2"]
    candidates += _dev_dirs()
    for c in candidates:
        if any((c / f).is_file() for f in set(WIKITEXT2_FILES.values())):
            return c.resolve()
    return packaged_wikitext2()


def _read_wikitext2_file(root: Path, name: str) -> str | None:
    if (root / name).is_file():
        return (root / name).read_text(encoding="utf-8")
    if (root / f"{name}.gz").is_file():
        with gzip.open(root / f"{name}.gz", "rt", encoding="utf-8") as f:
            return f.read()
    return None


def load_text(source: str | os.PathLike) -> str:
    """The whole text of a source (see the module docstring); never ``"generated"``."""
    s = str(source)
    if s in WIKITEXT2_FILES:
        root = find_wikitext2()
        if root is None:
            raise DataNotFoundError(
                f"{s}: WikiText-2 not found (and this installation lacks the packaged copy); "
                f"set YAQA_DATA_DIR to the directory holding {WIKITEXT2_FILES[s]}, or pass a "
                "text file, an 'hf:' dataset, or 'generated'")
        text = _read_wikitext2_file(root, WIKITEXT2_FILES[s])
        if text is None:
            raise DataNotFoundError(f"{s}: {root / WIKITEXT2_FILES[s]} does not exist")
        return text
    if s.startswith("hf:"):
        return _load_hf_text(s)
    if s == "generated":
        raise DataError("'generated' text comes from a model: use calibration_windows(..., "
                        "source='generated', model=model)")
    path = Path(s).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataNotFoundError(f"{path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return "\n\n".join(p.read_text(encoding="utf-8") for p in files)
    raise DataNotFoundError(
        f"data source {s!r} not found: not a file or directory, and not one of "
        f"{', '.join(WIKITEXT2_FILES)}, 'hf:<name>[:<config>][:<split>]', 'generated'")


def _load_hf_text(spec: str) -> str:
    parts = spec[3:].split(":")
    name, rest = parts[0], parts[1:]
    if not name or len(rest) > 2:
        raise DataError(f"{spec!r}: expected hf:<name>[:<config>][:<split>]")
    config, split = None, "train"
    if len(rest) == 2:
        config, split = rest[0] or None, rest[1]
    elif len(rest) == 1:
        # One extra field is ambiguous; split names (optionally sliced) are far more common.
        if rest[0].split("[")[0] in _HF_SPLITS:
            split = rest[0]
        else:
            config = rest[0]
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} needs the 'datasets' package: pip install 'yaqa[data]' "
                        "(or use a local text file, wikitext2, or 'generated')") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many unrelated types for "not reachable/not found"
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataNotFoundError(f"{spec!r}: could not load the dataset "
                                f"({type(e).__name__}: {first})") from e
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise DataError(f"{spec!r} has no text column (columns: {ds.column_names})")
    return "\n\n".join(ds[column])


def tokenize(tokenizer, source: Source) -> torch.Tensor:
    """1-D LongTensor of the source's token ids, without special tokens (BOS comes per window)."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 1:
            raise DataError(f"pre-tokenized source must be 1-D, got shape {tuple(source.shape)}")
        return source.long()
    if tokenizer is None:
        raise DataError(f"source {str(source)!r} is text and needs a tokenizer")
    text = load_text(source)
    # verbose=False: the "longer than model_max_length" warning is moot, windows are cut later.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    log.info("tokenized %s: %d characters → %d tokens", source, len(text), len(ids))
    return torch.tensor(ids, dtype=torch.long)


def bos_token_id(tokenizer=None, model: nn.Module | None = None,
                 bos_id: int | None = None) -> int | None:
    """The BOS id: explicit, else the tokenizer's, else the model config's, else None."""
    if bos_id is not None:
        return int(bos_id)
    tid = getattr(tokenizer, "bos_token_id", None)
    if tid is not None:
        return int(tid)
    tid = getattr(getattr(model, "config", None), "bos_token_id", None)
    return int(tid) if isinstance(tid, int) else None


def wants_bos(tokenizer, add_bos: bool | None = None) -> bool:
    """Resolve ``add_bos=None``: True when ``tokenizer`` prepends BOS on its own."""
    if add_bos is not None:
        return bool(add_bos)
    if tokenizer is None:
        return True
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def eval_windows(tokenizer, source: Source, ctx: int, n: int | None = None,
                 add_bos: bool | None = None,
                 *, bos_id: int | None = None) -> torch.Tensor:
    """Perplexity/KL windows, GPTQ convention: tokenize the whole text once, cut it into
    consecutive non-overlapping windows, drop the incomplete tail.  ``n`` keeps the first ``n``.

    With ``add_bos`` and a BOS id, each window is BOS + ``ctx - 1`` text tokens (see module doc).
    """
    _check_ctx(ctx)
    tokens = tokenize(tokenizer, source)
    bos = bos_token_id(tokenizer, bos_id=bos_id) if wants_bos(tokenizer, add_bos) else None
    width = ctx - 1 if bos is not None else ctx
    available = tokens.numel() // width
    if available == 0 or (n is not None and n > available):
        raise DataError(f"{_name(source)} has {tokens.numel()} tokens: {available} windows of "
                        f"{width} text tokens, {n or 1} requested; use a shorter context, fewer "
                        "windows, or more text")
    count = available if n is None else n
    windows = tokens[: count * width].view(count, width)
    return _prepend_bos(windows, bos)


def calibration_windows(tokenizer, source: Source, n: int, ctx: int, seed: int = 0,
                        model: nn.Module | None = None, add_bos: bool | None = None, *,
                        bos_id: int | None = None, batch_size: int = 8,
                        progress: bool = True, purpose: str = "calibration") -> torch.Tensor:
    """``n`` calibration windows of ``ctx`` tokens, identical for identical arguments.

    Text sources: window starts drawn uniformly (with replacement, as GPTQ does) from a generator
    seeded with ``seed``.  ``source="generated"``: sequences sampled from ``model`` itself (see
    :func:`generate_windows`); ``tokenizer`` may then be None if ``bos_id`` or the model config
    gives the BOS id.
    """
    _check_ctx(ctx)
    if n < 1:
        raise DataError(f"n must be >= 1, got {n}")
    if isinstance(source, str) and source == "generated":
        if model is None:
            raise DataError("source='generated' needs the model to sample from (model=...)")
        bos = bos_token_id(tokenizer, model, bos_id)
        return generate_windows(model, n, ctx, seed=seed, bos_id=bos,
                                add_bos=wants_bos(tokenizer, add_bos),
                                batch_size=batch_size, progress=progress, purpose=purpose)
    if isinstance(source, str) and source in ("wikitext2", "wikitext2-test"):
        log.warning("calibrating on the WikiText-2 test split that perplexity is reported on; "
                    "use 'wikitext2-valid' to keep evaluation held out")
    tokens = tokenize(tokenizer, source)
    bos = bos_token_id(tokenizer, model, bos_id) if wants_bos(tokenizer, add_bos) else None
    width = ctx - 1 if bos is not None else ctx
    if tokens.numel() < width:
        raise DataError(f"{_name(source)} has {tokens.numel()} tokens, fewer than one window of "
                        f"{width}; use a shorter context or more text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - width + 1, (n,), generator=gen)
    windows = torch.stack([tokens[s: s + width] for s in starts.tolist()])
    return _prepend_bos(windows, bos)


@torch.inference_mode()
def generate_windows(model: nn.Module, n: int, ctx: int, *, seed: int = 0, bos_id: int | None,
                     add_bos: bool = True, temperature: float = 1.0, batch_size: int = 8,
                     progress: bool = True, purpose: str = "calibration") -> torch.Tensor:
    """``n`` sequences sampled from ``model`` starting at BOS, ancestral sampling.

    Temperature 1 with no top-k/top-p, so the samples follow the model's own distribution (the
    distribution YAQA's Fisher is defined under).  An EOS is kept and sampling continues, so a
    window may span several generated documents, like windows cut from a corpus.  Determinism:
    same seed, device and dtype give the same windows; across devices the logits (hence samples)
    may differ.  ``add_bos=False`` samples one token more and drops the leading BOS.
    """
    from tqdm.auto import tqdm

    if bos_id is None:
        raise DataError("generated calibration needs a start token: the tokenizer and model "
                        "config have no BOS id, pass bos_id=...")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    length = ctx if add_bos else ctx + 1
    out = torch.empty(n, length, dtype=torch.long)
    # counted in generated tokens (all rows of a batch), so the rate reads as tokens/s
    bar = tqdm(total=n * (length - 1), desc=f"generating {purpose} text", disable=not progress,
               unit="tok", unit_scale=True)
    # transformers 5.x renamed past_key_values to cache; accept both so older versions work.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, n, batch_size):
            b = min(batch_size, n - b0)
            seq = torch.full((b, length), bos_id, dtype=torch.long, device=device)
            past, step_input = None, seq[:, :1]
            for t in range(1, length):
                res = model(input_ids=step_input, use_cache=True, **{cache_arg: past})
                past = res[cache_arg]
                probs = torch.softmax(res.logits[:, -1].float() / temperature, dim=-1)
                step_input = torch.multinomial(probs, 1, generator=gen)
                seq[:, t] = step_input[:, 0]
                bar.update(b)
            out[b0: b0 + b] = seq.cpu()
    finally:
        bar.close()
        model.train(was_training)
    return out if add_bos else out[:, 1:].contiguous()


def batched(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive row batches of ``windows`` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i: i + batch_size]


def _prepend_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows.clone()
    col = torch.full((windows.shape[0], 1), bos, dtype=torch.long)
    return torch.cat([col, windows], dim=1)


def _check_ctx(ctx: int) -> None:
    if ctx < 2:
        raise DataError(f"ctx must be >= 2 tokens, got {ctx}")


def _name(source: Source) -> str:
    return "pre-tokenized source" if isinstance(source, torch.Tensor) else repr(str(source))
