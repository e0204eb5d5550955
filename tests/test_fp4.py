"""MXFP4 / NVFP4: element and scale rounding against hand-computed values, grid contract."""

from __future__ import annotations

import pytest
import torch

from yaqa.quantizers import FP4Quantizer, make_quantizer, quantizer_from_config
from yaqa.quantizers.fp4 import e2m1_values, e4m3, round_e2m1


def test_e2m1_table_and_round_to_nearest_even():
    assert e2m1_values().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3,
                                      -4, -6]
    x = torch.tensor([0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 100.0,
                      -0.25, -0.8, -2.5, -9.0, 0.0])
    # Ties go to the even encoding: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    # 3.5 -> 4, 5 -> 4; beyond 6 saturates.
    expect = [0, 0, 0.5, 1, 1, 2, 2, 4, 4, 6, 6, 6, -0.0, -1, -2, -6, 0]
    got = e2m1_values()[round_e2m1(x).long()]
    assert got.tolist() == expect
    codes = round_e2m1(x)
    assert codes.tolist()[:4] == [0, 0, 1, 2] and int(codes[-4]) == 0b1010  # -1.0 = sign | 2


def test_e4m3_scale_rounding():
    x = torch.tensor([1.0, 1.0625, 1.07, 1.1875, 0.3, 448.0, 500.0, 2.0**-9, 2.0**-11])
    # E4M3 has 3 mantissa bits: spacing 1/8 in [1, 2); 1.0625 is a tie -> even (1.0);
    # 1.1875 ties between 1.125 and 1.25 -> 1.25; saturates at 448; subnormals down to 2^-9.
    expect = [1.0, 1.0, 1.125, 1.25, 0.3125, 448.0, 448.0, 2.0**-9, 0.0]
    assert e4m3(x).tolist() == expect


def test_mxfp4_standard_scale_is_the_e8m0_rule():
    W = torch.zeros(2, 64)
    W[0, :32] = torch.linspace(-3.0, 5.9, 32)  # amax 5.9: floor(log2 5.9) = 2 -> e = 0
    W[0, 32:] = 0.01  # amax 0.01: floor(log2 0.01) = -7 -> e = -9
    W[1, :32] = 1000.0  # floor(log2 1000) = 9 -> e = 7, 1000 / 128 = 7.8 saturates to 6
    grid = FP4Quantizer("mxfp4").fit(W)
    assert grid.state_dict()["scale"].tolist() == [[127, 118], [134, 0]]
    vals, codes = grid.round_all(W)
    assert vals[1, 0] == 6 * 128
    assert torch.equal(vals[1, 32:], torch.zeros(32))  # an all-zero block stays zero
    assert vals[0, 32] == pytest.approx(0.01, rel=0.25)
    ref = e2m1_values()[round_e2m1(W[0, :32]).long()]
    assert torch.equal(vals[0, :32], ref)


def test_nvfp4_scales_follow_the_two_level_rule():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 32, generator=g)
    grid = FP4Quantizer("nvfp4").fit(W)
    state = grid.state_dict()
    gs = W.abs().max() / (6 * 448)
    assert float(state["global_scale"]) == pytest.approx(float(gs), rel=1e-6)
    amax = W.reshape(4, 2, 16).abs().amax(-1)
    block = state["scale"].view(torch.float8_e4m3fn).float()
    assert torch.equal(block, e4m3(amax / (6 * gs.float())))
    vals, codes = grid.round_all(W)
    s = (block * state["global_scale"]).repeat_interleave(16, 1)
    assert torch.equal(vals, e2m1_values()[round_e2m1(W / s).long()] * s)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("search", ["maxabs", "mse"])
def test_fp4_grid_roundtrips_through_codes_and_state(fmt, search):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 96, generator=g) * torch.logspace(-3, 1, 96)
    q = make_quantizer(fmt, scale_search=search)
    grid = q.fit(W)
    vals, codes = grid.round_all(W)
    assert codes.dtype == torch.int32 and 0 <= int(codes.min()) and int(codes.max()) < 16
    assert torch.equal(grid.dequantize(codes), vals)
    again = quantizer_from_config(q.config()).grid_from_state(W.shape, grid.state_dict())
    assert torch.equal(again.dequantize(codes), vals)
    assert {k: (v.shape, v.dtype) for k, v in q.placeholder_state(W.shape).items()} == \
        {k: (v.shape, v.dtype) for k, v in grid.state_dict().items()}


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_mse_scale_search_never_worse_than_the_standard_rule(fmt):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 128, generator=g)
    errs = {}
    for search in ("maxabs", "mse"):
        vals, _ = make_quantizer(fmt, scale_search=search).fit(W).round_all(W)
        block = 32 if fmt == "mxfp4" else 16
        errs[search] = (vals - W).pow(2).reshape(16, -1, block).sum(-1)
    assert (errs["mse"] <= errs["maxabs"] + 1e-6).all()
    assert errs["mse"].sum() < errs["maxabs"].sum()


def test_fp4_rejects_bad_input():
    with pytest.raises(ValueError, match="blocks of 32"):
        FP4Quantizer("mxfp4").fit(torch.randn(4, 48))
    with pytest.raises(ValueError, match="format must be"):
        FP4Quantizer("fp4x")
