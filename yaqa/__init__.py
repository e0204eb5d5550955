"""yaqa: quantize Hugging Face language models with YAQA (model-preserving adaptive rounding)."""

from __future__ import annotations

__version__ = "0.1.0"
from .hessians import collect_hessians, load_hessians  # noqa: E402
