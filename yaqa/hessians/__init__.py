"""Kronecker factors of the full-model KL Hessian (YAQA Sketch A / B) and the plain GPTQ Hessian.

    hs = yaqa.collect_hessians(model, token_ids, sketch="B")   # {linear name: LayerHessian}
    hs["model.layers.0.mlp.down_proj"].H_in, .H_out, .H_x

Pieces, by file:
    accumulators  the per-layer math (pure tensors)
    labels        labels sampled from the model's own distribution
    config        CollectConfig: every option of a collection
    schedule      which passes a sketch needs; micro-batches of the data
    hooks         the autograd tap on each linear (HessianCollector)
    passes        the loop over the data for one group of blocks: checkpoints, resume
    interrupt     Ctrl-C: finish the micro-batch, checkpoint, stop
    collect       the driver: collect_hessians / run_collection
    storage       file layout, run identity, load_hessians
    distributed   torch.distributed glue
"""

from .accumulators import LayerAccumulator
from .collect import collect_hessians, run_collection
from .config import CollectConfig
from .distributed import maybe_init_distributed
from .hooks import HessianCollector
from .labels import sample_labels, sampled_label_grad
from .schedule import pass_kinds
from .storage import (HessianMetadataError, LayerHessian, StaleHessiansError, load_hessians,
                      model_fingerprint)

__all__ = ["CollectConfig", "HessianCollector", "HessianMetadataError", "LayerAccumulator",
           "LayerHessian", "StaleHessiansError", "collect_hessians", "load_hessians",
           "maybe_init_distributed", "model_fingerprint", "pass_kinds", "run_collection",
           "sample_labels", "sampled_label_grad"]
