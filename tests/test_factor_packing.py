"""Packed lower triangles and the symmetric-product blocking."""

from __future__ import annotations

import pytest
import torch

import yaqa.hessians.accumulators as acc_mod
from yaqa.hessians.packed import pack_lower, packed_order, packing_error, unpack_lower


@pytest.mark.parametrize("n", [1, 2, 7, 511, 512, 513, 1100])
def test_packed_triangle_round_trips_exactly(n):
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = a + a.T
    p = pack_lower(h)
    assert p.shape == (n * (n + 1) // 2,)
    rows, cols = torch.tril_indices(n, n)
    assert torch.equal(p, h[rows, cols])  # row-major lower triangle
    assert torch.equal(unpack_lower(p), h)
    assert packed_order(p.numel()) == n


def test_bf16_packing_halves_the_bytes_at_bf16_rounding_error():
    a = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    h = a @ a.T
    assert pack_lower(h, torch.bfloat16).nbytes * 2 == pack_lower(h).nbytes
    err = packing_error(h, torch.bfloat16)
    assert 1e-4 < err < 4e-3


def test_bad_packed_input_is_refused():
    with pytest.raises(ValueError, match="square"):
        pack_lower(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="n\\(n\\+1\\)/2"):
        unpack_lower(torch.zeros(5))


@pytest.mark.parametrize("scheme", acc_mod.SYM_SCHEMES)
@pytest.mark.parametrize("n", [64, 100, 128, 200])
def test_symmetric_blocks_cover_the_lower_block_triangle_exactly_once(monkeypatch, scheme, n):
    monkeypatch.setattr(acc_mod, "_SYM_TILE", 24)
    monkeypatch.setattr(acc_mod, "_OLD_TILE", 24)
    monkeypatch.setattr(acc_mod, "_SYM_SCHEME", scheme)
    cover = torch.zeros(n, n, dtype=torch.int32)
    for r0, r1, c0, c1 in acc_mod.sym_blocks(n):
        cover[r0:r1, c0:c1] += 1
    tiles = acc_mod.sym_tiles(n)
    want = torch.zeros(n, n, dtype=torch.int32)
    for i, (i0, i1) in enumerate(tiles):
        for j0, j1 in tiles[: i + 1]:
            want[i0:i1, j0:j1] = 1
    assert torch.equal(cover, want)
    # and the product it computes, mirrored, is the full symmetric product
    a = torch.randn(30, n, dtype=torch.float64)
    out = torch.zeros(n, n, dtype=torch.float64)
    prod = acc_mod.Products("full", torch.float64, torch.device("cpu"))
    acc_mod.sym_addmm(out, a, a, prod, "final")
    assert torch.allclose(acc_mod.mirror_lower(out), a.T @ a, rtol=1e-12, atol=1e-12)


def test_recursive_blocking_does_about_half_the_flops_at_large_n():
    assert acc_mod.sym_flop_fraction(14336) < 0.53
    assert acc_mod.sym_flop_fraction(4096) < 0.57
