"""NVFP4 global scales shared by the linears that vLLM fuses (q/k/v, gate/up).

Every expectation is recomputed here from the original weights: the rotated weight the quantizer
sees (``transform.weight(W)``), the standard rule ``max|W'| / 2688`` over the group, and the block
scales a quantizer pinned to that scale picks.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import yaqa
from yaqa.io import load, save_quantized
from yaqa.models import get_adapter
from yaqa.quantizers import FP4Quantizer, make_quantizer, quantizer_from_config
from yaqa.quantizers.fp4 import E2M1_MAX, E4M3_MAX, e4m3, nvfp4_global_scale
from yaqa.quantizers.fused import fused_quantizers, group_global_scale
from yaqa.recipe import RecipeError, get_recipe
from yaqa.rounding import round_weight

from tiny_models import tiny_model


def _rotated(orig: torch.nn.Module, model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight the quantizer fitted for ``name``: the original, rotated by the stored transform."""
    W = orig.get_submodule(name).weight.detach().float()
    tf = model.get_submodule(name).transform()
    return tf.weight(W) if tf is not None else W


def _groups(orig) -> tuple[list[tuple[str, ...]], list[str]]:
    """(fused groups, every linear that quantize() replaces) as full names, from the original."""
    adapter = get_adapter(orig)
    groups, names = [], []
    for i, block in enumerate(adapter.blocks(orig)):
        prefix = f"{adapter.blocks_path}.{i}."
        rels = list(adapter.block_linears(block))
        names += [prefix + r for r in rels]
        groups += [tuple(prefix + r for r in g) for g in adapter.fused_groups(rels)]
    return groups, names


def _quantized(family="llama", mode=False, **kw):
    orig = tiny_model(family)
    model = copy.deepcopy(orig)
    kw.setdefault("method", "rtn")
    yaqa.quantize(model, kw.pop("hessians", None), quantizer=kw.pop("quantizer", "nvfp4"),
                  incoherence=mode, progress=False, **kw)
    return orig, model


@pytest.mark.parametrize("family,mode", [("llama", False), ("llama", True), ("llama", "shared"),
                                         ("qwen3", "block"), ("gemma2", "shared"),
                                         ("phi3", True)])
def test_fused_groups_share_the_standard_scale_of_their_rotated_weights(family, mode):
    orig, model = _quantized(family, mode)
    groups, names = _groups(orig)
    expect_groups = {"phi3": 0}.get(family, 2 * 2)  # q/k/v and gate/up per block; phi3 has none
    assert len(groups) == expect_groups
    in_group = {n for g in groups for n in g}
    expected = {}
    for g in groups:
        top = max(_rotated(orig, model, n).abs().max() for n in g)
        expected.update({n: (top / (E2M1_MAX * E4M3_MAX)).float() for n in g})
    for n in names:
        if n not in in_group:  # o_proj, down_proj, phi3's fused linears: their own rule
            expected[n] = nvfp4_global_scale(_rotated(orig, model, n).abs().max())
    for n in names:
        mod = model.get_submodule(n)
        grid = mod.grid()
        assert torch.equal(grid.global_scale, expected[n].reshape(1)), n
        # block scales and codes: what a quantizer pinned to that global scale gives
        Wt = _rotated(orig, model, n)
        ref = FP4Quantizer("nvfp4", global_scale=float(expected[n])).fit(Wt)
        assert torch.equal(grid.stored, ref.stored), n
        assert torch.equal(mod.codes(), ref.round_all(Wt)[1]), n
    for g in groups:
        scales = {model.get_submodule(n).grid_global_scale.item() for n in g}
        assert len(scales) == 1, g
    if family == "llama":  # the group scale is really the max: members' own scales differ
        own = [nvfp4_global_scale(_rotated(orig, model, n).abs().max()).item() for n in groups[0]]
        assert len(set(own)) > 1 and max(own) == model.get_submodule(groups[0][0]).grid_global_scale.item()


def test_option_off_reproduces_per_layer_scales():
    orig, model = _quantized("llama", True, fused_global_scale=False)
    q = FP4Quantizer("nvfp4", fused_global_scale=False)
    _, names = _groups(orig)
    for n in names:
        mod = model.get_submodule(n)
        W = orig.get_submodule(n).weight.detach().float()
        res = round_weight(W, quantizer=q, method="rtn", incoherence=mod.transform(),
                           return_details=True)
        assert torch.equal(mod.codes(), res.codes), n
        for k, v in res.grid.state_dict().items():
            assert torch.equal(getattr(mod, f"grid_{k}"), v), (n, k)
    assert mod.quantizer.config() == {k: v for k, v in q.config().items()}
    assert "fused_global_scale" not in mod.quantizer.config()  # what configs held before
    # the quantizer object decides the same way as the keyword
    _, same = _quantized("llama", True, quantizer=q)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 same.state_dict().values()))


def _hessians(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, _, lin in get_adapter(model).named_linears(model):
        n, m = lin.in_features, lin.out_features
        X = torch.randn(n, 3 * n, generator=g) * torch.linspace(2, 0.1, 3 * n)
        H = X @ X.T / X.shape[1]
        out[name] = SimpleNamespace(H_in=H, H_x=H, H_out=torch.eye(m), shrinkage=None)
    return out


@pytest.mark.parametrize("mode", [False, "shared"])
def test_yaqa_with_identity_output_factor_equals_ldlq_with_fused_scale(mode):
    ref = tiny_model("llama")
    hs = _hessians(ref)
    _, a = _quantized("llama", mode, method="ldlq", hessians=hs)
    _, b = _quantized("llama", mode, method="yaqa", hessians=hs, shrinkage="off")
    _, rtn = _quantized("llama", mode)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    groups, _ = _groups(ref)
    for grp in groups:  # the fused scale reached LDLQ/YAQA, and it is RTN's (a weight property)
        scales = {a.get_submodule(n).grid_global_scale.item() for n in grp}
        assert scales == {rtn.get_submodule(grp[0]).grid_global_scale.item()}
    # adaptive rounding did something: codes differ from RTN's
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.codes(),
                           rtn.model.layers[0].self_attn.q_proj.codes())


def test_pinned_global_scale_picks_block_scales_under_it():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    own = nvfp4_global_scale(W.abs().max())
    g = float(own) * 3.0  # a group member with a larger maximum elsewhere
    grid = FP4Quantizer("nvfp4", global_scale=g).fit(W)
    gt = torch.tensor(g, dtype=torch.float32)
    assert torch.equal(grid.global_scale, gt.reshape(1))
    amax = W.reshape(8, 4, 16).abs().amax(-1)
    assert torch.equal(grid.stored, e4m3(amax / (6 * gt)))
    err = {}
    for search in ("maxabs", "mse"):
        vals, _ = FP4Quantizer("nvfp4", scale_search=search, global_scale=g).fit(W).round_all(W)
        err[search] = (vals - W).pow(2).reshape(8, 4, 16).sum(-1)
    assert (err["mse"] <= err["maxabs"] + 1e-6).all()


def test_group_scale_of_a_zero_member_is_the_others():
    W = torch.randn(4, 32)
    # a per-layer max would give the all-zero member g = 1 and the group max 1: wrong
    assert torch.equal(group_global_scale([torch.zeros(4, 32), W]),
                       nvfp4_global_scale(W.abs().max()))
    assert group_global_scale([torch.zeros(2, 16)]).item() == 1.0
    q = make_quantizer("nvfp4")
    pins = fused_quantizers(q, {"a": W, "b": 2 * W, "c": W}, [("a", "b")])
    assert set(pins) == {"a", "b"} and pins["a"].global_scale == pins["b"].global_scale
    assert fused_quantizers(make_quantizer("nvfp4", fused_global_scale=False),
                            {"a": W, "b": W}, [("a", "b")]) == {}


def test_option_is_validated_and_configs_stay_compatible():
    assert make_quantizer("nvfp4").fused_global_scale is True
    assert make_quantizer("mxfp4").fused_global_scale is False
    with pytest.raises(ValueError, match="nvfp4 only"):
        make_quantizer("int4", fused_global_scale=True)
    with pytest.raises(ValueError, match="no global scale"):
        FP4Quantizer("mxfp4", global_scale=0.5)
    with pytest.raises(ValueError, match="positive finite"):
        FP4Quantizer("nvfp4", global_scale=0.0)
    cfg = make_quantizer("nvfp4").config()
    assert cfg["fused_global_scale"] is True and "global_scale" not in cfg
    assert quantizer_from_config(cfg).fused_global_scale is True
    # configs written before the option (nvfp4 with per-layer scales, every mxfp4) are unchanged
    old = {"fmt": "nvfp4", "scale_search": "maxabs", "mse_grid": 8, "mse_max_shrink": 0.3,
           "bits": 4, "format": "fp4"}
    assert quantizer_from_config(old).fused_global_scale is False
    assert quantizer_from_config(old).config() == old
    assert "fused_global_scale" not in make_quantizer("mxfp4").config()


def test_recipe_option_and_identity():
    on = get_recipe("yaqa-b", quantizer="nvfp4")
    off = on.replace(fused_global_scale=False)
    assert on.fused_scale and on.make_quantizer().fused_global_scale is True
    assert not off.fused_scale and off.make_quantizer().fused_global_scale is False
    assert on == on.replace(fused_global_scale=True)  # the default, spelled out
    assert on.identity_hash() != off.identity_hash()
    # a recipe whose quantizer changes gets the new quantizer's default
    assert get_recipe("rtn").replace(quantizer="nvfp4").fused_scale
    assert not off.replace(quantizer="int4").fused_scale
    # recipes without it keep the identities they had before the option existed
    assert "fused_global_scale" not in off.identity()
    assert "fused_global_scale" not in get_recipe("yaqa-b").identity()
    assert not get_recipe("rtn", quantizer="mxfp4").fused_scale
    with pytest.raises(RecipeError, match="nvfp4 only"):
        get_recipe("rtn", quantizer="int4", fused_global_scale=True)


def test_old_per_layer_checkpoints_still_load(tmp_path):
    _, model = _quantized("llama", "shared", fused_global_scale=False)
    save_quantized(model, tmp_path / "ckpt")
    back = load(tmp_path / "ckpt")
    q = back.model.layers[0].self_attn.q_proj
    assert q.quantizer.fused_global_scale is False
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_generic_adapter_groups_by_vllm_leaf_names():
    from yaqa.models.adapters import ModelAdapter

    a = ModelAdapter("generic", "layers", None)
    names = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "other.q_proj"]
    assert a.fused_groups(names) == [("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                                     ("mlp.gate_proj", "mlp.up_proj")]


def test_cli_quantizes_nvfp4_with_fused_scales_by_default(tmp_path):
    from yaqa.cli import build_parser, recipe_from_args

    p = build_parser()
    args = p.parse_args(["quantize", "--method", "rtn", "--quantizer", "nvfp4", "--out", "x"])
    assert recipe_from_args(args, "rtn", "nvfp4").fused_scale
    args = p.parse_args(["quantize", "--method", "rtn", "--quantizer", "nvfp4", "--out", "x",
                         "--per-layer-global-scale"])
    assert not recipe_from_args(args, "rtn", "nvfp4").fused_scale
    assert not recipe_from_args(args, "rtn", 4).fused_scale  # int: no such scale
