"""MXFP4 / NVFP4 export to compressed-tensors, checked with compressed-tensors' and transformers'
own loading code.

compressed-tensors 0.20 unpacks FP4 to bfloat16 and dequantizes in that dtype, so its decompressed
weights are bfloat16 whatever the checkpoint holds:

* MXFP4 values (E2M1 times a power of two) are bfloat16 numbers, so they come back bit-exact;
* NVFP4 values ``E2M1 · s_e4m3 · g`` are float32 numbers that compressed-tensors computes as
  ``E2M1 · (s / G)`` with ``G = 1/g`` (its convention) and rounds to bfloat16.  The tests check
  that arithmetic bit-exactly, and yaqa's weights to bfloat16's rounding (relative 2^-8: half a
  bfloat16 ulp plus the float32 ulp by which ``s / G`` and ``s · g`` can differ).
"""

from __future__ import annotations

import json

import pytest
import torch

import yaqa
from yaqa.export import ExportError, export_compressed_tensors
from yaqa.export.compressed_tensors import nvfp4_global_divisor, pack_fp4
from yaqa.nn import QuantizedLinear
from yaqa.quantizers.fp4 import e2m1_values

from tiny_models import FAMILY_CONFIGS, tiny_model

ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (the export extra)")
from compressed_tensors.compressors.mxfp4 import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import (  # noqa: E402
    pack_fp4_to_uint8,
    unpack_fp4_from_uint8,
)
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from test_export_compressed_tensors import IDS, load_hf, qconfig  # noqa: E402

COMPRESSORS = {"mxfp4": MXFP4PackedCompressor, "nvfp4": NVFP4PackedCompressor}
PRESETS = {"mxfp4": "MXFP4A16", "nvfp4": "NVFP4A16"}
FORMATS = {"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}


def quantized(fmt, family="llama", mode=False, seed=0, **kw):
    model = tiny_model(family, seed=seed)
    yaqa.quantize(model, None, method="rtn", quantizer=fmt, incoherence=mode, progress=False,
                  **kw)
    return model


def export(model, path, **kw):
    # no allow_unfused_nvfp4: NVFP4 models share one global scale per fused group by default
    kw.setdefault("dtype", torch.float32)
    return export_compressed_tensors(model, path, **kw)


def layer_tensors(sd, name):
    return {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight_")}


def nvfp4_reference(mod: QuantizedLinear) -> torch.Tensor:
    """compressed-tensors' NVFP4 dequantization of yaqa's codes, step by step: float32
    ``E2M1 · (s / G)``, rounded to bfloat16."""
    grid = mod.grid()
    m, n = mod.out_features, mod.in_features
    step = grid.stored / nvfp4_global_divisor(grid.global_scale)
    vals = e2m1_values()[mod.codes().long()].view(m, n // 16, 16)
    return (vals * step.unsqueeze(-1)).reshape(m, n).to(torch.bfloat16)


def test_fp4_packing_matches_compressed_tensors():
    codes = torch.randint(0, 16, (7, 46), generator=torch.Generator().manual_seed(0))
    values = e2m1_values()[codes]  # code 8 is -0.0: compressed-tensors keeps its sign bit too
    ours = pack_fp4(codes)
    assert ours.dtype == torch.uint8 and ours.shape == (7, 23)
    assert torch.equal(ours, pack_fp4_to_uint8(values))
    assert torch.equal(unpack_fp4_from_uint8(ours, 7, 46, dtype=torch.float32), values)
    # column 2j in the low nibble: codes (1, 2) pack to 0x21
    assert pack_fp4(torch.tensor([[1, 2]])).item() == 0x21
    with pytest.raises(ExportError, match="even number"):
        pack_fp4(codes[:, :5])


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("mode", [False, "shared", "block"])
def test_decompressor_gives_our_weights_in_rotated_basis(tmp_path, fmt, mode):
    model = quantized(fmt, mode=mode)
    export(model, tmp_path)
    raw = qconfig(tmp_path)
    assert raw["format"] == FORMATS[fmt]
    cfg = QuantizationConfig.model_validate(raw)
    assert cfg.format == FORMATS[fmt] and cfg.ignore == ["lm_head"]
    scheme = cfg.config_groups["group_0"]
    preset = preset_name_to_scheme(PRESETS[fmt], ["Linear"]).weights
    for key in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"):
        assert getattr(scheme.weights, key) == getattr(preset, key), key
    assert scheme.input_activations is None  # weight-only
    assert (raw.get("transform_config") or None) is (None if mode is False else raw["transform_config"])
    sd = load_file(str(tmp_path / "model.safetensors"))
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantizedLinear):
            continue
        sub = layer_tensors(sd, name)
        assert set(sub) == set(COMPRESSORS[fmt].compression_param_names(scheme))
        assert sub["weight_packed"].shape == (mod.out_features, mod.in_features // 2)
        w = COMPRESSORS[fmt].decompress(sub, scheme)["weight"]
        ref = mod.transformed_weight()
        if fmt == "mxfp4":
            assert sub["weight_scale"].dtype == torch.uint8
            assert torch.equal(w.float(), ref), name
        else:
            assert sub["weight_scale"].dtype == torch.float8_e4m3fn
            g = mod.grid().global_scale
            assert sub["weight_global_scale"].dtype == torch.float32
            assert abs(sub["weight_global_scale"].double().item() * g.double().item() - 1) < 2**-23
            assert torch.equal(w, nvfp4_reference(mod)), name
            err = (w.float() - ref).abs()
            assert bool((err <= 2**-8 * ref.abs()).all()), (name, err.max())
        n += 1
    assert n == 14


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("mode", [False, "shared", "block"])
def test_transformers_loader_gives_our_logits(tmp_path, fmt, mode):
    model = quantized(fmt, mode=mode)
    export(model, tmp_path)
    with torch.no_grad():
        ref = model(IDS).logits
        out = load_hf(tmp_path)(IDS).logits
    if fmt == "mxfp4" and mode is False:
        assert torch.equal(out, ref)  # same dense weights, same kernels
    elif fmt == "mxfp4":
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    else:
        # NVFP4 weights come back rounded to bfloat16: the logits move by far less than
        # quantization moved them.
        with torch.no_grad():
            full = tiny_model("llama")(IDS).logits
        assert (out - ref).abs().max() < 0.1 * (ref - full).abs().max()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_transformers_default_route_in_bfloat16(tmp_path, fmt):
    """transformers' default compressed route decompresses FP4 to bfloat16 on CPU; the model must
    be loaded in bfloat16 (in float32 its matmul fails on the dtype mismatch)."""
    from transformers import AutoModelForCausalLM

    model = quantized(fmt)
    export(model, tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.bfloat16)
    with torch.no_grad():  # the compressed modules decompress on their first forward
        assert torch.isfinite(hf(IDS).logits).all()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear):
            w = hf.get_submodule(name).weight.detach()
            assert w.dtype == torch.bfloat16
            ref = mod.transformed_weight() if fmt == "mxfp4" else nvfp4_reference(mod)
            assert torch.equal(w.float(), ref.float()), name


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_exports_and_loads(tmp_path, family):
    fmt = "mxfp4" if sorted(FAMILY_CONFIGS).index(family) % 2 else "nvfp4"
    model = quantized(fmt, family, mode="shared")
    export(model, tmp_path)
    with torch.no_grad():
        ref = model(IDS).logits
        out = load_hf(tmp_path)(IDS).logits
        full = tiny_model(family)(IDS).logits
    tol = 1e-4 if fmt == "mxfp4" else 0.1 * (ref - full).abs().max().item()
    assert (out - ref).abs().max() <= tol, (fmt, (out - ref).abs().max())


def test_nvfp4_fused_layers_need_equal_global_scales(tmp_path):
    model = quantized("nvfp4", fused_global_scale=False)  # per-layer scales, as before
    with pytest.raises(ExportError, match="--allow-unfused-nvfp4"):
        export_compressed_tensors(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert export(model, tmp_path / "a", allow_unfused_nvfp4=True).fmt == "nvfp4"
    # the default quantization gives each fused group one global scale (what vLLM keeps)
    model = quantized("nvfp4")
    rep = export_compressed_tensors(model, tmp_path / "b", dtype=torch.float32)
    assert rep.fmt == "nvfp4" and rep.quantized_layers == 14
    sd = load_file(str(tmp_path / "b" / "model.safetensors"))
    for i in range(2):
        for group in (("self_attn", "q_proj", "k_proj", "v_proj"), ("mlp", "gate_proj", "up_proj")):
            scales = [sd[f"model.layers.{i}.{group[0]}.{n}.weight_global_scale"] for n in group[1:]]
            assert all(torch.equal(scales[0], s) for s in scales)
        o, q = (sd[f"model.layers.{i}.self_attn.{n}_proj.weight_global_scale"] for n in "oq")
        assert not torch.equal(o, q)  # layers outside the groups keep their own


def test_mixed_quantizer_families_are_refused(tmp_path):
    model = quantized("mxfp4")
    other = tiny_model("llama")
    yaqa.quantize(other, None, method="rtn", quantizer="int4", group_size=32, progress=False,
                  incoherence=False)
    model.model.layers[1].mlp.down_proj = other.model.layers[1].mlp.down_proj
    with pytest.raises(ExportError, match="mix quantizer families"):
        export_compressed_tensors(model, tmp_path)


def test_cli_exports_nvfp4_checkpoint(tmp_path):
    from yaqa.cli import main

    old = quantized("nvfp4", mode="block", fused_global_scale=False)
    yaqa.save_quantized(old, tmp_path / "old")
    args = ["-q", "export", str(tmp_path / "old"), "--out", str(tmp_path / "ct"), "--dtype", "float32"]
    assert main(args) == 2  # vLLM could not serve the unfused global scales
    assert main(args + ["--allow-unfused-nvfp4"]) == 0
    model = quantized("nvfp4", mode="block")
    yaqa.save_quantized(model, tmp_path / "ckpt")
    args = ["-q", "export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ct"), "--dtype",
            "float32", "--overwrite"]
    assert main(args) == 0
    assert json.loads((tmp_path / "ct" / "config.json").read_text())[
        "quantization_config"]["format"] == "nvfp4-pack-quantized"
    with torch.no_grad():
        ref = model(IDS).logits
        out = load_hf(tmp_path / "ct")(IDS).logits
        full = tiny_model("llama")(IDS).logits
    assert (out - ref).abs().max() < 0.1 * (ref - full).abs().max()


def test_fp4_per_layer_signs_are_refused_with_advice(tmp_path):
    with pytest.raises(ExportError, match="--incoherence shared"):
        export(quantized("mxfp4", mode=True), tmp_path)


def test_nvfp4_global_divisor_is_the_float32_reciprocal():
    g = torch.tensor([3.0 / 2688])  # float32, so 1/g is near but not exactly 896
    G = nvfp4_global_divisor(g)
    assert G.dtype == torch.float32 and abs(G.double().item() * g.double().item() - 1) <= 2**-24
    assert nvfp4_global_divisor(torch.tensor([0.125])).item() == 8.0  # exact where 1/g is
    for bad in (torch.zeros(1), torch.tensor([1e-45])):  # 1/g is inf in float32
        with pytest.raises(ExportError, match="reciprocal"):
            nvfp4_global_divisor(bad)
