"""Downstream tasks through lm-evaluation-harness, on a tiny multiple-choice task written here
(lm-eval local task files: a YAML config plus JSON data) and a tiny random model."""

import copy
import json
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

import yaqa  # noqa: E402
from yaqa.cli import main  # noqa: E402
from yaqa.tasks import TaskError, TaskSuite, parse_results, parse_task_list  # noqa: E402

from tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

TASK = "yaqa_tiny_arith"
PAIRS = [(1, 2), (3, 4), (5, 6), (2, 2), (7, 1), (4, 4), (9, 3), (6, 2)]
DOCS = [{"question": f"What is {a} plus {b}?",
         "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "answer": i % 3}
        for i, (a, b) in enumerate(PAIRS)]
TEXT = " ".join(f"Question: {d['question']}\nAnswer: {' '.join(d['choices'])}" for d in DOCS) * 8


def write_task(root, name=TASK, dataset_path="json", with_data=True):
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.json"
    data.write_text(json.dumps(DOCS))
    kwargs = f"dataset_kwargs:\n  data_files:\n    test: {data}\n" if with_data else ""
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: {dataset_path}\n{kwargs}test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: brier_score\n    higher_is_better: false\n")
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(TEXT)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab=len(tokenizer), hidden=64, intermediate=128)


@pytest.fixture(scope="module")
def suite(task_dir):
    return TaskSuite(TASK, include_path=task_dir, batch_size=4)


def own_accuracy(model, tok) -> tuple[float, float]:
    """acc and acc_norm computed here from the model's logits, the way lm-eval scores a
    multiple-choice doc: sum of the choice tokens' log-probabilities after the context (context
    and " choice" encoded together, then split), argmax; acc_norm divides by the choice's bytes."""
    seqs = []  # (token ids, context length) for every (doc, choice), scored in one batch
    for d in DOCS:
        ctx = f"Question: {d['question']}\nAnswer:"
        n_ctx = len(tok.encode(ctx))
        seqs += [(tok.encode(ctx + " " + c), n_ctx) for c in d["choices"]]
    width = max(len(ids) for ids, _ in seqs)
    # Right padding cannot change earlier positions of a causal model.
    batch = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in seqs])
    with torch.no_grad():
        lp = model(input_ids=batch).logits.float().log_softmax(-1)
    lls = [sum(lp[k, t - 1, ids[t]].item() for t in range(n_ctx, len(ids)))
           for k, (ids, n_ctx) in enumerate(seqs)]
    hits = hits_norm = 0
    for j, d in enumerate(DOCS):
        ll = lls[3 * j: 3 * j + 3]
        norm = [x / len((" " + c).encode()) for x, c in zip(ll, d["choices"])]
        hits += max(range(3), key=lambda i: ll[i]) == d["answer"]
        hits_norm += max(range(3), key=lambda i: norm[i]) == d["answer"]
    return hits / len(DOCS), hits_norm / len(DOCS)


def test_original_scores_identically_against_itself(suite, model, tokenizer):
    pad = tokenizer.pad_token
    first = suite.evaluate(model, tokenizer)
    again = suite.evaluate(copy.deepcopy(model), tokenizer)
    assert tokenizer.pad_token == pad  # lm-eval sets one on its tokenizer, not on ours
    assert set(first) == {TASK}
    assert first == again
    score = first[TASK]
    assert score.metric == "acc_norm" and score.n_samples == len(DOCS)
    assert 0 <= score.value <= 1 and score.stderr is not None and score.stderr >= 0
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "brier_score"} <= set(score.metrics)


def test_lm_eval_accuracy_equals_our_own_loglikelihood_scoring(suite, model, tokenizer):
    score = suite.evaluate(model, tokenizer)[TASK]
    acc, acc_norm = own_accuracy(model, tokenizer)
    assert score.metrics["acc"] == pytest.approx(acc)
    assert score.metrics["acc_norm"] == pytest.approx(acc_norm)


def test_quantized_checkpoint_is_scored_as_its_packed_layers(suite, model, tokenizer, tmp_path):
    q = copy.deepcopy(model)
    yaqa.quantize(q, None, method="rtn", quantizer="int2", group_size=32, progress=False)
    loaded = yaqa.load(yaqa.save_quantized(q, tmp_path / "q", tokenizer=tokenizer).path)
    assert any(type(m).__name__ == "QuantizedLinear" for m in loaded.modules())
    orig = suite.evaluate(model, tokenizer)[TASK]
    quant = suite.evaluate(loaded, tokenizer)[TASK]
    acc, acc_norm = own_accuracy(loaded, tokenizer)
    assert quant.metrics["acc"] == pytest.approx(acc)
    assert quant.metrics["acc_norm"] == pytest.approx(acc_norm)
    # brier_score is continuous in the choice probabilities: 2-bit weights must move it.
    assert quant.metrics["brier_score"] != pytest.approx(orig.metrics["brier_score"], abs=1e-9)


def test_cli_eval_puts_task_scores_with_stderr_in_the_table(tmp_path, task_dir, model, tokenizer,
                                                           capsys):
    mdir = tmp_path / "m"
    model.save_pretrained(mdir)
    tokenizer.save_pretrained(mdir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    q = copy.deepcopy(model)
    yaqa.quantize(q, None, method="rtn", quantizer="int4", group_size=32, progress=False)
    ckpt = yaqa.save_quantized(q, tmp_path / "ckpt", tokenizer=tokenizer,
                               info={"method": "rtn"}).path
    rc = main(["-q", "eval", "--model", str(mdir), "--device", "cpu", str(ckpt),
               "--eval-data", str(corpus), "--n-eval", "2", "--eval-ctx", "32",
               "--tasks", TASK, "--tasks-path", str(task_dir)])
    assert rc == 0
    table = capsys.readouterr().out
    assert f"{TASK} acc_norm" in table
    lines = [ln for ln in table.splitlines() if ln.startswith(("original", "rtn"))]
    assert len(lines) == 2 and all("±" in ln for ln in lines)


def test_task_list_parsing_keeps_order_and_drops_duplicates():
    assert parse_task_list("arc_easy, hellaswag,,arc_easy") == ("arc_easy", "hellaswag")
    assert parse_task_list(["piqa", "piqa"]) == ("piqa",)
    assert parse_task_list(None) == ()


def test_results_parsing_prefers_acc_norm_and_reads_stderr():
    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                             "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.2},
                       "w": {"acc,none": 0.7, "acc_stderr,none": "N/A"}},
           "n-samples": {"t": {"original": 10, "effective": 10}}}
    s = parse_results(out)
    assert (s["t"].metric, s["t"].value, s["t"].stderr, s["t"].n_samples) == \
        ("acc_norm", 0.6, 0.2, 10)
    assert (s["w"].metric, s["w"].value, s["w"].stderr) == ("acc", 0.7, None)


def test_unreachable_task_data_says_it_needs_the_network(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    d = write_task(tmp_path / "hub", name="yaqa_hub_task",
                   dataset_path="yaqa-tests/not-a-real-dataset", with_data=False)
    with pytest.raises(TaskError, match="needs the network") as e:
        TaskSuite("yaqa_hub_task", include_path=d)
    assert "\n" not in str(e.value) and "--tasks-path" in str(e.value)


def test_missing_task_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        TaskSuite(TASK, include_path=tmp_path / "nope")


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch, task_dir):
    monkeypatch.setitem(sys.modules, "lm_eval.evaluator", None)  # the import fails
    with pytest.raises(TaskError, match=r"pip install 'yaqa\[eval\]'"):
        TaskSuite(TASK, include_path=task_dir)


def test_unknown_task_names_are_reported_before_any_work(monkeypatch, task_dir):
    import yaqa.tasks

    real = yaqa.tasks._import_lm_eval

    def without_builtin_index():  # lm-eval's 15k built-in tasks take ~10 s to index
        evaluate, hflm, manager = real()
        return evaluate, hflm, lambda include_path=None, include_defaults=True: manager(
            include_path=include_path, include_defaults=False)

    monkeypatch.setattr(yaqa.tasks, "_import_lm_eval", without_builtin_index)
    with pytest.raises(TaskError, match="unknown task.*not_a_task") as e:
        TaskSuite([TASK, "not_a_task"], include_path=task_dir)
    assert str(e.value).startswith("unknown task(s) not_a_task:")  # the known one not listed
    assert "--tasks-path" in str(e.value)
