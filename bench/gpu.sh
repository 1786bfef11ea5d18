#!/usr/bin/env bash
# The project's GPU measurements in one run, for a fresh CUDA machine that has nothing but this repository:
#   bash bench/gpu.sh                 # CUDA: full sizes, <= 8 minutes; writes bench-gpu/gpu.json and prints a table
#   POT_BENCH_CPU=1 bash bench/gpu.sh # the same script on a CPU with tiny sizes (what tests/test_gpu_bench.py runs)
#
# What it measures (bench/gpu_bench.py and bench/pot_head.py, one process per section, each under a time limit, so a
# failing or slow section is recorded in the JSON and the others still run):
#   pot-step  POT training step, ResNet-50, batch 16, 512x512, bf16: network vs head, eager vs compiled head, peak memory
#   pot-head  the head alone (bench/pot_head.py): ops per call, host syncs, CUDA kernels, share of a ResNet-50 step
#   clip-es   CLIP-ES images/s with autocast, batched classes vs per-class loop, 224x224 and 500x375, random weights
#   deeplab   DeepLabV2 ResNet-101 training step, batch 10, 321x321
#
# Python: $POT_PYTHON if set; else .venv/bin/python or python3, whichever imports torch (the project is put on
# PYTHONPATH, nothing installed: the device machines ship torch, timm and most dependencies and reach no index); else a
# new venv .venv-gpu with `pip install -e .` (needs a package index). Wheels of missing pure-Python packages (CLIP-ES needs
# open_clip_torch, ftfy, wcwidth) can be carried in $POT_WHEELS (default .wheels): they are installed without an index
# into $POT_SITE (default /tmp/pot-bench-site) and put on PYTHONPATH.
# Environment: POT_BENCH_OUT (output folder, default bench-gpu; it receives at most 7 files), POT_BENCH_BUDGET
# (seconds for all sections, default 450), POT_BENCH_CPU=1 (CPU, tiny sizes).
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${POT_BENCH_OUT:-bench-gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: > "$LOG"
say() { echo "[gpu.sh $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# ---- python --------------------------------------------------------------------------------------------------------
has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }
if [ -n "${POT_PYTHON:-}" ]; then PY=$POT_PYTHON
elif [ -x .venv/bin/python ] && has_torch .venv/bin/python; then PY=.venv/bin/python
elif has_torch python3; then PY=python3
else
  if [ ! -x .venv-gpu/bin/python ]; then
    say "no python with torch: creating .venv-gpu"
    python3 -m venv .venv-gpu >>"$LOG" 2>&1 || { say "python3 -m venv failed"; exit 1; }
  fi
  PY=.venv-gpu/bin/python
  has_torch "$PY" || { say "pip install -e . (log: $LOG)"; "$PY" -m pip install -q -e . >>"$LOG" 2>&1 || say "pip install -e . failed"; }
fi
WHEELS=${POT_WHEELS:-.wheels}
SITE=${POT_SITE:-/tmp/pot-bench-site}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  say "installing carried wheels from $WHEELS into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 || say "installing the wheels failed (see $LOG)"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
has_torch "$PY" || { say "no torch for $PY; see $LOG"; exit 1; }

if [ "${POT_BENCH_CPU:-0}" = "1" ]; then
  DEV=cpu; TINY=--tiny; STEP_ARGS=; HEAD_ARGS="--tiny --layouts channels-last --no-compile"   # compiled: covered by pot-step
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { say "no CUDA GPU visible (POT_BENCH_CPU=1 for the CPU smoke test)"; exit 1; }
  DEV=cuda; TINY=; STEP_ARGS=--reduce-overhead; HEAD_ARGS="--reps 10 --loop-reps 2 --resnet-reps 10 --layouts channels-last"
fi
say "python $PY, device $DEV: $("$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1)"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/pot-bench-inductor}
export PYTHONUNBUFFERED=1

# ---- sections, each with its share of the budget --------------------------------------------------------------------
BUDGET=${POT_BENCH_BUDGET:-450}
run() {   # name seconds command...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 15 ]; then say "$name: skipped, time budget spent"; echo "{\"section\": \"$name\", \"result\": {\"error\": \"skipped: time budget spent\"}}" > "$OUT/$name.json"; return; fi
  say "$name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v -e "^USDT" -e "^ERROR:.*DeviceProperties"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    say "$name: exit status $rc"
    [ -s "$OUT/$name.json" ] || echo "{\"section\": \"$name\", \"result\": {\"error\": \"exit status $rc (timeout: 124); see gpu.log\"}}" > "$OUT/$name.json"
  fi
}
rm -f "$OUT"/pot-step.json "$OUT"/pot-head.json "$OUT"/clip-es.json "$OUT"/deeplab.json
run pot-step 180 "$PY" bench/gpu_bench.py --section pot-step --device $DEV $TINY $STEP_ARGS --json "$OUT/pot-step.json"
run pot-head 150 "$PY" bench/pot_head.py --device $DEV $HEAD_ARGS --no-memory --json "$OUT/pot-head.raw.json"
run clip-es   60 "$PY" bench/gpu_bench.py --section clip-es  --device $DEV $TINY --json "$OUT/clip-es.json"
run deeplab   60 "$PY" bench/gpu_bench.py --section deeplab  --device $DEV $TINY --json "$OUT/deeplab.json"
if [ -s "$OUT/pot-head.raw.json" ]; then
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); json.dump(dict(section='pot-head', result=r), open(sys.argv[2],'w'), indent=1)" \
    "$OUT/pot-head.raw.json" "$OUT/pot-head.json" && rm -f "$OUT/pot-head.raw.json"
fi
"$PY" bench/gpu_bench.py --summary "$OUT"/pot-step.json "$OUT"/pot-head.json "$OUT"/clip-es.json "$OUT"/deeplab.json \
  --wall-s $(( $(date +%s) - T0 )) $TINY --json "$OUT/gpu.json" | tee "$OUT/gpu.md"
say "done: $OUT/gpu.json, $OUT/gpu.md"
