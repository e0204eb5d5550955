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


def stage_plan(args, state: dict) -> None:
    t = time.perf_counter()
    shape = ModelShape.from_config(config(args))
    plan = make_plan(shape, request(args), budget_bytes=budget(args), device=args.device,
                     margin=args.margin)
    if not args.dry_run:
        model = build_model(args)
        ids = calibration(args, model.config.vocab_size)
        timed_warmup(model, ids, plan, request(args), steps=2)
    state["plan"] = plan.to_dict()
    print(plan.summary())
    record(state, "plan", time.perf_counter() - t, True, args)


def stage_collect(args, state: dict) -> None:
    if state["stages"].get("collect", {}).get("done"):
        print("collect: done")
        return
    if "plan" not in state:  # the plan stage was skipped: plan without the warm-up
        state["plan"] = make_plan(ModelShape.from_config(config(args)), request(args),
                                  budget_bytes=budget(args), device=args.device,
                                  margin=args.margin).to_dict()
    bpp = state["plan"]["blocks_per_pass"]
    t = time.perf_counter()
    model = build_model(args)
    ids = calibration(args, model.config.vocab_size)
    t_build = time.perf_counter() - t
    done = False
    try:
        with Deadline(max(1.0, args.budget_s - t_build)):
            run_collection(model, ids, args.work / "hessians", sketch="B", batch_size=args.batch_size,
                           blocks_per_pass=bpp, collect_hx=False, storage_dtype=args.storage,
                           checkpoint_interval_s=1e9, progress=not args.quiet)
        done = True
    except KeyboardInterrupt as e:
        print(f"collect: stopped at the time budget ({e}); run the same command again")
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            raise SystemExit(oom_message(e, None, "collection")) from None
        raise
    record(state, "collect", time.perf_counter() - t - t_build, done, args,
           build_seconds=t_build, blocks_per_pass=bpp)
    if done:
        print("collect: done")


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
                           work_dir=args.work / "quant", progress=not args.quiet)
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
        extra = {"layers": len(rep.layers), "resumed_blocks": rep.resumed_blocks}
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
    plan = make_plan(shape, req, budget_bytes=budget(args), device=args.device,
                     margin=args.margin)
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
    row = {"layers": layers, "batch": args.batch_size, "ctx": args.ctx, "plain_s": t_plain,
           "plain_peak_gib_est": plain_est / GiB,
           "plain_peak_gib": (plain_peak or 0) / GiB, "groups": plan.groups,
           "plan_peak_gib_est": plan.collection_peak_bytes / GiB,
           "plain_per_layer_token_s": t_plain / layers / ids.numel(), "modes": {}}
    for prec in precisions:
        _free(args.device)
        t_groups = []
        for g in plan.groups:
            col = HessianCollector(model, g, collect_hx=args.hx, precision=prec)
            with col:
                col.begin_pass("b")
                t_groups.append(_timed(lambda: col.step(ids, range(ids.shape[0])), args.steps,
                                       args.device))
            # how bf16 products reached the fp32 sums: one fused GEMM, or GEMM + add
            fused = {a.prod._fused_ok for a in col.acc.values()}
            del col  # its accumulators must be gone before the next group allocates its own
            gc.collect()
        # the statistics alone: each group's time minus the model's own work (the forward is
        # the same; its backward stops at the group's first block)
        stat_s = max(sum(tg - t_plain * (1 - g[0] / layers)
                         for tg, g in zip(t_groups, plan.groups)), 0.0)
        sb = sum(t_groups)
        row["modes"][prec] = {
            "sketch_b_s": sb, "x_plain": sb / t_plain,
            "x_plain_if_one_pass": (t_plain + stat_s) / t_plain,
            "stats_per_layer_token_s": stat_s / layers / ids.numel(),
            "peak_gpu_gib": (gpu_peak_bytes(args.device) or 0) / GiB,
            "fused_bf16_accumulation": sorted(str(f) for f in fused)}
        m = row["modes"][prec]
        print(f"{layers} layers, batch {args.batch_size}, {prec}: plain {t_plain * 1e3:.1f} ms, "
              f"Sketch B {sb * 1e3:.1f} ms over {len(plan.groups)} pass(es) = "
              f"{m['x_plain']:.2f}x plain ({m['x_plain_if_one_pass']:.2f}x if every accumulator "
              f"fit one pass); statistics {stat_s / layers * 1e3:.1f} ms per layer", flush=True)
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

def _layer_flops(cfg: dict, T: int) -> tuple[float, float]:
    """(model fwd+bwd, Sketch-B statistics) flops per token of one decoder layer."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    model = 4 * sum(m * n for m, n in shapes) + 6 * T * h  # activation-only bwd, causal attn
    stats = sum(4 * T * (m + n) + 2 * (n * n + m * m) * 0.52 for m, n in shapes)
    return model, stats


def stage_project(args, state: dict) -> None:
    """Llama-3.1-70B: GPUs, hours and disk, scaled from the measured per-layer numbers."""
    thr = state.get("throughput")
    if not thr:
        raise SystemExit("run --stage throughput first (it measures the per-layer numbers)")
    deepest = thr[max(thr, key=int)]
    T = args.ctx
    m8, s8 = _layer_flops(LLAMA8B, T)
    m70, s70 = _layer_flops(LLAMA70B, T)
    plain70 = deepest["plain_per_layer_token_s"] * m70 / m8
    stats70 = deepest["stats_per_layer_token_s"] * s70 / s8
    cfg = transformers.LlamaConfig(**LLAMA70B)
    shape = ModelShape.from_config(cfg)
    L = shape.n_blocks
    rows = []
    for gpus, tokens in [(g, t) for t in (args.n_seqs * T, 65536 * 2048) for g in (4, 8, 16)]:
        # layers split across the GPUs (pipeline, weights sharded); each GPU holds the
        # accumulators of the blocks it collects; the data passes repeat per group of blocks
        per_gpu = 80 * 10**9 * (1 - args.margin) - shape.param_bytes / gpus
        acc = yaqa.plan.accumulator_bytes(shape, request(args))
        act = yaqa.plan.activation_bytes_per_token(shape, T, False) * args.batch_size * T * L / gpus
        fit = int((per_gpu - act - 4 * GiB) // acc) if per_gpu > act else 0
        if fit < 1:
            rows.append({"gpus": gpus, "tokens": tokens, "fits": False})
            continue
        blocks_per_pass = min(L, fit * gpus)
        passes = math.ceil(L / blocks_per_pass)
        # each pass: a full forward (1/3 of fwd+bwd) + backward down to its first block; the
        # statistics of every layer once; pipeline stages run one after another (no overlap)
        fwd_bwd = sum((1 / 3 + 2 / 3 * (1 - k * blocks_per_pass / L)) for k in range(passes))
        secs = tokens * L * (plain70 * fwd_bwd + stats70)
        rows.append({"gpus": gpus, "tokens": tokens, "fits": True,
                     "blocks_per_pass": blocks_per_pass,
                     "passes": passes, "collect_hours": secs / 3600,
                     "gpu_hours": secs * gpus / 3600})
    disk = {"fp32": stored_bytes(shape, False, 4) / 1e9, "bf16": stored_bytes(shape, False, 2) / 1e9}
    state["projection_70b"] = {"plain_per_layer_token_s": plain70,
                               "stats_per_layer_token_s": stats70, "rows": rows,
                               "disk_gb": disk, "from": f"{max(thr, key=int)}-layer measurement"}
    print(json.dumps(state["projection_70b"], indent=1))


# -- report ----------------------------------------------------------------------------------------

def stage_report(args, state: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    st = state["stages"]
    total = sum(st.get(k, {}).get("seconds", 0) for k in ("collect", "round", "save"))
    lines = [f"# bench/scale.py{args.tag}", "",
             f"Machine: {platform.node()}, torch {torch.__version__}, "
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
                      f"estimated time {(p.get('seconds_estimate') or 0) / 60:.1f} min."]
    if "throughput" in state:
        lines += ["", "| layers | plain ms | Sketch B ms | x plain | x plain if one pass |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for k, v in state["throughput"].items():
            lines.append(f"| {k} | {v['plain_s'] * 1e3:.1f} | {v['sketch_b_s'] * 1e3:.1f} | "
                         f"{v['x_plain']:.2f} | {v['x_plain_if_one_pass']:.2f} |")
    if "projection_70b" in state:
        pr = state["projection_70b"]
        lines += ["", f"Llama-3.1-70B projection (per-layer times from the {pr['from']}, "
                      "scaled by flops; layers split over the GPUs, stages not overlapped; "
                      f"disk {pr['disk_gb']['fp32']:.0f} GB fp32 / {pr['disk_gb']['bf16']:.0f} GB "
                      "bf16 packed, no H_x):", "",
                  "| tokens | H100s | blocks/pass | passes | collection h | GPU-h |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in pr["rows"]:
            if r["fits"]:
                lines.append(f"| {r['tokens']} | {r['gpus']} | {r['blocks_per_pass']} | "
                             f"{r['passes']} | "
                             f"{r['collect_hours']:.2f} | {r['gpu_hours']:.1f} |")
            else:
                lines.append(f"| {r['tokens']} | {r['gpus']} | does not fit | | | |")
    (RESULTS / f"scale{args.tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"scale{args.tag}.json").write_text(json.dumps(state, indent=1, default=str))
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
    ap.add_argument("--layers-list", type=lambda s: [int(x) for x in s.split(",")],
                    default=None, help="throughput depths (default 8,32; tiny: 1,2)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hx", action="store_true", help="also collect H_x in throughput")
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=["auto"],
                    help="statistics precision modes timed by the throughput stage, e.g. "
                         "tf32,bf16 (the first feeds the projection)")
    ap.add_argument("--copy-to", type=Path, default=None,
                    help="also write the throughput table and profile here (e.g. $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="plan without the timed warm-up")
    ap.add_argument("--seed", type=int, default=0)
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
    state = load_state(args.work)
    stages = (["plan", "collect", "round", "save", "throughput", "project", "report"]
              if args.stage == "all" else [args.stage])
    run = {"plan": stage_plan, "collect": stage_collect, "round": stage_round,
           "save": lambda a, st: stage_round(a, st, save=True), "throughput": stage_throughput,
           "project": stage_project, "report": stage_report}
    for s in stages:
        run[s](args, state)
        save_state(args.work, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
