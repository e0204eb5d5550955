"""End to end on a tiny random model: collect -> quantize (every method) -> save -> load -> eval,
through the Python API and through the ``yaqa`` command."""

import copy
import json

import pytest
import torch

import yaqa
from yaqa.cli import main
from yaqa.data import calibration_windows, eval_windows

from tiny_models import tiny_model, tiny_tokenizer

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom. "
        "A quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n\n") * 40


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(TEXT)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer), hidden=64, intermediate=128)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_every_method_collects_quantizes_saves_and_reloads_exactly(tmp_path, tokenizer,
                                                                   text_file):
    ref = tiny_model("llama", vocab=len(tokenizer))
    calib = calibration_windows(tokenizer, text_file, n=6, ctx=32, seed=0, progress=False)
    ev = eval_windows(tokenizer, text_file, ctx=32, n=3)
    hs = {s: yaqa.collect_hessians(ref, calib, sketch=s, power_iters=2 if s == "A" else 1,
                                   batch_size=2, progress=False) for s in ("A", "B")}
    kls = {}
    for method, sketch in (("rtn", None), ("ldlq", "B"), ("yaqa", "A"), ("yaqa", "B")):
        q = copy.deepcopy(ref)
        yaqa.quantize(q, hs.get(sketch), method=method, quantizer="int3", group_size=32,
                      incoherence=True, progress=False)
        saved = yaqa.save_quantized(q, tmp_path / f"{method}-{sketch}",
                                    info={"method": method, "sketch": sketch})
        loaded = yaqa.load(saved.path)
        with torch.no_grad():
            assert torch.equal(q(ev).logits, loaded(ev).logits)
        kls[(method, sketch)] = yaqa.evaluate.kl_divergence(ref, loaded, ev, progress=False)
    assert all(0 < k < 10 for k in kls.values())


def test_cli_run_hessians_quantize_and_eval_on_a_local_checkpoint(tmp_path, model_dir,
                                                                  text_file, capsys):
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--device", "cpu"]
    data = ["--calib", str(text_file), "--n-calib", "4", "--ctx", "32"]
    rc = main(["-q", "run", *common, *data, "--methods", "rtn,ldlq,yaqa-a,yaqa-b",
               "--bits", "4,3", "--group-size", "32", "--eval-data", str(text_file),
               "--n-eval", "2", "--eval-ctx", "32", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "yaqa-b" in table and "original" in table
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["original"] + ["rtn", "ldlq", "yaqa-a", "yaqa-b"] * 2
    assert all(r["kl"] > 0 for r in rows[1:])

    hdir = tmp_path / "hs"
    assert main(["-q", "hessians", *common, *data, "--sketch", "B", "--n-seqs", "4",
                 "--out", str(hdir)]) == 0
    ckpt = tmp_path / "ckpt"
    assert main(["-q", "quantize", *common, *data, "--method", "yaqa-b", "--bits", "4",
                 "--group-size", "32", "--hessians", str(hdir), "--out", str(ckpt)]) == 0
    record = json.loads((ckpt / "yaqa.json").read_text())
    assert record["info"]["method"] == "yaqa-b" and record["info"]["sketch"] == "B"
    capsys.readouterr()
    assert main(["-q", "eval", *common, str(ckpt), "--eval-data", str(text_file),
                 "--n-eval", "2", "--eval-ctx", "32"]) == 0
    assert "yaqa-b" in capsys.readouterr().out


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "yaqa: error:" in err and "Traceback" not in err
    assert main(["eval", "--model", str(tmp_path / "nope"), str(tmp_path)]) == 2


def test_cli_tile_widths_reach_the_recipes_and_bad_ones_fail_before_loading(tmp_path, capsys):
    from yaqa.cli import build_parser, recipe_from_args
    from yaqa.pipeline import RunConfig

    args = build_parser().parse_args(["quantize", "--method", "yaqa-b", "--block-size", "4",
                                      "--out", "x"])
    assert recipe_from_args(args, args.method, args.bits).block_size == 4
    args = build_parser().parse_args(["run", "--block-size", "8", "--ldlq-block-size", "1"])
    assert (args.block_size, args.ldlq_block_size) == (8, 1)
    cfg = RunConfig(block_size=args.block_size, ldlq_block_size=args.ldlq_block_size)
    sizes = {m: cfg.recipe(m, 4).block_size for m in ("rtn", "ldlq", "yaqa-b")}
    assert sizes == {"rtn": 8, "ldlq": 1, "yaqa-b": 8}
    assert build_parser().parse_args(["run"]).block_size == 16
    for flag in ("--block-size", "--ldlq-block-size"):
        assert main(["run", flag, "0", "--model", str(tmp_path / "no-such-model")]) == 2
        err = capsys.readouterr().err
        assert "block_size must be >= 1" in err and "no-such-model" not in err


@pytest.mark.parametrize("sub", ["hessians", "quantize", "eval", "run"])
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0 and "usage: yaqa" in capsys.readouterr().out


def test_cli_hessians_under_torchrun_with_two_gloo_ranks_equals_one_process(tmp_path, model_dir,
                                                                          text_file):
    import os
    import subprocess
    import sys

    args = ["-m", "yaqa.cli", "-q", "hessians", "--model", str(model_dir), "--device", "cpu",
            "--calib", str(text_file), "--n-seqs", "8", "--ctx", "32", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "h1")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", *args, "--out", str(tmp_path / "h2")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("Sketch B from") == 1  # rank 0 reports, once
    a, b = yaqa.load_hessians(tmp_path / "h1"), yaqa.load_hessians(tmp_path / "h2")
    assert a.keys() == b.keys()
    for k in a:
        for f in ("H_in", "H_out", "H_x"):
            x, y = getattr(a[k], f), getattr(b[k], f)
            assert ((x - y).norm() / x.norm()).item() < 1e-6


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_yaqa_pipeline_works_for_every_supported_family(tmp_path, family):
    from tiny_models import FAMILY_CONFIGS

    assert family in FAMILY_CONFIGS
    ref = tiny_model(family)
    tokens = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    hs = yaqa.collect_hessians(ref, tokens, sketch="B", batch_size=2, progress=False)
    q = copy.deepcopy(ref)
    report = yaqa.quantize(q, hs, method="yaqa", quantizer="int4", group_size=32,
                           incoherence=True, progress=False)
    assert all(layer.proxy_loss is not None and layer.proxy_loss >= 0 for layer in report.layers)
    loaded = yaqa.load(yaqa.save_quantized(q, tmp_path / family).path)
    with torch.no_grad():
        assert torch.equal(q(tokens).logits, loaded(tokens).logits)
    assert 0 < yaqa.evaluate.kl_divergence(ref, loaded, tokens, progress=False) < 1


def test_cli_run_takes_quantizer_names(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "out"
    rc = main(["-q", "run", "--model", str(model_dir), "--device", "cpu", "--calib",
               str(text_file), "--n-calib", "4", "--ctx", "32", "--methods", "rtn,ldlq",
               "--quantizer", "nvfp4,mxfp4", "--eval-data", str(text_file), "--n-eval", "2",
               "--eval-ctx", "32", "--out", str(out)])
    assert rc == 0
    assert "nvfp4" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["quantizer"]) for r in rows[1:]] == \
        [("rtn", "nvfp4"), ("ldlq", "nvfp4"), ("rtn", "mxfp4"), ("ldlq", "mxfp4")]
    assert all(r["kl"] > 0 and r["bits"] == 4 for r in rows[1:])


@pytest.mark.parametrize("sub", ["quantize", "run"])
def test_cli_rejects_an_unknown_quantizer_before_loading_anything(sub, tmp_path, capsys):
    assert main([sub, "--model", str(tmp_path / "no-such-model"), "--quantizer", "fp3",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown quantizer 'fp3'" in err and "Traceback" not in err


def _run_config(model_dir, text_file, out, evaluation):
    from yaqa.pipeline import RunConfig

    return RunConfig(model=str(model_dir), methods=("rtn", "ldlq", "yaqa-b"), device="cpu",
                     calib=str(text_file), n_calib=4, calib_ctx=32, eval_data=str(text_file),
                     n_eval=3, eval_ctx=32, batch_size=2, out_dir=str(out), progress=False,
                     report=False, evaluation=evaluation)


def test_run_evaluates_jointly_with_the_numbers_of_one_method_at_a_time(tmp_path, model_dir,
                                                                        text_file):
    from yaqa.pipeline import run_pipeline

    per = run_pipeline(_run_config(model_dir, text_file, tmp_path / "per", "per-method"))
    joint = run_pipeline(_run_config(model_dir, text_file, tmp_path / "joint", "joint"))
    assert [r.method for r in joint] == ["original", "rtn", "ldlq", "yaqa-b"]
    for a, b in zip(per, joint):
        assert (a.method, a.kl, a.ppl, a.top1, a.bpw, a.size_mb) == \
            (b.method, b.kl, b.ppl, b.top1, b.bpw, b.size_mb)
    assert all(r.kl > 0 and r.seconds > 0 for r in joint[1:])


def test_run_chooses_joint_evaluation_only_when_every_model_fits(monkeypatch, tmp_path,
                                                                 model_dir, text_file):
    import yaqa.plan
    from yaqa.pipeline import choose_evaluation
    from yaqa.plan import ModelShape, joint_evaluation_bytes

    model = tiny_model("llama", vocab=96)
    cfg = _run_config(model_dir, text_file, tmp_path, "auto")
    need = joint_evaluation_bytes(ModelShape.from_model(model), 3, cfg.batch_size, 32)
    # the reference and 3 copies (dense cache and codes) and one batch's logits
    assert need > 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(yaqa.plan, "device_budget", lambda device: need * 2)
    assert choose_evaluation(cfg, model, 32, 3) == "joint"
    assert choose_evaluation(cfg, model, 32, 1) == "per-method"  # nothing to share
    monkeypatch.setattr(yaqa.plan, "device_budget", lambda device: need)  # no 20% margin
    assert choose_evaluation(cfg, model, 32, 3) == "per-method"
    cfg.evaluation = "joint"
    assert choose_evaluation(cfg, model, 32, 3) == "joint"  # an explicit choice stands
    cfg.evaluation = "together"
    with pytest.raises(ValueError, match="auto, joint or per-method"):
        choose_evaluation(cfg, model, 32, 3)
