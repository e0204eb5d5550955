"""The int8 GEMV of the int8 LM head, run by Triton's CPU interpreter against the dense reference.

Skipped where Triton is not installed or a GPU is present (bench/check_kernels.py covers the GPU);
the CPU row-block path of :class:`Int8Linear` is covered by test_int8_embeddings.py either way.
"""

import pytest
import torch

from triton_interpreter import kernels_rebuilt, require_interpreter

require_interpreter()

from yaqa.nn import kernels, kernels_int8  # noqa: E402
from yaqa.nn.int8 import Int8Embedding, Int8Linear, dequantize_rows, quantize_rows  # noqa: E402


interpreter = kernels_rebuilt(kernels_int8._kernels)  # build the kernels under the interpreter


def _head(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_rows(torch.randn(m, n, generator=g))
    q[0] = -127  # the extremes of the code range, and an all-zero row (scale 0)
    q[1] = 127
    s[2] = 0.0
    return q, s, dequantize_rows(q, s)


@pytest.mark.parametrize("n", [256, 200])  # whole BLOCK_K steps, and a masked last step
def test_int8_gemv_equals_the_dequantized_weight(n):
    m = 22  # not a multiple of any BLOCK_N: the last program's rows are masked
    q, s, W = _head(m, n, seed=n)
    for rows in (1, 3):
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
        ref = x.double() @ W.double().T
        tiles = [None] + [c for c in kernels_int8.INT8_CONFIGS if c[1] <= 512]
        for tile in tiles:
            y = kernels_int8.int8_gemv(x, q, s, tile=tile)
            assert y.shape == (rows, m) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4,
                                       msg=f"tile {tile}")


def test_int8_head_uses_the_gemv_for_few_rows_and_row_blocks_otherwise(monkeypatch):
    m, n = 40, 64
    lin = torch.nn.Linear(n, m, bias=True)
    head = Int8Linear.from_float(lin)
    calls = []
    real = kernels_int8.int8_gemv
    monkeypatch.setattr(kernels_int8, "int8_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 2, n)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, head.dequantized_weight(), lin.bias)
        cpu = head(x)
        assert not calls  # FORCE_TRITON off: the CPU path
        monkeypatch.setattr(kernels, "FORCE_TRITON", True)
        y = head(x)
        assert len(calls) == 1 and y.shape == (1, 2, m)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, cpu, rtol=1e-5, atol=1e-5)
        many = torch.randn(kernels.GEMV_MAX_ROWS + 1, n)
        torch.testing.assert_close(head(many), torch.nn.functional.linear(
            many, head.dequantized_weight(), lin.bias), rtol=1e-5, atol=1e-5)
        assert len(calls) == 1  # prefill-sized inputs keep the row blocks
        xb = x.bfloat16()
        head.compute_dtype = torch.bfloat16
        yb = head(xb)
        assert yb.dtype == torch.bfloat16
        assert ((yb.float() - ref).norm() / ref.norm()) < 1e-2


def test_tied_int8_head_reads_the_embedding_scales(monkeypatch):
    emb = Int8Embedding.from_float(torch.nn.Embedding(30, 32))
    head = Int8Linear.tied(emb)
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    x = torch.randn(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ emb.dequantized_weight().T, rtol=1e-5,
                                   atol=1e-5)


def test_int8_custom_op_has_a_fake_impl():
    q, s, _ = _head(8, 64)
    torch.library.opcheck(kernels_int8.int8_matmul, (torch.randn(1, 64), q, s),
                          test_utils=("test_schema", "test_faketensor"))


def test_graph_decoder_with_an_int8_head_gives_the_tokens_of_generate(monkeypatch):
    from tiny_models import tiny_model

    from yaqa.nn.graph_decode import GraphDecoder
    from yaqa.nn.int8 import quantize_embeddings

    model = tiny_model("llama", layers=2)
    quantize_embeddings(model)
    prompt = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)  # fused small ops + the int8 GEMV head
    calls = []
    real = kernels_int8.int8_gemv
    monkeypatch.setattr(kernels_int8, "int8_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    dec = GraphDecoder(model, max_len=16)
    assert dec.fused and dec.k[0].dtype == torch.float32
    assert torch.equal(dec.generate(prompt, 6), ref)
    assert calls


def test_int8_head_compiles_fullgraph_and_a_misaligned_view_takes_the_row_blocks(monkeypatch):
    # the H100 check caught storage_offset() in the Python dispatch: torch.compile(fullgraph)
    # cannot trace it, so the alignment check lives inside the custom op
    m, n = 24, 64
    head = Int8Linear.from_float(torch.nn.Linear(n, m, bias=False))
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    x = torch.randn(1, n)
    with torch.no_grad():
        ref = x @ head.dequantized_weight().T
        torch.testing.assert_close(torch.compile(head, fullgraph=True, backend="eager")(x), ref,
                                   rtol=1e-5, atol=1e-5)
        calls = []
        real = kernels_int8.int8_gemv
        monkeypatch.setattr(kernels_int8, "int8_gemv",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
        buf = torch.zeros(m * n + 1, dtype=torch.int8)
        view = buf[1:].view(m, n)  # contiguous, but one byte off a word boundary
        view.copy_(head.weight)
        s = head.scales()
        torch.testing.assert_close(kernels_int8.int8_matmul(x, view, s), ref, rtol=1e-5,
                                   atol=1e-5)
        assert not calls
        kernels_int8.int8_matmul(x, head.weight, s)
        assert calls == [1]
