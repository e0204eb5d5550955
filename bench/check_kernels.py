"""GPU correctness of the packed int-k paths against the dense dequantized weight (fp64 reference).

    python bench/check_kernels.py --quick   # ~20 s (mostly Triton compiles); exits 1 on a mismatch
    python bench/check_kernels.py           # every bit width x group x activation dtype

Checks, each against the dense weight: the fused GEMV (1 and 3 activation rows) and the
dequantize + cuBLAS path (40 rows), with and without Hadamard incoherence; the autotuned GEMV on a
Llama-8B shape and every autotuner config (split-K) forced in turn; the layer replayed from a
CUDA graph; the layer under ``torch.compile`` with
``fullgraph=True`` (no graph break); the int8 LM head's GEMV (every config, graph, compile); the
down projection's GEMV with silu(gate)·up folded in (bit-equal to the separate activation kernel);
the Triton GEMV of a bf16 LM head (every config, graph, compile, its timing against cuBLAS); and
:class:`GraphDecoder` greedy tokens, replayed from a CUDA graph, against the same step run eagerly
and against transformers ``generate`` (also with an int8 embedding and head, and with more
positions than one attention block); the fused rotary + attention kernel with split caches.
"""

import argparse
import faulthandler
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yaqa.nn import QuantizedLinear  # noqa: E402
from yaqa.quantizers import IntQuantizer  # noqa: E402
from yaqa.rounding import round_weight  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Checker:
    def __init__(self):
        self.bad = 0

    def check(self, label: str, y: torch.Tensor, ref: torch.Tensor, tol: float,
              show: bool = False) -> None:
        err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        ok = err < tol and bool(torch.isfinite(y).all())
        self.bad += not ok
        if show or not ok:
            print(f"{label}: rel err {err:.2e} {'OK' if ok else 'FAIL'}", flush=True)

    def expect(self, label: str, ok: bool) -> None:
        self.bad += not ok
        print(f"{label}: {'OK' if ok else 'FAIL'}", flush=True)


def layer(bits, group, m, n, inc, dev, dtype=torch.bfloat16):
    W = torch.randn(m, n, device=dev) * 0.05
    q = IntQuantizer(bits=bits, group_size=group)
    res = round_weight(W, None, None, q, method="rtn", incoherence=7 if inc else False,
                       return_details=True)
    return QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform, dtype=dtype)


def check_layers(c: Checker, dev, quick: bool) -> None:
    combos = [(b, g) for b in (4, 8, 2, 3) for g in (32, 64, 128)]
    if quick:
        combos = [(4, 32), (4, 64), (4, 128), (8, 128), (2, 128), (3, 128)]
    for bits, group in combos:
        # One K (1536 = 12·128, a Paley × Walsh size) for all shapes: K is a compile-time constant.
        for m, n, inc in ((200, 1536, False), (96, 1536, True)):
            ql = layer(bits, group, m, n, inc, dev)
            Wd = ql.dequantized_weight().double()
            dtypes = DTYPES if (not quick or (bits, group) == (4, 128)) else DTYPES[:1]
            for rows in (1, 3, 40):
                for dt in dtypes:
                    x = torch.randn(rows, n, device=dev, dtype=dt)
                    with torch.no_grad():
                        y = ql(x)
                    tol = 1e-2 if dt != torch.float32 else 2e-3
                    c.check(f"int{bits} g{group} {m}x{n} inc={inc} rows={rows} {dt}", y,
                            x.double() @ Wd.T, tol, show=rows == 1 and dt == torch.bfloat16)


def check_big_and_graphs(c: Checker, dev) -> None:
    # A Llama-8B shape: the autotuned GEMV, then the same call captured in a CUDA graph.
    # 4096 = 64·64 and 1024 = 32·32 rotate in one fused two-factor launch, 14336 = 28·32·16 in
    # the three-factor one (inputs: sign first; outputs: sign last).
    shapes = ((4096, 4096, False), (1024, 4096, True), (14336, 4096, True), (4096, 14336, True))
    if dev.type != "cuda":
        shapes = ((512, 512, False), (512, 512, True))
    for m, n, inc in shapes:
        ql = layer(4, 128, m, n, inc, dev)
        Wd = ql.dequantized_weight().double()
        x = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            y = ql(x)
            c.check(f"int4 g128 {m}x{n} inc={inc} autotuned GEMV", y, x.double() @ Wd.T, 1e-2,
                    show=True)
            if dev.type == "cuda":
                from yaqa.nn import kernels

                print(f"  autotuned config: {kernels.gemv_config(4, 128, m, n)}", flush=True)
            if dev.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    yg = ql(x)
                x.copy_(torch.randn_like(x))
                graph.replay()
                c.check(f"  same, CUDA graph replay on new input inc={inc}", yg,
                        x.double() @ Wd.T, 1e-2, show=True)
            compiled = torch.compile(ql, backend="eager", fullgraph=True)
            c.check(f"  same, torch.compile fullgraph inc={inc}", compiled(x), x.double() @ Wd.T,
                    1e-2, show=True)


def check_gemv_configs(c: Checker, dev, quick: bool) -> None:
    """Every autotuner config (split-K included) on Llama-8B shapes, forced one at a time, and
    the split-K counters left at zero (else the next launch would reduce too early)."""
    from yaqa.nn import kernels

    shapes = [(1024, 4096, 4), (4096, 14336, 4)] + ([] if quick else [(4096, 4096, 8),
                                                                      (14336, 4096, 2)])
    if dev.type != "cuda":
        shapes = [(64, 1024, 4)]
    for m, n, bits in shapes:
        ql = layer(bits, 128, m, n, False, dev)
        Wd = ql.dequantized_weight().double()
        x = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ Wd.T
        for tile in kernels._GEMV_CONFIGS:
            if not kernels.config_fits(tile, bits, 128, n):
                continue
            y = kernels.gemv(x, ql.qweight, ql.grid_scale, ql.grid_zero, bits, 128, m, n,
                             tile=tile)
            c.check(f"int{bits} {m}x{n} GEMV config {tile}", y, ref, 1e-2)
        counters = kernels.gemv_workspace(x.device)[1]
        c.expect(f"int{bits} {m}x{n}: every config ran, split-K counters back at zero",
                 not bool(counters.any()))


def check_stacked(c: Checker, dev) -> None:
    """q/k/v-shaped layers (Llama-8B: 4096 + 1024 + 1024 rows) stacked into one GEMV, with and
    without incoherence, autotuned and with every fitting config forced, against each layer's
    dense weight; the layers' own forwards on their views of the stack."""
    from yaqa.nn import kernels
    from yaqa.nn.stacked import StackedLinears, stacked_matmul

    dims = (4096, 1024, 1024) if dev.type == "cuda" else (64, 32, 32)
    n = 4096 if dev.type == "cuda" else 1024
    for inc in (False, True):
        mods = [layer(4, 128, m, n, inc, dev) for m in dims]
        refs = [m.dequantized_weight().double() for m in mods]
        x = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
        stack = StackedLinears.build(mods)
        c.expect(f"stacked q/k/v inc={inc}: built", stack is not None)
        if stack is None:
            continue
        with torch.no_grad():
            for i, (y, W) in enumerate(zip(stack(x), refs)):
                c.check(f"stacked q/k/v inc={inc} layer {i} (autotuned)", y, x.double() @ W.T,
                        1e-2, show=True)
                c.check(f"  layer {i} alone on its view inc={inc}", mods[i](x),
                        x.double() @ W.T, 1e-2)
            if inc:
                continue
            ref = torch.cat([x.double() @ W.T for W in refs], dim=1)
            for tile in kernels._GEMV_CONFIGS:
                if not kernels.config_fits(tile, 4, 128, n, stack.bounds):
                    continue
                y = kernels.gemv(x, *stack._packed()[:3], 4, 128, stack.m, n, tile=tile,
                                 bounds=stack.bounds, per_segment=False)
                c.check(f"stacked q/k/v config {tile}", y, ref, 1e-2)
            # per-segment rows: three different inputs, one launch
            xs = torch.randn(3, n, device=dev, dtype=torch.bfloat16)
            y = stacked_matmul(xs, *stack._packed(), list(stack.bounds), True)
            ref = torch.cat([xs[i:i + 1].double() @ W.T for i, W in enumerate(refs)], dim=1)
            c.check("stacked q/k/v, one input row per layer", y, ref, 1e-2, show=True)


def check_int8_head(c: Checker, dev) -> None:
    """The int8 LM head's GEMV (Llama-3 vocabulary) against its dequantized weight: autotuned,
    every config forced, replayed from a CUDA graph, under torch.compile, and 40 rows (the
    row-block path)."""
    from yaqa.nn import kernels_int8
    from yaqa.nn.int8 import Int8Linear

    m, n = (128256, 4096) if dev.type == "cuda" else (1000, 256)
    lin = torch.nn.Linear(n, m, bias=False, device=dev, dtype=torch.bfloat16)
    head = Int8Linear.from_float(lin)
    del lin
    W = head.dequantized_weight()  # float32
    for rows in (1, 3, 40):
        x = torch.randn(rows, n, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            c.check(f"int8 head {m}x{n} rows={rows}", head(x), x.float() @ W.T, 1e-2,
                    show=rows == 1)
    x = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
    ref = x.float() @ W.T
    if dev.type == "cuda":
        print(f"  autotuned config: {kernels_int8.int8_config(m, n)}", flush=True)
        for tile in kernels_int8.INT8_CONFIGS:
            y = kernels_int8.int8_gemv(x, head.weight, head.weight_scale, tile=tile)
            c.check(f"int8 head config {tile}", y, ref, 1e-2)
        with torch.no_grad():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                yg = head(x)
            x.copy_(torch.randn_like(x))
            graph.replay()
        c.check("  int8 head, CUDA graph replay on new input", yg, x.float() @ W.T, 1e-2,
                show=True)
        ref = x.float() @ W.T
    with torch.no_grad():
        compiled = torch.compile(head, backend="eager", fullgraph=True)
        c.check("  int8 head, torch.compile fullgraph", compiled(x), ref, 1e-2, show=True)


def check_attention(c: Checker, dev) -> None:
    """The fused rotary + cache write + attention kernel at Llama-8B's head shape (32 query heads,
    8 KV heads, 128 wide) against rotate_half + SDPA, with the cache blocks split over 1-16
    programs per head (the merge by atomic counter), and the counters left at zero."""
    import torch.nn.functional as F

    if dev.type != "cuda":
        return  # tests/test_decode_kernels.py runs it in the interpreter
    from yaqa.nn import decode_kernels as dk
    from yaqa.nn.graph_decode import _rotate_half

    H, KV, D, L = 32, 8, 128, 1024
    inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2, device=dev).float() / D))
    for dt in (torch.float32, torch.bfloat16):
        for pos in (0, 63, 700):
            kc0 = torch.randn(1, KV, L, D, device=dev, dtype=dt)
            vc0 = torch.randn(1, KV, L, D, device=dev, dtype=dt)
            q, k, v = (torch.randn(n * D, device=dev, dtype=dt) for n in (H, KV, KV))
            f = pos * inv_freq
            cos = torch.cat((f, f)).cos().to(dt).float()
            sin = torch.cat((f, f)).sin().to(dt).float()

            def rot(t, n):
                t = t.float().view(n, D)
                return (t * cos + _rotate_half(t) * sin).to(dt)

            ref_k, ref_v = kc0.clone(), vc0.clone()
            ref_k[0, :, pos], ref_v[0, :, pos] = rot(k, KV), v.view(KV, D)
            mask = (torch.arange(L, device=dev) <= pos).view(1, 1, 1, L)
            ref = F.scaled_dot_product_attention(rot(q, H).view(1, H, 1, D).double(),
                                                 ref_k.double(), ref_v.double(), attn_mask=mask,
                                                 enable_gqa=True).view(H, D)
            for split in (1, 4, 16):
                kc, vc = kc0.clone(), vc0.clone()
                ws = dk.attention_workspace(H, D, split, dev)
                o = dk.rope_attention(q, k, v, kc, vc, torch.tensor([pos], device=dev),
                                      inv_freq, 1.0, split, ws)
                c.check(f"rope+attention {dt} pos={pos} split={split}", o, ref,
                        1e-2 if dt == torch.bfloat16 else 1e-4, show=pos == 700 and split == 16)
                if not (torch.allclose(kc.float(), ref_k.float(), atol=1e-2)
                        and torch.equal(vc, ref_v) and not bool(ws[1].any())):
                    c.expect(f"  cache rows written, counters reset ({dt} pos={pos} "
                             f"split={split})", False)


def check_silu_fold(c: Checker, dev, quick: bool = False) -> None:
    """The down projection's GEMV with silu(gate)·up folded in (Llama-8B: 4096 x 14336 int4 g128,
    gate and up the two halves of the stacked gate/up output row) against the dense reference,
    bit-equal to the separate activation kernel + GEMV under the same forced config, replayed
    from a CUDA graph; other bit widths at a small shape; with incoherence, the input rotation
    that computes the activation.  --quick: no autotune at the 8B shape (inference.py's first
    call does it), forced configs only."""
    from yaqa.nn import decode_kernels as dk
    from yaqa.nn import kernels

    m, n = (4096, 14336) if dev.type == "cuda" else (64, 512)
    big = None
    for bits in (4, 8, 2, 3):
        shape = (m, n) if bits == 4 else (256, 1024)
        down = layer(bits, 128, *shape, False, dev)
        W = down.dequantized_weight().double()
        gu = torch.randn(1, 2 * shape[1], device=dev, dtype=torch.bfloat16) * 2
        g, u = gu[:, :shape[1]], gu[:, shape[1]:]  # views, as the stacked GEMV returns them
        act = dk.silu_mul(g, u)
        ref = act.double() @ W.T
        args = (down.qweight, down.grid_scale, down.grid_zero, bits, 128, *shape)
        tiles = [kernels._default_tile(shape[0], shape[1], 128, bits)]
        if bits == 4 and dev.type == "cuda":
            # --quick: the down projection's H100 picks and a 3-D unpacking (compiles cost
            # about a second each); else every fitting config.
            tiles += [t for t in kernels._GEMV_CONFIGS if kernels.config_fits(t, bits, 128, n)
                      and (not quick or t in ((64, 256, 8, 4, 1, False),
                                              (64, 256, 4, 4, 3, False),
                                              (32, 256, 4, 8, 1, True)))]
        with torch.no_grad():
            if bits == 4 and quick:
                y = kernels.gemv(g, *args, tile=tiles[0], up=u)
                label = "default config"
            else:
                y = down.forward_silu_mul(g, u)
                label = "autotuned" if dev.type == "cuda" else "default config"
            c.check(f"silu-folded down GEMV int{bits} {shape[0]}x{shape[1]} ({label})", y, ref,
                    1e-2, show=True)
            same = sum(torch.equal(kernels.gemv(g, *args, tile=t, up=u),
                                   kernels.gemv(act, *args, tile=t)) for t in tiles)
            c.expect(f"  int{bits}: folded == silu_mul + GEMV bit for bit, {same}/{len(tiles)} "
                     f"configs", same == len(tiles))
        if bits == 4:
            big = (down, W, gu, g, u)
    # With incoherence the input rotation computes the activation (14336 = 28·32·16); 256 rows
    # in --quick (below the autotune threshold).
    rows = (256 if quick else m) if dev.type == "cuda" else 64
    inc = layer(4, 128, rows, n if dev.type == "cuda" else 7168, True, dev)
    k = inc.in_features
    gu = torch.randn(1, 2 * k, device=dev, dtype=torch.bfloat16) * 2
    g, u = gu[:, :k], gu[:, k:]
    with torch.no_grad():
        act = dk.silu_mul(g, u)
        c.check(f"silu-folded input rotation + down GEMV inc {inc.out_features}x{k}",
                inc.forward_silu_mul(g, u), act.double() @ inc.dequantized_weight().double().T,
                2e-2, show=True)
        count = inc._fused_rotation(g, "in")
        c.expect(f"  inc: folded rotation == silu_mul + rotation bit for bit ({count} factors)",
                 bool(count) and torch.equal(inc._fused_rotate(g, "in", count, up=u),
                                             inc._fused_rotate(act, "in", count)))
    if dev.type == "cuda":
        down, W, gu, g, u = big
        with torch.no_grad():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                yg = down.forward_silu_mul(g, u)
            gu.copy_(torch.randn_like(gu))
            graph.replay()
        c.check("  silu-folded down GEMV, CUDA graph replay on new input", yg,
                dk.silu_mul(g, u).double() @ W.T, 1e-2, show=True)


def check_dense_head(c: Checker, dev, quick: bool = False) -> None:
    """The Triton GEMV for a bf16 LM head (Llama-3 vocabulary) against torch: autotuned, every
    config forced, 3 rows, replayed from a CUDA graph, under torch.compile; and the one-time
    comparison with cuBLAS that GraphDecoder makes."""
    from yaqa.nn import kernels_dense

    m, n = (128256, 4096) if dev.type == "cuda" else (1000, 256)
    W = torch.randn(m, n, device=dev, dtype=torch.bfloat16) * 0.02
    for rows in (1, 3):
        x = torch.randn(rows, n, device=dev, dtype=torch.bfloat16)
        c.check(f"bf16 head GEMV {m}x{n} rows={rows}", kernels_dense.dense_matmul(x, W),
                x.double() @ W.double().T, 1e-2, show=rows == 1)
    x = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
    ref = x.double() @ W.double().T
    if dev.type != "cuda":
        return
    print(f"  autotuned config: {kernels_dense.dense_config(m, n)}", flush=True)
    for tile in kernels_dense.DENSE_CONFIGS[:4] if quick else kernels_dense.DENSE_CONFIGS:
        c.check(f"bf16 head config {tile}", kernels_dense.dense_gemv(x, W, tile=tile), ref, 1e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = kernels_dense.dense_matmul(x, W)
    x.copy_(torch.randn_like(x))
    graph.replay()
    c.check("  bf16 head, CUDA graph replay on new input", yg, x.double() @ W.double().T, 1e-2,
            show=True)
    compiled = torch.compile(lambda t: kernels_dense.dense_matmul(t, W), backend="eager",
                             fullgraph=True)
    c.check("  bf16 head, torch.compile fullgraph", compiled(x), x.double() @ W.double().T,
            1e-2, show=True)
    use, t_triton, t_cublas = kernels_dense.faster_than_cublas(W)
    print(f"  bf16 head {m}x{n}: Triton GEMV {t_triton:.1f} us ({m * n * 2 / t_triton / 1e3:.0f}"
          f" GB/s), cuBLAS {t_cublas:.1f} us ({m * n * 2 / t_cublas / 1e3:.0f} GB/s): "
          f"GraphDecoder uses {'Triton' if use else 'cuBLAS'}", flush=True)


def check_decoder(c: Checker, dev) -> None:
    import transformers

    import yaqa
    from yaqa.nn.graph_decode import GraphDecoder

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    yaqa.quantize(model, method="rtn", quantizer="int4", group_size=128, incoherence=True,
                  progress=False)
    prompt = torch.randint(1, 512, (1, 6), device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        model.to(device=dev, dtype=dtype)
        dec = GraphDecoder(model, max_len=40, graph=dev.type == "cuda", fold_silu=True)
        graph = dec.generate(prompt, 16)
        eager = GraphDecoder(model, max_len=40, graph=False).generate(prompt, 16)
        c.expect(f"GraphDecoder {dtype} (fused small ops: {dec.fused}): CUDA graph tokens == "
                 "eager step tokens", torch.equal(graph, eager))
        unfolded = GraphDecoder(model, max_len=40, graph=dev.type == "cuda",
                                fold_silu=False).generate(prompt, 16)
        c.expect(f"GraphDecoder {dtype}, incoherence: silu folded into the down input rotation "
                 f"tokens == separate activation kernel tokens", torch.equal(graph, unfolded))
        sep = GraphDecoder(model, max_len=40, graph=dev.type == "cuda",
                           stack_linears=False).generate(prompt, 16)
        same = int((sep == graph).sum()) - prompt.shape[1]
        print(f"GraphDecoder {dtype} ({dec.stacked} stacked q/k/v, gate/up groups): vs one GEMV "
              f"per linear: {same}/16 tokens equal", flush=True)
        if dtype == torch.float32:
            c.expect("GraphDecoder float32: stacked linears tokens == one GEMV per linear",
                     torch.equal(sep, graph))
        plain = GraphDecoder(model, max_len=40, graph=False, fused=False).generate(prompt, 16)
        same = int((plain == graph).sum()) - prompt.shape[1]
        print(f"GraphDecoder {dtype}: fused small ops vs torch ops: {same}/16 tokens equal",
              flush=True)
        if dtype == torch.float32:  # bf16 rounding may flip a near-tie on a random model
            c.expect("GraphDecoder float32: fused small ops tokens == torch ops tokens",
                     torch.equal(plain, graph))
        if dtype == torch.float32:
            with torch.no_grad():
                ref = model.generate(prompt, max_new_tokens=16, min_new_tokens=16,
                                     do_sample=False, pad_token_id=0, disable_compile=True)
            c.expect("GraphDecoder float32 tokens == transformers generate", torch.equal(graph, ref))
    # Without incoherence the down projections fold silu(gate)·up into their GEMV: the tokens
    # of the separate activation kernel (bit-equal values, so equal tokens in both dtypes), and
    # the bf16 head by the Triton GEMV against cuBLAS.
    torch.manual_seed(0)
    plain_model = transformers.LlamaForCausalLM(cfg).eval()
    yaqa.quantize(plain_model, method="rtn", quantizer="int4", group_size=128, progress=False)
    for dtype in (torch.float32, torch.bfloat16):
        plain_model.to(device=dev, dtype=dtype)
        graph_on = dev.type == "cuda"
        dec = GraphDecoder(plain_model, max_len=40, graph=graph_on, fold_silu=True)
        folded = dec.generate(prompt, 16)
        unfolded = GraphDecoder(plain_model, max_len=40, graph=graph_on,
                                fold_silu=False).generate(prompt, 16)
        c.expect(f"GraphDecoder {dtype}, no incoherence: silu folded into the down GEMV "
                 f"({sum(dec._fold)} layers) tokens == separate activation kernel tokens",
                 torch.equal(folded, unfolded))
        if dtype == torch.bfloat16 and dec.fused:
            triton_head = GraphDecoder(plain_model, max_len=40, graph=graph_on,
                                       dense_head=True)
            cublas = GraphDecoder(plain_model, max_len=40, graph=graph_on,
                                  dense_head=False).generate(prompt, 16)
            same = int((triton_head.generate(prompt, 16) == cublas).sum()) - prompt.shape[1]
            # Two summation orders of the bf16 logits may flip a near-tie of the random model.
            c.expect(f"GraphDecoder bf16: Triton head GEMV ({triton_head.dense_head}) vs "
                     f"cuBLAS head: {same}/16 tokens equal", triton_head.dense_head and same >= 14)
    del plain_model
    from yaqa.nn.int8 import quantize_embeddings

    model.to(dtype=torch.float32)
    quantize_embeddings(model)  # int8 embedding and head: the head's GEMV in the graph
    graph = GraphDecoder(model, max_len=40, graph=dev.type == "cuda").generate(prompt, 16)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             pad_token_id=0, disable_compile=True)
    c.expect("GraphDecoder float32, int8 embedding + head: tokens == transformers generate",
             torch.equal(graph, ref))
    # 86 positions: attention reads two cache blocks of 64, split over 4 programs per head.
    dec = GraphDecoder(model, max_len=200, graph=dev.type == "cuda")
    graph = dec.generate(prompt, 80)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=80, min_new_tokens=80, do_sample=False,
                             pad_token_id=0, disable_compile=True)
    same = int((graph == ref).sum()) - prompt.shape[1]
    # A wrong merge of the split attention garbles every token after position 64; float32
    # rounding may flip a rare near-tie of the random model.
    c.expect(f"GraphDecoder float32, 80 tokens, attention split "
             f"{getattr(dec, '_attn_split', None)}: {same}/80 tokens == generate", same >= 72)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer bit/group/dtype combinations")
    ap.add_argument("--timeout", type=float, default=300, help="hard limit, seconds")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (no graphs)")
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)  # never hang the caller
    dev = torch.device(args.device)
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"`python {' '.join(sys.argv)}` on {name}, torch {torch.__version__}, triton {tv}",
          flush=True)
    c = Checker()
    check_layers(c, dev, args.quick)
    check_gemv_configs(c, dev, args.quick)
    check_stacked(c, dev)
    check_big_and_graphs(c, dev)
    check_int8_head(c, dev)
    check_silu_fold(c, dev, args.quick)
    check_dense_head(c, dev, args.quick)
    check_attention(c, dev)
    check_decoder(c, dev)
    from yaqa.nn import kernels

    for line in kernels.FALLBACKS:  # a kernel that did not build here ran on a slower path
        c.expect(f"kernel fell back: {line}", False)
    print("all kernel checks passed" if not c.bad else f"{c.bad} FAILED", flush=True)
    return 1 if c.bad else 0


if __name__ == "__main__":
    sys.exit(main())
