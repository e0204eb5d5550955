"""Write a yaqa model as a compressed-tensors ``pack-quantized`` checkpoint (what vLLM loads).

Per quantized linear ``<name>`` the safetensors file holds (compressed-tensors >= 0.18 layout,
``compressors/pack_quantized``):

* ``weight_packed``  int32 ``[out, ceil(in·b/32)]``: unsigned codes ``q + 2^(b-1)`` of the signed
  values, code ``i`` of a row at bit offset ``i·b`` (dense across words; for 2/4/8 bits this is
  also 0.17's layout, for 3 bits it is not);
* ``weight_scale``   ``[out, in/g]`` in the export dtype;
* ``weight_zero_point`` int32 ``[ceil(out·b/32), in/g]``, packed the same way along the output
  dimension (asymmetric grids only);
* ``weight_shape``   int64 ``[2]``.

Dequantization is ``(q - z) · s`` on the signed values; yaqa's codes and zeros are the unsigned
ones, so they are packed as they are.

FP4 layers (yaqa's ``mxfp4``/``nvfp4`` quantizers) are written in compressed-tensors' own FP4
formats, the weight-only presets ``MXFP4A16`` and ``NVFP4A16``:

* ``weight_packed`` uint8 ``[out, in/2]``: the 4-bit E2M1 codes (``sign << 3 | magnitude index``,
  yaqa's codes as they are), column ``2j`` in the low nibble of byte ``j``, ``2j+1`` in the high;
* ``weight_scale`` ``[out, in/block]``: MXFP4 the E8M0 exponent as uint8 (``2^(e - 127)``),
  NVFP4 the FP8 E4M3 block scale as float8_e4m3fn;
* ``weight_global_scale`` float32 ``[1]`` (NVFP4 only): compressed-tensors divides by it
  (``s / G``), so it holds the reciprocal of yaqa's multiplier ``g``.

Incoherence goes into ``transform_config`` as two online transforms, the input-side scheme ``v``
(``x -> x M_v / sqrt(n)``) and the output-side scheme ``u`` (``y' -> y' M_u^T / sqrt(m)``,
``inverse: true``); the fused halves are already in the stored weights.  compressed-tensors and
vLLM build one matrix per (scheme, size), stored once under the first layer that uses it (as
llm-compressor writes them), so only the ``shared`` and ``block`` incoherence modes export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..incoherence import IncoherenceTransform, expand_kv_signs, sign_partner
from ..models.adapters import VLLM_FUSED
from ..nn import QuantizedLinear
from ..nn.int8 import Int8Embedding, Int8Linear
from ..quantizers import FP4Grid, IntGrid

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
# Files of a yaqa checkpoint that the export writes itself or must not carry over.
_OWN_FILES = {"model.safetensors", "yaqa.json", "config.json"}
# The layout written here (dense cross-word packing) is compressed-tensors' since 0.18.
MIN_CT_VERSION = "0.18"
VLLM_BITS = (4, 8)
VLLM_GROUPS = (32, 64, 128, None)


class ExportError(ValueError):
    """The model cannot be written in the requested format (the message says what to change)."""


@dataclass
class LayerCodes:
    """What an exporter needs from one quantized linear, independent of yaqa's storage layout."""

    codes: torch.Tensor  # int32 [out, in], unsigned codes in [0, 2^bits)
    scale: torch.Tensor  # float32 [out, in / group_size]
    zero: torch.Tensor  # int32 [out, in / group_size], unsigned zero points
    bits: int
    group_size: int
    symmetric: bool
    transform: IncoherenceTransform | None
    bias: torch.Tensor | None
    fmt: str = "int"  # "int", "mxfp4" or "nvfp4"
    # FP4: ``scale`` is the stored block scale (MXFP4 exponent e, NVFP4 E4M3 value) and
    # ``global_scale`` NVFP4's per-tensor multiplier g (value = E2M1 · scale · g).
    global_scale: torch.Tensor | None = None


def layer_codes(module: QuantizedLinear) -> LayerCodes:
    """The codes, scales and zero points of ``module`` (the one place that knows how a
    :class:`QuantizedLinear` stores them)."""
    grid = module.grid()
    bias = module.bias.detach().float().cpu() if module.bias is not None else None
    if isinstance(grid, FP4Grid):
        codes = module.codes().to(torch.int32).cpu()
        return LayerCodes(codes=codes, scale=grid.stored.float().cpu(),
                          zero=torch.zeros(0, dtype=torch.int32), bits=4, group_size=grid.block,
                          symmetric=True, transform=module.transform(), bias=bias, fmt=grid.fmt,
                          global_scale=grid.global_scale.float().cpu().reshape(1))
    if not isinstance(grid, IntGrid):
        raise ExportError(f"compressed-tensors export takes int-k, mxfp4 and nvfp4 layers, not "
                          f"{type(grid).__name__} (re-quantize with one of those quantizers)")
    cfg = module.quantizer.config()
    return LayerCodes(codes=module.codes().to(torch.int32).cpu(), scale=grid.scale.float().cpu(),
                      zero=grid.zero.round().to(torch.int32).cpu(), bits=int(grid.bits),
                      group_size=int(grid.group_size), symmetric=bool(cfg.get("symmetric")),
                      transform=module.transform(), bias=bias)


# ---------------------------------------------------------------------------------------------
# Packing


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1, rows_per_chunk: int = 1024) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along ``dim`` of a 2-D tensor into int32 words.

    Code ``i`` of a row occupies bits ``[i·b, (i+1)·b)`` of the row's bit stream, word ``k`` holding
    stream bits ``[32k, 32k+32)`` (least significant first); the last word is zero-padded.
    """
    if not 1 <= bits <= 8:
        raise ExportError(f"can pack 1..8-bit codes, got {bits}")
    if dim == 0:
        return pack_int32(codes.T, bits, 1, rows_per_chunk).T.contiguous()
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ExportError(f"codes out of range for {bits}-bit packing")
    rows, cols = c.shape
    words = -(-cols * bits // 32)
    if 32 % bits == 0:  # whole codes per word: one shift-and-sum over a reshaped view
        per = 32 // bits
        padded = nn.functional.pad(c, (0, words * per - cols)).view(rows, words, per)
        w = (padded << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
        return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    pos = torch.arange(cols, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    # Codes that straddle a word boundary put their high bits at the bottom of the next word.
    spill = (off + bits > 32).nonzero().squeeze(1)
    out = torch.empty(rows, words, dtype=torch.int32)
    for r in range(0, rows, rows_per_chunk):
        chunk = c[r:r + rows_per_chunk]
        acc = torch.zeros(chunk.shape[0], words + 1, dtype=torch.int64)
        acc.index_add_(1, word, (chunk << off) & 0xFFFFFFFF)  # disjoint bits: add == or
        if spill.numel():
            acc.index_add_(1, word[spill] + 1, chunk[:, spill] >> (32 - off[spill]))
        w = acc[:, :words]
        out[r:r + rows_per_chunk] = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return out


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``size`` unsigned codes per row (``dim``) as int32."""
    if dim == 0:
        return unpack_int32(packed.T, bits, size, 1).T.contiguous()
    w = packed.to(torch.int64) & 0xFFFFFFFF
    stream = ((w[..., None] >> torch.arange(32)) & 1).reshape(w.shape[0], -1)[:, :size * bits]
    vals = (stream.view(w.shape[0], size, bits) << torch.arange(bits)).sum(-1)
    return vals.to(torch.int32)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the rows: column ``2j`` in the low nibble of byte ``j``."""
    c = codes.to(torch.int32)
    if c.shape[-1] % 2:
        raise ExportError(f"FP4 packing needs an even number of columns, got {c.shape[-1]}")
    if c.numel() and (c.min() < 0 or c.max() > 15):
        raise ExportError("codes out of range for 4-bit packing")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def nvfp4_global_divisor(g: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``weight_global_scale`` for yaqa's NVFP4 multiplier ``g``: the float32
    reciprocal (its loaders compute ``weight_scale / weight_global_scale``; vLLM takes ``1 / G``)."""
    G = (1.0 / g.double()).float().reshape(1)
    if not bool(torch.isfinite(G).all()) or not bool((G > 0).all()):
        raise ExportError(f"NVFP4 global scale {g.flatten().tolist()} has no finite float32 "
                          "reciprocal; the checkpoint is damaged or was not fitted")
    return G


# ---------------------------------------------------------------------------------------------
# Transforms


@dataclass
class _Scheme:
    """One compressed-tensors transform scheme: its type and the matrix stored per size."""

    name: str  # "v" (inputs) or "u" (outputs)
    type: str  # "random-hadamard" or "hadamard"
    head_dim: int | None
    signs: dict[int, torch.Tensor] = field(default_factory=dict)  # size -> signs (not in block mode)
    owner: dict[int, str] = field(default_factory=dict)  # size -> layer storing the matrix


def _transform_kind(tf: IncoherenceTransform) -> tuple[str, int | None]:
    return ("hadamard", tf.block) if tf.block is not None else ("random-hadamard", None)


def _online_signs(name: str, tf: IncoherenceTransform, side: str,
                  transforms: dict[str, IncoherenceTransform], head_dim: int | None
                  ) -> torch.Tensor:
    """The signs that must run online on one side of ``name`` (block mode: none, once the
    cancelling pairs are checked; raises when signs would be lost)."""
    s = tf.sign_in if side == "in" else tf.sign_out
    if tf.block is None or bool((s == 1).all()):
        return s
    pair = sign_partner(name)
    producer, consumer, kind = pair if pair else (None, None, None)
    if pair and producer in transforms and consumer in transforms:
        s_prod = transforms[producer].sign_out
        s_cons = transforms[consumer].sign_in
        if kind == "attn" and head_dim is not None and s_prod.numel() != s_cons.numel():
            s_prod = expand_kv_signs(s_prod, s_cons.numel(), head_dim)
        if torch.equal(s_prod, s_cons) and (name, side) in ((producer, "out"), (consumer, "in")):
            return torch.ones_like(s)
    raise ExportError(f"{name}: block-Hadamard signs on its {side}puts do not cancel with a "
                      "neighbouring layer, and the fast `hadamard` transform has no signs; "
                      "re-quantize with --incoherence block (which only places cancelling signs)")


def _collect_schemes(layers: dict[str, LayerCodes], head_dim: int | None) -> dict[str, _Scheme]:
    tfs = {n: lc.transform for n, lc in layers.items() if lc.transform is not None}
    if not tfs:
        return {}
    if len(tfs) != len(layers):
        missing = [n for n in layers if n not in tfs][:3]
        raise ExportError(f"some quantized layers have no incoherence transform ({missing}); "
                          "compressed-tensors applies one transform config to all of them")
    kinds = {_transform_kind(tf) for tf in tfs.values()}
    if len(kinds) != 1:
        raise ExportError(f"layers mix incoherence transforms {sorted(map(str, kinds))}")
    ttype, head = kinds.pop()
    schemes = {"v": _Scheme("v", ttype, head), "u": _Scheme("u", ttype, head)}
    for name, tf in tfs.items():
        for scheme, side, size in ((schemes["v"], "in", tf.n), (schemes["u"], "out", tf.m)):
            s = _online_signs(name, tf, side, tfs, head_dim)
            if head is not None:  # block mode: no signs run online, one Sylvester block
                scheme.owner.setdefault(head, name)
                continue
            key = size
            if key not in scheme.signs:
                scheme.signs[key], scheme.owner[key] = s, name
            elif not torch.equal(scheme.signs[key], s):
                raise ExportError(
                    f"{name} uses other {side}put signs than {scheme.owner[key]} for size {size}; "
                    "compressed-tensors and vLLM share one transform per size, so per-layer "
                    "random signs cannot be served. Re-quantize with --incoherence shared "
                    "(or block for vLLM's fast Hadamard kernel)")
    return schemes


def _scheme_matrix(scheme: _Scheme, key: int) -> torch.Tensor:
    if scheme.type == "hadamard":
        return IncoherenceTransform(key, key, seed=-1, block=key,
                                    sign_in=torch.ones(key), sign_out=torch.ones(key)
                                    ).online_matrix("in")
    s = scheme.signs[key]
    return IncoherenceTransform(key, key, seed=-1, sign_in=s, sign_out=s).online_matrix("in")


def _transform_config(schemes: dict[str, _Scheme], ignore: list[str]) -> dict:
    def scheme_json(s: _Scheme, location: str, inverse: bool) -> dict:
        return {"type": s.type, "randomize": False, "requires_grad": False, "head_dim": s.head_dim,
                "apply": [{"targets": ["Linear"], "location": location, "inverse": inverse,
                           "ignore": list(ignore)}]}

    return {"config_groups": {"v": scheme_json(schemes["v"], "input", False),
                              "u": scheme_json(schemes["u"], "output", True)}}


# ---------------------------------------------------------------------------------------------
# The export


@dataclass
class ExportReport:
    path: Path
    quantized_layers: int
    bits: tuple[int, ...]
    transform: str | None  # None, "random-hadamard" or "hadamard"
    size_bytes: int
    vllm_notes: list[str] = field(default_factory=list)
    fmt: str = "int"  # "int", "mxfp4" or "nvfp4"


# compressed-tensors' presets NVFP4A16 and MXFP4A16 (what vLLM's W4A16 FP4 schemes match).
# ``scale_dtype`` is left out: its compressors default to exactly these dtypes, and configs
# without it also parse in compressed-tensors releases older than the field.
_FP4_ARGS = {
    "nvfp4": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
              "group_size": 16, "dynamic": False},
    "mxfp4": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
              "group_size": 32, "dynamic": False},
}
_FORMATS = {"int": "pack-quantized", "nvfp4": "nvfp4-pack-quantized",
            "mxfp4": "mxfp4-pack-quantized"}


def _weights_args(lc: LayerCodes, n: int) -> dict:
    if lc.fmt != "int":
        return dict(_FP4_ARGS[lc.fmt])
    strategy = "channel" if lc.group_size == n else "group"
    args = {"num_bits": lc.bits, "type": "int", "symmetric": lc.symmetric, "strategy": strategy,
            "group_size": lc.group_size if strategy == "group" else None, "dynamic": False}
    return args


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, *,
                              dtype: torch.dtype = torch.float16, source_dir: str | os.PathLike | None = None,
                              overwrite: bool = False, allow_unfused_nvfp4: bool = False
                              ) -> ExportReport:
    """Write ``model`` (with :class:`QuantizedLinear` layers) as a compressed-tensors checkpoint.

    ``dtype`` is used for the int-k scales and every unquantized tensor (yaqa fits its int scales
    in fp16, so float16 or float32 reproduce yaqa's weights exactly; bfloat16 rounds the scales).
    FP4 scales keep their own formats (E8M0, E4M3, float32 global) whatever ``dtype`` is.
    ``source_dir``: a yaqa checkpoint whose tokenizer and generation files are copied along.
    ``allow_unfused_nvfp4``: write NVFP4 layers that vLLM fuses (q/k/v, gate/up) even when
    their global scales differ (vLLM keeps one per fused layer and would serve them wrongly).
    Only checkpoints quantized with ``fused_global_scale=False`` (or before yaqa shared the
    scale by default) need it.
    """
    out = Path(out_dir)
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not qmods:
        raise ExportError("model has no quantized layers; quantize it first")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass overwrite=True (--overwrite)")
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)

    layers = {n: layer_codes(m) for n, m in qmods.items()}
    fmts = sorted({lc.fmt for lc in layers.values()})
    if len(fmts) != 1:
        raise ExportError(f"layers mix quantizer families {fmts}; compressed-tensors writes one "
                          "format per checkpoint here (quantize every layer with one of them)")
    fmt = fmts[0]
    if dtype == torch.bfloat16 and fmt == "int":
        log.warning("bfloat16 export rounds yaqa's fp16 scales; use float16 to keep the weights exact")
    if fmt == "nvfp4" and not allow_unfused_nvfp4:
        _check_fused_global_scales(layers)
    # Int8 embedding/head (yaqa.nn.int8) have no compressed-tensors form that vLLM loads for
    # embeddings: they are exported dequantized, in ``dtype``, like any unquantized tensor.
    int8_mods = {n: m for n, m in model.named_modules()
                 if isinstance(m, (Int8Embedding, Int8Linear))}
    ignore = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, Int8Linear)) and n not in qmods]
    schemes = _collect_schemes(layers, head_dim)

    tensors: dict[str, torch.Tensor] = {}
    skip_prefixes = tuple(n + "." for n in list(qmods) + list(int8_mods))
    tied_head = None
    if getattr(cfg, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        tied_head = next((n for n, m in model.named_modules() if m is head), None)
    for k, v in model.state_dict().items():
        if k.startswith(skip_prefixes) or (tied_head and k == tied_head + ".weight"):
            continue
        tensors[k] = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
    for name, m in int8_mods.items():
        if name != tied_head:
            tensors[f"{name}.weight"] = m.dequantized_weight().to(dtype).cpu().contiguous()
        if getattr(m, "bias", None) is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to("cpu", dtype).contiguous()

    groups: dict[str, dict] = {}
    for name, lc in layers.items():
        m, n = lc.codes.shape
        if lc.fmt == "int":
            tensors[f"{name}.weight_packed"] = pack_int32(lc.codes, lc.bits)
            tensors[f"{name}.weight_scale"] = lc.scale.to(dtype).contiguous()
            tensors[f"{name}.weight_shape"] = torch.tensor([m, n], dtype=torch.int64)
            if not lc.symmetric:
                tensors[f"{name}.weight_zero_point"] = pack_int32(lc.zero, lc.bits, dim=0)
        else:
            tensors.update({f"{name}.{k}": v for k, v in _fp4_tensors(lc).items()})
        if lc.bias is not None:
            b = lc.bias if lc.transform is None else lc.transform.output_inverse(lc.bias)
            tensors[f"{name}.bias"] = b.to(dtype).contiguous()
        key = json.dumps(_weights_args(lc, n), sort_keys=True)
        groups.setdefault(key, {"args": _weights_args(lc, n), "names": []})["names"].append(name)

    for scheme in schemes.values():
        for key, owner in scheme.owner.items():
            loc = "input" if scheme.name == "v" else "output"
            tensors[f"{owner}.{scheme.name}_{loc}.weight"] = _scheme_matrix(scheme, key).to(dtype)

    config_groups = {}
    for i, g in enumerate(groups.values()):
        # One group covers every linear by class; several need the exact module names.
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{n}$" for n in g["names"]]
        config_groups[f"group_{i}"] = {"targets": targets, "weights": g["args"],
                                       "input_activations": None, "output_activations": None}
    qconfig = {"quant_method": "compressed-tensors", "format": _FORMATS[fmt],
               "quantization_status": "compressed", "config_groups": config_groups,
               "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {},
               "transform_config": _transform_config(schemes, ignore) if schemes else {}}
    notes = _vllm_notes(layers, schemes)
    for note in notes:
        log.warning("vLLM: %s", note)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg_dict = cfg.to_dict()
        cfg_dict.pop("_attn_implementation_autoset", None)
        cfg_dict["quantization_config"] = qconfig
        cfg_dict["dtype"] = str(dtype).removeprefix("torch.")
        if "torch_dtype" in cfg_dict:
            cfg_dict["torch_dtype"] = cfg_dict["dtype"]
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if source_dir is not None:
            for f in Path(source_dir).iterdir():
                if f.is_file() and f.name not in _OWN_FILES:
                    shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    ttype = next(iter(schemes.values())).type if schemes else None
    log.info("exported %d quantized layers to %s (%.1f MB)", len(layers), out, size / 1e6)
    return ExportReport(out, len(layers), tuple(sorted({lc.bits for lc in layers.values()})),
                        ttype, size, notes, fmt)


def _fp4_tensors(lc: LayerCodes) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one FP4 layer (names without the layer prefix)."""
    out = {"weight_packed": pack_fp4(lc.codes)}
    if lc.fmt == "mxfp4":
        # yaqa keeps exponents in [-127, 127]: biased 0..254, never E8M0's NaN (255).
        out["weight_scale"] = (lc.scale.round() + 127).to(torch.uint8).contiguous()
    else:
        out["weight_scale"] = lc.scale.to(torch.float8_e4m3fn).contiguous()
        out["weight_global_scale"] = nvfp4_global_divisor(lc.global_scale)
    return out


def _check_fused_global_scales(layers: dict[str, LayerCodes]) -> None:
    """Refuse NVFP4 siblings that vLLM fuses into one layer but that carry different global
    scales: vLLM's W4A16 NVFP4 scheme keeps only one (``1 / max(G)``) for the fused layer."""
    for name, lc in layers.items():
        parent, _, leaf = name.rpartition(".")
        group = next((grp for grp in VLLM_FUSED if leaf in grp), ())
        for other in group:
            sib = layers.get(f"{parent}.{other}" if parent else other)
            if sib is not None and not torch.equal(sib.global_scale, lc.global_scale):
                raise ExportError(
                    f"{name} and {other} have different NVFP4 global scales, but vLLM fuses "
                    f"{'/'.join(group)} and keeps one, so it would serve wrong weights. "
                    "Re-quantize without --per-layer-global-scale (fused_global_scale=False), "
                    "or pass allow_unfused_nvfp4=True (--allow-unfused-nvfp4) to write them "
                    "anyway (transformers and compressed-tensors load them correctly)")


def _vllm_notes(layers: dict[str, LayerCodes], schemes: dict[str, _Scheme]) -> list[str]:
    """What keeps vLLM from serving this export (empty: nothing known)."""
    notes = []
    fmt = next(iter(layers.values())).fmt
    if fmt == "nvfp4":
        notes.append("NVFP4 weight-only (W4A16) runs on vLLM's FP4 Marlin kernel (vLLM PR 18000, "
                     "merged 2025-05); fused q/k/v and gate/up layers need equal global scales "
                     "(yaqa's default for nvfp4)")
    elif fmt == "mxfp4":
        notes.append("MXFP4 weight-only (W4A16) on dense layers runs on vLLM's FP4 Marlin kernel "
                     "since vLLM PR 31926 (merged 2026-01)")
    bits = sorted({lc.bits for lc in layers.values()} - set(VLLM_BITS))
    if bits:
        notes.append(f"{bits}-bit weights: vLLM's Marlin/Machete kernels serve 4 and 8 bits "
                     "(with zero points only those); other widths need an optional kernel")
    groups = sorted({lc.group_size for lc in layers.values() if lc.fmt == "int"
                     and lc.group_size not in VLLM_GROUPS and lc.group_size != lc.codes.shape[1]})
    if groups:
        notes.append(f"group size {groups} is not one of Marlin's 32/64/128/per-channel")
    if schemes:
        biased = [n for n, lc in layers.items() if lc.bias is not None]
        if biased:
            notes.append(f"online transforms need layers without bias ({biased[0]} has one); "
                         "vLLM refuses them")
        s = schemes["v"]
        if s.type == "hadamard":
            notes.append(f"blocks of {s.head_dim}: runs with vLLM's fast Hadamard kernel (>= 0.11)")
        else:
            notes.append("random-hadamard transforms run as dense GEMMs in vLLM (>= 0.10.2)")
        if fmt != "int":
            notes.append("vLLM wraps any compressed-tensors linear scheme in its transform "
                         "method; FP4 with transforms is read from its code, not run")
    return notes


def export_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *,
                      dtype: torch.dtype = torch.float16, overwrite: bool = False,
                      allow_unfused_nvfp4: bool = False) -> ExportReport:
    """Load a yaqa checkpoint directory and export it (tokenizer files come along)."""
    from ..io import load

    model = load(ckpt, dtype=torch.float32, attn_implementation="eager")
    return export_compressed_tensors(model, out_dir, dtype=dtype, source_dir=ckpt,
                                     overwrite=overwrite, allow_unfused_nvfp4=allow_unfused_nvfp4)


__all__ = ["ExportError", "ExportReport", "LayerCodes", "export_checkpoint",
           "export_compressed_tensors", "layer_codes", "nvfp4_global_divisor", "pack_fp4",
           "pack_int32", "unpack_int32",
           "MIN_CT_VERSION"]

