"""Assertions shared by the Hessian collection tests."""

import torch


def assert_same_hessians(a, b):
    """Two ``{name: LayerHessian}`` results hold the same layers and bit-identical factors."""
    assert set(a) == set(b)
    for name in a:
        for k in ("H_in", "H_out", "H_x"):
            x, y = getattr(a[name], k), getattr(b[name], k)
            assert (x is None) == (y is None), (name, k)
            if x is not None:
                assert torch.equal(x, y), (name, k, (x - y).abs().max().item())
