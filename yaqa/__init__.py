"""yaqa: quantize Hugging Face language models with YAQA (model-preserving adaptive rounding).

    import yaqa
    hs = yaqa.collect_hessians(model, batches, sketch="B")
    yaqa.quantize(model, hs, method="yaqa", quantizer="int4", group_size=128)
    yaqa.save_quantized(model, "out/"); model = yaqa.load("out/")
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import evaluate, hf, rounding  # noqa: E402  (hf registers quant_method "yaqa")
from .hessians import collect_hessians, load_hessians  # noqa: E402
from .io import load, save_quantized  # noqa: E402
from .models import load_model  # noqa: E402
from .quantize_model import quantize  # noqa: E402
from .recipe import Recipe, get_recipe, register_recipe  # noqa: E402

__all__ = ["Recipe", "collect_hessians", "evaluate", "get_recipe", "load", "load_hessians",
           "load_model", "quantize", "register_recipe",
           "rounding", "save_quantized"]
