"""A Llama-3.1-8B-shaped model end to end: plan, Sketch B, YAQA int4 g128 of every linear, save.

Random bf16 weights from a config (no download), calibration 1024 × 2048 random tokens. Each
stage is one command under 9 minutes on an H100 and resumable: run the same command again until
it prints "done"; wall times add up in ``WORK/state.json``.

    python bench/scale.py --device cuda --stage plan      # plan + timed warm-up, nothing heavy
    python bench/scale.py --device cuda --stage collect   # repeat until "collect: done"
    python bench/scale.py --device cuda --stage round     # repeat until "round: done"
    python bench/scale.py --device cuda --stage save
    python bench/scale.py --device cuda --stage report    # bench/results/scale.{md,json}
    python bench/scale.py --device cuda --stage throughput --layers-list 8,32  # + profile
    python bench/scale.py --stage project                 # 70B projection from measured numbers

CPU check at a tiny scale: ``python bench/scale.py --tiny --stage all --work /tmp/scale``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

import yaqa
from yaqa.hessians import HessianCollector, load_hessians, run_collection
from yaqa.hessians.boundary import BoundaryCache, disk_free_bytes
from yaqa.hessians.phases import PhaseRecorder
from yaqa.hessians.labels import sampled_label_grad
from yaqa.models import get_adapter
from yaqa.plan import (GiB, CollectionRequest, ModelShape, collection_terms, is_oom, make_plan,
                       oom_message, stored_bytes, timed_warmup)

log = logging.getLogger("bench.scale")
RESULTS = Path(__file__).parent / "results"

LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
LLAMA70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


def config(args, layers: int | None = None) -> transformers.LlamaConfig:
    base = dict(TINY if args.tiny else LLAMA8B)
    if layers is not None:
        base["num_hidden_layers"] = layers
    cfg = transformers.LlamaConfig(**base, max_position_embeddings=max(8192, args.ctx),
                                   rope_theta=500000.0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(args, layers: int | None = None) -> torch.nn.Module:
    """Seeded random weights, identical in every command (same device, same torch)."""
    cfg = config(args, layers)
    torch.manual_seed(args.seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    # a stable identity so the stores do not hash 16 GB of weights on every command
    model.yaqa_weights_identity = f"scale-bench:{cfg.num_hidden_layers}L:seed{args.seed}"
    return model.eval()


def calibration(args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, vocab, (args.n_seqs, args.ctx), generator=g)


# -- state ------------------------------------------------------------------------------------------

def load_state(work: Path) -> dict:
    p = work / "state.json"
    return json.loads(p.read_text()) if p.exists() else {"stages": {}}


def save_state(work: Path, state: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / ".state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, work / "state.json")


def host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def gpu_peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def record(state: dict, stage: str, seconds: float, done: bool, args, **extra) -> dict:
    st = state["stages"].setdefault(stage, {"seconds": 0.0, "commands": 0})
    st["seconds"] += seconds
    st["commands"] += 1
    st["done"] = done
    st["peak_host_gib"] = max(st.get("peak_host_gib", 0), host_peak_bytes() / GiB)
    gp = gpu_peak_bytes(args.device)
    if gp is not None:
        st["peak_gpu_gib"] = max(st.get("peak_gpu_gib", 0), gp / GiB)
    st.update(extra)
    return st


class Deadline:
    """SIGINT to ourselves after ``seconds``: collection saves a checkpoint at the next
    micro-batch and stops (its Ctrl-C path); rounding stops between blocks."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        if self.seconds > 0:
            signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)


# -- stages -----------------------------------------------------------------------------------------

def request(args) -> CollectionRequest:
    return CollectionRequest(sketch="B", power_iters=1, n_seqs=args.n_seqs, ctx=args.ctx,
                             batch_size=args.batch_size, collect_hx=False)


def budget(args) -> int:
    if args.budget_gib:
        return int(args.budget_gib * GiB)
    return yaqa.plan.device_budget(args.device)


def plan_for(args, shape: ModelShape, req: CollectionRequest):
    """The memory plan, with the boundary cache placed as the collection will place it."""
    return make_plan(shape, req, budget_bytes=budget(args), device=args.device,
                     margin=args.margin, blocks_per_pass=args.blocks_per_pass,
                     boundary_cache=args.boundary_cache,
                     host_bytes=int(args.host_gib * GiB) if args.host_gib else None,
                     disk_bytes=disk_free_bytes(args.work))


def stage_plan(args, state: dict) -> None:
    t = time.perf_counter()
    shape = ModelShape.from_config(config(args))
    plan = plan_for(args, shape, request(args))
    if not args.dry_run:
        model = build_model(args)
        ids = calibration(args, model.config.vocab_size)
        timed_warmup(model, ids, plan, request(args), steps=2)
    state["plan"] = plan.to_dict()
    print(plan.summary())
    _write_results(args, f"scale_plan{args.tag}.txt", plan.summary() + "\n")
    record(state, "plan", time.perf_counter() - t, True, args)


def stage_collect(args, state: dict) -> None:
    if state["stages"].get("collect", {}).get("done"):
        print("collect: done")
        return
    if "plan" not in state:  # the plan stage was skipped: plan without the warm-up
        state["plan"] = plan_for(args, ModelShape.from_config(config(args)),
                                 request(args)).to_dict()
    bpp = state["plan"]["blocks_per_pass"]
    cache = state["plan"].get("boundary_cache", {}).get("mode", "off")
    t = time.perf_counter()
    model = build_model(args)
    ids = calibration(args, model.config.vocab_size)
    t_build = time.perf_counter() - t
    done = False
    # peak device memory by phase (passes, end_pass, writing; yaqa.hessians.phases): where the
    # collection peak is, against the plan's during-pass and end-of-pass terms
    phases = PhaseRecorder(args.device)
    try:
        with Deadline(max(1.0, args.budget_s - t_build)), phases:
            run_collection(model, ids, args.work / "hessians", sketch="B", batch_size=args.batch_size,
                           blocks_per_pass=bpp, collect_hx=False, storage_dtype=args.storage,
                           boundary_cache=cache, checkpoint_interval_s=1e9,
                           progress=not args.quiet)
        done = True
    except KeyboardInterrupt as e:
        print(f"collect: stopped at the time budget ({e}); run the same command again")
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            raise SystemExit(oom_message(e, None, "collection")) from None
        raise
    st = record(state, "collect", time.perf_counter() - t - t_build, done, args,
                build_seconds=t_build, blocks_per_pass=bpp, boundary_cache=cache)
    merge_phases(st, phases.to_dict())
    if done:
        print("collect: done")


def merge_phases(st: dict, new: dict) -> None:
    """Fold one command's peak by phase into the stage's record: the largest peak and the total
    seconds of each phase over its commands. The recorder resets the device's peak at every
    phase, so the stage's overall peak is the largest phase peak."""
    ph = st.setdefault("phases", {})
    for name, v in new.items():
        old = ph.setdefault(name, {"peak_gib": None, "seconds": 0.0})
        if v["peak_gib"] is not None:
            old["peak_gib"] = max(old["peak_gib"] or 0.0, v["peak_gib"])
            st["peak_gpu_gib"] = max(st.get("peak_gpu_gib") or 0.0, v["peak_gib"])
        old["seconds"] = round(old["seconds"] + v["seconds"], 2)


def phase_line(st: dict) -> str:
    ph = st.get("phases")
    if not ph:
        return ""
    parts = []
    for k, v in ph.items():
        peak = "n/a" if v["peak_gib"] is None else f"{v['peak_gib']:.1f} GiB"
        parts.append(f"{k} {peak} ({v['seconds']:.0f} s)")
    return "Collection peak GPU memory by phase: " + ", ".join(parts) + "."


def stage_round(args, state: dict, *, save: bool = False) -> None:
    stage = "save" if save else "round"
    if state["stages"].get(stage, {}).get("done"):
        print(f"{stage}: done")
        return
    from yaqa.quantize_model import quantize

    t = time.perf_counter()
    model = build_model(args)
    hs = load_hessians(args.work / "hessians", model, device=args.device, stream=True)
    t_build = time.perf_counter() - t
    done = False
    try:
        with Deadline(0 if save else max(1.0, args.budget_s - t_build)):
            rep = quantize(model, hs, method="yaqa", quantizer="int4", group_size=args.group_size,
                           work_dir=args.work / "quant", progress=not args.quiet,
                           refine=args.refine)
        done = True
    except KeyboardInterrupt:
        print(f"{stage}: stopped at the time budget; run the same command again")
        rep = None
    if done and save:
        from yaqa.io import save_quantized

        ts = time.perf_counter()
        save_quantized(model, args.work / "checkpoint", overwrite=True)
        record(state, "save", time.perf_counter() - ts, True, args)
        print("save: done")
        return
    extra = {}
    if rep is not None:
        from yaqa.recipe import get_recipe, with_default_refine

        rounds = with_default_refine(get_recipe("yaqa", quantizer="int4"), args.refine,
                                     args.device).refine
        extra = {"layers": len(rep.layers), "resumed_blocks": rep.resumed_blocks,
                 "refine_rounds": rounds}
    record(state, stage, time.perf_counter() - t - t_build, done, args, build_seconds=t_build,
           **extra)
    if done:
        print(f"{stage}: done")


# -- throughput ------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, steps: int, device: str) -> float:
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / steps


def _free(device: str) -> None:
    """Return every freed block to the device, so the next depth starts from its own weights."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _plain_step(model, ids, gen):
    """The model's own work in collection: forward, sampled-label gradient, activation-only
    backward down to the first decoder block (parameters frozen)."""
    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        grad, _ = sampled_label_grad(logits.detach(), range(ids.shape[0]), 0, gen)
        logits.backward(grad)
    return step


def _throughput_at(args, layers: int, precisions: list[str]) -> dict:
    """Plain fwd+bwd and Sketch B (every group of the plan, per precision) at one depth.

    Everything this allocates dies with the call; nothing but numbers comes back.
    """
    model = build_model(args, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    shape = ModelShape.from_model(model)
    req = CollectionRequest(n_seqs=args.batch_size, ctx=args.ctx, batch_size=args.batch_size,
                            collect_hx=args.hx)
    plan = plan_for(args, shape, req)
    # the plain baseline keeps every block's activations: the first group's peak without the
    # accumulators and the statistic workspace (never more than the plan's own peak)
    t0 = collection_terms(shape, req, [0])
    plain_est = t0["weights"] + t0["activations"] + t0["logits + gradient"]
    ids = calibration(args, model.config.vocab_size)[: args.batch_size].to(args.device)
    gen = torch.Generator(device=args.device)
    leaf_block = get_adapter(model).blocks(model)[0]

    def leaf(module, a, kw):
        return (a[0].detach().requires_grad_(),) + tuple(a[1:]), kw

    h = leaf_block.register_forward_pre_hook(leaf, with_kwargs=True)
    try:
        _free(args.device)
        t_plain = _timed(_plain_step(model, ids, gen), args.steps, args.device)
        plain_peak = gpu_peak_bytes(args.device)
    finally:
        h.remove()
    cached = plan.boundary_cache.get("mode", "off") != "off" and len(plan.groups) > 1
    row = {"layers": layers, "batch": args.batch_size, "ctx": args.ctx, "plain_s": t_plain,
           "plain_peak_gib_est": plain_est / GiB,
           "plain_peak_gib": (plain_peak or 0) / GiB, "groups": plan.groups,
           "plan_peak_gib_est": plan.collection_peak_bytes / GiB,
           "boundary_cache": "memory" if cached else "off", "gram_scheme": args.gram_scheme,
           "leaf_batch": args.leaf_batch,
           "hidden": shape.hidden, "intermediate": shape.intermediate,
           "heads": shape.heads, "kv_heads": shape.kv_heads, "vocab": shape.vocab,
           "plain_per_layer_token_s": t_plain / layers / ids.numel(), "modes": {}}
    for prec in precisions:
        _free(args.device)
        t_groups, work = [], []
        starts = [g[0] for g in plan.groups if g[0] > 0]
        bc = (BoundaryCache(starts, [ids.numel()], shape.hidden, next(model.parameters()).dtype,
                            "memory", grads=starts, device=args.device) if cached else None)
        # as in a real run: with the cache, the top group first, from the embeddings to the
        # head (recording the states every step); the others between cached state and gradient
        for g in (plan.groups[::-1] if cached else plan.groups):
            top = g is plan.groups[-1]
            col = HessianCollector(model, g, collect_hx=args.hx, precision=prec, boundary=bc)

            def step(col=col, top=top):
                if bc is not None and top:
                    bc.forget(0)  # a real run's top group finds no state: it records them
                col.step(ids, range(ids.shape[0]), 0)
            with col:
                col.begin_pass("b")
                t_groups.append(_timed(step, args.steps, args.device))
            if cached and not top:
                work.append(len(g) / layers)
            else:  # the top group's backward too stops at its first block
                work.append(1 / 3 + 2 / 3 * (layers - g[0]) / layers)
            # how bf16 products reached the fp32 sums: one fused GEMM, or GEMM + add
            fused = {a.prod._fused_ok for a in col.acc.values()}
            del col  # its accumulators must be gone before the next group allocates its own
            gc.collect()
        if bc is not None:
            bc.close(remove=True)
        # the statistics alone: each group's time minus the model's own work in it (cache: the
        # top group runs the whole forward and its own backward, the others their own blocks;
        # no cache: the whole forward and the backward down to the group's first block)
        stat_s = max(sum(tg - t_plain * w for tg, w in zip(t_groups, work)), 0.0)
        sb = sum(t_groups)
        row["modes"][prec] = {
            "sketch_b_s": sb, "x_plain": sb / t_plain,
            "x_plain_if_one_pass": (t_plain + stat_s) / t_plain,
            "stats_per_layer_token_s": stat_s / layers / ids.numel(),
            "model_work": sum(work),
            "peak_gpu_gib": (gpu_peak_bytes(args.device) or 0) / GiB,
            "fused_bf16_accumulation": sorted(str(f) for f in fused)}
        m = row["modes"][prec]
        print(f"{layers} layers, batch {args.batch_size}, {prec}: plain {t_plain * 1e3:.1f} ms, "
              f"Sketch B {sb * 1e3:.1f} ms over {len(plan.groups)} pass(es), boundary cache "
              f"{row['boundary_cache']} = {m['x_plain']:.2f}x plain ({m['x_plain_if_one_pass']:.2f}x "
              f"if every accumulator fit one pass); statistics {stat_s / layers * 1e3:.1f} ms per "
              "layer", flush=True)
    if layers == args.layers_list[0]:
        _free(args.device)
        profile(model, plan.groups[-1], ids, args, precisions[0])
    del model
    return row


def stage_throughput(args, state: dict) -> None:
    """Plain fwd+bwd vs Sketch B (every group of the plan) at each depth, and a profile."""
    precisions = args.precisions
    rows = {}
    for layers in args.layers_list:
        rows[layers] = _throughput_at(args, layers, precisions)
        _free(args.device)
        _throughput_table(args, state, rows)  # after every depth: a cut-off run keeps its rows


def _throughput_table(args, state: dict, rows: dict) -> None:
    precisions = args.precisions
    # the projection reads the first precision's numbers
    state["throughput"] = {str(k): {**{q: v for q, v in r.items() if q != "modes"},
                                    **r["modes"][precisions[0]], "precision": precisions[0]}
                           for k, r in rows.items()}
    state["throughput_modes"] = {str(k): r for k, r in rows.items()}
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [f"# Sketch B throughput at depth (bench/scale.py{args.tag})", "",
             f"Machine: {platform.node()}, {dev}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, yaqa at {_git_commit()}",
             f"Command: `python bench/scale.py {' '.join(sys.argv[1:])}`",
             f"Model: {'tiny' if args.tiny else 'Llama-3.1-8B'}-shaped, random bf16 weights, "
             f"ctx {args.ctx}, batch {args.batch_size}; mean of {args.steps} steps after one "
             "warm-up. Plain = forward + sampled-label activation-only backward (frozen "
             "weights), the model's own work in collection. Sketch B = every pass of the memory "
             "plan (each pass repeats the forward; its backward stops at its first block).", "",
             "x plain if one pass: the plain step plus the statistics alone (each pass's time "
             "minus its share of the model's work), i.e. as if every accumulator fit one pass. "
             "fused: bf16 products added to the fp32 sums by one addmm (True) or mm + add.", "",
             "| layers | passes | plain ms | precision | Sketch B ms | x plain | x plain if one "
             "pass | stats ms / layer | peak GiB plain (plan) | peak GiB Sketch B (plan) | fused |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for k, r in rows.items():
        for prec, m in r["modes"].items():
            per_layer = m["stats_per_layer_token_s"] * args.batch_size * args.ctx * 1e3
            lines.append(f"| {k} | {len(r['groups'])} | {r['plain_s'] * 1e3:.1f} | {prec} | "
                         f"{m['sketch_b_s'] * 1e3:.1f} | {m['x_plain']:.2f} | "
                         f"{m['x_plain_if_one_pass']:.2f} | {per_layer:.2f} | "
                         f"{r['plain_peak_gib']:.1f} ({r['plain_peak_gib_est']:.1f}) | "
                         f"{m['peak_gpu_gib']:.1f} ({r['plan_peak_gib_est']:.1f}) | "
                         f"{'/'.join(m['fused_bf16_accumulation'])} |")
    _write_results(args, f"scale_throughput{args.tag}.md", "\n".join(lines) + "\n")
    _write_results(args, f"scale_throughput{args.tag}.json",
                   json.dumps(state["throughput_modes"], indent=1, default=str))
    print("\n".join(lines))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_results(args, name: str, text: str) -> Path:
    """Into bench/results/, and into --copy-to as well (the device run's $OUT)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        (args.copy_to / name).write_text(text)
    return path


def profile(model, group, ids, args, precision: str = "auto") -> None:
    """Torch profiler over two collection steps, per-layer statistics labelled by layer kind."""
    from torch.profiler import ProfilerActivity, profile as tprofile, record_function

    col = HessianCollector(model, group, collect_hx=args.hx, precision=precision)
    with col:
        orig = col._on_backward

        def labelled(name, x, g):
            with record_function(f"stats:{name.rsplit('.', 1)[-1]}"):
                orig(name, x, g)
        col._on_backward = labelled
        col.begin_pass("b")
        col.step(ids, range(ids.shape[0]))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                         if args.device.startswith("cuda") else [])
        with tprofile(activities=acts) as prof:
            for _ in range(2):
                col.step(ids, range(ids.shape[0]))
            _sync(args.device)
    del col
    key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    path = _write_results(args, f"scale_profile{args.tag}.txt",
                          f"{platform.node()} {torch.__version__} {dev}, yaqa at {_git_commit()}, "
                          f"precision {precision}, {len(group)} block(s), batch {ids.shape[0]} x "
                          f"{ids.shape[1]}\npython bench/scale.py {' '.join(sys.argv[1:])}\n\n"
                          f"{table}\n")
    print(f"profile -> {path}")


# -- projection ------------------------------------------------------------------------------------

H100_THROUGHPUT = RESULTS / "scale_throughput_h100_i14.json"
H100_ROUNDING = RESULTS / "rounding_cuda.json"
H100_TRELLIS = RESULTS / "trellis_speed_h100_triton.json"
GPU_BYTES = 80 * 10 ** 9  # an 80 GB H100
HOST_BYTES = 2 * 10 ** 12  # host memory of a typical 8 x H100 node


def _shapes(cfg: dict) -> list[tuple[int, int]]:
    """(out m, in n) of one decoder block's seven linears."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def _layer_flops(cfg: dict, T: int) -> tuple[float, float]:
    """(model fwd + activation-only bwd, Sketch-B statistics) flops per token of one layer, at
    context T, by the route and the symmetric-product tiling the collection uses."""
    from yaqa.hessians.accumulators import choose_route, sym_flop_fraction

    h = cfg["hidden_size"]
    model = 4 * sum(m * n for m, n in _shapes(cfg)) + 6 * T * h  # + causal attention
    stats = 0.0
    for m, n in _shapes(cfg):
        sym = n * n * sym_flop_fraction(n) + m * m * sym_flop_fraction(m)
        if choose_route(T, m, n) == "gram":  # per sequence, then per token
            stats += (4 * T * T * (m + n) + 2 * T * sym) / T
        else:
            stats += (2 * T * m * n + 2 * m * n * (m + n)) / T  # sym ignored: ∇W_b products
    return model, stats


def _measured_row(path: Path, precision: str | None) -> tuple[dict, dict, str]:
    """The deepest row of a throughput JSON and the shape it was measured on."""
    if not path.exists():
        raise SystemExit(f"{path} not found: run --stage throughput on a GPU first, or pass "
                         "--throughput-json")
    rows = json.loads(path.read_text())
    row = rows[max(rows, key=int)]
    prec = precision if precision in row["modes"] else next(iter(row["modes"]))
    if "hidden" in row:
        cfg = dict(hidden_size=row["hidden"], intermediate_size=row["intermediate"],
                   num_attention_heads=row["heads"], num_key_value_heads=row["kv_heads"],
                   vocab_size=row["vocab"])
    else:  # files written before the shape was recorded: only the Llama-3.1-8B runs exist
        cfg = dict(LLAMA8B)
    if cfg["hidden_size"] < 1024:
        # a tiny model's time per token is interpreter overhead, not flops: scaling it to 70B
        # gave the hundreds of thousands of hours this table once showed
        raise SystemExit(f"{path} was measured on a tiny model (hidden {cfg['hidden_size']}); "
                         "project from a GPU measurement of the 8B shape")
    return row, cfg, prec


def stage_project(args, state: dict) -> None:
    """Llama-3.1-70B: passes, GPUs, hours and disk, scaled by flops from the measured 8B
    per-layer numbers; writes bench/results/scale_projection_70b.{md,json}."""
    src = args.throughput_json or H100_THROUGHPUT
    row, mcfg, prec = _measured_row(src, "bf16")
    m = row["modes"][prec]
    T_meas, T = row["ctx"], 2048
    new_split = "model_work" in m  # older rows counted repeated forwards as statistics
    m8, s8 = _layer_flops(mcfg, T_meas)
    m70, s70 = _layer_flops(LLAMA70B, T)
    plain70 = row["plain_per_layer_token_s"] * m70 / m8
    stats70 = m["stats_per_layer_token_s"] * s70 / s8
    shape = ModelShape.from_config(transformers.LlamaConfig(**LLAMA70B))
    acc = yaqa.plan.accumulator_bytes(shape, CollectionRequest(collect_hx=False))
    rows = []
    for batch in (1, 2):
        rows += _project_rows(shape, T, batch, plain70, stats70, args.margin)
    rounding = _project_rounding()
    disk = {"fp32": stored_bytes(shape, False, 4) / 1e9, "bf16": stored_bytes(shape, False, 2) / 1e9}
    proj = {"source": str(src.relative_to(Path(__file__).parent.parent)
                          if src.is_relative_to(Path(__file__).parent.parent) else src),
            "measured": {"layers": row["layers"], "ctx": T_meas, "precision": prec,
                         "plain_per_layer_token_s": row["plain_per_layer_token_s"],
                         "stats_per_layer_token_s": m["stats_per_layer_token_s"],
                         "stats_include_repeated_forwards": not new_split},
            "flops_ratio_model": m70 / m8, "flops_ratio_stats": s70 / s8,
            "plain_per_layer_token_s": plain70, "stats_per_layer_token_s": stats70,
            "accumulators_gb_per_block": acc / 1e9, "rows": rows, "rounding": rounding,
            "disk_gb": disk}
    state["projection_70b"] = proj
    _write_results(args, "scale_projection_70b.json", json.dumps(proj, indent=1))
    _write_results(args, "scale_projection_70b.md", _projection_md(proj))
    print(_projection_md(proj))


def _project_rows(shape: ModelShape, T: int, batch: int, plain70: float, stats70: float,
                  margin: float) -> list[dict]:
    """Passes, cache and hours of 70B collection for each token count and GPU count."""
    L = shape.n_blocks
    req = CollectionRequest(n_seqs=1024, ctx=T, batch_size=batch, collect_hx=False)
    acc = yaqa.plan.accumulator_bytes(shape, req)
    act = yaqa.plan.activation_bytes_per_token(shape, T, False) * batch * T
    head = yaqa.plan.head_bytes(shape, req)
    ws = yaqa.plan.workspace_bytes(shape, req)
    rows: list[dict] = []
    for tokens_label, n_seqs in (("1024 x 2048", 1024), ("65536 x 2048 (paper)", 65536)):
        tokens = n_seqs * T
        cache_per_boundary = tokens * shape.hidden * shape.dtype_bytes
        for gpus in (2, 4, 8):
            # the model split by layers over the GPUs (one process, a device map: what yaqa's
            # hooks support today); a GPU holds its L/G blocks' weights and activations, the
            # head on the last one, and the accumulators of the group's blocks it holds
            per_gpu = L / gpus
            free = GPU_BYTES * (1 - margin) - shape.param_bytes / gpus - act * per_gpu \
                - head - ws
            fit = int(free // acc) if free > 0 else 0
            if fit < 1:
                rows.append({"tokens": tokens_label, "batch": batch, "gpus": gpus,
                             "fits": False})
                continue
            for layout, bpp in (("contiguous (today)", min(fit, math.ceil(per_gpu))),
                                ("spread over GPUs (not built)", min(L, fit * gpus))):
                groups = math.ceil(L / bpp)
                cache = cache_per_boundary * groups if groups > 1 else 0
                # with the boundary cache: the top group runs the whole forward and its own
                # backward, the others their own blocks; without: the whole forward and the
                # backward to the group's start
                top = L - (groups - 1) * bpp
                work_cached = 1 / 3 + 2 / 3 * top / L + (groups - 1) * bpp / L
                work_off = sum(1 / 3 + 2 / 3 * (1 - k * bpp / L) for k in range(groups))
                secs = {w: tokens * L * (plain70 * work + stats70)
                        for w, work in (("cached", work_cached), ("recompute", work_off))}
                # the cache is used where it fits 60% of the host memory (as "auto" decides)
                use = cache <= 0.6 * HOST_BYTES
                best = secs["cached"] if use else secs["recompute"]
                rows.append({"tokens": tokens_label, "batch": batch, "gpus": gpus, "fits": True,
                             "layout": layout, "blocks_per_pass": bpp, "passes": groups,
                             "boundary_cache_gb": cache / 1e9, "cache_fits_host": use,
                             "hours_cached": secs["cached"] / 3600,
                             "hours_recompute": secs["recompute"] / 3600,
                             "hours": best / 3600, "gpu_hours": best * gpus / 3600})
    return rows


def _project_rounding() -> dict:
    """Rounding all 560 linears of 70B, from the H100 per-shape times (int4 g128 YAQA, and the
    trellis2 per-tile time), one GPU; blocks are independent, so G GPUs divide it by G."""
    out: dict = {}
    if H100_ROUNDING.exists():
        t = {r["shape"]: r for r in json.loads(H100_ROUNDING.read_text())["timings"]}
        # YAQA's feedback is two-sided: cost ~ m n (m + n); scale from the nearest measured shape
        ref = [(r["m"], r["n"], r["yaqa_s"]) for r in t.values() if r["m"] >= 4096]

        def yaqa_s(m: int, n: int) -> float:
            rm, rn, rs = min(ref, key=lambda x: abs(math.log(x[0] * x[1] / (m * n))))
            return rs * (m * n * (m + n)) / (rm * rn * (rm + rn))
        per_block = sum(yaqa_s(m, n) for m, n in _shapes(LLAMA70B))
        out["yaqa_int4_hours_one_gpu"] = per_block * LLAMA70B["num_hidden_layers"] / 3600
        out["yaqa_int4_s_per_block"] = per_block
    if H100_TRELLIS.exists():
        runs = json.loads(H100_TRELLIS.read_text())["runs"]
        ms = min(r["ms_per_tile"] for r in runs if "ms_per_tile" in r)
        params = LLAMA70B["num_hidden_layers"] * sum(m * n for m, n in _shapes(LLAMA70B))
        out["trellis2_hours_one_gpu"] = params / 256 * ms / 1e3 / 3600
        out["trellis2_ms_per_tile"] = ms
    return out


def _projection_md(p: dict) -> str:
    me = p["measured"]
    lines = ["# Llama-3.1-70B projection (bench/scale.py --stage project)", "",
             f"Source: `{p['source']}`, the {me['layers']}-layer Llama-3.1-8B-shaped row, "
             f"precision {me['precision']}, ctx {me['ctx']}: plain forward+backward "
             f"{me['plain_per_layer_token_s'] * 1e9:.0f} ns and statistics "
             f"{me['stats_per_layer_token_s'] * 1e9:.0f} ns per layer and token"
             + (" (that row's statistics still include the forwards its passes repeated, so "
                "they err on the long side)" if me["stats_include_repeated_forwards"] else "")
             + ".", "",
             f"Scaled by flops to 70B (80 layers, hidden 8192, intermediate 28672, 8 kv heads, "
             f"ctx 2048): model x{p['flops_ratio_model']:.2f}, statistics "
             f"x{p['flops_ratio_stats']:.2f} -> {p['plain_per_layer_token_s'] * 1e9:.0f} ns + "
             f"{p['stats_per_layer_token_s'] * 1e9:.0f} ns per layer and token. Accumulators: "
             f"{p['accumulators_gb_per_block']:.1f} GB per block (fp32, no H_x).", "",
             "Layout: the 141 GB bf16 model does not fit one 80 GB GPU, so it is split by layers "
             "over the GPUs (one process, a device map; yaqa's hooks put each layer's "
             "accumulators on its device). Stages run one after another (no pipelining), so "
             "the wall time does not shrink with more GPUs; more GPUs leave more memory for "
             "accumulators. 'contiguous' is what `blocks_per_pass` does today (a group is a "
             "run of consecutive blocks, so it lives on about one GPU); 'spread' would collect "
             "blocks on every GPU at once (not built). Hours use the boundary cache (the top "
             "group runs the whole forward and its own backward, the others their own blocks) "
             "where it fits 60% of a 2 TB host; otherwise every pass recomputes the forward and "
             "backward outside its "
             "group. GPU-h = hours x GPUs (stages idle in turn). Batch = sequences of 2048 per "
             "micro-batch (the 8B measurement used 2; per-token times are taken as equal); "
             "data parallelism over model replicas (which would divide the hours) is not "
             "modelled.", "",
             "| tokens | batch | H100s | layout | blocks/pass | passes | cache GB | h with cache | "
             "h without | collection h | GPU-h |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in p["rows"]:
        if not r["fits"]:
            lines.append(f"| {r['tokens']} | {r['batch']} | {r['gpus']} | does not fit (weights "
                         "+ activations of the GPU's layers) | | | | | | | |")
            continue
        cached = f"{r['hours_cached']:.1f}" if r["cache_fits_host"] else "(cache too big)"
        lines.append(f"| {r['tokens']} | {r['batch']} | {r['gpus']} | {r['layout']} | "
                     f"{r['blocks_per_pass']} | "
                     f"{r['passes']} | {r['boundary_cache_gb']:.0f} | {cached} | "
                     f"{r['hours_recompute']:.1f} | **{r['hours']:.1f}** | {r['gpu_hours']:.0f} |")
    ro = p["rounding"]
    if ro:
        lines += ["", "Rounding all 560 linears on one H100 (blocks are independent: G GPUs "
                      "divide it by G): "
                  + (f"YAQA int4 g128 {ro['yaqa_int4_hours_one_gpu']:.2f} h "
                     f"({ro['yaqa_int4_s_per_block']:.0f} s per block, scaled from "
                     "`rounding_cuda.json` by m·n·(m+n))" if "yaqa_int4_hours_one_gpu" in ro
                     else "")
                  + (f"; trellis2 {ro['trellis2_hours_one_gpu']:.1f} h at "
                     f"{ro['trellis2_ms_per_tile']:.3f} ms per 16x16 tile "
                     "(`trellis_speed_h100_triton.json`)" if "trellis2_hours_one_gpu" in ro
                     else "") + "."]
    lines += ["", f"Disk: the Hessian store (packed triangles, no H_x) is "
                  f"{p['disk_gb']['fp32']:.0f} GB in fp32 or {p['disk_gb']['bf16']:.0f} GB in "
                  "bf16, plus the boundary cache where it goes to disk."]
    return "\n".join(lines) + "\n"


# -- report ----------------------------------------------------------------------------------------

def stage_report(args, state: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    st = state["stages"]
    total = sum(st.get(k, {}).get("seconds", 0) for k in ("collect", "round", "save"))
    lines = [f"# bench/scale.py{args.tag}", ""]
    if args.tiny:
        lines += ["(CPU functional check of the stage sequence at a tiny size, on a loaded "
                  "machine: the timings are noise, not measurements. The 70B projection is in "
                  "scale_projection_70b.md, from the H100 measurements.)", ""]
    lines += [f"Machine: {platform.node()}, torch {torch.__version__}, "
             f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
             f"Model: {'tiny' if args.tiny else 'Llama-3.1-8B'}-shaped, random bf16 weights; "
             f"Sketch B on {args.n_seqs} x {args.ctx} tokens, batch {args.batch_size}; "
             f"YAQA int4 g{args.group_size}; factors stored as packed {args.storage} triangles.", "",
             "| stage | wall s | commands | peak GPU GiB | peak host GiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for k in ("plan", "collect", "round", "save"):
        if k in st:
            v = st[k]
            lines.append(f"| {k} | {v['seconds']:.1f} | {v['commands']} | "
                         f"{v.get('peak_gpu_gib', float('nan')):.1f} | {v['peak_host_gib']:.1f} |")
    lines += ["", f"**Total (collect + round + save): {total / 60:.1f} min** "
                  "(model construction in each command excluded, listed in state.json)."]
    if "plan" in state:
        p = state["plan"]
        lines += ["", f"Plan: {p['blocks_per_pass']} blocks per pass, {len(p['groups'])} passes, "
                      f"estimated collection peak {p['collection_peak_bytes'] / GiB:.1f} GiB "
                      f"(measured: {st.get('collect', {}).get('peak_gpu_gib', float('nan')):.1f}), "
                      f"estimated time {(p.get('seconds_estimate') or 0) / 60:.1f} min; boundary "
                      f"cache: {p.get('boundary_cache', {}).get('mode', 'off')} "
                      f"({p.get('boundary_cache', {}).get('reason', '')})."]
        if p.get("end_of_pass_peak_bytes"):
            lines += ["", f"Plan during a pass {sum(p['collection_terms'].values()) / GiB:.1f} "
                          f"GiB, at a pass's end {p['end_of_pass_peak_bytes'] / GiB:.1f} GiB ("
                          + ", ".join(f"{k} {v / GiB:.2f}"
                                      for k, v in p.get("end_of_pass_terms", {}).items()) + ")."]
    if phase_line(st.get("collect", {})):
        lines += ["", phase_line(st["collect"]) + " (passes: the micro-batches; end_pass: sums "
                  "to factors, and on the last pass also checked, estimated, packed and copied "
                  "to host; writing: handing the files to the writer; other: the rest)"]
    if "throughput" in state:
        lines += ["", "| layers | plain ms | Sketch B ms | x plain | x plain if one pass |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for k, v in state["throughput"].items():
            lines.append(f"| {k} | {v['plain_s'] * 1e3:.1f} | {v['sketch_b_s'] * 1e3:.1f} | "
                         f"{v['x_plain']:.2f} | {v['x_plain_if_one_pass']:.2f} |")
    if "projection_70b" in state:
        lines += ["", "Llama-3.1-70B projection: see bench/results/scale_projection_70b.md."]
    _write_results(args, f"scale{args.tag}.md", "\n".join(lines) + "\n")
    _write_results(args, f"scale{args.tag}.json", json.dumps(state, indent=1, default=str))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", required=True,
                    choices=["plan", "collect", "round", "save", "report", "throughput",
                             "project", "all"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=Path("scale-work"))
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64 (CPU check)")
    ap.add_argument("--n-seqs", type=int, default=None, help="default 1024 (tiny: 8)")
    ap.add_argument("--ctx", type=int, default=None, help="default 2048 (tiny: 32)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=None, help="default 128 (tiny: 32)")
    ap.add_argument("--storage", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--budget-s", type=float, default=420,
                    help="stop collect/round after this many seconds (leaves time to write the "
                         "resume checkpoint inside a 10-minute command)")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="device memory to plan for (default: the device's)")
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--blocks-per-pass", type=int, default=None,
                    help="force this many blocks per pass (default: the plan's choice)")
    ap.add_argument("--boundary-cache", default="auto",
                    choices=["auto", "memory", "disk", "off"],
                    help="hidden states and gradients at pass boundaries (see the plan)")
    ap.add_argument("--host-gib", type=float, default=None,
                    help="host memory available to plan the boundary cache for (default: "
                         "this machine's)")
    ap.add_argument("--layers-list", type=lambda s: [int(x) for x in s.split(",")],
                    default=None, help="throughput depths (default 8,32; tiny: 1,2)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hx", action="store_true", help="also collect H_x in throughput")
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=["auto"],
                    help="statistics precision modes timed by the throughput stage, e.g. "
                         "tf32,bf16 (the first feeds the projection)")
    ap.add_argument("--gram-scheme", default="syrk", choices=["syrk", "full"],
                    help="T x T Grams of the statistics: lower triangle only (syrk) or whole")
    ap.add_argument("--leaf-batch", default="on", choices=["on", "off"],
                    help="one batched GEMM for the diagonal leaves of every symmetric product "
                         "(on) or one GEMM each (off, the previous statistics)")
    ap.add_argument("--packed-sums", default="on", choices=["on", "off"],
                    help="symmetric sums stored packed, about half of n x n (on), or as full "
                         "n x n matrices (off, the previous layout; the plan then fits fewer "
                         "blocks per pass)")
    ap.add_argument("--throughput-json", type=Path, default=None,
                    help="project from this throughput file (default: "
                         "bench/results/scale_throughput_h100_i14.json)")
    ap.add_argument("--copy-to", type=Path, default=None,
                    help="also write the throughput table and profile here (e.g. $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="plan without the timed warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refine", type=int, default=None,
                    help="round stage: refinement rounds (default: the library's, 32 on CUDA; "
                         "the recorded 9.6 min run predates that default and had none)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.n_seqs = args.n_seqs or (8 if args.tiny else 1024)
    args.ctx = args.ctx or (32 if args.tiny else 2048)
    args.group_size = args.group_size or (32 if args.tiny else 128)
    args.layers_list = args.layers_list or ([1, 2] if args.tiny else [8, 32])
    if args.tiny and "tiny" not in args.tag:
        args.tag += "_tiny"  # a functional check never overwrites a real run's results
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from yaqa.hessians import accumulators

    accumulators._GRAM_SCHEME = args.gram_scheme
    accumulators._BATCH_LEAVES = args.leaf_batch == "on"
    accumulators._PACKED_SUMS = args.packed_sums == "on"
    state = load_state(args.work)
    stages = (["plan", "collect", "round", "save", "throughput", "project", "report"]
              if args.stage == "all" else [args.stage])
    run = {"plan": stage_plan, "collect": stage_collect, "round": stage_round,
           "save": lambda a, st: stage_round(a, st, save=True), "throughput": stage_throughput,
           "project": stage_project, "report": stage_report}
    for s in stages:
        run[s](args, state)
        save_state(args.work, state)
        if args.copy_to:  # every stage leaves its state in $OUT, done or cut off
            args.copy_to.mkdir(parents=True, exist_ok=True)
            (args.copy_to / f"scale_state{args.tag}.json").write_text(
                (args.work / "state.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
