"""Int8 input embedding and LM head (``embeddings="int8"``): exact against an explicit
dequantized reference, int8 in memory and on disk, tied weights stored once, loads through
both ``yaqa.load`` and ``from_pretrained``."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

from yaqa.io import load, read_record, save_quantized
from yaqa.io.checkpoint import CheckpointError
from yaqa.nn import QuantizedLinear
from yaqa.nn.int8 import (Int8Embedding, Int8Linear, dequantize_rows, parse_embeddings,
                          quantize_embeddings, quantize_rows)
from yaqa.quantize_model import quantize

from tiny_models import tiny_model

V, D = 160, 64
PROMPT = torch.tensor([[5, 9, 2, 7, 1, 150, 3]])


def _model(family="llama", tied=False, dtype=torch.float32, seed=0):
    m = tiny_model(family, vocab=V, hidden=D, intermediate=96, dtype=dtype, seed=seed)
    if tied:
        m.config.tie_word_embeddings = True
        m.tie_weights()
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    return m


def _int4(m):
    # shared incoherence: the compressed-tensors export (tested below) can serve it
    quantize(m, method="rtn", quantizer="int4", group_size=32, incoherence="shared",
             progress=False)
    return m


def _dequantized_reference(model):
    """``model`` with its embedding and head weights replaced by their int8 values, in float."""
    ref = copy.deepcopy(model)
    emb, head = ref.get_input_embeddings(), ref.get_output_embeddings()
    with torch.no_grad():
        q, s = quantize_rows(emb.weight)
        emb.weight.copy_(dequantize_rows(q, s))
        if head.weight is not emb.weight:
            q, s = quantize_rows(head.weight)
            head.weight.copy_(dequantize_rows(q, s))
    return ref


def _int8_bytes(model):
    """Bytes of the int8 modules' parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, (Int8Embedding, Int8Linear)):
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def test_rows_round_to_nearest_with_one_symmetric_scale_each():
    W = torch.randn(9, 33, generator=torch.Generator().manual_seed(0)) * torch.rand(9, 1) * 4
    W[3] = 0.0
    q, s = quantize_rows(W)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (9,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(s, W.abs().amax(1) / 127)
    assert torch.equal(q[3], torch.zeros(33, dtype=torch.int8)) and s[3] == 0
    # Round to nearest: no other int8 value is closer to any entry.
    err = (dequantize_rows(q, s) - W).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: scaled embedding
@pytest.mark.parametrize("tied", [False, True])
def test_int8_modules_equal_the_explicit_dequantized_reference(family, tied):
    model = _model(family, tied)
    ref = _dequantized_reference(model)
    q = copy.deepcopy(model)
    specs = quantize_embeddings(q)
    assert isinstance(q.get_input_embeddings(), Int8Embedding)
    assert isinstance(q.get_output_embeddings(), Int8Linear)
    head_spec = next(s for s in specs.values() if s["kind"] == "linear")
    assert (head_spec["tied_to"] is not None) == tied
    if tied:
        assert q.get_output_embeddings().weight is q.get_input_embeddings().weight
    with torch.no_grad():
        out, exact, orig = q(PROMPT).logits, ref(PROMPT).logits, model(PROMPT).logits
    assert torch.equal(out, exact)
    assert (out - orig).abs().max() < 0.02 * orig.abs().max()


def test_head_in_row_blocks_equals_one_block(monkeypatch):
    import yaqa.nn.int8 as int8

    lin = torch.nn.Linear(D, V, bias=True)
    head = Int8Linear.from_float(lin)
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        whole = head(x)
        monkeypatch.setattr(int8, "CPU_BLOCK", 7 * D)  # 7 rows a block, a short last block
        blocked = head(x)
        ref = torch.nn.functional.linear(x, head.dequantized_weight(), lin.bias)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, ref, rtol=1e-6, atol=1e-6)


def test_dtype_casts_keep_int8_storage_and_ties():
    q = _model(tied=True)
    quantize_embeddings(q)
    q = copy.deepcopy(q).to(torch.bfloat16)
    emb, head = q.get_input_embeddings(), q.get_output_embeddings()
    assert emb.weight.dtype == torch.int8 and emb.weight_scale.dtype == torch.float32
    assert emb.compute_dtype == head.compute_dtype == torch.bfloat16
    assert head.weight is emb.weight and head.scales() is emb.weight_scale
    assert q.dtype == torch.bfloat16  # the int8 parameters do not change the model's dtype
    with torch.no_grad():
        assert q(PROMPT).logits.dtype == torch.bfloat16


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ckpts(request, tmp_path_factory):
    tied = request.param
    model = _int4(_model(tied=tied, dtype=torch.bfloat16))
    root = tmp_path_factory.mktemp("int8")
    rest16 = save_quantized(model, root / "rest16")
    rest8 = save_quantized(model, root / "rest8", embeddings="int8")
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)  # saving changed nothing
    return tied, model, rest16, rest8


def test_checkpoint_records_the_option_and_shrinks_by_the_int8_size(ckpts):
    tied, model, rest16, rest8 = ckpts
    rec = read_record(rest8.path)
    qcfg = json.loads((rest8.path / "config.json").read_text())["quantization_config"]
    assert rec["format_version"] == 3 and read_record(rest16.path)["format_version"] == 2
    assert rec["embeddings"] == qcfg["embeddings"] and rec["embeddings"]["format"] == "int8"
    assert set(rec["embeddings"]["modules"]) == {"model.embed_tokens", "lm_head"}
    assert read_record(rest16.path)["embeddings"] is None
    with safe_open(str(rest8.path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.int8
    stored = {k for k in keys if k.startswith(("lm_head.", "model.embed_tokens."))}
    expect = {"model.embed_tokens.weight", "model.embed_tokens.weight_scale"}
    assert stored == (expect if tied else expect | {"lm_head.weight", "lm_head.weight_scale"})
    tensors = 1 if tied else 2
    saved = tensors * (V * D * 2 - (V * D + V * 4))  # bf16 matrix -> int8 matrix + fp32 scales
    # up to the safetensors header, which lists the extra scale tensors
    assert abs((rest16.weights_bytes - rest8.weights_bytes) - saved) < 512


def test_loaded_model_is_int8_in_memory_and_exact(ckpts):
    tied, model, rest16, rest8 = ckpts
    loaded = load(rest8.path, dtype=torch.float32)
    emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear)
    assert (head.weight is emb.weight) == tied
    tensors = 1 if tied else 2
    assert _int8_bytes(loaded) == tensors * (V * D + V * 4)
    # References from the 16-bit checkpoint loaded the same way (same float32 compute).
    plain = load(rest16.path, dtype=torch.float32)
    ref = _dequantized_reference(plain)
    converted = copy.deepcopy(plain)
    quantize_embeddings(converted)
    with torch.no_grad():
        out = loaded(PROMPT).logits
        assert torch.equal(out, ref(PROMPT).logits)
        assert torch.equal(out, converted(PROMPT).logits)
        orig = plain(PROMPT).logits
    assert (out - orig).abs().max() < 0.02 * orig.abs().max()


def test_from_pretrained_generate_equals_yaqa_load(ckpts):
    from transformers import AutoModelForCausalLM

    tied, _, _, rest8 = ckpts
    hf = AutoModelForCausalLM.from_pretrained(rest8.path, attn_implementation="eager")
    ours = load(rest8.path)
    assert isinstance(hf.get_output_embeddings(), Int8Linear)
    # The activations follow the dtype asked for at load time; the storage stays int8.
    h16 = AutoModelForCausalLM.from_pretrained(rest8.path, dtype=torch.bfloat16)
    emb = h16.get_input_embeddings()
    assert emb.compute_dtype == torch.bfloat16 and emb.weight.dtype == torch.int8
    assert emb.weight_scale.dtype == torch.float32 and h16.dtype == torch.bfloat16
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(hf.generate(PROMPT, **kw), ours.generate(PROMPT, **kw))


def test_save_pretrained_round_trips_int8(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    tied, _, _, rest8 = ckpts
    hf = AutoModelForCausalLM.from_pretrained(rest8.path)
    hf.save_pretrained(tmp_path / "rt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "rt")
    assert isinstance(again.get_input_embeddings(), Int8Embedding)
    assert (again.get_output_embeddings().weight is again.get_input_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(again(PROMPT).logits, hf(PROMPT).logits)


def test_export_dequantizes_int8_embeddings(ckpts, tmp_path):
    from yaqa.export.compressed_tensors import export_checkpoint

    tied, _, _, rest8 = ckpts
    export_checkpoint(rest8.path, tmp_path / "ct", dtype=torch.float32)
    loaded = load(rest8.path, dtype=torch.float32)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight_scale" not in f.keys()
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"),
                           loaded.get_input_embeddings().dequantized_weight())
        assert ("lm_head.weight" in f.keys()) != tied
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert "lm_head" in cfg["quantization_config"]["ignore"]


def test_bad_option_is_a_one_line_error_and_writes_nothing(tmp_path):
    model = _int4(_model())
    for bad in ("int4", "fp8", 8):
        with pytest.raises(ValueError) as e:
            save_quantized(model, tmp_path / "c", embeddings=bad)
        assert "\n" not in str(e.value) and "'int8'" in str(e.value)
    assert not (tmp_path / "c").exists()
    assert parse_embeddings(None) == "auto" and parse_embeddings("INT8") == "int8"


def test_damaged_int8_record_is_a_checkpoint_error(ckpts, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    tied, _, _, rest8 = ckpts
    bad = tmp_path / "bad"
    shutil.copytree(rest8.path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["embeddings"]["format"] = "int3"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown embeddings format"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_cli_quantize_with_int8_embeddings(tmp_path):
    from tiny_models import tiny_tokenizer

    from yaqa.cli import build_parser, main

    tok = tiny_tokenizer("the cat sat on the mat. " * 50, vocab_size=280)
    tiny_model("llama", vocab=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "q"
    assert main(["-q", "quantize", "--model", str(tmp_path / "m"), "--device", "cpu",
                 "--method", "rtn", "--group-size", "32", "--embeddings", "int8",
                 "--out", str(out)]) == 0
    assert read_record(out)["embeddings"]["format"] == "int8"
    assert isinstance(load(out).get_input_embeddings(), Int8Embedding)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--out", "x", "--embeddings", "int4"])


def test_quantize_one_evaluates_what_it_saves(tmp_path):
    from yaqa.pipeline import quantize_one
    from yaqa.recipe import get_recipe

    recipe = get_recipe("rtn", quantizer="int4", group_size=32)
    untouched = _model()
    with pytest.raises(ValueError, match="unknown embeddings format"):
        quantize_one(untouched, recipe, None, tmp_path / "bad", embeddings="int4", progress=False)
    assert not any(isinstance(m, QuantizedLinear) for m in untouched.modules())  # no work done
    model = _model()
    res = quantize_one(model, recipe, None, tmp_path / "c", embeddings="int8", progress=False)
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    assert read_record(res.saved.path)["embeddings"]["format"] == "int8"
    with torch.no_grad():
        assert torch.equal(load(res.saved.path)(PROMPT).logits, model(PROMPT).logits)
