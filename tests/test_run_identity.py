"""Stored work (Hessians, resume state, checkpoints) is reused only for the run it belongs to;
bad input fails before heavy work with a one-line error; interrupted writes lose nothing.

Each test here reproduces a case of issue 9 that silently corrupted results, printed a traceback
or lost data before the Recipe / store rework.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import yaqa
from yaqa import quantize_model as yq
from yaqa.cli import build_parser, main

from tiny_models import tiny_model

from test_pipeline import TEXT, tokenizer  # noqa: F401 - the same corpus and tokenizer fixture

OTHER = ("Colorless green ideas sleep furiously while the harbor lights blink at midnight. "
         "Seven silver swans swam south in the summer of ninety-nine.\n\n") * 40


@pytest.fixture
def files(tmp_path):
    a, b = tmp_path / "corpus.txt", tmp_path / "other.txt"
    a.write_text(TEXT)
    b.write_text(OTHER)
    return a, b


def _save_model(path: Path, tokenizer, seed: int = 0, layers: int = 3) -> Path:
    model = tiny_model("llama", vocab=len(tokenizer), layers=layers, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return _save_model(tmp_path / "tiny", tokenizer)


def _args(model_dir, calib, n=4, ctx=32):
    return ["--model", str(model_dir), "--device", "cpu", "--calib", str(calib),
            "--n-calib", str(n), "--ctx", str(ctx), "--group-size", "32"]


def _hargs(model_dir, calib, n=4, ctx=32):
    """The same model and data for `yaqa hessians`."""
    return ["--model", str(model_dir), "--device", "cpu", "--calib", str(calib),
            "--n-seqs", str(n), "--ctx", str(ctx)]


def _interrupt_after(monkeypatch, n_layers: int) -> None:
    """Make the next quantization stop (like Ctrl-C) after ``n_layers`` layers."""
    real = yq._quantize_linear
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > n_layers:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(yq, "_quantize_linear", flaky)


def _logits(path, ids):
    with torch.no_grad():
        return yaqa.load(path)(ids).logits


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# -- silent corruption ----------------------------------------------------------------------

def test_resume_after_the_weights_changed_is_refused_and_overwrite_matches_a_fresh_run(
        tmp_path, model_dir, files, tokenizer, monkeypatch, capsys):
    calib, _ = files
    ck = tmp_path / "ck"
    base = ["-q", "quantize", *_args(model_dir, calib), "--method", "yaqa-b"]
    _interrupt_after(monkeypatch, 8)  # 7 linears per block: inside block 1
    assert main([*base, "--hessians", str(tmp_path / "H1"), "--out", str(ck)]) == 130
    monkeypatch.undo()
    assert any((tmp_path / "ck.work").glob("block_*.safetensors"))

    _save_model(model_dir, tokenizer, seed=1)  # other weights, same shapes
    assert main([*base, "--hessians", str(tmp_path / "H2"), "--out", str(ck)]) == 2
    err = _err(capsys)
    assert "weights: stored" in err and "--overwrite" in err and "ck.work" in err
    assert not ck.exists()

    assert main([*base, "--hessians", str(tmp_path / "H2"), "--out", str(ck),
                 "--overwrite"]) == 0
    fresh = tmp_path / "fresh"
    assert main([*base, "--hessians", str(tmp_path / "H2"), "--out", str(fresh)]) == 0
    ids = torch.randint(0, len(tokenizer), (2, 16))
    assert torch.equal(_logits(ck, ids), _logits(fresh, ids))


def test_a_killed_yaqa_a_run_does_not_resume_into_yaqa_b(tmp_path, model_dir, files,
                                                         monkeypatch, capsys):
    calib, _ = files
    common = ["-q", "quantize", *_args(model_dir, calib), "--out", str(tmp_path / "ck")]
    _interrupt_after(monkeypatch, 8)
    assert main([*common, "--method", "yaqa-a", "--power-iters", "1"]) == 130
    monkeypatch.undo()
    assert main([*common, "--method", "yaqa-b"]) == 2
    err = _err(capsys)
    assert "recipe.hessian: stored 'A', now 'B'" in err and "--overwrite" in err


def test_stored_hessians_are_not_reused_for_other_calibration(tmp_path, model_dir, files,
                                                              capsys):
    calib, other = files
    ck = tmp_path / "ckX"
    assert main(["-q", "quantize", *_args(model_dir, calib), "--out", str(ck)]) == 0
    hdir = tmp_path / "ckX.hessians-B"
    # the same Hessian directory with other data: refused, naming the calibration
    assert main(["-q", "quantize", *_args(model_dir, other, n=6, ctx=16), "--hessians",
                 str(hdir), "--out", str(tmp_path / "ckY")]) == 2
    err = _err(capsys)
    assert "calibration: stored" in err and "--overwrite" in err
    assert main(["-q", "hessians", *_hargs(model_dir, other, n=6, ctx=16),
                 "--out", str(hdir)]) == 2
    assert "calibration: stored" in _err(capsys)
    # --overwrite reaches the Hessians: they are collected again from the new data
    assert main(["-q", "quantize", *_args(model_dir, other, n=6, ctx=16), "--out", str(ck),
                 "--overwrite"]) == 0
    meta = json.loads((hdir / "meta.json").read_text())
    assert meta["data"]["n_seqs"] == 6 and meta["data"]["ctx"] == [16]
    info = json.loads((ck / "yaqa.json").read_text())["info"]
    assert info["calibration"] == str(other) and info["n_calib"] == 6 and info["calib_ctx"] == 16
    capsys.readouterr()
    assert main(["hessians", *_hargs(model_dir, other, n=6, ctx=16), "--out", str(hdir)]) == 0
    assert "from 96 tokens (6 sequences of 16)" in capsys.readouterr().out


def test_an_inf_weight_is_refused_naming_the_layer_before_anything_is_written(
        tmp_path, tokenizer, files, capsys):
    calib, _ = files
    model = tiny_model("llama", vocab=len(tokenizer), layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "H"
    assert main(["-q", "hessians", *_hargs(tmp_path / "m", calib), "--out", str(out)]) == 2
    err = _err(capsys)
    assert "model.layers.1.mlp.up_proj.weight" in err and "non-finite" in err
    assert not any(out.glob("block_*")) if out.exists() else True
    assert main(["-q", "quantize", *_args(tmp_path / "m", calib), "--method", "rtn",
                 "--out", str(tmp_path / "ck")]) == 2
    assert "model.layers.1.mlp.up_proj.weight" in _err(capsys)


# -- tracebacks and data loss --------------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    else:
        path.write_bytes(os.urandom(300))


@pytest.mark.parametrize("how", ["truncate", "random"])
def test_damaged_files_give_one_line_errors_naming_the_file(tmp_path, model_dir, files, how,
                                                            monkeypatch, capsys):
    calib, _ = files
    common = ["-q", "quantize", *_args(model_dir, calib), "--method", "yaqa-b"]
    hdir = tmp_path / "H"
    # a finished Hessian block
    assert main([*common, "--hessians", str(hdir), "--out", str(tmp_path / "a")]) == 0
    _damage(hdir / "block_0001.safetensors", how)
    assert main([*common, "--hessians", str(hdir), "--out", str(tmp_path / "b")]) == 2
    assert "block_0001.safetensors" in _err(capsys)
    # a quantization resume block
    _interrupt_after(monkeypatch, 8)
    assert main([*common, "--method", "rtn", "--out", str(tmp_path / "c")]) == 130
    monkeypatch.undo()
    _damage(tmp_path / "c.work" / "block_0000.safetensors", how)
    assert main([*common, "--method", "rtn", "--out", str(tmp_path / "c")]) == 2
    assert "block_0000.safetensors" in _err(capsys)
    # the checkpoint itself, and its record
    _damage(tmp_path / "a" / "model.safetensors", how)
    with pytest.raises(yaqa.io.CheckpointError, match="model.safetensors"):
        yaqa.load(tmp_path / "a")
    # the model being quantized
    _damage(model_dir / "model.safetensors", how)
    assert main([*common, "--method", "rtn", "--out", str(tmp_path / "d")]) == 2
    assert "tiny/model.safetensors" in _err(capsys)


def test_damaged_progress_json_names_the_file(tmp_path, tokenizer):
    from yaqa import store
    from yaqa.hessians.storage import read_progress

    d = tmp_path / "state"
    d.mkdir()
    (d / "progress.json").write_text('{"pass": 1, "cursor": "\x01')
    with pytest.raises(store.StoreError, match="progress.json"):
        read_progress(d)


def test_out_that_is_a_file_fails_before_any_work(tmp_path, model_dir, files, capsys):
    calib, _ = files
    out = tmp_path / "out-file"
    out.write_text("keep me")
    assert main(["-q", "quantize", *_args(model_dir, calib), "--out", str(out)]) == 2
    assert "existing file" in _err(capsys)
    assert out.read_text() == "keep me"
    assert not (tmp_path / "out-file.hessians-B").exists()


def test_bad_group_size_fails_before_hessians_naming_the_layer(tmp_path, model_dir, files,
                                                               capsys):
    calib, _ = files
    args = _args(model_dir, calib)
    args[args.index("--group-size") + 1] = "48"
    assert main(["-q", "quantize", *args, "--out", str(tmp_path / "ck")]) == 2
    err = _err(capsys)
    assert "model.layers.0" in err and "48" in err
    assert not (tmp_path / "ck.hessians-B").exists()


def test_overwrite_keeps_the_old_checkpoint_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    from yaqa import store

    model = tiny_model("llama")
    yaqa.quantize(model, method="rtn", group_size=32, progress=False)
    out = tmp_path / "ck"
    yaqa.save_quantized(model, out)
    before = (out / "model.safetensors").read_bytes()
    real = os.replace
    calls = {"n": 0}

    def killed_after_first_rename(a, b):
        calls["n"] += 1
        if calls["n"] == 2:  # the old checkpoint was moved aside; the new one not yet in
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(store.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        yaqa.save_quantized(model, out, overwrite=True)
    monkeypatch.undo()
    # a kill would leave the old one aside under a dead pid: the next run puts it back
    aside = next(tmp_path.glob(".ck.yaqa-old-*"))
    dead = aside.with_name(aside.name.replace(f"-{os.getpid()}-", "-999999999-"))
    aside.rename(dead)
    store.clean_stale_temps(out)
    assert (out / "model.safetensors").read_bytes() == before
    yaqa.save_quantized(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_save_killed_midway_leaves_a_temp_dir_that_the_next_save_removes(tmp_path):
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import yaqa, yaqa.io.checkpoint as ck
from tiny_models import tiny_model
m = tiny_model("llama")
yaqa.quantize(m, method="rtn", group_size=32, progress=False)
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
ck.save_file = die  # the tensor writer save_quantized calls
yaqa.save_quantized(m, {str(tmp_path / "ck")!r})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck")]
    m = tiny_model("llama")
    yaqa.quantize(m, method="rtn", group_size=32, progress=False)
    yaqa.save_quantized(m, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# -- smaller defects ----------------------------------------------------------------------------

def test_a_resumed_run_reports_every_layer(tmp_path, model_dir, files, monkeypatch, capsys):
    calib, _ = files
    common = ["quantize", *_args(model_dir, calib), "--method", "rtn", "--out",
              str(tmp_path / "ck")]
    _interrupt_after(monkeypatch, 8)
    assert main(["-q", *common]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["-q", *common]) == 0
    assert "21 layers (1 blocks resumed)" in capsys.readouterr().out
    report = json.loads((tmp_path / "ck" / "yaqa.json").read_text())["info"]["report"]
    assert len(report["layers"]) == 21 and report["resumed_blocks"] == 1


def test_an_encoder_model_is_rejected(tmp_path, tokenizer, capsys):
    import transformers

    cfg = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    assert main(["-q", "quantize", "--model", str(tmp_path / "bert"), "--device", "cpu",
                 "--method", "rtn", "--out", str(tmp_path / "ck")]) == 2
    assert "not a causal" in _err(capsys)


def test_hessians_are_never_written_into_a_model_directory(tmp_path, model_dir, files, capsys):
    calib, _ = files
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(["-q", "quantize", *_args(model_dir, calib), "--hessians", str(model_dir),
                 "--out", str(tmp_path / "ck")]) == 2
    assert "not a yaqa Hessian directory" in _err(capsys)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_gptq_collects_only_the_forward_input_hessian(tmp_path, model_dir, files):
    calib, _ = files
    assert main(["-q", "quantize", *_args(model_dir, calib), "--method", "GPTQ",
                 "--out", str(tmp_path / "ck")]) == 0
    meta = json.loads((tmp_path / "ck.hessians-hx" / "meta.json").read_text())
    assert meta["passes"] == ["hx"]
    hs = yaqa.load_hessians(tmp_path / "ck.hessians-hx")
    assert all(h.H_out is None and h.H_x is not None for h in hs.values())
    info = json.loads((tmp_path / "ck" / "yaqa.json").read_text())["info"]
    assert info["method"] == "ldlq" and info["recipe"]["rounding"] == "ldlq"


def test_run_power_iters_reaches_sketch_b(tmp_path, model_dir, files):
    calib, _ = files
    out = tmp_path / "run"
    assert main(["-q", "run", *_args(model_dir, calib), "--methods", "yaqa-b",
                 "--power-iters", "2", "--eval-data", str(calib), "--n-eval", "1",
                 "--eval-ctx", "32", "--no-save", "--out", str(out)]) == 0
    (hdir,) = out.glob("hessians-*")
    meta = json.loads((hdir / "meta.json").read_text())
    assert meta["sketch"] == "B" and meta["power_iters"] == 2


def test_library_and_cli_share_one_set_of_defaults():
    import inspect

    from yaqa.models import load_model
    from yaqa.recipe import get_recipe

    q = build_parser().parse_args(["quantize", "--out", "x"])
    sig = inspect.signature(yaqa.quantize).parameters
    r = get_recipe("yaqa-b")
    assert sig["group_size"].default == q.group_size == r.group_size
    assert sig["incoherence"].default == q.incoherence == r.incoherence
    assert inspect.signature(load_model).parameters["dtype"].default == q.dtype
    assert f"int{q.bits}" == r.quantizer


def test_half_written_files_of_killed_runs_are_removed(tmp_path, model_dir, files):
    calib, _ = files
    hdir, work = tmp_path / "H", tmp_path / "ck.work"
    for d in (hdir, work):
        d.mkdir()
        (d / ".block_0000.safetensors.tmp-999999999").write_bytes(b"half")
    (work / f".unrelated.tmp-{os.getpid()}").write_bytes(b"ours, still running")
    m, tok = yaqa.load_model(str(model_dir))
    ids = torch.randint(0, len(tok), (2, 16))
    yaqa.collect_hessians(m, ids, out_dir=hdir, progress=False)
    yaqa.quantize(m, method="rtn", group_size=32, work_dir=work, progress=False)
    for d in (hdir, work):
        assert ".block_0000.safetensors.tmp-999999999" not in {p.name for p in d.iterdir()}
    assert (work / f".unrelated.tmp-{os.getpid()}").exists()
