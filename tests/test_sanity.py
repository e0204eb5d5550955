"""Sanity checks on the reference: the pure decisions, the measurements on tiny models, and the
warning / --strict one-line error through the CLI."""

import logging

import pytest
import torch
from torch import nn

from yaqa import sanity
from yaqa.cli import main
from yaqa.data import eval_windows
from yaqa.sanity import Finding, SanityError

from tiny_models import tiny_model, tiny_tokenizer

TEXT = ("The committee met on a grey Tuesday morning to discuss the harbour, whose old stone walls "
        "had begun to crumble after decades of winter storms. Engineers proposed three repairs; "
        "the mayor preferred the cheapest, while fishermen argued for rebuilding the northern "
        "breakwater before the season started.\n\n") * 30


@pytest.fixture(scope="module")
def good_tok():
    return tiny_tokenizer(TEXT, vocab_size=600)


@pytest.fixture(scope="module")
def char_tok():
    # The byte-level alphabet (256) plus <s> and no room for merges: one token per character.
    return tiny_tokenizer(TEXT, vocab_size=257)


# -- the decisions --------------------------------------------------------------------------


def test_tokens_per_char_flags_character_level_tokenizers_only():
    assert sanity.tokens_per_char_finding(230, 1000) is None  # SmolLM2 on WikiText-2: 0.23
    f = sanity.tokens_per_char_finding(990, 1000)
    assert f.check == "tokenizer" and "0.99 tokens per character" in f.message
    assert sanity.tokens_per_char_finding(0, 0) is None


def test_perplexity_is_absurd_above_a_couple_of_thousand_or_near_uniform():
    assert sanity.perplexity_finding(29.5, 49152) is None
    assert sanity.perplexity_finding(37035.0, 49152).check == "perplexity"
    assert sanity.perplexity_finding(2500.0, 200000) is not None
    assert sanity.perplexity_finding(3.5, 256) is None  # a byte-level model
    assert sanity.perplexity_finding(120.0, 128) is not None  # near uniform guessing
    assert sanity.perplexity_finding(float("nan"), 49152) is not None
    assert sanity.perplexity_finding(float("inf"), 49152) is not None


def test_bos_decision_follows_the_measured_gap_and_family_knowledge():
    assert sanity.bos_finding(3.75, 3.81, windows_have_bos=False) is None  # SmolLM2: 0.06
    f = sanity.bos_finding(2.0, 6.0, windows_have_bos=False)
    assert f.check == "bos" and "lack it" in f.message
    f = sanity.bos_finding(6.0, 2.0, windows_have_bos=True)
    assert f is not None and "without" in f.message
    assert sanity.bos_finding(2.0, 6.0, windows_have_bos=True) is None
    assert sanity.bos_finding(None, None, False, family_needs_bos=True) is not None
    assert sanity.bos_finding(None, None, True, family_needs_bos=True) is None
    f = sanity.bos_finding(None, None, False, family_needs_bos=True, bos_known=False)
    assert "names one" in f.message


def test_vocab_mismatch_beyond_padding():
    assert sanity.vocab_finding(49152, 49152) is None
    assert sanity.vocab_finding(151665, 152064) is None  # Qwen2.5 pads to a multiple of 128
    assert sanity.vocab_finding(32011, 32064) is None  # Phi-3
    assert "only 128 rows" in sanity.vocab_finding(300, 128).message
    assert "does not belong" in sanity.vocab_finding(100, 49152).message


def test_chat_template_needed_by_instruction_tuned_models():
    assert sanity.chat_finding("HuggingFaceTB/SmolLM2-135M-Instruct", "{{ x }}") is None
    assert sanity.chat_finding("HuggingFaceTB/SmolLM2-135M", None) is None
    assert "no chat template" in sanity.chat_finding("Qwen/Qwen2.5-0.5B-Instruct", None).message
    assert "no chat template" in sanity.chat_finding("google/gemma-2-2b-it", None).message
    assert "<|im_start|>" in sanity.chat_finding("m", "{{x}}", ["<|im_start|>"]).message
    assert "no EOS" in sanity.chat_finding("m", None, has_eos=False).message


def test_template_markers_must_be_single_tokens():
    tok = tiny_tokenizer(TEXT, vocab_size=600)
    template = "{{ '<|im_start|>' + m['content'] + '<|im_end|>' }}"
    assert sanity.missing_template_markers(tok, template) == ["<|im_end|>", "<|im_start|>"]
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert sanity.missing_template_markers(tok, template) == []


def test_strict_raises_one_line_with_every_finding_and_otherwise_warns(caplog):
    found = [Finding("tokenizer", "a"), None, Finding("vocab", "b")]
    with pytest.raises(SanityError) as e:
        sanity.enforce(found, strict=True)
    msg = str(e.value)
    assert "\n" not in msg and "tokenizer: a" in msg and "vocab: b" in msg
    with caplog.at_level(logging.WARNING, logger="yaqa.sanity"):
        assert len(sanity.enforce(found)) == 2
    assert sum("SANITY CHECK FAILED" in r.message for r in caplog.records) == 2
    assert sanity.enforce([None], strict=True) == []


# -- the measurements -------------------------------------------------------------------------


def test_character_level_tokenizer_is_detected_on_real_text(good_tok, char_tok):
    n_tok, n_chars = sanity.measure_tokens_per_char(char_tok, TEXT)
    assert n_tok / n_chars > 0.9
    assert sanity.tokens_per_char_finding(n_tok, n_chars) is not None
    n_tok, n_chars = sanity.measure_tokens_per_char(good_tok, TEXT)
    assert sanity.tokens_per_char_finding(n_tok, n_chars) is None
    # Chinese legitimately approaches one token per character: not judged.
    assert sanity.measure_tokens_per_char(char_tok, "这是一个测试句子。" * 100) is None


class PredictsOnlyAfterBos(nn.Module):
    """Next token = token + 1 (mod V), predicted confidently only in sequences that start with
    BOS; without it, uniform: a model that was trained with BOS and breaks without it."""

    def __init__(self, vocab: int = 50, bos: int = 0):
        super().__init__()
        self.vocab, self.bos = vocab, bos
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        starts = input_ids[:, 0] == self.bos
        nxt = (input_ids + 1) % self.vocab
        logits[starts] = 10.0 * nn.functional.one_hot(nxt[starts], self.vocab).float()
        return type("Out", (), {"logits": logits})()


def test_bos_effect_is_measured_on_the_same_targets():
    model = PredictsOnlyAfterBos()
    text = torch.arange(1, 33).repeat(3, 1) % 49 + 1  # no BOS (0) inside
    with_bos, without = sanity.measure_bos_effect(model, text, bos_id=0)
    assert without == pytest.approx(torch.log(torch.tensor(50.0)).item(), rel=1e-5)
    assert with_bos < 0.01
    assert sanity.bos_finding(with_bos, without, windows_have_bos=False) is not None
    # Windows that already start with BOS measure the same gap (the BOS is stripped first).
    bos_first = torch.cat([torch.zeros(3, 1, dtype=torch.long), text], 1)
    assert sanity.measure_bos_effect(model, bos_first, bos_id=0) == (with_bos, without)


def test_gemma_without_bos_is_flagged_and_with_bos_is_not(good_tok):
    model = tiny_model("gemma2", vocab=len(good_tok))
    lacking = eval_windows(good_tok, torch.tensor(good_tok.encode(TEXT)), ctx=32, n=2)
    f = sanity.bos_check(model, good_tok, lacking)
    assert f is not None and f.check == "bos" and "Gemma" in f.message
    having = eval_windows(good_tok, torch.tensor(good_tok.encode(TEXT)), ctx=32, n=2,
                          add_bos=True)
    assert sanity.bos_check(model, good_tok, having) is None
    assert sanity.bos_check(tiny_model("llama", vocab=len(good_tok)), good_tok, lacking) is None


# -- through the command line -----------------------------------------------------------------


def _model_dir(tmp_path, tok, family="llama"):
    path = tmp_path / f"{family}-{len(tok)}"
    tiny_model(family, vocab=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _eval(path, corpus, *extra):
    return main(["-q", "eval", "--model", str(path), "--device", "cpu", "--eval-data",
                 str(corpus), "--n-eval", "2", "--eval-ctx", "32", *extra])


def _error_line(stderr: str) -> str:
    """The one line the error takes (progress bars of model loading may precede it)."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if "yaqa: error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("yaqa: error: ")
    assert stderr.rstrip().endswith(lines[0])  # nothing after it: the message is that line
    return lines[0]


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def test_cli_warns_about_a_character_level_tokenizer_and_strict_makes_it_one_line(
        tmp_path, corpus, char_tok, good_tok, caplog, capsys):
    broken = _model_dir(tmp_path, char_tok)
    with caplog.at_level(logging.WARNING, logger="yaqa"):
        assert _eval(broken, corpus) == 0
    assert any("SANITY CHECK FAILED [tokenizer]" in r.message for r in caplog.records)
    capsys.readouterr()
    assert _eval(broken, corpus, "--strict") == 2
    err = _error_line(capsys.readouterr().err)
    assert "tokenizer:" in err
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="yaqa"):
        assert _eval(_model_dir(tmp_path, good_tok), corpus) == 0
    assert not any("[tokenizer]" in r.message for r in caplog.records)


def test_cli_warns_about_a_model_without_its_bos_and_strict_makes_it_one_line(
        tmp_path, corpus, good_tok, caplog, capsys):
    gemma = _model_dir(tmp_path, good_tok, "gemma2")
    with caplog.at_level(logging.WARNING, logger="yaqa"):
        assert _eval(gemma, corpus) == 0
    assert any("SANITY CHECK FAILED [bos]" in r.message for r in caplog.records)
    capsys.readouterr()
    assert _eval(gemma, corpus, "--strict") == 2
    err = _error_line(capsys.readouterr().err)
    assert "bos:" in err
