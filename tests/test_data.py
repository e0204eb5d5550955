"""Text → token windows: determinism, GPTQ-style cutting, BOS handling, sources and errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.tiny_models import tiny_model, tiny_tokenizer
from yaqa.data import (wants_bos, DataError, DataNotFoundError, batched, calibration_windows, eval_windows,
                       find_wikitext2, load_text, tokenize)

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3
        + "Pack my box with five dozen liquor jugs!\n\n" * 2
        + "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow.\n") * 20


@pytest.fixture(scope="module")
def tokenizer():
    """A small GPT-2-like byte-level BPE tokenizer, trained here: no downloads."""
    tok = tiny_tokenizer(TEXT, vocab_size=320)
    tok.eos_token = None
    return tok


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_eval_windows_are_consecutive_non_overlapping_cuts_without_bos():
    tokens = torch.arange(100)
    w = eval_windows(None, tokens, ctx=16)
    assert w.shape == (6, 16)  # 100 // 16, tail dropped
    assert torch.equal(w.flatten(), torch.arange(96))


def test_eval_windows_with_bos_hold_bos_plus_ctx_minus_one_text_tokens():
    tokens = torch.arange(10, 110)
    w = eval_windows(None, tokens, ctx=16, bos_id=1)
    assert w.shape == (100 // 15, 16)
    assert (w[:, 0] == 1).all()
    assert torch.equal(w[:, 1:].flatten(), torch.arange(10, 10 + 15 * w.shape[0]))


def test_eval_windows_add_bos_false_ignores_the_tokenizer_bos(tokenizer, text_file):
    w = eval_windows(tokenizer, text_file, ctx=32, add_bos=False)
    assert (w[:, 0] != tokenizer.bos_token_id).any()
    assert w.shape[1] == 32


def test_eval_windows_first_n_and_whole_text_tokenized_once(tokenizer, text_file):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    w = eval_windows(tokenizer, text_file, ctx=32, add_bos=True)
    assert w.shape[0] == len(ids) // 31
    assert (w[:, 0] == tokenizer.bos_token_id).all()
    assert w[:, 1:].flatten().tolist() == ids[: w.shape[0] * 31]
    assert torch.equal(eval_windows(tokenizer, text_file, ctx=32, n=3, add_bos=True), w[:3])


def test_default_bos_follows_whether_the_tokenizer_adds_one(tokenizer, text_file):
    # This test tokenizer does not prepend BOS when encoding, so by default windows carry none.
    assert not wants_bos(tokenizer)
    w = eval_windows(tokenizer, text_file, ctx=32)
    assert torch.equal(w, eval_windows(tokenizer, text_file, ctx=32, add_bos=False))
    assert wants_bos(None) and wants_bos(tokenizer, True) and not wants_bos(None, False)


def test_calibration_windows_are_deterministic_for_a_seed(tokenizer, text_file):
    a = calibration_windows(tokenizer, text_file, n=8, ctx=24, seed=3)
    b = calibration_windows(tokenizer, text_file, n=8, ctx=24, seed=3)
    c = calibration_windows(tokenizer, text_file, n=8, ctx=24, seed=4)
    assert a.shape == (8, 24) and torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_windows_are_bos_plus_contiguous_slices_of_the_text():
    tokens = torch.arange(1000, 1500)
    w = calibration_windows(None, tokens, n=16, ctx=10, seed=0, bos_id=7)
    assert (w[:, 0] == 7).all()
    assert (w[:, 2:] - w[:, 1:-1] == 1).all()
    assert w[:, 1:].min() >= 1000 and w[:, 1:].max() < 1500


def test_too_little_text_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(None, torch.arange(5), n=2, ctx=16)
    with pytest.raises(DataError, match="windows"):
        eval_windows(None, torch.arange(40), ctx=16, n=3)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="not found"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no"):
        load_text(tmp_path / "empty")


def test_directory_source_joins_text_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.raw").write_text("first")
    (tmp_path / "ignored.json").write_text("{}")
    assert load_text(tmp_path) == "first\n\nsecond"


def test_tokenizer_is_required_for_text_sources(text_file):
    with pytest.raises(DataError, match="needs a tokenizer"):
        tokenize(None, text_file)


def test_generated_calibration_works_offline_without_tokenizer():
    model = tiny_model("llama", vocab=64)
    a = calibration_windows(None, "generated", n=3, ctx=12, seed=0, model=model, bos_id=5,
                            batch_size=2, progress=False)
    b = calibration_windows(None, "generated", n=3, ctx=12, seed=0, model=model, bos_id=5,
                            batch_size=2, progress=False)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert (a[:, 0] == 5).all() and a.max() < 64
    assert len({tuple(r) for r in a[:, 1:].tolist()}) == 3  # sampling, not greedy decoding
    no_bos = calibration_windows(None, "generated", n=2, ctx=12, model=model, bos_id=5,
                                 add_bos=False, progress=False)
    assert no_bos.shape == (2, 12)


def test_generated_calibration_uses_model_config_bos_and_matches_sampling_by_hand():
    model = tiny_model("llama", vocab=64)
    model.config.bos_token_id = 3
    w = calibration_windows(None, "generated", n=1, ctx=6, seed=11, model=model, progress=False)
    gen = torch.Generator().manual_seed(11)
    seq = [3]
    with torch.no_grad():
        for _ in range(5):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            seq.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
    assert w[0].tolist() == seq


def test_generated_calibration_needs_a_model_and_a_start_token():
    with pytest.raises(DataError, match="model"):
        calibration_windows(None, "generated", n=1, ctx=4)
    model = tiny_model("llama", vocab=64)
    model.config.bos_token_id = None
    with pytest.raises(DataError, match="bos_id"):
        calibration_windows(None, "generated", n=1, ctx=4, model=model, progress=False)


def test_batched_covers_all_rows_in_order():
    w = torch.arange(70).view(7, 10)
    parts = list(batched(w, 3))
    assert [p.shape[0] for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat(parts), w)


def test_find_wikitext2_honours_yaqa_data_dir(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text(" = Title = \n")
    monkeypatch.setenv("YAQA_DATA_DIR", str(tmp_path))
    assert find_wikitext2() == (tmp_path / "wikitext-2").resolve()
    assert load_text("wikitext2") == " = Title = \n"


@pytest.mark.skipif(find_wikitext2() is None, reason="../shared/data/wikitext-2 not present")
def test_wikitext2_test_and_valid_load_from_shared_data():
    test = load_text("wikitext2-test")
    assert test.startswith(" = Robert Boulter = ") and load_text("wikitext2") == test
    valid = load_text("wikitext2-valid")
    assert "<unk>" in valid and valid != test


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="datasets is installed")
def test_hf_source_without_datasets_says_how_to_install():
    with pytest.raises(DataError, match="pip install"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")


def test_packaged_wikitext2_loads_without_shared_data_or_network(tmp_path, monkeypatch):
    """A fresh clone or a wheel: no $YAQA_DATA_DIR, no ../shared; the packaged copy serves both
    splits, identical to the shared files where those exist."""
    import yaqa.data as data

    shared = find_wikitext2()
    monkeypatch.delenv("YAQA_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_dev_dirs", lambda: [tmp_path / "nowhere"])
    monkeypatch.chdir(tmp_path)
    root = find_wikitext2()
    assert root == data.packaged_wikitext2() and root is not None
    assert "corpora" in root.parts and (root / "README.md").is_file()
    assert "CC BY-SA" in (root / "README.md").read_text()
    test, valid = load_text("wikitext2-test"), load_text("wikitext2-valid")
    assert test.startswith(" = Robert Boulter = ") and len(test) > 1_000_000
    assert " = Homarus gammarus = " in valid[:40] and len(valid) > 1_000_000
    if shared is not None and "corpora" not in shared.parts:
        assert test == (shared / "wiki.test.raw").read_text(encoding="utf-8")
        assert valid == (shared / "wiki.valid.tokens").read_text(encoding="utf-8")
    # $YAQA_DATA_DIR still wins over the packaged copy
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text(" = Mine = \n")
    monkeypatch.setenv("YAQA_DATA_DIR", str(tmp_path))
    assert load_text("wikitext2-test") == " = Mine = \n"


def test_generated_text_progress_names_its_purpose(capsys):
    model = tiny_model("llama", vocab=40)
    calibration_windows(None, "generated", n=2, ctx=5, model=model, bos_id=1,
                        purpose="evaluation")
    err = capsys.readouterr().err
    assert "generating evaluation text" in err and "tok/s" in err
