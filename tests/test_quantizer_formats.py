"""Every quantizer through the rounding engines, QuantizedLinear and checkpoints."""

from __future__ import annotations

import pytest
import torch

from yaqa.io import load, save_quantized
from yaqa.quantize_model import quantize
from yaqa.quantizers import FP4Quantizer, IntQuantizer, TrellisQuantizer
from yaqa.rounding import round_weight

from tiny_models import tiny_model

# Small trellises (L = 10) keep CPU Viterbi fast; the code paths are those of L = 16.
QUANTIZERS = {
    "int4": IntQuantizer(bits=4, group_size=16),
    "trellis2-hyb": TrellisQuantizer(bits=2, L=10, V=2, code="hyb", tlut_bits=6),
    "trellis3-3inst": TrellisQuantizer(bits=3, L=10, V=1, code="3inst", scale="row"),
    "mxfp4": FP4Quantizer("mxfp4", scale_search="mse"),
    "nvfp4": FP4Quantizer("nvfp4"),
}


def _pd(n: int, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    X = X * torch.exp(-2.0 * torch.linspace(0, 1, 2 * n, dtype=torch.float64))
    return X @ X.T / X.shape[1]


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("incoherence", [False, 3])
def test_yaqa_equals_ldlq_when_output_factor_is_identity_for_every_quantizer(name, incoherence):
    q = QUANTIZERS[name]
    g = torch.Generator().manual_seed(0)
    m, n = 32, 64
    W = torch.randn(m, n, generator=g)
    Hi = _pd(n, g)
    a = round_weight(W, Hi, None, q, "ldlq", incoherence=incoherence, return_details=True)
    b = round_weight(W, Hi, torch.eye(m), q, "yaqa", incoherence=incoherence, return_details=True)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_adaptive_rounding_lowers_the_proxy_for_every_quantizer(name):
    q = QUANTIZERS[name]
    g = torch.Generator().manual_seed(1)
    m, n = 32, 64
    W = torch.randn(m, n, generator=g)
    Hi, Ho = _pd(n, g), _pd(m, g)
    loss = {meth: round_weight(W, Hi, Ho, q, meth, return_details=True).proxy_loss
            for meth in ("rtn", "ldlq", "yaqa")}
    assert loss["yaqa"] < loss["ldlq"] < loss["rtn"]


@pytest.mark.parametrize("name", [k for k in QUANTIZERS if k != "int4"])
def test_checkpoint_roundtrip_is_exact_for_every_quantizer(tmp_path, name):
    model = tiny_model("llama")
    quantize(model, method="rtn", quantizer=QUANTIZERS[name], incoherence=True, progress=False)
    saved = save_quantized(model, tmp_path / "ckpt")
    loaded = load(saved.path)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    mods = [m for m in loaded.modules() if type(m).__name__ == "QuantizedLinear"]
    assert mods and mods[0].quantizer == QUANTIZERS[name]
    # Stored bits per weight: exactly k for the trellis plus per-row scales.
    lin = mods[0]
    assert lin.qweight.numel() * 8 == lin.in_features * lin.out_features * lin.bits


def test_recipes_carry_the_new_quantizer_names_and_check_layer_shapes():
    from yaqa.recipe import RecipeError, get_recipe
    from yaqa.validate import ModelCheckError, check_recipe_fits

    r = get_recipe("yaqa-b", quantizer="trellis3")
    q = r.make_quantizer()
    assert isinstance(q, TrellisQuantizer) and q.bits == 3
    assert isinstance(get_recipe("ldlq", quantizer="NVFP4".lower()).make_quantizer(), FP4Quantizer)
    with pytest.raises(RecipeError, match="unknown quantizer"):
        get_recipe("rtn", quantizer="fp8")
    model = tiny_model("llama", hidden=48, intermediate=96, heads=3, kv_heads=3)
    with pytest.raises(ModelCheckError, match="blocks of 32"):
        check_recipe_fits(model, get_recipe("rtn", quantizer="mxfp4", incoherence=False))
    check_recipe_fits(model, get_recipe("rtn", quantizer="nvfp4", incoherence=False))
    with pytest.raises(ValueError, match="multiple of 16"):
        TrellisQuantizer().check_shape(24, 32)
