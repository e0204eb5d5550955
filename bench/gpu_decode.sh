#!/usr/bin/env bash
# Issue 10, batch-1 decode: one bounded GPU run (about 3-5 min on an H100, at most 6.3).
#
#   OUT=/some/dir bash bench/gpu_decode.sh
#
# 1. bench/check_kernels.py --quick: every kernel against the dense weight, every GEMV config
#    (split-K) forced in turn, the autotuned picks, stacked q/k/v (one GEMV, with and without
#    incoherence, every config forced), CUDA graphs, the int8 LM head's GEMV (every config, graph,
#    compile), the silu-folded down GEMV (bit-equal to SiLU-mul + GEMV under every config), the
#    bf16 head's Triton GEMV (every config, graph, compile; its time against cuBLAS),
#    GraphDecoder tokens (stacked linears vs one GEMV per linear, fused small ops vs torch ops vs
#    generate, int8 head vs generate, silu folded vs not, Triton vs cuBLAS head).  Prints FAIL
#    lines and "N FAILED" on a mismatch.
# 2. bench/inference.py --profile: Llama-3.1-8B shape, bf16 / int4 / int4 + incoherence, and the
#    two int4 variants with the int8 embedding + LM head of --embeddings int8: memory,
#    decode tok/s (CUDA graph, fused small ops and stacked q/k/v + gate/up GEMVs; the same with
#    one GEMV per linear, today's path before stacking; with transformers' small ops), prefill,
#    per-layer GEMV GB/s (plus the stacked q+k+v and gate+up rows against the layers one by
#    one, the silu-folded down GEMV against SiLU-mul + GEMV, and the LM head as the int8 GEMV
#    and as the bf16 Triton GEMV against cuBLAS), decode tok/s without the silu fold and with
#    the cuBLAS head (the gains as ratios, same run), the autotuned configs, and a
#    torch.profiler breakdown of one decode step per variant.  Results are written after every
#    stage, so a kill keeps what finished.
# Everything lands in $OUT (default bench/results/gpu_decode).
set -u
OUT=${OUT:-bench/results/gpu_decode}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv; } \
    > "$OUT/machine.txt" 2>&1
timeout 150 python bench/check_kernels.py --quick --timeout 140 2>&1 \
    | tee "$OUT/check_kernels-cuda.log"
echo "check_kernels exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/check_kernels-cuda.log"
timeout 225 python bench/inference.py --device cuda --new-tokens 32 --profile --budget 170 \
    --variants bf16,int4,int4-inc,int4+int8head,int4-inc+int8head --copy-to "$OUT" 2>&1 \
    | tee "$OUT/inference-cuda.log"
echo "inference exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/inference-cuda.log"
cp bench/results/inference-cuda.json bench/results/inference-cuda.md "$OUT"/ 2>/dev/null
ls -l "$OUT"
