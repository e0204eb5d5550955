"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}),
}


def tiny_model(family: str = "llama", *, hidden: int = 64, intermediate: int = 128,
               layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    cfg_name, model_name, extra = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, tie_word_embeddings=False, **extra,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(dtype)
    model.eval()
    return model


def tiny_tokenizer(text: str, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``text`` here (no downloads), BOS/EOS ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


class Interrupting:
    """Re-iterable micro-batches of ``ids`` (``bs`` rows each) that raise KeyboardInterrupt once,
    after ``stop_after`` micro-batches in total over all iterations (-1: never)."""

    def __init__(self, ids: torch.Tensor, bs: int, stop_after: int):
        self.parts, self.left = list(ids.split(bs)), stop_after

    def __iter__(self):
        for p in self.parts:
            if self.left == 0:
                self.left = -1
                raise KeyboardInterrupt("simulated interruption")
            self.left -= 1
            yield p
