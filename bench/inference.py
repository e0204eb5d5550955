"""Inference speed and memory of packed int-k models against bf16, in one run.

    python bench/inference.py --device cuda --budget 100   # Llama-3.1-8B shape, ~1.5 min on an H100
    python bench/inference.py --device cuda --generate     # + transformers generate (compiles, ~6 min)
    python bench/inference.py --device cpu --tiny          # smoke test of the script

Builds a Llama-3.1-8B-shaped model with random weights from its config (no download).  The
quantized variants replace every decoder linear by a packed int4 g128 layer with random codes,
scales and signs (speed does not depend on the values, and quantizing 8B weights would take a
minute).  For bf16, int4 and int4 + incoherence (``+int8head``: with the int8 embedding and LM
head that ``--embeddings int8`` saves):

- GPU memory after loading, and the bytes of the decoder linears alone;
- batch-1 greedy decode tokens/s with :class:`yaqa.nn.graph_decode.GraphDecoder` (static cache,
  one CUDA graph per token: no Python or launch overhead), and without the graph;
- with ``--generate``: tokens/s of transformers ``generate`` with a static cache (it compiles the
  forward with ``torch.compile(mode="reduce-overhead")``, about a minute per variant);
- prefill latency of ``--prefill`` tokens (dequantize to bf16 + cuBLAS for the packed layers);
- per-layer kernel times for the four Llama shapes: the fused GEMV in GB/s of packed bytes, with
  and without the Hadamard rotations, the dequantize kernel, against bf16, and the GEMV's error
  against the dense dequantized weight (RTN codes); and the LM head as the int8 GEMV against
  bf16; the down projection with silu(gate)·up folded into its GEMV against the SiLU-mul kernel
  + GEMV; the bf16 head by the Triton GEMV against cuBLAS.  Decode tok/s also with the fold (off by default)
  and with the cuBLAS head (same run), so their gains show as ratios.

``--budget S`` skips the stages that would start after S seconds (they are reported as skipped)
and a watchdog ends the process 20 s later whatever happens, so the run cannot hang.  Results are
written after every stage: ``bench/results/inference-<device>.json`` and a markdown table next to
it (``--out``), also into ``--copy-to DIR``.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yaqa.nn import QuantizedLinear  # noqa: E402
from yaqa.nn.graph_decode import GraphDecoder  # noqa: E402
from yaqa.quantizers import IntQuantizer  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            tie_word_embeddings=False)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps: int) -> float:
    """Median wall seconds of ``fn`` (after one warm-up call)."""
    fn()
    out = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def build(cfg: dict, dev, dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


_TEMPLATES: dict[tuple, QuantizedLinear] = {}


def random_packed(lin: torch.nn.Linear, bits: int, group: int, incoherence: bool,
                  gen: torch.Generator) -> QuantizedLinear:
    """A packed layer of ``lin``'s shape with random codes (zero point mid-range) and scales that
    keep the output scale of the random init, and random signs."""
    m, n = lin.out_features, lin.in_features
    dev, dtype = lin.weight.device, lin.weight.dtype
    key = (m, n, bits, group, incoherence, dev, dtype)
    if key not in _TEMPLATES:  # building a layer costs ~0.1 s of host work; copying one does not
        _TEMPLATES[key] = QuantizedLinear(n, m, IntQuantizer(bits=bits, group_size=group),
                                          incoherence=incoherence, dtype=dtype, device=dev)
    ql = copy.deepcopy(_TEMPLATES[key])
    # Drawn on the device: 3.4 GB of random bytes on the host would take longer than the run.
    ql.qweight.copy_(torch.randint(0, 256, ql.qweight.shape, dtype=torch.uint8, device=dev))
    code_std = math.sqrt((4**bits - 1) / 12)
    ql.grid_scale.fill_(lin.weight.float().std().item() / code_std)
    ql.grid_zero.fill_(2 ** (bits - 1))
    if incoherence:
        for name in ("tf_sign_in", "tf_sign_out"):
            b = getattr(ql, name)
            b.copy_((torch.randint(0, 2, b.shape, generator=gen) * 2 - 1).to(b))
        ql.materialize_hadamard()
    return ql


def quantize_random(model, bits: int, group: int, incoherence: bool) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for name in PROJ:
            layer.set_submodule(name, random_packed(layer.get_submodule(name), bits, group,
                                                    incoherence, gen))


def linear_bytes(model) -> int:
    total = 0
    for m in model.model.layers.modules():
        if isinstance(m, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
            total += sum(p.numel() * p.element_size() for p in m.parameters())
        elif isinstance(m, torch.nn.Linear):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
    return total


def measure_model(model, dev, args, left) -> dict:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    res = {"memory_bytes": torch.cuda.memory_allocated() if dev.type == "cuda" else None,
           "linear_bytes": linear_bytes(model)}
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g).to(dev)
    n, reps = args.new_tokens, 3
    eager_n = max(2, n // 8)
    dec = GraphDecoder(model, max_len=args.prompt + (reps + 1) * n + 2 * eager_n + 16)
    t = time.perf_counter()
    dec.prefill(prompt)  # captures the graph
    res["capture_s"] = time.perf_counter() - t
    res["decode_tok_s"] = n / timed(lambda: dec.decode(n), dev, reps)
    res["fused_small_ops"] = dec.fused
    res["stacked_groups"] = dec.stacked  # q/k/v and gate/up GEMVs run as one launch each
    res["silu_folded_layers"] = sum(dec._fold) if dec.fused else 0
    res["triton_head"] = dec.dense_head  # bf16 head by the Triton GEMV (measured faster)
    res["step_ms_graph"] = 1e3 / res["decode_tok_s"]
    if args.profile and left() > 0:
        res["profile"] = profile_step(dec, dev)
    dec.use_graph = False
    res["decode_eager_tok_s"] = eager_n / timed(lambda: dec.decode(eager_n), dev, 1)
    del dec

    def alternative(key: str, when: bool, **options) -> None:
        """Decode tok/s of the same graph with other GraphDecoder ``options``, into res[key]."""
        if not (dev.type == "cuda" and args.compare_unfused and when and left() > 0):
            return
        alt = GraphDecoder(model, max_len=args.prompt + (reps + 1) * n + 8, **options)
        if key == "decode_tok_s_folded_silu":
            res["silu_foldable_layers"] = sum(alt._fold)
            if not res["silu_foldable_layers"]:
                return
        alt.prefill(prompt)
        res[key] = n / timed(lambda: alt.decode(n), dev, reps)

    # transformers' norm / rotary / SDPA / activation ops: what the fused small-op kernels save
    alternative("decode_tok_s_torch_small_ops", True, fused=False)
    # the path before stacking: one GEMV launch per linear (fused small ops)
    alternative("decode_tok_s_separate_linears", res["stacked_groups"], stack_linears=False)
    # silu(gate)·up inside the down projections (off by default): the fold against the
    # separate SiLU-mul kernel
    alternative("decode_tok_s_folded_silu", res["fused_small_ops"], fold_silu=True)
    # cuBLAS for the bf16 head: what the Triton head GEMV saves
    alternative("decode_tok_s_cublas_head", res["triton_head"], dense_head=False)

    long = torch.randint(0, vocab, (1, args.prefill), generator=g).to(dev)

    def prefill():
        with torch.no_grad():
            model(long, use_cache=False, logits_to_keep=1)

    res["prefill_s"] = timed(prefill, dev, 3)
    if args.generate and left() > 0:
        res.update(measure_generate(model, prompt, dev, args))
    return res


# Kernel name fragments -> what they are (first match wins), for the per-step breakdown.
CATEGORIES = (("gemv_words", "packed GEMV"), ("gemv_bytes", "packed GEMV"),
              ("dequant", "dequantize"), ("rotate", "Hadamard rotation"),
              ("_add_rmsnorm", "add + RMSNorm (fused)"),
              ("_rope_attention", "rotary + cache + attention (fused)"),
              ("_rope_cache", "rotary + cache (fused)"), ("int8_gemv", "int8 GEMV (head)"),
              ("dense_gemv", "bf16 head GEMV (Triton)"),
              ("_argmax", "argmax (fused)"),
              ("_decode_attention", "attention (fused)"), ("_silu_mul", "SiLU-mul (fused)"),
              ("attention", "attention (torch)"), ("fmha", "attention (torch)"),
              ("softmax", "attention (torch)"), ("gemm", "cuBLAS GEMM/GEMV (bf16 linears, head)"),
              ("gemv", "cuBLAS GEMM/GEMV (bf16 linears, head)"), ("nvjet", "cuBLAS GEMM/GEMV (bf16 linears, head)"),
              ("xmma", "cuBLAS GEMM/GEMV (bf16 linears, head)"), ("cutlass", "cuBLAS GEMM/GEMV (bf16 linears, head)"),
              ("reduce", "reductions (norm, argmax)"), ("index", "indexing / cache writes"),
              ("copy", "copies / casts"), ("elementwise", "elementwise"),
              ("memset", "memset"), ("embedding", "embedding"))


def category(name: str) -> str:
    low = name.lower()
    return next((c for frag, c in CATEGORIES if frag.lower() in low), "other")


def profile_step(dec, dev, steps: int = 3, top: int = 20) -> dict:
    """Per decode step: GPU kernels (count, time, top kernels, categories) from torch.profiler.

    The step runs eagerly here (every launch visible to the profiler); its kernels are the ones
    the CUDA graph replays, so kernel time per step vs the graph's step time shows how much is
    launch gaps.  On CPU: the top ops by self CPU time (a smoke test of the script).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    use_graph = dec.use_graph
    dec.use_graph = False
    dec.step()  # warm
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            dec.step()
        sync(dev)
    dec.use_graph = use_graph
    kernels_ = {}
    for e in prof.events():
        if dev.type == "cuda" and e.device_type != DeviceType.CUDA:
            continue
        if dev.type != "cuda" and (e.device_type != DeviceType.CPU or e.cpu_parent is not None):
            continue
        dur = (e.time_range.end - e.time_range.start) if dev.type == "cuda" else e.self_cpu_time_total
        k = kernels_.setdefault(e.name, [0, 0.0])
        k[0] += 1
        k[1] += dur
    if not kernels_ and dev.type == "cuda":
        # This torch's profiler did not list kernels as device events: fall back to the ops
        # with the device time of the kernels each launched.
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", 0) or 0
            if us > 0:
                kernels_[e.key] = [e.count, us]
    total = sum(v[1] for v in kernels_.values()) / steps
    rows = sorted(kernels_.items(), key=lambda kv: -kv[1][1])
    cats: dict[str, list] = {}
    for name, (n, us) in rows:
        c = cats.setdefault(category(name) if dev.type == "cuda" else "cpu op", [0, 0.0])
        c[0] += n
        c[1] += us
    return {
        "unit": "GPU kernels" if dev.type == "cuda" else "top-level CPU ops",
        "launches_per_step": sum(v[0] for v in kernels_.values()) / steps,
        "busy_us_per_step": total,
        "categories": {c: {"per_step": n / steps, "us_per_step": us / steps}
                       for c, (n, us) in sorted(cats.items(), key=lambda kv: -kv[1][1])},
        "top": [{"name": name[:90], "per_step": n / steps, "us_per_step": us / steps,
                 "share": us / steps / total if total else 0.0} for name, (n, us) in rows[:top]],
    }


def measure_generate(model, prompt, dev, args) -> dict:
    def gen(n):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  cache_implementation="static", disable_compile=not args.compile,
                                  pad_token_id=0)

    t0 = time.perf_counter()
    gen(args.new_tokens)  # compiles (if enabled) and warms up
    res = {"generate_warmup_s": time.perf_counter() - t0}
    t_short = timed(lambda: gen(2), dev, 2)
    t_long = timed(lambda: gen(args.new_tokens), dev, 2)
    res["generate_tok_s"] = (args.new_tokens - 2) / max(t_long - t_short, 1e-9)
    return res


SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}


def kernel_bandwidth(dev, args) -> list[dict]:
    """Matrix-vector time and GB/s of packed int-k g128 against bf16, per Llama-8B shape."""
    from yaqa.nn import kernels

    shapes = SHAPES
    if args.tiny:
        shapes = {k: (m // 16, n // 16) for k, (m, n) in shapes.items()}
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (m, n) in shapes.items():
        for bits in args.kernel_bits:
            torch.manual_seed(0)
            W = torch.randn(m, n, device=dev) * 0.02
            q = IntQuantizer(bits=bits, group_size=128)
            grid = q.fit(W)
            _, codes = grid.round_all(W)
            ql = QuantizedLinear.from_codes(codes, grid, q, dtype=torch.bfloat16)
            dense = grid.dequantize(codes).to(torch.bfloat16)
            inc = random_packed(torch.nn.Linear(n, m, device=dev, dtype=torch.bfloat16), bits, 128,
                                True, gen)
            x = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                ref = x.float() @ dense.float().T
                err = ((ql(x).float() - ref).norm() / ref.norm()).item()
                t_q = _bench(lambda: ql(x), dev)
                t_i = _bench(lambda: inc(x), dev)
                t_d = _bench(lambda: torch.nn.functional.linear(x, dense), dev)
                t_w = (_bench(lambda: kernels.dequantize_cuda(ql.qweight, ql.grid_scale,
                                                              ql.grid_zero, bits, 128, m, n,
                                                              torch.bfloat16), dev)
                       if dev.type == "cuda" else float("nan"))
            qbytes = sum(b.numel() * b.element_size() for b in ql.buffers())
            rows.append({"layer": name, "shape": [m, n], "bits": bits, "rel_err": err,
                         "us_packed": t_q * 1e6, "us_packed_inc": t_i * 1e6, "us_bf16": t_d * 1e6,
                         "us_dequant": t_w * 1e6,
                         "GBs_packed": qbytes / t_q / 1e9, "GBs_bf16": m * n * 2 / t_d / 1e9,
                         "speedup": t_d / t_q})
            del W, ql, dense, inc
    rows += stacked_bandwidth(dev, args, shapes, gen)
    rows += silu_bandwidth(dev, args, shapes, gen)
    rows += head_bandwidth(dev, args)
    return rows


def silu_bandwidth(dev, args, shapes, gen) -> list[dict]:
    """The down projection with silu(gate)·up folded into its GEMV (reading the two halves of
    the stacked gate/up output; with incoherence into its input rotation) against the separate
    SiLU-mul kernel + the layer (column "layers one by one us"); GB/s of the packed weight plus
    the gate and up rows it reads."""
    from yaqa.nn import kernels

    if not kernels.use_triton(torch.empty(0, device=dev)):
        return []
    from yaqa.nn.decode_kernels import silu_mul

    m, n = shapes["down_proj"]
    out = []
    for bits, inc in ((b, i) for b in args.kernel_bits for i in (False, True)):
        down = random_packed(torch.nn.Linear(n, m, device=dev, dtype=torch.bfloat16), bits, 128,
                             inc, gen)
        if not down.folds_silu(torch.empty(1, n, device=dev, dtype=torch.bfloat16)):
            continue
        gu = torch.randn(1, 2 * n, device=dev, dtype=torch.bfloat16)
        g, u = gu[:, :n], gu[:, n:]
        dense = torch.randn(m, n, device=dev, dtype=torch.bfloat16) * 0.02
        with torch.no_grad():
            y = down.forward_silu_mul(g, u).float()
            ref = down(silu_mul(g, u)).float()
            err = ((y - ref).norm() / ref.norm()).item()
            t_f = _bench(lambda: down.forward_silu_mul(g, u), dev)
            t_u = _bench(lambda: down(silu_mul(g, u)), dev)
            t_d = _bench(lambda: torch.nn.functional.linear(silu_mul(g, u), dense), dev)
        qbytes = sum(b.numel() * b.element_size() for b in down.buffers()) + gu.numel() * 2
        # With incoherence the fold is in the input rotation: rotation + GEMV + output rotation.
        out.append({"layer": "down silu-folded" + (" +Hadamard" if inc else ""),
                    "shape": [m, n], "bits": bits, "rel_err": err,
                    "us_packed": t_f * 1e6, "us_packed_inc": float("nan"),
                    "us_bf16": t_d * 1e6, "us_dequant": float("nan"), "us_separate": t_u * 1e6,
                    "GBs_packed": qbytes / t_f / 1e9, "GBs_bf16": m * n * 2 / t_d / 1e9,
                    "speedup": t_d / t_f})
        del down, dense
    return out


def head_bandwidth(dev, args) -> list[dict]:
    """The LM head (128,256 x 4,096): the int8 GEMV (one scale per row) against bf16 cuBLAS."""
    from yaqa.nn.int8 import Int8Linear

    m, n = (LLAMA_8B["vocab_size"], LLAMA_8B["hidden_size"]) if not args.tiny else (8016, 256)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lin = torch.nn.Linear(n, m, bias=False, device=dev, dtype=dtype)
    head = Int8Linear.from_float(lin)
    x = torch.randn(1, n, device=dev, dtype=dtype)
    with torch.no_grad():
        ref = x.float() @ head.dequantized_weight().T
        err = ((head(x).float() - ref).norm() / ref.norm()).item()
        del ref
        t_q = _bench(lambda: head(x), dev)
        t_d = _bench(lambda: lin(x), dev)
    qbytes = head.weight.numel() + head.weight_scale.numel() * 4
    rows = [{"layer": "lm_head int8", "shape": [m, n], "bits": 8, "rel_err": err,
             "us_packed": t_q * 1e6, "us_packed_inc": float("nan"), "us_bf16": t_d * 1e6,
             "us_dequant": float("nan"), "GBs_packed": qbytes / t_q / 1e9,
             "GBs_bf16": m * n * 2 / t_d / 1e9, "speedup": t_d / t_q}]
    from yaqa.nn import kernels

    if dtype == torch.bfloat16 and kernels.use_triton(lin.weight):
        # The bf16 head by the Triton GEMV against cuBLAS, and the decoder's measured choice.
        from yaqa.nn import kernels_dense

        W = lin.weight.detach()
        with torch.no_grad():
            ref = x.float() @ W.float().T
            err = ((kernels_dense.dense_matmul(x, W).float() - ref).norm() / ref.norm()).item()
            del ref
            t_t = _bench(lambda: kernels_dense.dense_matmul(x, W), dev)
        use = kernels_dense.faster_than_cublas(W)[0] if dev.type == "cuda" else False
        rows.append({"layer": f"lm_head bf16 Triton ({'used' if use else 'not used'})",
                     "shape": [m, n], "bits": 16, "rel_err": err, "us_packed": t_t * 1e6,
                     "us_packed_inc": float("nan"), "us_bf16": t_d * 1e6,
                     "us_dequant": float("nan"), "GBs_packed": m * n * 2 / t_t / 1e9,
                     "GBs_bf16": m * n * 2 / t_d / 1e9, "speedup": t_d / t_t})
    return rows


def stacked_bandwidth(dev, args, shapes, gen) -> list[dict]:
    """q+k+v and gate+up as one stacked GEMV (:mod:`yaqa.nn.stacked`), with and without
    incoherence, against the same layers launched one by one (no incoherence) and bf16 one by
    one."""
    from yaqa.nn.stacked import StackedLinears

    groups = {"q+k+v stacked": [shapes["q/o_proj"], shapes["k/v_proj"], shapes["k/v_proj"]],
              "gate+up stacked": [shapes["gate/up_proj"]] * 2}
    out = []
    for name, dims in groups.items():
        n = dims[0][1]
        for bits in args.kernel_bits:
            mods = {inc: [random_packed(torch.nn.Linear(n, m, device=dev, dtype=torch.bfloat16),
                                        bits, 128, inc, gen) for m, _ in dims]
                    for inc in (False, True)}
            dense = [torch.randn(m, n, device=dev, dtype=torch.bfloat16) * 0.02 for m, _ in dims]
            x = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                t_sep = _bench(lambda: [l(x) for l in mods[False]], dev)
                ref = [l(x).float() for l in mods[True]]
                stacks = {inc: StackedLinears.build(mods[inc]) for inc in (False, True)}
                if stacks[False] is None or stacks[True] is None:
                    continue
                got = stacks[True](x)
                err = max(((g.float() - r).norm() / r.norm()).item() for g, r in zip(got, ref))
                t_q = _bench(lambda: stacks[False](x), dev)
                t_i = _bench(lambda: stacks[True](x), dev)
                t_d = _bench(lambda: [torch.nn.functional.linear(x, w) for w in dense], dev)
            m = sum(d[0] for d in dims)
            qbytes = stacks[False].nbytes
            out.append({"layer": name, "shape": [m, n], "bits": bits, "rel_err": err,
                        "us_packed": t_q * 1e6, "us_packed_inc": t_i * 1e6,
                        "us_bf16": t_d * 1e6, "us_dequant": float("nan"),
                        "us_separate": t_sep * 1e6,
                        "GBs_packed": qbytes / t_q / 1e9, "GBs_bf16": m * n * 2 / t_d / 1e9,
                        "speedup": t_d / t_q})
            del mods, dense, stacks
    return out


def gemv_configs(dev, args) -> dict:
    if dev.type != "cuda":
        return {}
    from yaqa.nn import kernels

    out = {}
    for name, (m, n) in SHAPES.items():
        for bits in args.kernel_bits:
            cfg = kernels.gemv_config(bits, 128, m, n)
            if cfg:
                out[f"{name} int{bits}"] = cfg
    from yaqa.nn import kernels_int8

    cfg = kernels_int8.int8_config(LLAMA_8B["vocab_size"], LLAMA_8B["hidden_size"])
    if cfg:
        out["lm_head int8"] = cfg
    from yaqa.nn import kernels_dense

    cfg = kernels_dense.dense_config(LLAMA_8B["vocab_size"], LLAMA_8B["hidden_size"])
    if cfg:
        out["lm_head bf16 Triton"] = {k: v for k, v in cfg.items()}
    for bits in args.kernel_bits:
        cfg = kernels.gemv_config(bits, 128, *SHAPES["down_proj"], silu=True)
        if cfg:
            out[f"down silu-folded int{bits}"] = cfg
    for name, m in (("q+k+v stacked", 6144), ("gate+up stacked", 28672)):
        for bits in args.kernel_bits:
            for inc in (False, True):
                cfg = kernels.gemv_config(bits, 128, m, 4096, segmented=inc)
                if cfg:
                    out[f"{name} int{bits}{' inc' if inc else ''}"] = cfg
    return out


def _bench(fn, dev) -> float:
    """GPU time of ``fn``: replays of a CUDA graph, so Python launch overhead is not counted
    (decode runs under CUDA graphs too)."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        fn()  # compiles and autotunes outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                fn()
        return do_bench(graph.replay, warmup=10, rep=50, return_mode="median") / 1e3 / 20
    return timed(fn, dev, 3)


def machine(dev) -> dict:
    import transformers

    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def render(report: dict) -> str:
    base = report["variants"].get("bf16")

    def rel(a, b):
        return f"{a / b:.2f}x" if base and a and b else "-"

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = ["| variant | memory GiB | linears GiB | linears vs bf16 | decode tok/s (graph) | vs bf16"
             " | decode tok/s (eager) | generate tok/s | prefill ms | vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines[0] = lines[0].replace(" | decode tok/s (eager) |", " | graph, one GEMV per linear"
                                " | graph, torch small ops | graph, SiLU folded into down (fold gain)"
                                " | graph, cuBLAS head (Triton head gain)"
                                " | decode tok/s (eager) |")
    lines[1] += "---|---|---|---|"

    def gain(r, key, inverse=False):
        v = r.get(key)
        if not (isinstance(v, float) and v):
            return "-"
        return f"{v:.1f} ({(v / r['decode_tok_s'] if inverse else r['decode_tok_s'] / v):.3f}x)"

    for name, r in report["variants"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} |" + " |" * 12)
            continue
        mem = f"{r['memory_bytes'] / 2**30:.2f}" if r["memory_bytes"] else "-"
        lines.append(
            f"| {name} | {mem} | {r['linear_bytes'] / 2**30:.2f} | "
            f"{rel(r['linear_bytes'], base and base.get('linear_bytes'))} | "
            f"{r['decode_tok_s']:.1f} | {rel(r['decode_tok_s'], base and base.get('decode_tok_s'))}"
            f" | {fmt(r.get('decode_tok_s_separate_linears'), '.1f')}"
            f" | {fmt(r.get('decode_tok_s_torch_small_ops'), '.1f')}"
            f" | {gain(r, 'decode_tok_s_folded_silu', inverse=True)} | {gain(r, 'decode_tok_s_cublas_head')}"
            f" | {r['decode_eager_tok_s']:.1f} | {fmt(r.get('generate_tok_s'), '.1f')} | "
            f"{r['prefill_s'] * 1e3:.1f} | {rel(base and base.get('prefill_s'), r['prefill_s'])} |")
    lines += ["", "| layer | shape | bits | packed us | packed GB/s | +Hadamard us | dequant us | "
              "bf16 us | bf16 GB/s | speedup | rel err | layers one by one us |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("kernels", []):
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | "
                     f"{r['us_packed']:.1f} | {r['GBs_packed']:.0f} | {r['us_packed_inc']:.1f} | "
                     f"{r['us_dequant']:.1f} | {r['us_bf16']:.1f} | {r['GBs_bf16']:.0f} | "
                     f"{r['speedup']:.2f} | {r['rel_err']:.1e} | "
                     f"{fmt(r.get('us_separate'), '.1f')} |")
    configs = report.get("gemv_configs")
    if configs:
        lines += ["", "GEMV configs the autotuner picked (BLOCK_N, BLOCK_K, SPLIT_K, UNPACK_3D, "
                  "warps, stages):", ""]
        lines += [f"- {k}: {v}" for k, v in configs.items()]
    for name, r in report["variants"].items():
        prof = r.get("profile") if isinstance(r, dict) else None
        if not prof:
            continue
        graph_us = r.get("step_ms_graph", 0) * 1e3
        lines += ["", f"### {name}: one decode step, {prof['unit']}: "
                  f"{prof['launches_per_step']:.0f} per step, {prof['busy_us_per_step']:.0f} us busy"
                  + (f" (graph step {graph_us:.0f} us: {graph_us - prof['busy_us_per_step']:.0f} us "
                     "of gaps)" if graph_us and prof["unit"] == "GPU kernels" else ""),
                  "", "| category | per step | us per step |", "|---|---|---|"]
        lines += [f"| {c} | {v['per_step']:.0f} | {v['us_per_step']:.1f} |"
                  for c, v in prof["categories"].items()]
        lines += ["", "| top kernel | per step | us per step | share |", "|---|---|---|---|"]
        lines += [f"| `{t['name']}` | {t['per_step']:.0f} | {t['us_per_step']:.1f} | "
                  f"{t['share']:.0%} |" for t in prof["top"]]
    return "\n".join(lines)


def write(report: dict, paths: list[Path]) -> None:
    table = render(report)
    m = report["machine"]
    head = (f"`{report['command']}` on {m.get('gpu') or m['cpu']} ({m['host']}), torch "
            f"{m['torch']}, triton {m['triton']}, transformers {m['transformers']}, "
            f"{report['total_s']:.0f} s")
    if report.get("kernel_fallbacks"):
        table += "\n\nKernels that fell back to a slower path:\n" + "\n".join(
            f"- {line}" for line in report["kernel_fallbacks"])
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=2))
        p.with_suffix(".md").write_text(f"{head}\n\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--generate", action="store_true",
                    help="also time transformers generate with a static cache (slow: compiles)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="with --generate: do not let generate compile the forward")
    ap.add_argument("--variants", default="bf16,int4,int4-inc",
                    help="comma-separated: bf16, intK, intK-inc, each optionally +int8head (int8 "
                         "embedding and LM head, as --embeddings int8 saves them)")
    ap.add_argument("--kernel-bits", type=lambda s: [int(b) for b in s.split(",") if b],
                    default=[4], help="bit widths for the per-layer kernel table ('' for none)")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds: later stages are skipped, the process ends 20 s after")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler breakdown of one decode step per variant (kernels, "
                         "categories) into the report")
    ap.add_argument("--no-compare-unfused", dest="compare_unfused", action="store_false",
                    help="skip timing the graph with transformers' small ops (CUDA)")
    ap.add_argument("--per-code-decode", action="store_true",
                    help="2/4-bit GEMVs decode one code per shift (the decode before the paired "
                         "mantissa decode), to time both on one machine")
    ap.add_argument("--out", default=None)
    ap.add_argument("--copy-to", default=None, help="a directory that gets the results too")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.per_code_decode:
        from yaqa.nn import kernels

        kernels.PAIRED_DECODE = False
    cfg = dict(TINY if args.tiny else LLAMA_8B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if args.tiny:
        args.prefill = min(args.prefill, 256)
        args.new_tokens = min(args.new_tokens, 16)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t_all = time.perf_counter()
    if args.budget:
        faulthandler.dump_traceback_later(args.budget + 20, exit=True)

    def left() -> float:
        return (args.budget - (time.perf_counter() - t_all)) if args.budget else math.inf

    out = Path(args.out or Path(__file__).parent / "results" / f"inference-{dev.type}.json")
    paths = [out] + ([Path(args.copy_to) / out.name] if args.copy_to else [])
    report = {"machine": machine(dev), "command": "python " + " ".join(sys.argv),
              "config": cfg, "variants": {}, "kernels": [], "total_s": 0.0}

    def save():
        from yaqa.nn import kernels

        report["kernel_fallbacks"] = list(kernels.FALLBACKS)  # kernels that did not build here
        report["total_s"] = time.perf_counter() - t_all
        write(report, paths)

    print("kernels ...", flush=True)
    report["kernels"] = kernel_bandwidth(dev, args)
    for r in report["kernels"]:
        print(f"  {r['layer']:<13} {r['shape']} int{r['bits']}: {r['us_packed']:7.1f} us "
              f"{r['GBs_packed']:7.0f} GB/s, +Hadamard {r['us_packed_inc']:7.1f} us, dequant "
              f"{r['us_dequant']:7.1f} us (bf16 {r['us_bf16']:7.1f} us {r['GBs_bf16']:6.0f} GB/s)"
              f"  x{r['speedup']:.2f}  err {r['rel_err']:.1e}", flush=True)
    report["gemv_configs"] = gemv_configs(dev, args)
    save()
    for variant in args.variants.split(","):
        if left() <= 0:
            report["variants"][variant] = {"skipped": f"budget of {args.budget:.0f} s spent"}
            continue
        t = time.perf_counter()
        try:
            model = build(cfg, dev, dtype)
            base, _, extra = variant.partition("+")
            if base != "bf16":
                bits = int(base.split("-")[0].removeprefix("int"))
                quantize_random(model, bits, 128, base.endswith("-inc"))
                _TEMPLATES.clear()
            if extra == "int8head":
                # As a checkpoint saved with --embeddings int8 loads: int8 embedding and head,
                # one scale per row; decode runs the head as the int8 GEMV.
                from yaqa.nn.int8 import quantize_embeddings

                quantize_embeddings(model)
            elif extra:
                raise ValueError(f"unknown variant suffix +{extra} (known: +int8head)")
            built = time.perf_counter() - t
            res = measure_model(model, dev, args, left)
            res["build_s"] = built
        except Exception as e:  # one failing variant must not lose the others' numbers
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        report["variants"][variant] = res
        print(f"{variant}: {json.dumps(res)}", flush=True)
        model = None
        save()
    save()
    print(render(report))
    print(f"wrote {', '.join(map(str, paths))} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
