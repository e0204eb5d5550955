"""``yaqa generate``: talk to a quantized checkpoint, with tokens/s and memory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float
    tokens_per_s: float
    linear_mb: float  # bytes held by the quantized linears (packed)
    device_peak_mb: float | None  # CUDA peak allocation, None on CPU


def generate(path: str | Path, prompt: str, *, max_new_tokens: int = 64,
             device: str = "auto", chat: bool = False, model=None, tokenizer=None) -> Generation:
    """Greedy continuation of ``prompt`` by the checkpoint at ``path`` (static cache on CUDA)."""
    from transformers import AutoTokenizer

    from .io import load
    from .nn import QuantizedLinear

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else ("cpu" if device == "auto" else device))
    if model is None:
        model = load(path, device=dev)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} has no tokenizer (save_quantized(..., tokenizer=tok) "
                             f"writes one): {e}") from e
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(dev)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if dev.type == "cuda":
        kwargs["cache_implementation"] = "static"
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t
    new = out.shape[1] - ids.shape[1]
    linear = sum(x.numel() * x.element_size() for m in model.modules()
                 if isinstance(m, QuantizedLinear)
                 for x in list(m.parameters()) + list(m.buffers()))
    peak = torch.cuda.max_memory_allocated(dev) / 1e6 if dev.type == "cuda" else None
    return Generation(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), new,
                      seconds, new / max(seconds, 1e-9), linear / 1e6, peak)
