"""Quantized checkpoints: packed codes and grids in safetensors plus a JSON record.

Layout of a checkpoint directory (format v2)::

    config.json          the model's Hugging Face config plus ``quantization_config``
                         (``quant_method: "yaqa"`` and the quantized modules), so that after
                         ``import yaqa`` transformers' ``from_pretrained`` loads it (:mod:`yaqa.hf`)
    tokenizer files      when a tokenizer was given
    model.safetensors    unquantized tensors (embeddings, norms, head) in the model's 16-bit dtype
                         (or as asked) and, for every quantized linear, ``qweight`` (packed codes,
                         see :mod:`yaqa.nn.kernels` for the layout), ``grid_*`` (fp16 scales,
                         uint8 zero points) and ``tf_*`` (incoherence sign vectors)
    yaqa.json            how it was made (method, quantizer, Hessians, data, seeds) and which
                         modules are quantized with which format

With ``embeddings="int8"`` the input embedding and the LM head are stored as int8 ``weight``
plus a float32 ``weight_scale`` per row (:mod:`yaqa.nn.int8`; a tied head is stored once), and
both records list them under ``embeddings``; such a checkpoint is format v3, which older yaqa
versions refuse instead of misreading.  Without the option a checkpoint is still written as v2.

Format v1 (yaqa 0.1) had the same tensors, float32 unquantized tensors and no
``quantization_config``; :func:`load` still reads it.

The directory is written under a temporary name and renamed into place, so an interrupted save
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import __version__, store
from ..nn import QuantizedLinear
from ..nn import int8 as int8_rows
from ..quantizers import quantizer_from_config

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # the newest this yaqa reads and writes
# Checkpoints are written with the oldest version that describes them: v3 only adds int8
# embeddings, so a checkpoint without them stays readable by yaqa versions that read v2.
BASE_FORMAT_VERSION = 2
RECORD = "yaqa.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or was not written by yaqa."""


@dataclass
class SavedCheckpoint:
    path: Path
    size_bytes: int
    weights_bytes: int


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def check_checkpoint_target(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``out_dir`` may receive a checkpoint: it is new, empty, or (with ``overwrite``) a yaqa
    checkpoint; never a file or someone else's directory.  Run before any heavy work."""
    out = Path(out_dir)
    try:
        store.check_output_dir(out)
    except store.StoreError as e:
        raise CheckpointError(str(e)) from None
    if out.is_dir() and any(out.iterdir()):
        if not (out / RECORD).exists():
            raise CheckpointError(f"{out} exists and is not a yaqa checkpoint; refusing to "
                                  "overwrite it (choose another --out)")
        if not overwrite:
            raise CheckpointError(f"{out} already holds a checkpoint; pass overwrite=True "
                                  "(--overwrite) to replace it")
    return out


def module_specs(qmods: dict[str, QuantizedLinear]) -> dict[str, dict]:
    return {name: {"in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.bias is not None, "incoherence": m.incoherence,
                   "quantizer": m.quantizer.config()}
            for name, m in qmods.items()}


def _resolve_save_dtype(model: nn.Module, dtype) -> torch.dtype | None:
    """``"auto"``: the dtype the model was stored in if 16-bit, else keep each tensor's dtype."""
    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}[str(dtype)]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'bfloat16', 'float16' or "
                             "'float32'") from None
    stored = getattr(model, "yaqa_stored_dtype", None) or getattr(model.config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.bfloat16, torch.float16) else None


def _state_to_save(model: nn.Module, qmods: dict[str, QuantizedLinear],
                   dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    # Stored formats keep their dtypes: packed linears, and int8 rows with float32 scales.
    stored = dict(qmods) | {n: m for n, m in model.named_modules()
                            if isinstance(m, (int8_rows.Int8Embedding, int8_rows.Int8Linear))}
    packed = {f"{name}.{k}" for name, m in stored.items() for k, _ in m.named_buffers()}
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        # Tied weights (embedding = head) are one tensor: save it once, as transformers does.
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        if dtype is not None and name not in packed and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.detach().cpu().contiguous()
    return state


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None,
                   info: dict | None = None, overwrite: bool = False,
                   dtype: torch.dtype | str | None = "auto",
                   embeddings: str | None = "auto") -> SavedCheckpoint:
    """Write ``model`` (with QuantizedLinear modules) to ``out_dir``.

    ``dtype``: of the unquantized tensors (embeddings, norms, head, biases).  ``"auto"`` keeps
    the 16-bit dtype the model was published in (float32 tensors of a bf16 model are saved as
    bf16); ``None`` saves every tensor as it is in memory.
    ``embeddings``: ``"auto"`` saves the input embedding and the LM head like the other
    unquantized tensors; ``"int8"`` stores them as int8 with one scale per row (the model in
    memory is left as it is).  A model already converted by
    :func:`yaqa.nn.int8.quantize_embeddings` is saved with int8 embeddings either way.

    The directory is built under a temporary name and swapped in by rename; an old checkpoint
    is deleted only after the swap.
    """
    qmods = quantized_modules(model)
    if not qmods:
        raise CheckpointError("model has no quantized layers; run yaqa.quantize first")
    want_int8 = int8_rows.parse_embeddings(embeddings) == "int8"
    out = check_checkpoint_target(out_dir, overwrite=overwrite)
    save_dtype = _resolve_save_dtype(model, dtype)
    specs = module_specs(qmods)
    view = (int8_rows.int8_embeddings_view(model)
            if want_int8 and not int8_rows.has_int8_embeddings(model) else nullcontext())
    with view, store.atomic_dir(out) as tmp:
        emb_specs = int8_rows.embedding_specs(model)
        version = FORMAT_VERSION if emb_specs else BASE_FORMAT_VERSION
        emb_record = {"format": "int8", "modules": emb_specs} if emb_specs else None
        config = copy.deepcopy(model.config)
        config.quantization_config = {"quant_method": "yaqa", "format_version": version,
                                      "modules": specs}
        if emb_record:
            config.quantization_config["embeddings"] = emb_record
        if save_dtype is not None:
            config.dtype = save_dtype
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(_state_to_save(model, qmods, save_dtype), str(tmp / WEIGHTS),
                  metadata={"format": "pt", "yaqa_format_version": str(version)})
        record = {
            "format": "yaqa",
            "format_version": version,
            "yaqa_version": __version__,
            # Attention kernels differ in the last bits; reload with the one used here so the
            # loaded model reproduces the in-memory logits exactly.
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "dtype": str(save_dtype).removeprefix("torch.") if save_dtype else None,
            "modules": specs,
            "embeddings": emb_record,
            "info": info or {},
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str))
    size = dir_size(out)
    weights = (out / WEIGHTS).stat().st_size
    log.info("saved %s (%.2f MB)", out, size / 1e6)
    return SavedCheckpoint(out, size, weights)


def read_record(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint directory: {p}")
    if not (p / RECORD).exists() or not (p / WEIGHTS).exists():
        raise CheckpointError(f"{p} is not a yaqa checkpoint (missing {RECORD} or {WEIGHTS})")
    try:
        record = store.read_json(p / RECORD)
    except store.StoreError as e:
        raise CheckpointError(str(e)) from None
    if record.get("format") != "yaqa" or int(record.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"{p}: unsupported checkpoint format "
                              f"{record.get('format')!r} v{record.get('format_version')}; "
                              f"this yaqa reads up to v{FORMAT_VERSION}")
    return record


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, attn_implementation: str | None = None,
         dense_cache: bool = False) -> nn.Module:
    """Rebuild a working model from a checkpoint directory alone.

    Format v2: ``AutoModelForCausalLM.from_pretrained`` through yaqa's registered quantizer.
    ``dtype``: of the unquantized tensors and the activations (default: the checkpoint's).
    ``dense_cache``: keep dense dequantized weights (fast CPU evaluation, unquantized memory).
    """
    p = Path(path)
    record = read_record(p)
    attn = attn_implementation or record.get("attn_implementation")
    if int(record["format_version"]) >= 2:
        from transformers import AutoModelForCausalLM

        from .. import hf  # noqa: F401  (registers quant_method "yaqa")

        dev = torch.device(device)
        kwargs = {"dtype": dtype or "auto"}
        if attn:
            kwargs["attn_implementation"] = attn
        if dev.type != "cpu":
            kwargs["device_map"] = str(dev)
        try:
            model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a damaged checkpoint
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            text = str(e).strip().splitlines()
            raise CheckpointError(f"{p / WEIGHTS} cannot be loaded ({type(e).__name__}: "
                                  f"{text[0] if text else ''}); is it damaged or truncated?"
                                  ) from None
        if dense_cache:
            from ..nn import set_dense_cache

            set_dense_cache(model, True)
        model.yaqa_record = record
        return model.eval()
    return _load_v1(p, record, device, dtype, attn, dense_cache)


def _load_v1(p: Path, record: dict, device, dtype, attn, dense_cache: bool) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(p)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, **({"attn_implementation": attn} if attn else {}))
    compute_dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    for name, spec in record["modules"].items():
        q = quantizer_from_config(spec["quantizer"])
        model.set_submodule(name, QuantizedLinear(spec["in_features"], spec["out_features"], q,
                                                 bias=spec["bias"],
                                                 incoherence=spec["incoherence"],
                                                 dtype=compute_dtype, dense_cache=dense_cache))
    try:
        state, _ = store.read_tensors(p / WEIGHTS)
    except store.StoreError as e:
        raise CheckpointError(str(e)) from None
    result = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.materialize_hadamard()
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if meta:
        raise CheckpointError(f"{p}: checkpoint lacks tensors for {meta[:5]}"
                              f"{' ...' if len(meta) > 5 else ''}")
    if result.unexpected_keys:
        raise CheckpointError(f"{p}: unexpected tensors {result.unexpected_keys[:5]}")
    for n, prm in model.named_parameters():
        prm.requires_grad_(False)
        if prm.is_floating_point() and prm.dtype != compute_dtype:
            prm.data = prm.data.to(compute_dtype)
    model.yaqa_record = record
    return model.to(device).eval()
