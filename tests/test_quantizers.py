import numpy as np
import pytest
import torch

from yaqa.io import pack_codes, packed_nbytes, unpack_codes
from yaqa.quantizers import IntQuantizer, make_quantizer, quantizer_from_config


def numpy_rtn(W: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Independent round-to-nearest: per (row, group) min/max grid, fp16 scales."""
    m, n = W.shape
    maxq = 2**bits - 1
    out = np.empty_like(W)
    for r in range(m):
        for g0 in range(0, n, group):
            w = W[r, g0:g0 + group].astype(np.float64)
            if symmetric:
                amax = np.abs(w).max()
                s = np.float32(np.float16(2 * amax / maxq))
                z = (maxq + 1) // 2
            else:
                lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
                s = np.float32(np.float16(np.float32((hi - lo) / maxq)))
                z = np.clip(np.round(-lo / s), 0, maxq)
            q = np.clip(np.round(w.astype(np.float32) / s) + z, 0, maxq)
            out[r, g0:g0 + group] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_grid_matches_independent_numpy(bits, symmetric):
    torch.manual_seed(bits)
    W = torch.randn(12, 96)
    q = IntQuantizer(bits=bits, group_size=32, symmetric=symmetric)
    Wq, codes = q.fit(W).round_all(W)
    ref = numpy_rtn(W.numpy(), bits, 32, symmetric)
    np.testing.assert_allclose(Wq.numpy(), ref, rtol=0, atol=1e-6)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


def test_fewer_bits_give_larger_rounding_error():
    W = torch.randn(64, 256)
    errs = [(W - IntQuantizer(bits=b, group_size=64).fit(W).round_all(W)[0]).pow(2).mean()
            for b in (8, 4, 3, 2)]
    assert errs == sorted(errs)


def test_mse_scale_search_never_worse_than_maxabs():
    torch.manual_seed(1)
    W = torch.randn(32, 128) * torch.rand(32, 1)
    for bits in (2, 3, 4):
        e_max = (W - IntQuantizer(bits=bits, group_size=64).fit(W).round_all(W)[0]).pow(2).sum()
        e_mse = (W - IntQuantizer(bits=bits, group_size=64, scale_search="mse").fit(W)
                 .round_all(W)[0]).pow(2).sum()
        assert e_mse <= e_max + 1e-6


def test_round_with_indices_equals_round_all():
    W = torch.randn(16, 64)
    grid = IntQuantizer(bits=3, group_size=16).fit(W)
    full, _ = grid.round_all(W)
    rows, cols = torch.arange(4, 12), torch.arange(8, 40)
    part, _ = grid.round(W[4:12, 8:40], rows, cols)
    assert torch.equal(part, full[4:12, 8:40])
    # batched tiles with their own indices
    tiles = torch.stack([W[0:4, 0:4], W[8:12, 32:36]])
    r = torch.stack([torch.arange(0, 4), torch.arange(8, 12)])
    c = torch.stack([torch.arange(0, 4), torch.arange(32, 36)])
    out, _ = grid.round(tiles, r, c)
    assert torch.equal(out[0], full[0:4, 0:4]) and torch.equal(out[1], full[8:12, 32:36])


def test_dequantize_of_codes_reproduces_rounded_weight():
    W = torch.randn(8, 64)
    grid = IntQuantizer(bits=4, group_size=16).fit(W)
    Wq, codes = grid.round_all(W)
    assert torch.equal(grid.dequantize(codes), Wq)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 24, 1000])
def test_pack_unpack_roundtrip_is_exact(bits, numel):
    g = torch.Generator().manual_seed(numel * 10 + bits)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
    assert packed.numel() <= (numel * bits + 63) // 8
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_packing_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([0, 4]), 2)


def test_quantizer_config_roundtrip_and_errors():
    q = make_quantizer("int3", group_size=64, symmetric=True, scale_search="mse")
    assert quantizer_from_config(q.config()) == q
    with pytest.raises(ValueError, match="bits"):
        IntQuantizer(bits=5)
    with pytest.raises(ValueError, match="unknown quantizer"):
        make_quantizer("fp4")
    with pytest.raises(ValueError, match="does not divide"):
        IntQuantizer(bits=4, group_size=48).fit(torch.randn(4, 64))
    with pytest.raises(ValueError, match="NaN"):
        IntQuantizer(bits=4, group_size=16).fit(torch.tensor([[float("nan")] * 16]))


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_group_rounds_to_zero_not_nan_even_with_error_feedback(symmetric):
    from yaqa.rounding import round_weight

    W = torch.randn(8, 64)
    W[:, :16] = 0.0  # a whole group of dead input columns
    q = IntQuantizer(bits=4, group_size=16, symmetric=symmetric)
    grid = q.fit(W)
    assert (grid.scale > 0).all()
    Wq, _ = grid.round_all(W)
    assert torch.isfinite(Wq).all() and torch.equal(Wq[:, :16], torch.zeros(8, 16))
    A = torch.randn(64, 48)
    H = A @ A.T / 48 + 0.1 * torch.eye(64)
    for method in ("ldlq", "yaqa"):
        out = round_weight(W, H, torch.eye(8) if method == "yaqa" else None, q, method=method)
        assert torch.isfinite(out).all(), method
