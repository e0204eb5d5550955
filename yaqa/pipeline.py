"""The whole job: Hessians -> rounding -> checkpoint -> evaluation, for several methods at once.

Used by ``yaqa run`` and ``bench/quality.py``.  Hessians are collected once per sketch and shared by
every method that needs them (LDLQ uses the plain input Hessian from the same pass), so all rows
of a comparison see exactly the same calibration data.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import store
from .recipe import (DEFAULT_BLOCK_SIZE, DEFAULT_DTYPE, DEFAULT_GROUP_SIZE, DEFAULT_INCOHERENCE,
                     DEFAULT_SIGMA, Recipe, get_recipe, with_default_refine)

log = logging.getLogger(__name__)

# `yaqa run` with no arguments: the three methods that show the point (RTN < GPTQ < YAQA).
DEFAULT_RUN_METHODS = ("rtn", "ldlq", "yaqa-b")
EVALUATION_MODES = ("auto", "joint", "per-method")


@dataclass
class Calibration:
    """Calibration windows: where they come from and, once :meth:`load` ran, the token ids."""

    source: str
    n: int
    ctx: int
    seed: int = 0
    ids: torch.Tensor | None = None

    def load(self, tokenizer, model: nn.Module) -> Calibration:
        from .data import calibration_windows

        if self.ids is None:
            self.ids = calibration_windows(tokenizer, self.source, self.n, self.ctx,
                                           seed=self.seed, model=model)
        return self

    def identity(self) -> dict:
        """Source, n, ctx, seed and a hash of the token ids (the text's content)."""
        if self.ids is None:
            raise ValueError("calibration not loaded yet")
        return {"source": self.source, "n": int(self.ids.shape[0]),
                "ctx": int(self.ids.shape[1]), "seed": self.seed,
                "tokens": store.calibration_identity(self.ids)}


@dataclass
class RunConfig:
    model: str | None = None
    methods: tuple[str, ...] = DEFAULT_RUN_METHODS
    bits: tuple[int, ...] = (4,)
    # Quantizer names (int4, trellis2, mxfp4, ...; see yaqa.quantizers.QUANTIZER_NAMES); when
    # given they replace the int-k formats of ``bits``.
    quantizers: tuple[str, ...] | None = None
    group_size: int | None = DEFAULT_GROUP_SIZE
    symmetric: bool = False
    scale_search: str = "maxabs"
    incoherence: bool | str = DEFAULT_INCOHERENCE  # or "per-layer", "shared", "block", "none"
    # nvfp4: one global scale per group that vLLM fuses (None: on; False: per layer)
    fused_global_scale: bool | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    sigma: float = DEFAULT_SIGMA
    shrinkage: str | float = "auto"  # YAQA factors towards the LDLQ pair, see hessians/shrinkage.py
    ldlq_block_size: int | None = None  # None: same as block_size; 1 gives column-wise GPTQ
    yaqa_block_size_out: int | None = None  # YAQA's tile height along outputs (None: block_size)
    sketch_b_power_iters: int | None = None  # None: the recipe's default
    calib: str = "auto"
    n_calib: int = 64
    calib_ctx: int = 512
    power_iters: int | None = None  # Sketch A (and Sketch B unless sketch_b_power_iters is set)
    label_draws: int = 1  # Sketch B: label draws per sequence (D× its forward+backward work)
    # LDLQ/YAQA: rounds of ±1 code steps after rounding (yaqa.rounding.refine); None: the
    # device's default (yaqa.recipe.default_refine: 32 for YAQA with int-k on CUDA, else 0)
    refine: int | None = None
    eval_data: str = "auto"
    eval_ctx: int = 512
    n_eval: int | None = 64
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    dtype: str = DEFAULT_DTYPE
    out_dir: str = "yaqa-out"
    save: bool = True
    overwrite: bool = False  # discard stored Hessians / resume state of other runs
    progress: bool = True
    tasks: tuple[str, ...] = ()  # lm-eval tasks scored on the original and every checkpoint
    tasks_path: str | None = None  # directory of local lm-eval task YAML files
    tasks_limit: int | None = None  # examples per task (quick checks only)
    strict: bool = False  # a failed sanity check on the reference is an error, not a warning
    command: str | None = None  # the command line, for report.md
    report: bool = True  # write report.md (and the KL plot) next to results.json
    embeddings: str = "auto"  # "int8": input embedding and LM head int8, one scale per row
    # "joint": hold every quantized model and evaluate all in one sweep (the original runs once
    # per batch); "per-method": evaluate each right after quantizing it, then free it; "auto":
    # joint when the memory plan says every model fits (see choose_evaluation)
    evaluation: str = "auto"

    def formats(self) -> tuple[str, ...]:
        """The quantizer names of the comparison: ``quantizers``, else ``int<bits>``."""
        if self.quantizers:
            return tuple(q.lower() for q in self.quantizers)
        return tuple(f"int{b}" for b in self.bits)

    def recipe(self, method: str, quantizer: int | str) -> Recipe:
        """``quantizer``: a make_quantizer name, or an int k for int-k."""
        base = get_recipe(method)
        iters = self.sketch_b_power_iters if base.sketch == "B" and self.sketch_b_power_iters \
            else self.power_iters
        block = self.ldlq_block_size if base.rounding == "ldlq" \
            and self.ldlq_block_size is not None else self.block_size
        qname = f"int{quantizer}" if isinstance(quantizer, int) else quantizer
        tiles_out = self.yaqa_block_size_out if base.rounding == "yaqa" else None
        recipe = get_recipe(method, power_iters=iters, label_draws=self.label_draws,
                            block_size_out=tiles_out, refine=self.refine,
                            quantizer=qname, group_size=self.group_size,
                            symmetric=self.symmetric, scale_search=self.scale_search,
                            incoherence=self.incoherence, block_size=block, sigma=self.sigma,
                            seed=self.seed, shrinkage=str(self.shrinkage),
                            fused_global_scale=self.fused_global_scale)
        return with_default_refine(recipe, self.refine, self.device)


@dataclass
class ResultRow:
    method: str
    bits: int | None
    group_size: int | None
    size_mb: float
    kl: float
    ppl: float
    top1: float
    seconds: float
    bpw: float | None = None  # bits per weight of the quantized layers, scales included
    path: str | None = None
    extra: dict = field(default_factory=dict)
    quantizer: str | None = None  # the quantizer's name (int4, trellis2, nvfp4, ...)


def _source(spec: str, kind: str) -> str:
    from .data import find_wikitext2

    if spec != "auto":
        return spec
    if find_wikitext2() is not None:  # $YAQA_DATA_DIR, ../shared, else the packaged copy
        return "wikitext2-valid" if kind == "calib" else "wikitext2-test"
    log.warning("WikiText-2 not found (this installation lacks the packaged copy; set "
                "YAQA_DATA_DIR); using text generated by the model itself for %s",
                "calibration" if kind == "calib" else "evaluation")
    return "generated"


def evaluation_windows(tokenizer, model, source: str, ctx: int, n: int | None, seed: int = 0):
    """Held-out windows; model-generated text uses ``seed + 1`` so it differs from calibration's."""
    from .data import calibration_windows, eval_windows

    if source == "generated":
        return calibration_windows(tokenizer, "generated", n or 64, ctx, seed=seed + 1,
                                   model=model, purpose="evaluation")
    return eval_windows(tokenizer, source, ctx, n=n)


def checkpoint_info(recipe: Recipe, calib: Calibration | None, model_name: str | None,
                    weights: str, report) -> dict:
    """What ``yaqa.json`` records about how a checkpoint was made."""
    cid = calib.identity() if calib is not None and recipe.hessian != "none" else None
    return {"method": recipe.name, "recipe": recipe.to_dict(), "sketch": recipe.sketch,
            "calibration": cid and cid["source"], "n_calib": cid and cid["n"],
            "calib_ctx": cid and cid["ctx"], "calibration_identity": cid, "seed": recipe.seed,
            "base_model": model_name or "smollm2-135m", "weights": weights,
            "shrinkage": shrinkage_summary(report), "report": report.to_dict()}


def refine_summary(report, rounds: int) -> dict:
    """Refinement over a model's layers: mean relative drop of the damped proxy, total time."""
    red = [lr.refine_reduction for lr in report.layers if lr.refine_reduction is not None]
    secs = [lr.refine_seconds for lr in report.layers if lr.refine_seconds is not None]
    return {"rounds": rounds, "layers": len(red),
            "mean_reduction": sum(red) / len(red) if red else None,
            "seconds": sum(secs)}


def shrinkage_summary(report) -> dict | None:
    """The setting and mean amounts over layers (each layer's own are in the report)."""
    if getattr(report, "shrinkage", "off") == "off":
        return None
    a_in = [r.shrink_in for r in report.layers if r.shrink_in is not None]
    a_out = [r.shrink_out for r in report.layers if r.shrink_out is not None]
    return {"setting": report.shrinkage, "layers": len(a_out),
            "mean_in": sum(a_in) / len(a_in) if a_in else None,
            "mean_out": sum(a_out) / len(a_out) if a_out else None}


def _param_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6


# -- one model, one recipe ---------------------------------------------------------------------

def preflight(model: nn.Module, recipes: list[Recipe], *, outs: list[str | Path] = (),
              overwrite: bool = False, include_head: bool = False) -> None:
    """Everything that can be checked before heavy work: each recipe against every layer's
    shape, finite weights, and the output paths."""
    from .io.checkpoint import check_checkpoint_target
    from .validate import check_finite_weights, check_recipe_fits

    for out in outs:
        check_checkpoint_target(out, overwrite=overwrite)
    for r in recipes:
        check_recipe_fits(model, r, include_head=include_head)
    check_finite_weights(model)


def collect_for(model: nn.Module, recipe: Recipe, calib: Calibration, out_dir: str | Path, *,
                batch_size: int = 4, overwrite: bool = False, progress: bool = True) -> dict:
    """The Hessians ``recipe`` needs, collected into (or reused from) ``out_dir``.

    Collected with the memory plan's blocks per pass, and returned as a mapping that reads one
    block's factors at a time (the whole model's factors are never resident)."""
    from .hessians import load_hessians, run_collection
    from .models.adapters import input_embeddings
    from .plan import CollectionRequest, ModelShape, device_budget, make_plan

    t = time.perf_counter()
    device = input_embeddings(model).weight.device
    plan = make_plan(ModelShape.from_model(model),
                     CollectionRequest(sketch=recipe.hessian, power_iters=recipe.power_iters,
                                       n_seqs=calib.ids.shape[0], ctx=calib.ids.shape[1],
                                       batch_size=batch_size, label_draws=recipe.label_draws),
                     budget_bytes=device_budget(device), device=str(device))
    log.info("%s", plan.summary())
    run_collection(model, calib.ids, out_dir, sketch=recipe.hessian,
                   power_iters=recipe.power_iters, seed=recipe.seed, batch_size=batch_size,
                   label_draws=recipe.label_draws,
                   blocks_per_pass=plan.blocks_per_pass, overwrite=overwrite,
                   progress=progress)
    hs = load_hessians(out_dir, model, device=device, stream=True)
    log.info("Hessians %s ready in %.1f s (%s)", recipe.hessian, time.perf_counter() - t, out_dir)
    return hs


@dataclass
class QuantizeOutcome:
    report: object        # QuantizeReport
    saved: object | None  # SavedCheckpoint when saved
    seconds_saving: float = 0.0


def quantize_one(model: nn.Module, recipe: Recipe, calib: Calibration | None,
                 out: str | Path | None, *, tokenizer=None, hessians: dict | None = None,
                 hessian_dir: str | Path | None = None, work_dir: str | Path | None = None,
                 model_name: str | None = None, include_head: bool = False,
                 overwrite: bool = False, replace_output: bool | None = None,
                 batch_size: int = 4, progress: bool = True,
                 embeddings: str = "auto") -> QuantizeOutcome:
    """Validate, collect (or reuse) Hessians, round block by block (resumable in ``work_dir``)
    and save a checkpoint to ``out`` (skipped when ``out`` is None).  What ``yaqa quantize``
    and each row of ``yaqa run`` do.

    ``overwrite`` discards stale Hessians and resume state; ``replace_output`` (default:
    ``overwrite``) allows replacing an existing checkpoint at ``out``.
    ``embeddings="int8"``: the input embedding and the LM head become int8 (one scale per row)
    in ``model`` too, so what is evaluated is what is saved.
    """
    from .io import save_quantized
    from .nn.int8 import parse_embeddings, quantize_embeddings
    from .quantize_model import quantize

    embeddings = parse_embeddings(embeddings)

    replace = overwrite if replace_output is None else replace_output
    preflight(model, [recipe], outs=[out] if out is not None else [], overwrite=replace,
              include_head=include_head)
    if work_dir is not None:
        store.check_output_dir(work_dir, what="work directory")
    if recipe.hessian != "none" and hessians is None:
        if calib is None:
            raise ValueError(f"method {recipe.name} needs calibration data")
        if calib.ids is None:
            if tokenizer is None:
                raise ValueError("calibration data has no token ids and no tokenizer was given")
            calib.load(tokenizer, model)
        hessians = collect_for(model, recipe, calib, hessian_dir, batch_size=batch_size,
                               overwrite=overwrite, progress=progress)
    weights = store.weights_identity(model)
    report = quantize(model, hessians, recipe=recipe, include_head=include_head,
                      work_dir=work_dir, overwrite=overwrite, progress=progress)
    if embeddings == "int8":
        quantize_embeddings(model)
    saved, t = None, time.perf_counter()
    if out is not None:
        info = checkpoint_info(recipe, calib, model_name, weights, report)
        saved = save_quantized(model, out, tokenizer=tokenizer, info=info, overwrite=replace)
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)  # the resume state is now redundant
    return QuantizeOutcome(report, saved, time.perf_counter() - t)


# -- several recipes, one table ----------------------------------------------------------------

def _hessian_plan(recipes: list[Recipe]) -> dict[str, Recipe]:
    """One collection per distinct Hessian request.  LDLQ's ``H_x`` comes from the same pass as
    a sketch that is collected anyway, so all rows of a comparison see the same data."""
    plan: dict[str, Recipe] = {}
    for r in recipes:
        if r.hessian != "none":
            plan.setdefault(_request_key(r), r)
    sketches = [k for k, r in plan.items() if r.sketch]
    if sketches:
        for k in [k for k, r in plan.items() if r.hessian == "hx"]:
            del plan[k]
    return plan


def _request_key(r: Recipe) -> str:
    """One collection per key: sketch, ALS steps and (where several) label draws."""
    draws = f"d{r.label_draws}" if r.label_draws != 1 else ""
    return f"{r.hessian}{r.power_iters}{draws}"


def _hessians_key(plan: dict[str, Recipe], r: Recipe) -> str:
    key = _request_key(r)
    if key in plan:
        return key
    # LDLQ's H_x: from Sketch B's pass when there is one (the same pass GPTQ would make)
    return sorted(plan, key=lambda k: k[0] != "B")[0]


# A joint evaluation sweep measures the reference's perplexity on every window anyway; before the
# heavy work the sanity check only needs a perplexity that tells a broken model (near the
# vocabulary size) from a working one, which a couple of windows give.
SANITY_PPL_WINDOWS = 2


def checked_reference(model, tok, ev, eval_src, batch_size: int, strict: bool,
                      progress: bool = True, ppl_windows: int | None = None
                      ) -> tuple[float, list]:
    """Sanity checks on the reference, then its perplexity (checked too): (ppl, findings).

    The checks that need no perplexity run first, so ``strict`` stops a broken reference before
    even that forward pass; each finding is warned about once (or raised, with ``strict``).
    ``ppl_windows``: measure the perplexity on the first few windows only.
    """
    from . import evaluate, sanity

    findings = sanity.enforce(sanity.check_reference(model, tok, ev,
                                                     sanity.text_sample(eval_src)), strict)
    ref_ppl = evaluate.perplexity(model, ev if ppl_windows is None else ev[:ppl_windows],
                                  batch_size=batch_size, progress=progress)
    findings += sanity.enforce([sanity.perplexity_finding(ref_ppl,
                                                          sanity.model_vocab_size(model))], strict)
    return ref_ppl, findings


def run_pipeline(cfg: RunConfig) -> list[ResultRow]:
    from . import evaluate
    from .models import load_model
    from .nn import set_dense_cache
    from .report import RunRecord, StageLog, write_report

    out = Path(cfg.out_dir)
    store.check_output_dir(out)
    from .nn.int8 import parse_embeddings

    cfg.embeddings = parse_embeddings(cfg.embeddings)  # a bad value fails before any work
    _check_evaluation(cfg)
    recipes = [cfg.recipe(m, q) for q in cfg.formats() for m in cfg.methods]
    if cfg.refine and not any(r.refine for r in recipes):
        raise ValueError(f"refine applies to LDLQ and YAQA rounding; the methods "
                         f"{', '.join(cfg.methods)} have nothing to refine")
    out.mkdir(parents=True, exist_ok=True)
    stages = StageLog()
    with stages.stage("load model"):
        model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    preflight(model, recipes)
    calib_src, eval_src = _source(cfg.calib, "calib"), _source(cfg.eval_data, "eval")
    with stages.stage("reference: sanity checks, perplexity"):
        ev = evaluation_windows(tok, model, eval_src, cfg.eval_ctx, cfg.n_eval, cfg.seed)
        log.info("evaluation: %d windows x %d tokens of %s", ev.shape[0], ev.shape[1], eval_src)
        mode = choose_evaluation(cfg, model, ev.shape[1], len(recipes))
        # The reference is re-run for every comparison instead of cached: full log-probabilities
        # of 64 x 512 tokens over a 49k vocabulary would be 6.4 GB, and a forward pass is cheap.
        # A joint sweep gives the reference's perplexity on every window at the end; until then
        # the sanity check uses the first few.
        ref_ppl, findings = checked_reference(
            model, tok, ev, eval_src, cfg.batch_size, cfg.strict, cfg.progress,
            ppl_windows=SANITY_PPL_WINDOWS if mode == "joint" else None)
    rows = [ResultRow("original", None, None, _param_mb(model), 0.0, ref_ppl, 1.0, 0.0)]
    suite = None
    if cfg.tasks:  # before the heavy work: an unknown task or no network fails in seconds
        from .tasks import TaskSuite

        with stages.stage("tasks: load"):
            suite = TaskSuite(cfg.tasks, include_path=cfg.tasks_path, limit=cfg.tasks_limit,
                              batch_size=cfg.batch_size, seed=cfg.seed)
        with stages.stage("tasks: original"):
            rows[0].extra["tasks"] = _task_dicts(suite.evaluate(model, tok))

    calib = Calibration(calib_src, cfg.n_calib, cfg.calib_ctx, cfg.seed)
    plan = _hessian_plan(recipes)
    hessians = {}
    if plan:
        with stages.stage("calibration data"):
            calib.load(tok, model)
        tag = store.identity_hash(calib.identity())[:10]
        for key, r in plan.items():
            with stages.stage(f"hessians: {'sketch ' + r.hessian if r.sketch else 'H_x'}"):
                hessians[key] = collect_for(model, r, calib, out / f"hessians-{key}-{tag}",
                                            batch_size=cfg.batch_size, overwrite=cfg.overwrite,
                                            progress=cfg.progress)

    layers: dict[str, list] = {}
    held: list[_Quantized] = []  # joint mode: evaluated together once all are quantized
    for recipe in recipes:
        t = time.perf_counter()
        qmodel = copy.deepcopy(model)
        name = f"{recipe.name}-{recipe.quantizer}"
        hs = hessians[_hessians_key(plan, recipe)] if recipe.hessian != "none" else None
        with stages.stage(f"{name}: quantize" + (", save" if cfg.save else "")):
            res = quantize_one(qmodel, recipe, calib, out / name if cfg.save else None,
                               tokenizer=tok, hessians=hs, work_dir=out / "work" / name,
                               model_name=cfg.model, overwrite=cfg.overwrite,
                               replace_output=True, progress=cfg.progress,
                               embeddings=cfg.embeddings)
        layers[name] = res.report.layers
        set_dense_cache(qmodel, True)  # evaluation: dense weights are faster than packed
        q = _Quantized(recipe, name, res, qmodel,
                       time.perf_counter() - t - (res.seconds_saving or 0.0))
        if mode == "joint":
            held.append(q)
            continue
        with stages.stage(f"{name}: KL, perplexity"):
            t = time.perf_counter()
            ev_res = evaluate.compare(model, qmodel, ev, batch_size=cfg.batch_size,
                                      progress=cfg.progress)
        rows.append(_result_row(cfg, q, ev_res, time.perf_counter() - t))
        _finish(q, rows[-1], ev_res, suite, stages, tok)
        del q, qmodel
    if held:
        del qmodel
        names = ", ".join(q.name for q in held)
        with stages.stage(f"KL, perplexity: {names} in one sweep"):
            joint = evaluate.compare_many(model, [q.model for q in held], ev,
                                          batch_size=cfg.batch_size, progress=cfg.progress)
        log.info("joint evaluation: the original's forward passes took %.1f s, shared by %d "
                 "models", joint.reference_seconds, len(held))
        rows[0].ppl = joint.results[0].ref_ppl  # every window, not the sanity check's few
        share = joint.reference_seconds / len(held)
        for q, ev_res, secs in zip(held, joint.results, joint.seconds):
            rows.append(_result_row(cfg, q, ev_res, secs + share))
            _finish(q, rows[-1], ev_res, suite, stages, tok)
            q.model = None  # each freed once its tasks (if any) ran
    store.atomic_write_text(out / "results.json", json.dumps([asdict(r) for r in rows], indent=2))
    if cfg.report:
        write_report(out, rows, RunRecord(
            command=cfg.command, stages=stages.stages, layers=layers, sanity=findings,
            seeds={"seed (calibration sampling, Hessian labels, Hadamard signs, lm-eval)":
                   cfg.seed},
            settings=_report_settings(cfg, calib_src, eval_src, ev, model)))
    return rows



@dataclass
class _Quantized:
    """One quantized copy of a run, between its quantization and its evaluation."""

    recipe: Recipe
    name: str
    outcome: QuantizeOutcome
    model: nn.Module | None
    seconds: float  # quantizing, without saving


def choose_evaluation(cfg: RunConfig, model: nn.Module, ctx: int, n_models: int) -> str:
    """``cfg.evaluation`` when set, else "joint" when the reference and every quantized copy
    fit in memory together (:func:`yaqa.plan.joint_evaluation_fits`) and "per-method" when
    not (large models: one copy at a time, as before)."""
    from .plan import ModelShape, device_budget, joint_evaluation_bytes, joint_evaluation_fits

    _check_evaluation(cfg)
    if cfg.evaluation != "auto":
        return cfg.evaluation
    if n_models < 2:
        return "per-method"  # nothing to share
    shape = ModelShape.from_model(model)
    budget = device_budget(next(model.parameters()).device)
    mode = "joint" if joint_evaluation_fits(shape, n_models, cfg.batch_size, ctx,
                                            budget_bytes=budget) else "per-method"
    log.info("evaluation: %s (%d models together need about %.1f GiB of %.1f GiB available)",
             mode, n_models, joint_evaluation_bytes(shape, n_models, cfg.batch_size, ctx) / 2**30,
             budget / 2**30)
    return mode


def _check_evaluation(cfg: RunConfig) -> None:
    if cfg.evaluation not in EVALUATION_MODES:
        raise ValueError(f"evaluation must be auto, joint or per-method, got {cfg.evaluation!r}")


def _result_row(cfg: RunConfig, q: _Quantized, ev_res, eval_seconds: float) -> ResultRow:
    """``seconds``: quantizing plus this model's evaluation (in a joint sweep: its own forward
    passes and an equal share of the original's)."""
    res, recipe = q.outcome, q.recipe
    group = cfg.group_size if recipe.quantizer.startswith("int") else None
    summary = shrinkage_summary(res.report)
    extra = {"shrinkage": summary} if summary else {}
    if recipe.refine:
        extra["refine"] = refine_summary(res.report, recipe.refine)
    return ResultRow(recipe.name, res.report.quantizer.get("bits"), group,
                     res.saved.weights_bytes / 1e6 if res.saved else float("nan"),
                     ev_res.kl, ev_res.ppl, ev_res.top1, q.seconds + eval_seconds,
                     _bits_per_weight(q.model), str(res.saved.path) if res.saved else None,
                     quantizer=recipe.quantizer, extra=extra)


def _finish(q: _Quantized, row: ResultRow, ev_res, suite, stages, tok) -> None:
    """Log one model's results and score its lm-eval tasks."""
    summary = row.extra.get("shrinkage")
    if summary and summary["mean_out"] is not None:
        log.info("%s: factors shrunk towards LDLQ's by %.2f (H_in) / %.2f (H_out) on "
                 "average", q.name, summary["mean_in"] or 0.0, summary["mean_out"])
    log.info("%s: KL %.4f ppl %.2f top1 %.3f", q.name, ev_res.kl, ev_res.ppl, ev_res.top1)
    if suite is not None:
        with stages.stage(f"{q.name}: tasks"):
            row.extra["tasks"] = _task_dicts(suite.evaluate(q.model, tok))


def _report_settings(cfg: RunConfig, calib_src: str, eval_src: str, ev, model) -> dict:
    tasks = ", ".join(cfg.tasks) or "none"
    refined = _refine_setting(cfg)
    return {"model": cfg.model or "SmolLM2-135M-Instruct (embedded)",
            "calibration": f"{calib_src}, {cfg.n_calib} x {cfg.calib_ctx}"
                           + (f", {cfg.label_draws} label draws per sequence (Sketch B)"
                              if cfg.label_draws != 1 else ""),
            "evaluation": f"{eval_src}, {ev.shape[0]} x {ev.shape[1]}",
            "quantizer": f"{','.join(cfg.formats())} g{cfg.group_size or 'row'} "
                         f"{'sym' if cfg.symmetric else 'asym'} {cfg.scale_search}"
                         + (f", {refined}" if refined else ""),
            "incoherence": cfg.incoherence, "device": str(next(model.parameters()).device),
            "dtype": cfg.dtype,
            **({"embedding, LM head": "int8, one scale per row"}
               if cfg.embeddings == "int8" else {}),
            "tasks": tasks + (f" (limit {cfg.tasks_limit})" if cfg.tasks_limit else "")}


def _refine_setting(cfg: RunConfig) -> str:
    """"refined: yaqa-b 32 rounds" for the methods whose recipes refine (asked or default)."""
    rounds = {}
    for q in cfg.formats():
        for m in cfg.methods:
            r = cfg.recipe(m, q)
            if r.refine:
                rounds.setdefault(m, r.refine)
    if not rounds:
        return ""
    how = "" if cfg.refine is not None else " (the GPU default)"
    return "refined: " + ", ".join(f"{m} {n} rounds" for m, n in rounds.items()) + how


def _task_dicts(scores: dict) -> dict:
    return {name: score.as_dict() for name, score in scores.items()}


def _bits_per_weight(model) -> float:
    from .nn import QuantizedLinear

    bits = numel = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            bits += 8 * sum(b.numel() * b.element_size() for n, b in m.named_buffers()
                            if n == "qweight" or n.startswith("grid_"))
            numel += m.in_features * m.out_features
    return bits / max(numel, 1)


def format_table(rows: list[ResultRow]) -> str:
    from .report import task_cell, task_headers, task_names

    tasks, task_heads = task_names(rows), task_headers(rows)
    widths = [max(len(h), 17) for h in task_heads]  # "0.1234 ± 0.0123"
    head = f"{'method':<10} {'format':>14} {'group':>5} {'bpw':>5} {'size MB':>8} {'KL':>8} " \
           f"{'ppl':>8} {'top-1':>6} {'time s':>7}" + \
           "".join(f" {h:>{w}}" for h, w in zip(task_heads, widths))
    lines = [head, "-" * len(head)]
    for r in rows:
        bpw = f"{r.bpw:.2f}" if getattr(r, "bpw", None) else "-"
        fmt = getattr(r, "quantizer", None) or (f"int{r.bits}" if r.bits else "-")
        lines.append(f"{r.method:<10} {fmt:>14} {r.group_size or '-':>5} {bpw:>5} "
                     f"{r.size_mb:>8.1f} {r.kl:>8.4f} {r.ppl:>8.2f} {r.top1:>6.3f} "
                     f"{r.seconds:>7.1f}"
                     + "".join(f" {task_cell(r, t):>{w}}" for t, w in zip(tasks, widths)))
    return "\n".join(lines)
