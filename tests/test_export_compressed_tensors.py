"""compressed-tensors export, checked with compressed-tensors' and transformers' own loading code."""

from __future__ import annotations

import json
import math

import pytest
import torch

import yaqa
from yaqa.export import ExportError, export_compressed_tensors
from yaqa.export.compressed_tensors import pack_int32, unpack_int32
from yaqa.incoherence import plan_transforms
from yaqa.nn import QuantizedLinear

from tiny_models import FAMILY_CONFIGS, tiny_model

ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (the export extra)")
from compressed_tensors.compressors.pack_quantized import (  # noqa: E402
    PackedQuantizationCompressor,
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.transform import TransformConfig, apply_transform_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def quantized(family="llama", mode=False, bits=4, group=32, symmetric=False, seed=0):
    model = tiny_model(family, seed=seed)
    yaqa.quantize(model, None, method="rtn", quantizer=f"int{bits}", group_size=group,
                  symmetric=symmetric, incoherence=mode, progress=False)
    return model


def qconfig(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


def load_hf(path, transforms=True):
    """transformers' compressed-tensors loader (dense), then the stored online transforms applied
    with compressed-tensors' own transform modules (transformers does not run them)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # dequantize=True: compressed-tensors 0.20's compressed route sizes an asymmetric model's
    # zero points unpacked and refuses the packed ones (llm-compressor issue 1618).
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", quantization_config=CompressedTensorsConfig(dequantize=True))
    tcfg = qconfig(path).get("transform_config")
    if transforms and tcfg:
        apply_transform_config(model, TransformConfig.model_validate(tcfg))
        stored = {}
        for k, v in load_file(str(path / "model.safetensors")).items():
            if k.endswith(("v_input.weight", "u_output.weight")):
                stored[(k.split(".")[-2], v.shape[0])] = v
        for mod in model.modules():
            for kind in ("v_input", "u_output"):
                t = getattr(mod, kind, None)
                if t is not None:
                    t.weight.data.copy_(stored[(kind, t.weight.shape[0])])
    return model.eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_matches_compressed_tensors(bits, dim):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (37, 45), generator=g, dtype=torch.int32)
    ours = pack_int32(codes, bits, dim=dim)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    theirs = pack_to_int32(signed, bits, packed_dim=dim)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, codes.shape[dim], dim=dim), codes)
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape, packed_dim=dim), signed)


@pytest.mark.parametrize("mode,bits,symmetric", [(False, 4, False), (False, 8, False),
                                                 (False, 3, False), (False, 4, True),
                                                 ("shared", 4, False), ("block", 2, False)])
def test_decompressor_gives_our_weights_in_rotated_basis(tmp_path, mode, bits, symmetric):
    model = quantized(mode=mode, bits=bits, symmetric=symmetric)
    export_compressed_tensors(model, tmp_path, dtype=torch.float16)
    cfg = QuantizationConfig.model_validate(qconfig(tmp_path))
    assert cfg.format == "pack-quantized" and cfg.quantization_status == "compressed"
    assert cfg.ignore == ["lm_head"]
    scheme = cfg.config_groups["group_0"]
    assert (scheme.weights.num_bits, scheme.weights.symmetric) == (bits, symmetric)
    sd = load_file(str(tmp_path / "model.safetensors"))
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear):
            sub = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight_")}
            assert ("weight_zero_point" in sub) == (not symmetric)
            w = PackedQuantizationCompressor.decompress(sub, scheme)["weight"]
            assert torch.equal(w, mod.transformed_weight().to(torch.float16)), name
            n += 1
    assert n == 14


@pytest.mark.parametrize("mode", ["shared", "block"])
def test_stored_transforms_give_original_basis_weights(tmp_path, mode):
    model = quantized(mode=mode)
    export_compressed_tensors(model, tmp_path, dtype=torch.float16)
    tcfg = TransformConfig.model_validate(qconfig(tmp_path)["transform_config"])
    assert {s.type for s in tcfg.config_groups.values()} == (
        {"hadamard"} if mode == "block" else {"random-hadamard"})
    sd = load_file(str(tmp_path / "model.safetensors"))
    scheme = QuantizationConfig.model_validate(qconfig(tmp_path)).config_groups["group_0"]
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantizedLinear):
            continue
        sub = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight_")}
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
        lin.weight.data = PackedQuantizationCompressor.decompress(sub, scheme)["weight"].float()
        holder = torch.nn.Sequential()
        holder.add_module("lin", lin)
        apply_transform_config(holder, tcfg)
        for kind in ("v_input", "u_output"):
            t = getattr(lin, kind)
            key = next(k for k in sd if k.endswith(f"{kind}.weight") and sd[k].shape == t.weight.shape)
            if mode == "block":  # the plain Sylvester matrix compressed-tensors builds itself
                assert torch.equal(t.weight.data.float(), sd[key].float())
            t.weight.data.copy_(sd[key])
        with torch.no_grad():
            W = lin(torch.eye(mod.in_features)).T  # x -> x M_v W'^T M_u^T: the effective weight
        ref = mod.dequantized_weight()
        if mode == "block":
            # Signs that cancel between neighbours never run online (the logits tests check
            # that they cancel): W = D_out W_eff D_in.
            tf = mod.transform()
            ref = tf.sign_out.float()[:, None] * ref * tf.sign_in.float()[None, :]
        assert torch.allclose(W, ref, atol=2e-3 * ref.abs().max().item(), rtol=0), name


@pytest.mark.parametrize("mode", [False, "shared", "block"])
def test_transformers_loader_gives_our_logits(tmp_path, mode):
    model = quantized(mode=mode)
    export_compressed_tensors(model, tmp_path, dtype=torch.float32)
    with torch.no_grad():
        ref = model(IDS).logits
        out = load_hf(tmp_path)(IDS).logits
    if mode is False:
        assert torch.equal(out, ref)  # same dense weights, same kernels
    else:
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_transformers_default_route_loads_symmetric_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantized(symmetric=True)
    export_compressed_tensors(model, tmp_path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_exports_and_loads(tmp_path, family):
    mode = "block" if family == "llama" else "shared"
    model = quantized(family, mode=mode)
    export_compressed_tensors(model, tmp_path, dtype=torch.float32)
    with torch.no_grad():
        ref = model(IDS).logits
        out = load_hf(tmp_path)(IDS).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()


def test_block_signs_cancel_between_neighbouring_layers():
    shapes = {"m.layers.0.self_attn.v_proj": (32, 64), "m.layers.0.self_attn.o_proj": (64, 64),
              "m.layers.0.mlp.up_proj": (128, 64), "m.layers.0.mlp.down_proj": (64, 128),
              "m.layers.0.mlp.gate_proj": (128, 64)}
    tfs = plan_transforms("block", shapes, seed=1, head_dim=16)
    assert all(t.block == 32 for t in tfs.values())
    up, down = tfs["m.layers.0.mlp.up_proj"], tfs["m.layers.0.mlp.down_proj"]
    assert torch.equal(up.sign_out, down.sign_in) and (up.sign_out == -1).any()
    assert (tfs["m.layers.0.mlp.gate_proj"].sign_out == 1).all()
    v, o = tfs["m.layers.0.self_attn.v_proj"], tfs["m.layers.0.self_attn.o_proj"]
    # GQA: 2 kv heads of 16 serve 4 query heads, so o sees each v head's signs twice.
    assert torch.equal(o.sign_in, v.sign_out.view(2, 1, 16).expand(2, 2, 16).reshape(64))


def test_shared_mode_shares_one_matrix_per_side_and_size():
    shapes = {"a": (64, 32), "b": (64, 32), "c": (32, 64)}
    tfs = plan_transforms("shared", shapes, seed=3)
    assert torch.equal(tfs["a"].sign_in, tfs["b"].sign_in)
    assert torch.equal(tfs["a"].sign_out, tfs["b"].sign_out)
    assert not torch.equal(tfs["a"].sign_in, tfs["c"].sign_out)  # schemes u and v differ
    per_layer = plan_transforms("per-layer", shapes, seed=3)
    assert not torch.equal(per_layer["a"].sign_in, per_layer["b"].sign_in)


def test_per_layer_signs_are_refused_with_advice(tmp_path):
    with pytest.raises(ExportError, match="--incoherence shared"):
        export_compressed_tensors(quantized(mode=True), tmp_path)


def test_cli_export_from_checkpoint(tmp_path):
    from yaqa.cli import main

    model = quantized(mode="shared")
    yaqa.save_quantized(model, tmp_path / "ckpt")
    assert main(["-q", "export", str(tmp_path / "ckpt"), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct"), "--dtype", "float32"]) == 0
    with torch.no_grad():
        ref = model(IDS).logits
        out = load_hf(tmp_path / "ct")(IDS).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    # refuses to overwrite without --overwrite, with a one-line error
    assert main(["-q", "export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ct")]) == 2


def test_bias_is_rotated_into_the_output_basis():
    tfs = plan_transforms("shared", {"x": (64, 32)}, seed=0)
    tf = tfs["x"]
    b = torch.randn(64, dtype=torch.float64)
    M = tf.online_matrix("out")
    assert torch.allclose(tf.output_inverse(b) @ M.T.double() / math.sqrt(64), b, atol=1e-12)


def test_per_layer_mode_keeps_the_previous_sign_seeding():
    import hashlib

    from yaqa.incoherence import IncoherenceTransform

    name = "model.layers.3.mlp.down_proj"
    seed = int.from_bytes(hashlib.sha256(f"7:{name}".encode()).digest()[:4], "little")
    old = IncoherenceTransform(64, 128, seed=seed)
    new = plan_transforms("per-layer", {name: (64, 128)}, seed=7)[name]
    assert torch.equal(old.sign_in, new.sign_in) and torch.equal(old.sign_out, new.sign_out)


def test_block_mode_checkpoint_round_trip(tmp_path):
    model = quantized("qwen3", mode="block")
    yaqa.save_quantized(model, tmp_path / "ckpt")
    loaded = yaqa.load(tmp_path / "ckpt")
    assert all(m.transform().block == 32 for m in loaded.modules() if isinstance(m, QuantizedLinear))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_cli_incoherence_mode_flags():
    from yaqa.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["quantize", "--out", "x"]).incoherence is True
    assert parse(["quantize", "--out", "x", "--incoherence", "block"]).incoherence == "block"
    assert parse(["quantize", "--out", "x", "--no-incoherence"]).incoherence is False
    assert parse(["run", "--incoherence", "shared"]).incoherence == "shared"


def test_recipe_takes_incoherence_modes_and_keeps_old_identities():
    from yaqa.recipe import RecipeError, get_recipe

    assert get_recipe("rtn", incoherence="per-layer").incoherence is True
    assert get_recipe("rtn", incoherence="none").incoherence is False
    assert get_recipe("rtn", incoherence="block").incoherence == "block"
    assert get_recipe("rtn", incoherence="per-layer").identity() == get_recipe("rtn").identity()
    with pytest.raises(RecipeError, match="incoherence mode"):
        get_recipe("rtn", incoherence="bogus")
