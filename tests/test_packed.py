"""Packed inference: QuantizedLinear runs from packed codes; transformers loads yaqa checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import yaqa
from yaqa.incoherence import hadamard_transform
from yaqa.io import load, read_record, save_quantized
from yaqa.nn import QuantizedLinear, set_dense_cache
from yaqa.nn.hadamard import fast_hadamard
from yaqa.nn.kernels import cpu_matmul, unpack_rows
from yaqa.nn.packing import pack_codes, packed_nbytes
from yaqa.quantizers import IntQuantizer
from yaqa.quantize_model import quantize
from yaqa.rounding import round_weight

from tiny_models import tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "v1_int3_inc"


@pytest.mark.parametrize("n", [1, 2, 64, 96, 112, 4096, 14336])
def test_kron_hadamard_equals_the_reference_transform(n):
    x = torch.randn(3, n, dtype=torch.float64)
    for t in (False, True):
        torch.testing.assert_close(fast_hadamard(x, t), hadamard_transform(x, t))
        torch.testing.assert_close(fast_hadamard(x[:1], t), hadamard_transform(x[:1], t))  # decode


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_row_unpack_matches_flat_unpack(bits):
    codes = torch.randint(0, 2**bits, (7, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_rows(packed, bits, 40, 0, 7), codes.to(torch.int32))
    assert torch.equal(unpack_rows(packed, bits, 40, 2, 5), codes[2:5].to(torch.int32))
    odd = torch.randint(0, 2**bits, (5, 12))  # rows not on chunk boundaries for 3 bits
    assert torch.equal(unpack_rows(pack_codes(odd, bits), bits, 12, 1, 4), odd[1:4].to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("incoherence", [False, True])
def test_packed_forward_equals_dense_dequantized_path(bits, group, incoherence):
    torch.manual_seed(bits * 1000 + group)
    m, n = 96, 384  # 96 and 384 = 3·128: Paley × Walsh-Hadamard sizes
    lin = torch.nn.Linear(n, m, bias=True)
    q = IntQuantizer(bits=bits, group_size=group)
    res = round_weight(lin.weight.detach(), None, None, q, method="rtn",
                       incoherence=11 if incoherence else False, return_details=True)
    ql = QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform,
                                    bias=lin.bias)
    x = torch.randn(2, 5, n)
    dense = torch.nn.functional.linear(x, ql.dequantized_weight(), lin.bias)
    with torch.no_grad():
        torch.testing.assert_close(ql(x), dense, rtol=1e-5, atol=1e-5)
        ql.dense_cache = True
        torch.testing.assert_close(ql(x), dense, rtol=1e-5, atol=1e-5)
    # Row blocks of any size give the same matmul.
    xw = ql._rotate_in(x) if incoherence else x
    torch.testing.assert_close(
        cpu_matmul(xw, ql.qweight, ql.grid_scale, ql.grid_zero, bits, group, m, n, block_rows=7),
        xw @ res.grid.dequantize(res.codes).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [None, 32])
def test_packed_forward_follows_the_stored_block_or_full_hadamard(block, tmp_path):
    # A block-Hadamard transform (incoherence "block") must be applied blockwise by the packed
    # path too, also after a save/load round trip, not as the full-size Hadamard of the shape.
    from yaqa.incoherence import IncoherenceTransform

    torch.manual_seed(5)
    m, n = 64, 128
    lin = torch.nn.Linear(n, m, bias=False)
    q = IntQuantizer(bits=4, group_size=32)
    tf = IncoherenceTransform(m, n, seed=3, block=block)
    res = round_weight(lin.weight.detach(), None, None, q, method="rtn", incoherence=tf,
                       return_details=True)
    ql = QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform)
    x = torch.randn(3, n)
    expected = x @ ql.dequantized_weight().T
    with torch.no_grad():
        torch.testing.assert_close(ql(x), expected, rtol=1e-5, atol=1e-5)
        fresh = QuantizedLinear(n, m, q, incoherence=True)
        fresh.load_state_dict(ql.state_dict())
        fresh.materialize_hadamard()
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_int_params_returns_the_unpacked_codes_scales_and_zeros():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    q = IntQuantizer(bits=4, group_size=32)
    grid = q.fit(W)
    _, codes = grid.round_all(W)
    ql = QuantizedLinear.from_codes(codes, grid, q)
    c, s, z = ql.int_params()
    assert torch.equal(c, codes) and c.dtype == torch.int32
    assert torch.equal(s, grid.scale) and torch.equal(z.float(), grid.zero)
    torch.testing.assert_close(((c.float().reshape(32, 2, 32) - z[..., None]) * s[..., None])
                               .reshape(32, 64), grid.dequantize(codes))


def _linear_bytes(model):
    return sum(t.numel() * t.element_size() for m in model.modules()
               if isinstance(m, QuantizedLinear)
               for t in list(m.parameters()) + list(m.buffers()))


def _packed_size(model, on_disk=False):
    """Codes + scales + zeros + signs (+ bias), and in memory the derived Hadamard factors."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            g = m.group_size
            groups = m.out_features * (m.in_features // g)
            total += packed_nbytes(m.in_features * m.out_features, m.bits) + groups * 3  # fp16 + u8
            if m.incoherence:  # int8 signs, int64 shape and block size, the ±1 Hadamard factors
                total += m.in_features + m.out_features + 24
                if not on_disk:
                    total += sum(b.numel() * b.element_size() for k, b in m.named_buffers()
                                 if k.startswith("had_"))
            if m.bias is not None:
                total += m.bias.numel() * m.bias.element_size()
    return total


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = tiny_model("llama", hidden=64, intermediate=96, vocab=96)
    quantize(model, method="rtn", quantizer="int4", group_size=32, incoherence=True,
             progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "q"
    save_quantized(model, path)
    return model, path


def test_from_pretrained_generates_the_same_tokens_as_yaqa_load(ckpt):
    from transformers import AutoModelForCausalLM

    model, path = ckpt
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "yaqa"
    assert read_record(path)["format_version"] == 2
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    ours = load(path)
    assert isinstance(hf.model.layers[0].mlp.down_proj, QuantizedLinear)
    prompt = torch.tensor([[5, 9, 2, 7, 1]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        assert torch.equal(hf.generate(prompt, **kw), ref)
        assert torch.equal(ours.generate(prompt, **kw), ref)
        torch.testing.assert_close(hf(prompt).logits, model(prompt).logits)
    # The loaded model holds the packed tensors, nothing dense.
    assert _linear_bytes(hf) == _packed_size(model) == _linear_bytes(model)
    assert all(not m._cache for m in hf.modules() if isinstance(m, QuantizedLinear))


def test_save_pretrained_round_trips(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    model, path = ckpt
    hf = AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path / "rt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "rt")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(again(prompt).logits, hf(prompt).logits)


def test_dense_cache_is_opt_in(ckpt):
    model, path = ckpt
    loaded = load(path, dense_cache=True)
    prompt = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits)
    assert all(m._cache is not None for m in loaded.modules() if isinstance(m, QuantizedLinear))
    assert set_dense_cache(loaded, False) == 14


def test_format_v1_checkpoint_still_loads():
    expected = torch.load(FIXTURE / "expected.pt")
    assert read_record(FIXTURE)["format_version"] == 1
    model = load(FIXTURE)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["tokens"]).logits, expected["logits"],
                                   rtol=1e-5, atol=1e-5)


def test_checkpoint_is_packed_linears_plus_16_bit_rest(tmp_path):
    model = tiny_model("llama", hidden=128, intermediate=256, vocab=512, dtype=torch.bfloat16)
    quantize(model, method="rtn", quantizer="int4", group_size=128, progress=False)
    rest = sum(p.numel() * 2 for n, p in model.named_parameters()
               if not any(n.startswith(q + ".") for q in _qnames(model)))
    saved = save_quantized(model, tmp_path / "c")
    expect = _packed_size(model, on_disk=True) + rest
    assert expect <= saved.weights_bytes < expect * 1.02 + 8192  # + safetensors header
    # Float32 in memory (as yaqa calibrates), bfloat16 published: saved as bfloat16.
    model.float()
    model.yaqa_stored_dtype = torch.bfloat16
    again = save_quantized(model, tmp_path / "d")
    assert again.weights_bytes == saved.weights_bytes
    loaded = load(again.path)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def _qnames(model):
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def test_without_import_yaqa_transformers_does_not_know_the_method(ckpt):
    _, path = ckpt
    code = ("import transformers.quantizers.auto as a; "
            f"print('yaqa' in a.AUTO_QUANTIZER_MAPPING)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "yaqa" in __import__("transformers.quantizers.auto").quantizers.auto.AUTO_QUANTIZER_MAPPING
    assert yaqa.hf.QUANT_METHOD == "yaqa"


def test_generate_cli_prints_text_and_speed(tmp_path, capsys):
    from tiny_models import tiny_tokenizer

    from yaqa.cli import main

    tok = tiny_tokenizer("the cat sat on the mat. " * 50, vocab_size=280)
    model = tiny_model("llama", vocab=len(tok))
    quantize(model, method="rtn", quantizer="int4", group_size=32, progress=False)
    save_quantized(model, tmp_path / "c", tokenizer=tok)
    assert main(["generate", str(tmp_path / "c"), "the cat", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the cat") and "5 tokens in" in out and "tokens/s" in out
    assert main(["generate", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("n,folded", [(256, True), (384, False)])
def test_sign_vectors_stay_exact_in_16_bit(n, folded):
    # 1/sqrt(256) = 2^-4 joins the ±1 signs exactly; 1/sqrt(384) would round in bf16 and bias
    # every output by the same factor, so it stays a float32 scalar.
    q = IntQuantizer(bits=4, group_size=64)
    ql = QuantizedLinear(n, 64, q, incoherence=True, dtype=torch.bfloat16)
    v = ql.had_in_sign.float().abs()
    expected = n ** -0.5 if folded else 1.0
    assert v.dtype == torch.float32 and torch.equal(v, torch.full_like(v, expected))
    assert ql._had_in_scale == pytest.approx(1.0 if folded else n ** -0.5, rel=1e-15)
