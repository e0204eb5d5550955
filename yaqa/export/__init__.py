"""Export yaqa checkpoints to formats that serving engines read as they are."""

from __future__ import annotations

from .compressed_tensors import ExportError, ExportReport, LayerCodes, export_compressed_tensors, layer_codes

__all__ = ["ExportError", "ExportReport", "LayerCodes", "export_compressed_tensors", "layer_codes"]
