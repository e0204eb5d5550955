"""transformers integration: ``AutoModelForCausalLM.from_pretrained(yaqa_checkpoint)`` after ``import yaqa``.

A format-v2 checkpoint's ``config.json`` carries::

    "quantization_config": {"quant_method": "yaqa", "format_version": 2,
                            "modules": {"model.layers.0.self_attn.q_proj": {...}, ...}}

``import yaqa`` registers :class:`YaqaConfig` and :class:`YaqaHfQuantizer` for ``"yaqa"``.  While
transformers builds the model on the meta device, the quantizer swaps each listed linear for an
empty :class:`~yaqa.nn.QuantizedLinear` whose buffers carry the checkpoint's tensor names
(``qweight``, ``grid_*``, ``tf_*``), so the loader fills them directly: no weight conversion,
and the packed tensors stay packed on the device.  ``save_pretrained`` writes the same layout back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

QUANT_METHOD = "yaqa"


def _register() -> None:
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:  # re-import (importlib.reload, tests)
        return

    @register_quantization_config(QUANT_METHOD)
    class YaqaConfig(QuantizationConfigMixin):
        """``quantization_config`` of a yaqa checkpoint: which linears are quantized, and how."""

        def __init__(self, modules: dict[str, dict] | None = None, format_version: int = 2,
                     dense_cache: bool = False, embeddings: dict | None = None,
                     **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.format_version = int(format_version)
            self.modules = dict(modules or {})
            # Int8 input embedding / LM head (format v3): {"format": "int8", "modules": {...}}
            self.embeddings = embeddings
            # Opt-in dense weights (fast CPU evaluation, unquantized memory); never saved as True
            # by yaqa itself.
            self.dense_cache = bool(dense_cache)
            for k, v in kwargs.items():
                if k != "quant_method":
                    setattr(self, k, v)

    @register_quantizer(QUANT_METHOD)
    class YaqaHfQuantizer(HfQuantizer):
        """Loads yaqa checkpoints: packed int-k (or any yaqa format) linears, kept packed."""

        requires_calibration = True  # only pre-quantized checkpoints; quantize with yaqa itself

        def validate_environment(self, *args, **kwargs) -> None:
            from .io.checkpoint import FORMAT_VERSION, CheckpointError

            v = self.quantization_config.format_version
            if v > FORMAT_VERSION:
                raise CheckpointError(f"checkpoint format v{v} is newer than this yaqa reads "
                                      f"(v{FORMAT_VERSION}); upgrade yaqa")
            if not self.quantization_config.modules:
                raise CheckpointError("quantization_config lists no quantized modules")

        def _process_model_before_weight_loading(self, model, **kwargs) -> None:
            replace_linears(model, self.quantization_config.modules,
                            dense_cache=self.quantization_config.dense_cache)
            specs = _int8_specs(self.quantization_config)
            if specs:
                from .nn.int8 import build_int8_modules

                build_int8_modules(model, specs)

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .nn import QuantizedLinear

            specs = _int8_specs(self.quantization_config)
            if specs:
                from .nn.int8 import check_tied

                check_tied(model, specs)

            for m in model.modules():
                if isinstance(m, QuantizedLinear):
                    m.materialize_hadamard()
                    m.clear_cache()
            return model

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    globals().update(YaqaConfig=YaqaConfig, YaqaHfQuantizer=YaqaHfQuantizer)


def _int8_specs(config) -> dict[str, dict]:
    emb = getattr(config, "embeddings", None) or {}
    if emb and emb.get("format") != "int8":
        from .io.checkpoint import CheckpointError

        raise CheckpointError(f"unknown embeddings format {emb.get('format')!r} in "
                              "quantization_config; upgrade yaqa")
    return dict(emb.get("modules") or {})


def replace_linears(model: torch.nn.Module, modules: dict[str, dict], *,
                    dense_cache: bool = False) -> int:
    """Swap the named linears of ``model`` for empty QuantizedLinear modules (on the meta device).

    ``modules`` maps names to the specs a checkpoint records (``in_features``, ``out_features``,
    ``bias``, ``incoherence``, ``quantizer``).
    """
    from .io.checkpoint import CheckpointError
    from .nn import QuantizedLinear
    from .quantizers import quantizer_from_config

    dtype = torch.get_default_dtype()
    for name, spec in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"checkpoint quantizes {name!r}, which this model lacks") from e
        old_w = getattr(old, "weight", None)
        if old_w is not None and tuple(old_w.shape) != (spec["out_features"], spec["in_features"]):
            raise CheckpointError(f"{name}: checkpoint shape {spec['out_features']}x"
                                  f"{spec['in_features']} != model's {tuple(old_w.shape)}")
        if old_w is not None and old_w.is_floating_point():
            dtype = old_w.dtype
        q = quantizer_from_config(spec["quantizer"])
        model.set_submodule(name, QuantizedLinear(
            spec["in_features"], spec["out_features"], q, bias=spec["bias"],
            incoherence=spec["incoherence"], dtype=dtype, device="meta", dense_cache=dense_cache))
    return len(modules)


try:
    _register()
except ImportError as e:  # a transformers without the quantizer registry (4.x before 4.47)
    log.debug("yaqa: transformers integration unavailable: %s", e)
