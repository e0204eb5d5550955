"""report.md: the table, the KL plot (and its clean absence without matplotlib), the worst
layers, time and memory per stage, the command and versions; written by ``yaqa run``."""

import json
import sys

import pytest

from yaqa.cli import main
from yaqa.pipeline import ResultRow
from yaqa.quantize_model import LayerReport
from yaqa.report import (PLOT_NAME, RunRecord, StageLog, markdown_table, top_layers,
                         write_report)

from tiny_models import tiny_model, tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows():
    tasks = {"t": {"task": "t", "metric": "acc_norm", "value": 0.5, "stderr": 0.1}}
    return [ResultRow("original", None, None, 10.0, 0.0, 20.0, 1.0, 0.0,
                      extra={"tasks": tasks}),
            ResultRow("rtn", 4, 64, 3.0, 0.4, 30.0, 0.8, 1.0, 4.5,
                      extra={"tasks": {"t": dict(tasks["t"], value=0.25)}}),
            ResultRow("rtn", 3, 64, 2.5, 1.5, 60.0, 0.6, 1.0, 3.5),
            ResultRow("yaqa-b", 4, 64, 3.0, 0.1, 22.0, 0.9, 2.0, 4.5)]


def record(**kw):
    layers = {"rtn-int4": [LayerReport(f"l{i}", (4, 4), float(i), None, None, 0.1,
                                       proxy_loss_relative=1.0 / (i + 1)) for i in range(12)]}
    return RunRecord(command="yaqa run --bits 4,3", seeds={"seed": 0}, layers=layers,
                     stages=[], **kw)


def test_table_holds_kl_ppl_and_task_scores_with_stderr():
    table = markdown_table(rows())
    lines = table.splitlines()
    assert "t acc_norm" in lines[0] and len(lines) == 2 + 4
    assert "0.5000 ± 0.1000" in lines[2] and "0.2500 ± 0.1000" in lines[3]
    assert lines[4].endswith("| - |")  # a row without task scores


def test_top_layers_ranks_by_relative_proxy_loss():
    layers = record().layers["rtn-int4"]
    top = top_layers(layers, 10)
    assert [x.name for x in top[:3]] == ["l0", "l1", "l2"] and len(top) == 10
    absolute = [{"name": "a", "proxy_loss": 1.0}, {"name": "b", "proxy_loss": 3.0}]
    assert [x["name"] for x in top_layers(absolute, 1)] == ["b"]


def test_report_and_plot_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = write_report(tmp_path, rows(), record())
    text = path.read_text()
    assert (tmp_path / PLOT_NAME).read_bytes().startswith(PNG_MAGIC)
    assert f"]({PLOT_NAME})" in text
    assert "| l0 | 4×4 | 1 | 0 |" in text and "| l9 |" in text and "| l10 |" not in text
    assert "yaqa run --bits 4,3" in text and "| torch |" in text


def test_report_is_complete_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    (tmp_path / PLOT_NAME).write_bytes(b"stale")
    text = write_report(tmp_path, rows(), record()).read_text()
    assert not (tmp_path / PLOT_NAME).exists()
    assert "Plot skipped: matplotlib is not installed" in text and PLOT_NAME not in text
    for section in ("## Results", "## Layers where quantization hurts most",
                    "## Time and peak memory per stage", "## Reproduce"):
        assert section in text
    assert "0.2500 ± 0.1000" in text


def test_stage_log_measures_time_and_peak_memory_per_stage():
    log = StageLog()
    with log.stage("big"):
        block = bytearray(300 * 2**20)
        block[::4096] = b"\x01" * len(block[::4096])  # touch every page
        del block
    with log.stage("small"):
        pass
    big, small = log.stages
    assert big.seconds >= 0 and big.peak_rss_mb >= 300
    if not small.rss_since_start:  # the kernel can reset the high-water mark (Linux)
        assert small.peak_rss_mb < big.peak_rss_mb - 200


def test_run_writes_report_with_tasks_next_to_results(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("matplotlib")
    from test_tasks import TASK, TEXT, write_task

    tok = tiny_tokenizer(TEXT)
    mdir = tmp_path / "m"
    tiny_model("llama", vocab=len(tok)).save_pretrained(mdir)
    tok.save_pretrained(mdir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    out = tmp_path / "out"
    argv = ["-q", "run", "--model", str(mdir), "--device", "cpu", "--calib", str(corpus),
            "--n-calib", "4", "--ctx", "32", "--methods", "rtn,ldlq", "--bits", "3",
            "--group-size", "32", "--eval-data", str(corpus), "--n-eval", "2", "--eval-ctx",
            "32", "--out", str(out), "--tasks", TASK, "--tasks-path",
            str(write_task(tmp_path / "tasks")), "--tasks-limit", "4", "--seed", "7"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert all(TASK in r["extra"]["tasks"] for r in results)
    text = (out / "report.md").read_text()
    assert (out / PLOT_NAME).read_bytes().startswith(PNG_MAGIC)
    for name in ("rtn-int3", "ldlq-int3"):
        assert f"### {name}" in text and f"| {name}: quantize, save |" in text
    assert text.count(" ± ") >= 3  # the original and two checkpoints
    assert "yaqa -q run --model" in text and "--seed 7" in text and "= 7" in text
    assert "| hessians: H_x |" in text and "| lm_eval |" in text
