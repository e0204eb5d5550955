"""Compile the decode kernels for an H100 (sm_90) without a GPU, and show their resources.

    python bench/compile_check.py           # every GEMV config x (K=4096, 14336), the
                                            # silu-folded down GEMV, int8 and bf16 head GEMV
                                            # configs, decode kernels
    python bench/compile_check.py --quick   # one GEMV config per unpack mode (a CI smoke test)

Triton compiles ahead of time with its bundled ptxas, so a kernel that would fail to build on the
GPU (an unsupported op, a shape rule) fails here, and the registers, spills (LOCAL bytes) and
128-bit weight loads of each config are visible before anyone spends GPU time.  Exits 1 when a
kernel fails to compile.  Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compile_one(fn, sig: dict, consts: dict, opts: dict, target) -> tuple[bool, str]:
    import triton
    from triton.compiler import ASTSource

    # Launches specialise 16-byte-aligned pointers and strides divisible by 16; without the
    # same attributes the compiler would not emit the vector loads it emits on the GPU.
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names
             if sig[a].startswith("*") or a.startswith("stride")}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=target, options=opts)
    except Exception as e:  # compile errors have no common base class
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = ""
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                 capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
        if m:
            usage = f"regs {m[1]}, shared {m[2]} B, spills {m[3]} B"
    v4 = len(re.findall(r"ld\.global[\w.:]*\.v4\.b32", k.asm["ptx"]))
    return True, f"{usage}, 128-bit loads {v4}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget

    from yaqa.nn import decode_kernels as dk
    from yaqa.nn import kernels_gemv as kg
    from yaqa.nn.kernels import _GEMV_CONFIGS, config_fits

    target = GPUTarget("cuda", args.arch, 32)
    bad = 0

    def run(fn, sig, consts, opts):
        nonlocal bad
        ok, info = compile_one(fn, sig, consts, opts, target)
        bad += not ok
        shown = {k: v for k, v in consts.items() if k not in ("GROUP",)}
        print(f"{'OK  ' if ok else 'FAIL'} {fn.__name__} {shown} {opts}: {info}", flush=True)

    gemv_sig = {"x_ptr": "*bf16", "u_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
                "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "M": "i32",
                "stride_x": "i32", "stride_y": "i32", "SEG1": "i32", "SEG2": "i32",
                "stride_seg": "i32", "K": "constexpr", "BITS": "constexpr",
                "GROUP": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                "SPLIT_K": "constexpr", "UNPACK_3D": "constexpr", "SILU": "constexpr"}
    configs = list(_GEMV_CONFIGS)
    if args.quick:
        configs = [next(c for c in configs if not c[5]), next(c for c in configs if c[5])]
    for K in ((4096,) if args.quick else (4096, 14336)):
        for bn, bk, sk, w, st, u in configs:
            if config_fits((bn, bk, sk), 4, 128, K):
                run(kg.gemv_words, gemv_sig, {"K": K, "BITS": 4, "GROUP": 128, "BLOCK_N": bn,
                                              "BLOCK_K": bk, "SPLIT_K": sk, "UNPACK_3D": u,
                                              "SILU": False},
                    {"num_warps": w, "num_stages": st})
    # The down projection with silu(gate)·up folded in (K = 14336), in the configs the H100's
    # autotune picked for the unfused down projection, and one of each unpack mode.
    silu_configs = [(64, 256, 8, 4, 1, False), (64, 256, 4, 4, 3, False),
                    (32, 256, 4, 8, 1, True)]
    for bn, bk, sk, w, st, u in silu_configs[:2] if args.quick else silu_configs:
        run(kg.gemv_words, gemv_sig, {"K": 14336, "BITS": 4, "GROUP": 128, "BLOCK_N": bn,
                                      "BLOCK_K": bk, "SPLIT_K": sk, "UNPACK_3D": u,
                                      "SILU": True},
            {"num_warps": w, "num_stages": st})
    bytes_sig = {k: v for k, v in gemv_sig.items() if k != "UNPACK_3D"} | {
        "qw_ptr": "*u8", "CPC": "constexpr", "NB": "constexpr"}
    for silu in (False, True):
        run(kg.gemv_bytes, bytes_sig, {"K": 4096, "BITS": 3, "CPC": 8, "NB": 3, "GROUP": 128,
                                       "BLOCK_N": 8, "BLOCK_K": 256, "SPLIT_K": 4, "SILU": silu},
            {"num_warps": 4})
    run(dk._add_rmsnorm, {"h_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16",
                          "hout_ptr": "*bf16", "out_ptr": "*bf16", "eps": "fp32",
                          "N": "constexpr", "BLOCK": "constexpr", "HAS_D": "constexpr"},
        {"N": 4096, "BLOCK": 4096, "HAS_D": True}, {"num_warps": 8})
    run(dk._rope_attention, {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
                             "kc_ptr": "*bf16", "vc_ptr": "*bf16", "o_ptr": "*bf16",
                             "ws_ptr": "*fp32", "cnt_ptr": "*i32", "pos_ptr": "*i64", "inv_ptr": "*fp32", "rope_scale": "fp32",
                             "sm_scale": "fp32", "L": "i32", "GROUP": "constexpr",
                             "D": "constexpr", "BLOCK_L": "constexpr", "SPLIT": "constexpr"},
        {"GROUP": 4, "D": 128, "BLOCK_L": 64, "SPLIT": 4}, {"num_warps": 4})
    run(dk._argmax, {"x_ptr": "*bf16", "N": "i32", "tok_ptr": "*i64", "next_ptr": "*i64",
                     "val_ptr": "*fp32", "idx_ptr": "*i32", "cnt_ptr": "*i32",
                     "BLOCK": "constexpr", "P": "constexpr"},
        {"BLOCK": 1024, "P": 128}, {"num_warps": 4})
    run(dk._silu_mul, {"g_ptr": "*bf16", "u_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
                       "BLOCK": "constexpr"}, {"BLOCK": 1024}, {"num_warps": 4})
    from yaqa.nn import kernels_int8

    int8_sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "y_ptr": "*bf16", "N": "i32",
                "stride_x": "i32", "stride_y": "i32", "K": "constexpr", "BLOCK_N": "constexpr",
                "BLOCK_K": "constexpr", "EVEN_K": "constexpr"}
    int8_configs = kernels_int8.INT8_CONFIGS[:1] if args.quick else kernels_int8.INT8_CONFIGS
    for bn, bk, w, st in int8_configs:  # the Llama-3 head: 128,256 x 4,096
        run(kernels_int8._kernels()[1], int8_sig, {"K": 4096, "BLOCK_N": bn, "BLOCK_K": bk,
                                                   "EVEN_K": True},
            {"num_warps": w, "num_stages": st})
    from yaqa.nn import kernels_dense

    dense_sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32",
                 "stride_x": "i32", "stride_y": "i32", "K": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_K": "constexpr", "EVEN_K": "constexpr"}
    dense_configs = kernels_dense.DENSE_CONFIGS[:2] if args.quick else kernels_dense.DENSE_CONFIGS
    for bn, bk, w, st in dense_configs:  # the Llama-3 head in bf16
        run(kernels_dense._kernels()[1], dense_sig, {"K": 4096, "BLOCK_N": bn, "BLOCK_K": bk,
                                                     "EVEN_K": True},
            {"num_warps": w, "num_stages": st})
    from yaqa.nn.kernels import _kernels

    rotate2, rotate3 = _kernels()[6:8]
    rot = {"x_ptr": "*bf16", "u_ptr": "*bf16", "s_ptr": "*bf16"}
    run(rotate2, rot | {"h1_ptr": "*bf16", "h2_ptr": "*bf16", "y_ptr": "*bf16", "stride_x": "i32",
                        "stride_y": "i32", "stride_s": "i32", "scale": "fp32",
                        "D1": "constexpr", "D2": "constexpr", "SIGN_FIRST": "constexpr",
                        "IEEE": "constexpr", "SILU": "constexpr"},
        {"D1": 64, "D2": 64, "SIGN_FIRST": True, "IEEE": False, "SILU": False}, {"num_warps": 4})
    rot3 = rot | {"ha_ptr": "*bf16", "hb_ptr": "*bf16", "hc_ptr": "*bf16", "y_ptr": "*bf16",
                  "stride_x": "i32", "stride_y": "i32", "stride_s": "i32", "scale": "fp32",
                  "A": "constexpr", "AP": "constexpr", "B": "constexpr", "C": "constexpr",
                  "SIGN_FIRST": "constexpr", "PREC": "constexpr", "SILU": "constexpr"}
    for silu in (False, True):  # with SILU: the down projection's input, silu(gate)·up
        run(rotate3, rot3, {"A": 28, "AP": 32, "B": 32, "C": 16, "SIGN_FIRST": True, "PREC": None,
                            "SILU": silu}, {"num_warps": 8})
    print("all kernels compiled" if not bad else f"{bad} FAILED to compile", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
