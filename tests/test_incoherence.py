"""Randomized Hadamard transforms: orthogonality, fast == dense, consistency of all the sides."""

from __future__ import annotations

import math
import os

import pytest
import torch

from yaqa.incoherence import (
    IncoherenceTransform,
    _base_hadamard,
    _paley_order,
    fwht,
    hadamard_factor,
    hadamard_matrix,
    hadamard_supported,
    hadamard_transform,
)
from yaqa.rounding import proxy_loss, round_weight

DEVICE = os.environ.get("YAQA_TEST_DEVICE", "cpu")

MODEL_SIZES = [576, 1536, 192, 14336, 18944, 4096, 11008, 3072, 8192, 2048, 896, 4864, 5120,
               13824, 27648, 3584, 2816, 3840, 5632, 6144, 7168, 8960, 9728, 12288, 28672]


def sylvester(p: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(p):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def dense_reference(n: int) -> torch.Tensor:
    """Had_n built as an explicit Kronecker product, independent of the fast code path."""
    K, P = hadamard_factor(n)
    base = torch.tensor(_base_hadamard(K), dtype=torch.float64)
    return torch.kron(base, sylvester(int(math.log2(P)))) / math.sqrt(n)


@pytest.mark.parametrize("K", [12, 20, 24, 28, 36, 44, 52, 60, 76, 100, 108, 148, 344])
def test_paley_base_matrices_are_hadamard(K):
    # 28 (q = 27 = 3^3), 52 (q = 25) and 100 (q = 49) exercise the prime-power fields.
    assert _paley_order(K) is not None
    H = torch.tensor(_base_hadamard(K), dtype=torch.float64)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256, 12, 20, 28, 36, 40, 48, 96, 192, 576, 896, 1536])
def test_hadamard_is_orthogonal_and_fast_transform_equals_dense_matrix(n):
    H = hadamard_matrix(n, device=DEVICE)
    eye = torch.eye(n, dtype=torch.float64, device=DEVICE)
    assert torch.allclose(H @ H.T, eye, atol=1e-12)
    assert torch.allclose(H, dense_reference(n).to(DEVICE), atol=1e-13)
    x = torch.randn(3, 5, n, dtype=torch.float64, device=DEVICE)
    assert torch.allclose(hadamard_transform(x), x @ H.T, atol=1e-11)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ H, atol=1e-11)


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes_are_supported_with_a_small_dense_factor(n):
    K, P = hadamard_factor(n)
    assert K * P == n and P & (P - 1) == 0 and K <= 344
    # Orthonormal on random vectors (the dense matrix is too big for the largest sizes).
    x = torch.randn(4, n, dtype=torch.float64, device=DEVICE)
    y = hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(hadamard_transform(y, transpose=True), x, atol=1e-11)


@pytest.mark.parametrize("n", [23, 92, 172, 184])
def test_unsupported_size_raises_a_clear_error(n):
    assert not hadamard_supported(n)
    with pytest.raises(ValueError, match="no Hadamard matrix of order"):
        hadamard_factor(n)
    with pytest.raises(ValueError, match="no Hadamard matrix"):
        IncoherenceTransform(64, n)


def dense_transform(tf: IncoherenceTransform) -> tuple[torch.Tensor, torch.Tensor]:
    U = hadamard_matrix(tf.n) * tf.sign_in.double()[None, :]
    V = hadamard_matrix(tf.m) * tf.sign_out.double()[None, :]
    return U, V


@pytest.mark.parametrize("m,n", [(64, 48), (96, 576), (28, 16)])
def test_transform_sides_match_the_dense_definitions(m, n):
    tf = IncoherenceTransform(m, n, seed=3)
    U, V = dense_transform(tf)
    assert torch.allclose(U @ U.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    W = torch.randn(m, n, dtype=torch.float64)
    Hi = torch.randn(n, n, dtype=torch.float64)
    Hi = Hi @ Hi.T
    Ho = torch.randn(m, m, dtype=torch.float64)
    Ho = Ho @ Ho.T
    d = dict(device=DEVICE)
    Wt = tf.weight(W.to(**d)).cpu()
    assert torch.allclose(Wt, V @ W @ U.T, atol=1e-11)
    assert torch.allclose(tf.inverse_weight(Wt.to(**d)).cpu(), W, atol=1e-11)
    assert torch.allclose(tf.factor_in(Hi.to(**d)).cpu(), U @ Hi @ U.T, atol=1e-9)
    assert torch.allclose(tf.factor_out(Ho.to(**d)).cpu(), V @ Ho @ V.T, atol=1e-9)


def test_inference_path_reproduces_the_original_layer():
    m, n = 96, 192
    tf = IncoherenceTransform(m, n, seed=11)
    W = torch.randn(m, n, device=DEVICE)
    x = torch.randn(2, 7, n, device=DEVICE)
    Wt = tf.weight(W)
    y = tf.output(tf.input(x) @ Wt.T)
    assert torch.allclose(y, x @ W.T, atol=1e-4, rtol=1e-4)


def test_transform_is_deterministic_per_seed_and_round_trips_through_state_dict():
    a, b, c = IncoherenceTransform(64, 48, seed=5), IncoherenceTransform(64, 48, seed=5), \
        IncoherenceTransform(64, 48, seed=6)
    assert torch.equal(a.sign_in, b.sign_in) and torch.equal(a.sign_out, b.sign_out)
    assert not torch.equal(a.sign_in, c.sign_in)
    r = IncoherenceTransform.from_state_dict(a.state_dict())
    W = torch.randn(64, 48)
    assert torch.equal(r.weight(W), a.weight(W))
    assert (r.m, r.n) == (64, 48)


def test_proxy_loss_is_invariant_under_the_transforms():
    m, n = 48, 96
    tf = IncoherenceTransform(m, n, seed=2)
    dW = torch.randn(m, n, dtype=torch.float64)
    A = torch.randn(n, n, dtype=torch.float64)
    B = torch.randn(m, m, dtype=torch.float64)
    Hi, Ho = A @ A.T, B @ B.T
    before = proxy_loss(dW, Hi, Ho)
    after = proxy_loss(tf.weight(dW), tf.factor_in(Hi), tf.factor_out(Ho))
    assert after == pytest.approx(before, rel=1e-10)


def test_round_weight_with_incoherence_returns_the_original_basis():
    m, n = 64, 192
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g).to(DEVICE)
    A = torch.randn(n, n, dtype=torch.float64, generator=g)
    Hi = (A @ A.T).to(DEVICE)
    for method in ("rtn", "ldlq", "yaqa"):
        r = round_weight(W, Hi, None, "int4", method, incoherence=7, group_size=32, return_details=True)
        assert r.transform is not None and r.transform.seed == 7
        rebuilt = r.transform.inverse_weight(r.grid.dequantize(r.codes))
        assert torch.allclose(r.weight, rebuilt, atol=1e-6)
        assert r.weight.shape == W.shape and r.weight.device == W.device
        # Ŵ is a good approximation of W (int4: a few percent relative error)
        assert (r.weight - W).norm() / W.norm() < 0.15


@pytest.mark.parametrize("n", [1, 2, 4, 32, 128])
def test_fwht_matches_sylvester_and_its_autograd_path_bit_for_bit(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    x0 = x.clone()
    fast = fwht(x)  # the buffered path (no graph needed)
    assert torch.allclose(fast, x @ sylvester(int(math.log2(n))).T, rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    graph = fwht(xg)  # the stacking path, which autograd can follow
    assert torch.equal(fast, graph.detach())
    graph.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
    assert torch.equal(x, x0)  # the input is left alone
