"""Everything yaqa writes to disk goes through here: atomic files and directories, and the
content identities that decide whether stored work (Hessians, quantization resume state,
checkpoints) may be reused.

An identity is a small JSON dict (``{"weights": ..., "calibration": ..., "recipe": ...}``).
Stored work is reused only when its identity equals the current one; otherwise
:func:`check_identity` raises :class:`StaleWorkError` naming every differing field and the flag
that starts over.  Nothing is ever silently mixed or silently discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

_CHUNK = 1 << 24  # bytes hashed per read; keeps memory flat for multi-GB weight files


class StoreError(ValueError):
    """A file yaqa wrote (or reads) is unreadable, or a path cannot be used for output."""


class StaleWorkError(StoreError):
    """Stored work belongs to another run (other weights, data or recipe)."""


# -- identities --------------------------------------------------------------------------------

def identity_hash(obj: Any) -> str:
    """A stable short hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint_cache_file() -> Path:
    from .models.loading import cache_dir

    return cache_dir() / "fingerprints.json"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached by (absolute path, size, mtime) so a model file is read
    for hashing once, not once per run."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _fingerprint_cache_file()
    cache: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(cache_file.read_text())
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")}
    cache[key] = h.hexdigest()
    with contextlib.suppress(OSError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=0))
    return cache[key]


WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def files_fingerprint(model_dir: str | os.PathLike) -> str | None:
    """Hash of every weight file of a model directory (None when it has none)."""
    d = Path(model_dir)
    files = sorted({f for pat in WEIGHT_FILE_PATTERNS for f in d.glob(pat) if f.is_file()})
    if not files:
        return None
    return identity_hash([(f.name, file_sha256(f)) for f in files])


def tensors_fingerprint(model: nn.Module) -> str:
    """Hash of every byte of every parameter and buffer of ``model`` (names, dtypes, shapes)."""
    h = hashlib.sha256()
    for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers()),
                          key=lambda kv: kv[0]):
        if t.is_meta:
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        # bytes via a uint8 view: numpy has no bfloat16
        h.update(flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_identity(model: nn.Module) -> str:
    """The identity of ``model``'s weights.

    ``load_model`` records the hash of the weight files it read (cached by size and mtime) plus
    the dtype it loaded them in, so a multi-GB model is not hashed again from GPU memory; other
    models (built in memory) are hashed tensor by tensor.
    """
    fp = getattr(model, "yaqa_weights_identity", None)
    return fp if fp is not None else tensors_fingerprint(model)


def calibration_identity(ids: Tensor | Iterable[Tensor] | None) -> str | None:
    """Hash of the calibration token ids: covers the source text, n, ctx and the sampling seed.
    None for data that can be iterated only once (it cannot be hashed without consuming it)."""
    if ids is None:
        return None
    if isinstance(ids, Tensor):
        batches: Iterable[Tensor] = [ids]
    elif isinstance(ids, (list, tuple)):
        batches = ids
    else:
        return None
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


class _Absent:
    """A key one identity lacks: fields at their default are left out of identities (so that
    adding a field keeps older work valid), so the message names the default, not None."""

    def __repr__(self) -> str:
        return "absent (the default)"


_ABSENT = _Absent()


def diff_identity(stored: Any, now: Any, prefix: str = "") -> list[str]:
    """Human-readable list of the leaves where two identities differ."""
    if isinstance(stored, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(stored) | set(now), key=str):
            out += diff_identity(stored.get(k, _ABSENT), now.get(k, _ABSENT), f"{prefix}{k}.")
        return out
    if stored != now:
        return [f"{prefix.rstrip('.')}: stored {stored!r}, now {now!r}"]
    return []


def check_identity(what: str, stored: dict | None, now: dict, flag: str) -> None:
    """Raise :class:`StaleWorkError` unless ``stored`` is None or equals ``now``."""
    if stored is None:
        return
    problems = diff_identity(stored, now)
    if problems:
        raise StaleWorkError(f"{what} belongs to a different run ({'; '.join(problems)}); "
                             f"pass {flag} to discard it and start over, or use another "
                             "output path")


# -- reading our own files ---------------------------------------------------------------------

def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file yaqa wrote; a damaged one becomes a one-line :class:`StoreError`."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{p} is damaged or unreadable ({_first_line(e)}); delete it "
                         "(or pass --overwrite) to start over") from None


def read_tensors(path: str | os.PathLike,
                 device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict]:
    """Tensors and the ``yaqa`` metadata of a safetensors file, or a :class:`StoreError`."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {}).get("yaqa", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, JSON: all mean "damaged"
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise StoreError(f"{p} is damaged or unreadable ({_first_line(e)}); delete it "
                         "(or pass --overwrite) to start over") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# -- atomic writes ------------------------------------------------------------------------------

def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor],
                        meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_name(path)
    # safetensors refuses aliased storage; contiguous CPU copies also free the GPU sooner
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
              str(tmp), metadata={"yaqa": json.dumps(meta)})
    os.replace(tmp, path)


_TMP_DIR_MARK = ".yaqa-tmp-"
_OLD_DIR_MARK = ".yaqa-old-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove temporary directories that killed runs left next to ``target``.

    A kill between the two renames of an overwrite leaves the old directory under its
    ``.yaqa-old-`` name and no ``target``: it is put back, so nothing is lost.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    for mark in (_OLD_DIR_MARK, _TMP_DIR_MARK):
        for p in parent.glob(f".{target.name}{mark}*"):
            try:
                pid = int(p.name.rsplit("-", 2)[-2])
            except (ValueError, IndexError):
                continue
            if _pid_alive(pid):
                continue
            if mark == _OLD_DIR_MARK and not target.exists():
                log.warning("restoring %s from an overwrite that was interrupted", target)
                os.replace(p, target)
                continue
            log.info("removing %s, left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def clean_stale_files(directory: str | os.PathLike) -> list[Path]:
    """Remove half-written ``.NAME.tmp-PID`` files that killed runs left in ``directory``."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.glob(".*.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[-1])
        except ValueError:
            continue
        if p.is_file() and not _pid_alive(pid):
            log.info("removing %s, left by an interrupted run", p)
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it in for ``target``.

    An existing ``target`` is renamed aside first and deleted only after the new one is in
    place, so a kill at any point leaves either the old or the new directory (never neither).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_DIR_MARK}{os.getpid()}-",
                                dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, target: Path) -> None:
    """Rename ``src`` to ``target``; an existing ``target`` is deleted after the swap."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}{_OLD_DIR_MARK}{os.getpid()}-{os.urandom(3).hex()}")
        os.replace(target, old)
    os.replace(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(path: str | os.PathLike, *, what: str = "--out") -> Path:
    """``path`` can become a directory we write: it is not a file, and its parent is writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise StoreError(f"{what} {p} is an existing file, not a directory; choose another path")
    parent = p if p.is_dir() else next((a for a in p.parents if a.exists()), Path("."))
    if not parent.is_dir():
        raise StoreError(f"{what} {p}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"{what} {p}: {parent} is not writable")
    return p
