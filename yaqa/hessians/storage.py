"""On-disk Hessians: one safetensors file per decoder block, a meta.json, and resume checkpoints.

Layout of ``out_dir``::

    meta.json                      run identity (model fingerprint, sketch, seed, ...) + data summary
    block_0000.safetensors         finished factors of block 0: "<linear>.H_in", ".H_out", ".H_x"
    resume/blocks-0000-0031/       state of an unfinished group of blocks:
        progress.json              pass, micro-batch cursor, data hash at the cursor, checkpoint id
        ckpt-000003/block_*.safetensors   partial sums, counts and finished factors

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
file under a real name; progress.json is renamed last and names its checkpoint folder, which
makes a checkpoint all-or-nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.adapters import ModelAdapter, get_adapter
from ..store import (StaleWorkError, StoreError, atomic_save_tensors, atomic_write_text,
                     clean_stale_files, diff_identity, identity_hash, read_json, read_tensors, replace_dir,
                     weights_identity)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
# keys that must agree for stored results (or a checkpoint) to belong to the current request
IDENTITY_KEYS = ("format_version", "sketch", "power_iters", "seed", "dtype", "precision",
                 "collect_hx", "calibration")
MODEL_KEYS = ("linears_sha256", "weights_sha256", "dtype")


class HessianMetadataError(StoreError):
    """Stored Hessians (or a resume checkpoint) do not match the model or the request."""


@dataclass
class LayerHessian:
    """Kronecker factors of one linear layer ``y = x W^T`` (W is m×n).

    ``H_in`` (n×n) and ``H_out`` (m×m) approximate the KL Hessian as ``H_out ⊗ H_in``;
    ``H_x`` (n×n) is the plain GPTQ/LDLQ Hessian E[x^T x] from the same data.
    ``shrinkage``: the noise statistic and estimated shrinkage amounts of a single Sketch-B pass
    (:func:`yaqa.hessians.shrinkage.estimate_amounts`), None where there is none.
    """

    name: str
    H_in: Tensor
    H_out: Tensor | None  # None when only H_x was collected (forward-only, for GPTQ/LDLQ)
    H_x: Tensor | None
    n_seqs: int
    n_tokens: int
    sketch: str
    power_iters: int
    identity: str | None = None  # hash of the collection's identity (model, data, request)
    shrinkage: dict | None = None


def block_filename(i: int) -> str:
    return f"block_{i:04d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_fingerprint(model: nn.Module, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """What the stored factors depend on: the layer shapes and every byte of the weights."""
    adapter = adapter or get_adapter(model)
    linears = adapter.named_linears(model)
    shapes = [(name, int(mod.out_features), int(mod.in_features)) for name, _, mod in linears]
    cfg = getattr(model, "config", None)
    return {
        "model_name": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
        "model_type": str(getattr(cfg, "model_type", "")),
        "n_blocks": len(adapter.blocks(model)),
        "linears_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
        "weights_sha256": weights_identity(model),
        "dtype": dtype_name(next(model.parameters()).dtype),
    }


def run_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The part of a collection's identity that decides the factors."""
    out = {**{k: identity.get(k) for k in IDENTITY_KEYS},
           "model": {k: identity.get("model", {}).get(k) for k in MODEL_KEYS}}
    # several label draws per sequence give other factors; recorded only then, so one draw
    # keeps the identity (and its hash) of every directory written before the option
    if identity.get("label_draws", 1) != 1:
        out["label_draws"] = identity["label_draws"]
    return out


def identity_problems(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two collection identities.  Data read from a one-shot iterator has
    no calibration hash; then only the per-pass data hash of a resume can catch a change."""
    a, b = run_identity(stored), run_identity(now)
    if a["calibration"] is None or b["calibration"] is None:
        a.pop("calibration"), b.pop("calibration")
    return diff_identity(a, b)


def read_meta(out_dir: Path) -> dict[str, Any] | None:
    p = Path(out_dir) / META_FILE
    return read_json(p) if p.exists() else None


def mismatches(stored: dict[str, Any], wanted: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}"
            for k in keys if stored.get(k) != wanted.get(k)]


def check_run_identity(out_dir: Path, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Refuse to mix results of different requests, models or data in one directory.

    A directory with files but no meta.json is not ours (e.g. a model directory): refused even
    with ``overwrite``.  With ``overwrite``, a mismatching directory is renamed aside, replaced by
    an empty one, and only then deleted.
    """
    out_dir = Path(out_dir)
    clean_stale_files(out_dir)
    stored = read_meta(out_dir)
    if stored is None:
        if out_dir.is_dir() and any(p.name != "resume" for p in out_dir.iterdir()):
            raise HessianMetadataError(f"{out_dir} is not empty and not a yaqa Hessian directory "
                                       "(no meta.json); choose another Hessian directory")
        return
    problems = identity_problems(stored, identity)
    if not problems:
        return
    if overwrite:
        log.warning("overwriting Hessians in %s (%s)", out_dir, "; ".join(problems))
        fresh = out_dir.with_name(f".{out_dir.name}.yaqa-tmp-{os.getpid()}-new")
        fresh.mkdir()
        replace_dir(fresh, out_dir)
        return
    raise StaleHessiansError(
        f"{out_dir} holds Hessians from a different run ({'; '.join(problems)}); pass "
        "--overwrite (overwrite=True) to discard them, or use another Hessian directory")


class StaleHessiansError(HessianMetadataError, StaleWorkError):
    """Stored Hessians were collected for other weights, data or settings."""


def write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(Path(out_dir) / META_FILE, json.dumps(meta, indent=1, sort_keys=True))


# -- resume state ----------------------------------------------------------------------------

def resume_dir(out_dir: Path, blocks: list[int]) -> Path:
    return Path(out_dir) / "resume" / f"blocks-{blocks[0]:04d}-{blocks[-1]:04d}"


def save_checkpoint(state_dir: Path, progress: dict[str, Any],
                    block_tensors: dict[int, dict[str, Tensor]],
                    block_meta: dict[int, dict[str, Any]]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    old = read_progress(state_dir)
    ckpt_id = (old["ckpt_id"] + 1) if old else 0
    ckpt = state_dir / f"ckpt-{ckpt_id:06d}"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir()
    for i, tensors in block_tensors.items():
        atomic_save_tensors(ckpt / block_filename(i), tensors, block_meta[i])
    atomic_write_text(state_dir / "progress.json",
                      json.dumps({**progress, "ckpt_id": ckpt_id}, indent=1, sort_keys=True))
    for p in state_dir.glob("ckpt-*"):
        if p != ckpt:
            shutil.rmtree(p, ignore_errors=True)


def read_progress(state_dir: Path) -> dict[str, Any] | None:
    p = state_dir / "progress.json"
    return read_json(p) if p.exists() else None


def load_checkpoint(state_dir: Path, progress: dict[str, Any],
                    blocks: list[int]) -> dict[int, tuple[LazyTensors, dict]]:
    """Each block's checkpoint as (its tensors, read from disk into host memory one at a time
    when asked for, its metadata). A resumed group's accumulators then take them one by one:
    the group's whole checkpoint is never resident beside them (on a GPU it would double their
    memory)."""
    ckpt = state_dir / f"ckpt-{progress['ckpt_id']:06d}"
    out = {}
    for i in blocks:
        lazy = LazyTensors(ckpt / block_filename(i))
        out[i] = (lazy, lazy.meta)
    return out


class LazyTensors(Mapping):
    """The tensors of a safetensors file by name, each read into host memory when asked for
    (and not kept); ``prefix`` views the names that start with it, without the prefix."""

    def __init__(self, path: Path, prefix: str = "", *, _header_of: LazyTensors | None = None):
        self.path, self.prefix = Path(path), prefix
        if _header_of is None:
            self.meta, shapes = _header(self.path)
            self._all = sorted(shapes)
        else:
            self.meta, self._all = _header_of.meta, _header_of._all
        self._keys = [k[len(prefix):] for k in self._all if k.startswith(prefix)]

    def sub(self, prefix: str) -> LazyTensors:
        return LazyTensors(self.path, self.prefix + prefix, _header_of=self)

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import safe_open

        if key not in self._keys:
            raise KeyError(key)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                return f.get_tensor(self.prefix + key)
        except Exception as e:  # noqa: BLE001 - as store.read_tensors: all mean "damaged"
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            raise StoreError(f"{self.path} is damaged or unreadable ({type(e).__name__}); "
                             "delete it (or pass --overwrite) to start over") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# -- loading finished results ------------------------------------------------------------------

def read_block_hessians(path: Path, meta: dict[str, Any],
                        device: str | torch.device = "cpu") -> dict[str, LayerHessian]:
    """One block file's factors as full fp32 (or fp64) matrices, packed or not on disk."""
    from .stream import unpack_factor

    tensors, bmeta = read_tensors(path, device)
    prefix = bmeta.get("block_prefix", "")
    dtype = torch.float64 if meta.get("dtype") == "float64" else torch.float32
    ident = identity_hash(run_identity(meta))
    out = {}
    for rel, info in bmeta.get("layers", {}).items():
        def get(k: str) -> Tensor | None:
            t = tensors.get(f"{rel}.{k}")
            return None if t is None else unpack_factor(t, dtype)
        out[f"{prefix}{rel}"] = LayerHessian(
            f"{prefix}{rel}", get("H_in"), get("H_out"), get("H_x"), int(info["n_seqs"]),
            int(info["n_tokens"]), meta["sketch"], int(meta["power_iters"]), ident,
            info.get("shrinkage"))
    return out


def _header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """A block file's ``yaqa`` metadata and tensor shapes, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get("yaqa", "{}"))
            return meta, {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - as store.read_tensors: all mean "damaged"
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise StoreError(f"{path} is damaged or unreadable ({type(e).__name__}); delete it "
                         "(or pass --overwrite) to start over") from None


def _order(shape: list[int]) -> int:
    """n of a stored n×n factor (packed triangles are 1-D)."""
    from .packed import packed_order

    return packed_order(shape[0]) if len(shape) == 1 else int(shape[0])


def load_hessians(path: str | os.PathLike, model: nn.Module | None = None, *,
                  device: str | torch.device = "cpu", blocks: range | list[int] | None = None,
                  strict: bool = True, stream: bool = False) -> Mapping[str, LayerHessian]:
    """Read factors written by :func:`yaqa.collect_hessians` and check them against ``model``.

    Raises :class:`HessianMetadataError` naming every mismatch (layer shapes, model, missing
    blocks). A different weight sample (e.g. the same model in another dtype) only warns unless
    ``strict`` and the layer shapes differ too. Factors stored as packed triangles (this format)
    and as full matrices (earlier files) both load as full matrices. ``stream=True`` checks
    everything from the file headers and returns a mapping that reads one block at a time
    (:class:`yaqa.hessians.stream.StreamedHessians`), for rounding models whose factors do not
    fit in memory at once.
    """
    out_dir = Path(path)
    meta = read_meta(out_dir)
    if meta is None:
        raise HessianMetadataError(f"{out_dir} has no {META_FILE}: not a yaqa Hessian directory "
                                   "(or the collection never started)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise HessianMetadataError(f"{out_dir} was written in format {meta.get('format_version')},"
                                   f" this yaqa reads format {FORMAT_VERSION}; collect again")
    expected: dict[str, tuple[int, int, int]] = {}
    if model is not None:
        adapter = get_adapter(model)
        fp = model_fingerprint(model, adapter)
        sm = meta.get("model", {})
        if sm.get("weights_sha256") != fp["weights_sha256"]:
            log.warning("Hessians in %s were collected on other weights than this model's "
                        "(weight samples differ; stored model %r, this one %r): fine for the "
                        "same model in another dtype, wrong for a different checkpoint",
                        out_dir, sm.get("model_name"), fp["model_name"])
        if strict and sm.get("linears_sha256") != fp["linears_sha256"]:
            log.warning("layer list of %s differs from the model's; checking layer by layer",
                        out_dir)
        for name, bi, mod in adapter.named_linears(model):
            expected[name] = (bi, int(mod.out_features), int(mod.in_features))
    files = sorted(out_dir.glob("block_*.safetensors"))
    present = {int(p.stem.split("_")[1]): p for p in files}
    wanted_blocks = (sorted(set(blocks)) if blocks is not None
                     else sorted({b for b, _, _ in expected.values()}) if expected
                     else sorted(present))
    missing = [b for b in wanted_blocks if b not in present]
    if missing:
        raise HessianMetadataError(
            f"{out_dir} lacks finished blocks {missing} (unfinished or never collected); run the "
            "collection again with the same out_dir to resume, or pass blocks=... to load a subset")
    problems: list[str] = []
    names: dict[str, int] = {}
    for b in wanted_blocks:
        bmeta, shapes = _header(present[b])
        prefix = bmeta.get("block_prefix", "")
        for rel in bmeta.get("layers", {}):
            name = f"{prefix}{rel}"
            if f"{rel}.H_in" not in shapes:
                problems.append(f"{name}: {present[b]} lacks {rel}.H_in")
                continue
            if expected:
                if name not in expected:
                    problems.append(f"{name}: stored, but the model has no such linear layer")
                    continue
                _, m, n = expected.pop(name)
                n_in = _order(shapes[f"{rel}.H_in"])
                n_out = _order(shapes[f"{rel}.H_out"]) if f"{rel}.H_out" in shapes else m
                if (n_in, n_out) != (n, m):
                    problems.append(f"{name}: stored H_in ({n_in}, {n_in}), H_out "
                                    f"({n_out}, {n_out}); the layer is {m}×{n} (out×in), so "
                                    f"expected ({n}, {n}) and ({m}, {m})")
                    continue
            names[name] = b
    left = [n for n, (b, _, _) in expected.items() if b in wanted_blocks]
    if left:
        problems.append(f"no factors stored for {left}")
    if problems:
        raise HessianMetadataError(f"Hessians in {out_dir} do not fit this model "
                                   f"({meta.get('model', {}).get('model_name')}):\n  "
                                   + "\n  ".join(problems))
    if stream:
        from .stream import StreamedHessians

        return StreamedHessians(present, names, meta, device)
    out: dict[str, LayerHessian] = {}
    for b in wanted_blocks:
        out.update({k: v for k, v in read_block_hessians(present[b], meta, device).items()
                    if k in names})
    return out
