"""yaqa: quantize Hugging Face language models with YAQA (model-preserving adaptive rounding)."""

from __future__ import annotations

__version__ = "0.1.0"
