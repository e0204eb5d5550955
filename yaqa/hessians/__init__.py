"""Kronecker factors of the full-model KL Hessian (YAQA Sketch A / B) and the plain GPTQ Hessian.

    hs = yaqa.collect_hessians(model, token_ids, sketch="B")   # {linear name: LayerHessian}
    hs["model.layers.0.mlp.down_proj"].H_in, .H_out, .H_x

Pieces: ``accumulators`` (the per-layer math, pure tensors), ``labels`` (labels sampled from the
model), ``collect`` (hooks and the loop over the data), ``storage`` (files, resume),
``distributed`` (torch.distributed glue).
"""

from .accumulators import LayerAccumulator
from .collect import HessianCollector, collect_hessians, pass_kinds, run_collection
from .distributed import maybe_init_distributed
from .labels import sample_labels, sampled_label_grad
from .storage import HessianMetadataError, LayerHessian, load_hessians, model_fingerprint

__all__ = ["HessianCollector", "HessianMetadataError", "LayerAccumulator", "LayerHessian",
           "collect_hessians", "load_hessians", "maybe_init_distributed", "model_fingerprint",
           "pass_kinds", "run_collection", "sample_labels", "sampled_label_grad"]
