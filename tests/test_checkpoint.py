"""Model-level quantization, QuantizedLinear and checkpoints (RTN: no Hessians needed)."""

import pytest
import torch

import yaqa.quantize_model as yq
from yaqa.io import CheckpointError, load, read_record, save_quantized
from yaqa.nn import QuantizedLinear
from yaqa.quantize_model import quantize
from yaqa.models import get_adapter

from tiny_models import FAMILY_CONFIGS, tiny_model

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("incoherence", [False, True])
def test_saved_checkpoint_loads_back_with_identical_logits(tmp_path, incoherence):
    model = tiny_model("llama")
    quantize(model, method="rtn", quantizer="int4", group_size=16, incoherence=incoherence,
             progress=False)
    saved = save_quantized(model, tmp_path / "ckpt", info={"method": "rtn"})
    loaded = load(saved.path)
    assert torch.equal(logits(model), logits(loaded))
    rec = read_record(saved.path)
    fresh = tiny_model("llama")
    assert len(rec["modules"]) == len(get_adapter(fresh).named_linears(fresh))


def test_quantized_linear_forward_equals_dense_dequantized_weight():
    from yaqa.quantizers import IntQuantizer
    from yaqa.rounding import round_weight

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=True)
    q = IntQuantizer(bits=3, group_size=16)
    for inc in (False, 7):
        res = round_weight(lin.weight.detach(), None, None, q, method="rtn", incoherence=inc,
                           return_details=True)
        ql = QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform,
                                        bias=lin.bias)
        x = torch.randn(5, 64)
        dense = torch.nn.functional.linear(x, ql.dequantized_weight(), lin.bias)
        torch.testing.assert_close(ql(x), dense, rtol=1e-5, atol=1e-5)
        ql.mode = "rotate"  # fast Hadamard on the activations instead of a folded weight
        torch.testing.assert_close(ql(x), dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ql.dequantized_weight(), res.weight, rtol=1e-5, atol=1e-5)


def test_two_bit_checkpoint_is_about_an_eighth_of_fp16(tmp_path):
    model = tiny_model("llama", hidden=128, intermediate=256, vocab=64)
    names = [n for n, _, _ in get_adapter(model).named_linears(model)]
    fp16_bytes = sum(m.weight.numel() * 2 for _, _, m in get_adapter(model).named_linears(model))
    quantize(model, method="rtn", quantizer="int2", group_size=128, progress=False)
    qbytes = sum(model.get_submodule(n).qweight.numel() for n in names)
    scale_bytes = sum(model.get_submodule(n).grid_scale.numel() * 3 for n in names)
    assert qbytes == fp16_bytes // 8
    assert (qbytes + scale_bytes) / fp16_bytes < 0.15


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_each_family_builds_quantizes_saves_and_evaluates(tmp_path, family):
    from yaqa.evaluate import kl_divergence

    ref = tiny_model(family)
    model = tiny_model(family)
    quantize(model, method="rtn", quantizer="int4", group_size=32, incoherence=True,
             progress=False)
    n_q = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert n_q == len(get_adapter(ref).named_linears(ref))
    kl = kl_divergence(ref, model, [TOKENS], progress=False)
    assert 0 < kl < 1 and kl == kl
    loaded = load(save_quantized(model, tmp_path / family).path)
    assert torch.equal(logits(model), logits(loaded))


def test_kl_grows_with_fewer_bits():
    from yaqa.evaluate import kl_divergence

    ref = tiny_model("llama", hidden=128, intermediate=256)
    kls = []
    for bits in (8, 4, 3, 2):
        model = tiny_model("llama", hidden=128, intermediate=256)
        quantize(model, method="rtn", quantizer=f"int{bits}", group_size=32, progress=False)
        kls.append(kl_divergence(ref, model, [TOKENS], progress=False))
    assert kls == sorted(kls) and kls[0] < 1e-3 < kls[-1]


def test_interrupted_quantization_resumes_to_the_same_model(tmp_path, monkeypatch):
    expect = tiny_model("llama", layers=3)
    quantize(expect, method="rtn", quantizer="int3", group_size=16, incoherence=True,
             progress=False)

    model = tiny_model("llama", layers=3)
    real = yq._quantize_linear
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # inside block 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(yq, "_quantize_linear", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize(model, method="rtn", quantizer="int3", group_size=16, incoherence=True,
                 work_dir=tmp_path / "work", progress=False)
    monkeypatch.setattr(yq, "_quantize_linear", real)
    model = tiny_model("llama", layers=3)
    report = quantize(model, method="rtn", quantizer="int3", group_size=16, incoherence=True,
                      work_dir=tmp_path / "work", progress=False)
    assert report.resumed_blocks == 1
    assert torch.equal(logits(model), logits(expect))


def test_resume_refuses_blocks_from_other_settings_and_overwrite_starts_over(tmp_path):
    from yaqa.store import StaleWorkError

    a = tiny_model("llama")
    quantize(a, method="rtn", quantizer="int2", group_size=16, work_dir=tmp_path, progress=False)
    b = tiny_model("llama")
    with pytest.raises(StaleWorkError, match=r"quantizer: stored 'int2', now 'int4'.*--overwrite"):
        quantize(b, method="rtn", quantizer="int4", group_size=16, work_dir=tmp_path,
                 progress=False)
    report = quantize(b, method="rtn", quantizer="int4", group_size=16, work_dir=tmp_path,
                      overwrite=True, progress=False)
    assert report.resumed_blocks == 0
    assert not torch.equal(logits(a), logits(b))


def test_clear_errors_for_bad_checkpoints_and_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "missing")
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "x.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a yaqa checkpoint"):
        load(tmp_path / "notckpt")
    model = tiny_model("llama")
    with pytest.raises(CheckpointError, match="no quantized layers"):
        save_quantized(model, tmp_path / "x")
    quantize(model, method="rtn", quantizer="int4", group_size=16, progress=False)
    with pytest.raises(CheckpointError, match="not a yaqa checkpoint"):
        save_quantized(model, tmp_path / "notckpt")
    assert (tmp_path / "notckpt" / "x.txt").read_text() == "keep me"
    save_quantized(model, tmp_path / "ok")
    with pytest.raises(CheckpointError, match="overwrite"):
        save_quantized(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="needs Hessians"):
        quantize(tiny_model("llama"), None, method="ldlq", progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        quantize(tiny_model("llama"), None, method="awq", progress=False)
