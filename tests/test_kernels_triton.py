"""The Triton kernels, run by Triton's CPU interpreter at tiny sizes against the dense reference.

Skipped where Triton is not installed (CI's test extra does not pull it); the pure-torch CPU
path is covered by test_packed.py either way.
"""


import pytest
import torch

from yaqa.nn import kernels
from yaqa.nn.packing import pack_codes

from triton_interpreter import kernels_rebuilt, require_interpreter

require_interpreter()


interpreter = kernels_rebuilt(kernels._kernels)  # build the kernels under the interpreter


def _layer(bits, group, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (m, n), generator=g)
    qw = pack_codes(codes, bits)
    scale = (torch.rand(m, n // group, generator=g) * 0.1 + 0.01).half()
    zero = torch.randint(0, 2**bits, (m, n // group), generator=g).to(torch.uint8)
    return qw, scale, zero, kernels.dequantize_rows(qw, scale, zero, bits, group, n, 0, m)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128])
def test_gemv_and_dequant_kernels_equal_the_dense_weight(bits, group):
    m, n = 22, 256  # 22 rows: the last program of every kernel is partly masked
    qw, scale, zero, W = _layer(bits, group, m, n, seed=bits * 100 + group)
    Wk = kernels.dequantize_cuda(qw, scale, zero, bits, group, m, n, torch.float32)
    assert torch.equal(Wk, W)  # same float32 arithmetic, exactly
    W16 = kernels.dequantize_cuda(qw, scale, zero, bits, group, m, n, torch.bfloat16)
    assert W16.dtype == torch.bfloat16  # (the interpreter's bf16 cast may truncate: 1 ulp)
    torch.testing.assert_close(W16.float(), W, rtol=2**-7, atol=0)
    for rows in (1, 3, kernels.GEMV_MAX_ROWS + 2):  # GEMV, GEMV over rows, dequantize + matmul
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
        y = kernels.packed_matmul(x, qw, scale, zero, bits, group, m, n)
        torch.testing.assert_close(y, x @ W.T, rtol=1e-4, atol=1e-4)  # 8-bit sums reach ~10


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_autotuner_tile_computes_the_same_gemv(bits):
    m, n, group = 20, 1024, 128
    qw, scale, zero, W = _layer(bits, group, m, n, seed=bits)
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(0))
    xb = x.bfloat16()  # 16-bit activations: the paired decode at 2 and 4 bits
    ref16 = xb.float() @ W.T
    for tile in kernels._GEMV_CONFIGS:
        if not kernels.config_fits(tile, bits, group, n):
            continue
        y = kernels.gemv(x, qw, scale, zero, bits, group, m, n, tile=tile)
        torch.testing.assert_close(y, x @ W.T, rtol=1e-4, atol=1e-4, msg=f"tile {tile}")
        y16 = kernels.gemv(xb, qw, scale, zero, bits, group, m, n, tile=tile).float()
        torch.testing.assert_close(y16, ref16, rtol=2**-7, atol=ref16.abs().max() * 2**-8,
                                   msg=f"bf16, tile {tile}")


def test_tiles_of_long_k_slices_compute_the_same_gemv():
    # The configs whose split-K slices do not fit K=1024 (split 32, 512-wide steps): at K=4096.
    m, n, bits, group = 8, 4096, 4, 128
    qw, scale, zero, W = _layer(bits, group, m, n, seed=5)
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    tiles = [t for t in kernels._GEMV_CONFIGS if not kernels.config_fits(t, bits, group, 1024)
             and kernels.config_fits(t, bits, group, n) and not t[5]]
    assert tiles
    for tile in tiles:
        y = kernels.gemv(x, qw, scale, zero, bits, group, m, n, tile=tile)
        torch.testing.assert_close(y, x @ W.T, rtol=1e-4, atol=1e-4, msg=f"tile {tile}")


def test_gemv_writes_the_activation_dtype_and_keeps_leading_dims():
    m, n, bits, group = 16, 128, 4, 64
    qw, scale, zero, W = _layer(bits, group, m, n)
    x = torch.randn(2, 1, n).bfloat16()
    y = kernels.packed_matmul(x, qw, scale, zero, bits, group, m, n)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 1, m)
    ref = x.float() @ W.T
    assert ((y.float() - ref).norm() / ref.norm()) < 1e-2


def test_custom_op_has_a_fake_impl_and_compiles_without_graph_breaks():
    m, n, bits, group = 16, 128, 4, 32
    qw, scale, zero, W = _layer(bits, group, m, n)
    x = torch.randn(1, n)
    torch.library.opcheck(kernels.intk_matmul, (x, qw, scale, zero, bits, group, m, n),
                          test_utils=("test_schema", "test_faketensor"))

    def step(x):
        return torch.relu(kernels.intk_matmul(x, qw, scale, zero, bits, group, m, n)) + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)  # fullgraph: breaks raise
    torch.testing.assert_close(compiled(x), torch.relu(x @ W.T) + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [256, 1024, 4096])
@pytest.mark.parametrize("sign_first", [True, False])
def test_fused_rotation_equals_the_kronecker_path(n, sign_first):
    from yaqa.nn.hadamard import apply_factors, factors, kron_factors

    assert kernels.rotate2_supports(kron_factors(n))
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g)
    sign = (torch.randint(0, 2, (n,), generator=g) * 2 - 1) / n**0.5
    Hs = factors(n, transpose=not sign_first)
    y = kernels.hadamard_rotate2(x, sign, Hs[0], Hs[1], sign_first)
    ref = (apply_factors(x * sign, Hs, normalize=False) if sign_first
           else apply_factors(x, Hs, normalize=False) * sign)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_codes_off_a_word_boundary_take_the_byte_kernels():
    m, n, bits, group = 8, 128, 4, 32
    qw, scale, zero, W = _layer(bits, group, m, n)
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), qw])[1:]  # storage offset 1
    assert shifted.storage_offset() % 4
    x = torch.randn(1, n)
    torch.testing.assert_close(kernels.packed_matmul(x, shifted, scale, zero, bits, group, m, n),
                               x @ W.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernels.dequantize_cuda(shifted, scale, zero, bits, group, m, n,
                                                       torch.float32), W)


def test_a_kernel_that_fails_to_build_falls_back_once_and_is_reported(monkeypatch):
    calls = []

    def broken():
        calls.append("fast")
        raise RuntimeError("no such instruction\nout of resources: shared memory")

    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    monkeypatch.setattr(kernels, "FALLBACKS", [])
    monkeypatch.setattr(kernels, "_BROKEN", set())
    assert kernels._guarded("k", (1,), broken, lambda: "slow") == "slow"
    assert kernels._guarded("k", (1,), broken, lambda: "slow") == "slow"
    assert calls == ["fast"]  # not retried
    assert kernels.FALLBACKS == ["k (1,): RuntimeError: out of resources: shared memory"]


@pytest.mark.parametrize("n", [14336, 10240, 512 * 12])
@pytest.mark.parametrize("sign_first", [True, False])
def test_fused_three_factor_rotation_equals_the_kronecker_path(n, sign_first):
    from yaqa.nn.hadamard import apply_factors, factors, kron_factors

    sizes = kron_factors(n)
    assert kernels.rotate3_supports(sizes), sizes
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, generator=g)
    sign = (torch.randint(0, 2, (n,), generator=g) * 2 - 1) / n**0.5
    Hs = factors(n, transpose=not sign_first)  # the out side uses the transposed (Paley) factor
    y = kernels.hadamard_rotate3(x, sign, *Hs, sign_first)
    ref = (apply_factors(x * sign, Hs, normalize=False) if sign_first
           else apply_factors(x, Hs, normalize=False) * sign)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,n", [(256, 256), (96, 6144)])
def test_quantized_linear_on_the_triton_path_equals_the_dense_weight(m, n, monkeypatch):
    # 256 = 16·16: two-factor fused rotation; 6144 = 12·32·16: the three-factor one, on the
    # input side (the output side is covered by the kernel test above).
    from yaqa.nn import QuantizedLinear
    from yaqa.quantizers import IntQuantizer
    from yaqa.rounding import round_weight

    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    torch.manual_seed(m + n)
    q = IntQuantizer(bits=4, group_size=64)
    res = round_weight(torch.randn(m, n) * 0.05, None, None, q, method="rtn", incoherence=5,
                       return_details=True)
    ql = QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform)
    Wd = ql.dequantized_weight()
    for rows in (1, kernels.GEMV_MAX_ROWS + 1):  # fused rotations + GEMV; torch + dequantize
        x = torch.randn(rows, n)
        fused = ql._fused_rotation(x, "in") or ql._fused_rotation(torch.zeros(rows, m), "out")
        assert bool(fused) == (rows == 1)
        with torch.no_grad():
            torch.testing.assert_close(ql(x), x @ Wd.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_split_k_gemv_equals_the_dense_weight_and_leaves_its_counters_at_zero(bits, group,
                                                                              monkeypatch):
    # 13 rows: odd, so the last output block is partly masked; 4 K slices of 128 codes each.
    m, n = 13, 512
    qw, scale, zero, W = _layer(bits, group, m, n, seed=bits + group)
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(group))
    monkeypatch.setenv("YAQA_GEMV_CONFIG", "8,128,4,4,1,0")  # what the 3-bit byte kernel takes
    y = kernels.gemv(x, qw, scale, zero, bits, group, m, n)
    torch.testing.assert_close(y, x @ W.T, rtol=1e-4, atol=1e-4)
    counters = kernels.gemv_workspace(x.device)[1]
    assert not counters.any()  # the last program of each block reset its counter
    assert torch.equal(kernels.gemv(x, qw, scale, zero, bits, group, m, n), y)  # deterministic


def test_split_k_gemv_unpacking_a_3d_tile_agrees():
    m, n, bits, group = 9, 1024, 4, 64
    qw, scale, zero, W = _layer(bits, group, m, n)
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(3))
    for tile in ((16, 256, 2, 4, 1, True), (4, 128, 8, 4, 1, False)):
        torch.testing.assert_close(kernels.gemv(x, qw, scale, zero, bits, group, m, n, tile=tile),
                                   x @ W.T, rtol=1e-4, atol=1e-4, msg=str(tile))


def test_gemv_config_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("YAQA_GEMV_CONFIG", "8,512,3,4,1,0")
    with pytest.raises(ValueError, match="SPLIT_K must be a power of two"):
        kernels.forced_config()
    monkeypatch.setenv("YAQA_GEMV_CONFIG", "8,512")
    with pytest.raises(ValueError, match="6 integers"):
        kernels.forced_config()
    # A config that does not tile this K is ignored from the environment, refused as an argument.
    m, n, bits, group = 4, 256, 4, 128
    qw, scale, zero, W = _layer(bits, group, m, n)
    x = torch.randn(1, n)
    monkeypatch.setenv("YAQA_GEMV_CONFIG", "4,512,1,4,1,0")
    torch.testing.assert_close(kernels.gemv(x, qw, scale, zero, bits, group, m, n), x @ W.T,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not tile"):
        kernels.gemv(x, qw, scale, zero, bits, group, m, n, tile=(4, 512, 1, 4, 1, False))


def test_default_gemv_config_splits_k_for_short_layers():
    assert kernels._default_tile(1024, 4096, 128)[2] > 1   # k/v_proj: 256 blocks alone
    for m, n in ((1024, 4096), (14336, 4096), (4096, 14336), (22, 256)):
        assert kernels.config_fits(kernels._default_tile(m, n, 128), 4, 128, n)
    # a few rows over a very long K: the split stops at what the split-K workspace holds
    assert kernels._default_tile(4, 1 << 17, 128)[2] == kernels.MAX_SPLIT


@pytest.mark.parametrize("n", [256, 6144])
def test_several_sign_vectors_rotate_one_row_in_one_launch(n):
    # 256 = 16·16 (two factors), 6144 = 12·32·16 (three): r rotations of the same activations.
    from yaqa.nn.hadamard import factors, kron_factors

    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, 1, n, generator=g)
    signs = (torch.randint(0, 2, (3, n), generator=g) * 2 - 1).float()
    Hs = factors(n)
    op = kernels.hadamard_rotate2 if len(kron_factors(n)) == 2 else kernels.hadamard_rotate3
    y = op(x, signs, *Hs, True, 0.5)
    assert y.shape == (3, n)
    for i in range(3):
        torch.testing.assert_close(y[i], op(x, signs[i], *Hs, True, 0.5).reshape(n))
    with pytest.raises(ValueError, match="one activation row"):
        op(torch.randn(2, n), signs, *Hs, True)


def test_layers_sharing_an_input_rotate_it_once_and_give_their_own_outputs(monkeypatch):
    from yaqa.nn import QuantizedLinear
    from yaqa.nn.quantized_linear import rotate_shared_input, shared_input_signs
    from yaqa.quantizers import IntQuantizer
    from yaqa.rounding import round_weight

    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    q = IntQuantizer(bits=4, group_size=64)
    mods = []
    for seed, m in ((0, 256), (1, 64), (2, 64)):  # q/k/v-like: one input size, own signs
        torch.manual_seed(seed)
        res = round_weight(torch.randn(m, 256) * 0.05, None, None, q, method="rtn",
                           incoherence=seed + 3, return_details=True)
        mods.append(QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform))
    signs = shared_input_signs(mods)
    assert signs.shape == (3, 256)
    assert shared_input_signs([mods[0], torch.nn.Linear(256, 8)]) is None
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        for y, m in zip(rotate_shared_input(mods, signs, x), mods):
            torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paired_mantissa_decoding_equals_the_per_code_path(bits, dtype, monkeypatch):
    # 16-bit activations take the paired 2/4-bit decode: two codes go into fp32 mantissas after
    # one shift and the offsets come back per group.  Both decodes must match the dense weight
    # within the output's rounding, also for activations far from unit scale (the offsets are
    # 2^(2·bits) times x), and agree with each other more closely still.
    m, n, group = 24, 1024, 64
    qw, scale, zero, W = _layer(bits, group, m, n, seed=7 * bits)
    g = torch.Generator().manual_seed(bits)
    mag = torch.logspace(-2, 2, n)[torch.randperm(n, generator=g)]
    x = (torch.randn(1, n, generator=g) * mag).to(dtype)
    ref = x.double() @ W.double().T
    out = {}
    for paired in (True, False):
        monkeypatch.setattr(kernels, "PAIRED_DECODE", paired)
        out[paired] = kernels.gemv(x, qw, scale, zero, bits, group, m, n,
                                   tile=(8, 256, 2, 4, 1, False))
        assert out[paired].dtype == dtype
    top = ref.abs().max()
    for paired, y in out.items():
        err = ((y.double() - ref).abs().max() / top).item()
        assert err < 2**-8, f"paired={paired}: relative error {err:.2e}"
    # the two differ at most by the output rounding of values that differ by ~1e-5
    diff = ((out[True].double() - out[False].double()).abs() / ref.abs().clamp_min(top * 1e-3))
    assert diff.max().item() <= 2**-7
