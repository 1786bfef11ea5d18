#!/usr/bin/env bash
# The project's GPU measurements in one run, for a fresh CUDA machine that has nothing but this repository (no make, no
# package index). The device call, its carry list and time limit: bench/README.md, "The device call".
#   bash bench/gpu.sh                 # CUDA: full sizes, <= 8 minutes; writes into $OUT (else bench-gpu/) and prints a table
#   POT_BENCH_CPU=1 bash bench/gpu.sh # the same script on a CPU with tiny sizes (what tests/test_gpu_bench.py runs)
#
# What it measures (bench/gpu_bench.py and bench/pot_head.py, one process per section, each under a time limit, so a
# failing or slow section is recorded in the JSON and the others still run):
#   pot-step  POT training step, ResNet-50, batch 16, 512x512, bf16: network vs head, eager vs compiled head, peak memory
#   pot-head  the head alone (bench/pot_head.py): ops per call, host syncs, CUDA kernels, share of a ResNet-50 step
#   clip-es   CLIP-ES images/s with autocast, batched classes vs per-class loop, 224x224 and 500x375, random weights
#   deeplab   DeepLabV2 ResNet-101 training step, batch 10, 321x321
# Every section writes its JSON after each variant it finishes (atomically), so a failure or a time-out keeps the numbers
# before it; the merged gpu.json and gpu.md are rewritten after every section.
#
# Output folder: $POT_BENCH_OUT if set, else $OUT (the device tool's folder: only it comes back), else bench-gpu. It receives
# at most 7 files, no sub-folder (the device tool returns at most 8 files): gpu.log, gpu.json (pre-flight + all sections),
# gpu.md, pot-step.json, pot-head.json, clip-es.json, deeplab.json.
# Python: $POT_PYTHON if set; else python3 if it imports torch (the device machines' python3 holds torch, timm and most
# dependencies); else .venv/bin/python; else a new venv .venv-gpu with `pip install -e .` (needs a package index). Nothing
# is installed: the repository goes first on PYTHONPATH. Wheels of the packages the device lacks (bench/gpu_wheels.sh
# downloads them: open_clip_torch, ftfy, wcwidth) are taken from $POT_WHEELS (default .wheels) and installed without an
# index into $POT_SITE (default /tmp/pot-bench-site), which goes on PYTHONPATH. A pre-flight then lists, per section, the
# modules that are still missing; a section that lacks one is recorded as skipped, not run.
# Environment: POT_BENCH_BUDGET (seconds for all sections, default 450), POT_BENCH_CPU=1 (CPU, tiny sizes),
# POT_BENCH_FAIL (section or section:variant, comma-separated: fail there on purpose; the test of partial results).
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
DEST=${POT_BENCH_OUT:-${OUT:-bench-gpu}}
mkdir -p "$DEST" || { echo "gpu.sh: cannot create the output folder $DEST"; exit 1; }
DEST=$(cd "$DEST" && pwd)
LOG="$DEST/gpu.log"
: > "$LOG"
say() { echo "[gpu.sh $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
say "writing into $DEST${OUT:+ (\$OUT)}"

# ---- python --------------------------------------------------------------------------------------------------------
has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }
if [ -n "${POT_PYTHON:-}" ]; then PY=$POT_PYTHON
elif command -v python3 >/dev/null && has_torch python3; then PY=python3
elif [ -x .venv/bin/python ] && has_torch .venv/bin/python; then PY=.venv/bin/python
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
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  say "installing the carried wheels from $WHEELS into $SITE: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
    say "pip could not install them (see $LOG): unpacking them instead"
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 \
      || say "unpacking the wheels failed"
  fi
else
  say "no wheels in $WHEELS (bench/gpu_wheels.sh downloads them): CLIP-ES needs open_clip_torch, ftfy, wcwidth"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
has_torch "$PY" || { say "no torch for $PY; see $LOG"; exit 1; }

if [ "${POT_BENCH_CPU:-0}" = "1" ]; then
  DEV=cpu; TINY=--tiny; STEP_ARGS=--no-compile; HEAD_ARGS="--tiny --layouts channels-last --static eager-all,eager,eager-check8"   # compiled: 07_activation tests it
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { say "no CUDA GPU visible (POT_BENCH_CPU=1 for the CPU smoke test)"; exit 1; }
  DEV=cuda; TINY=; STEP_ARGS=--reduce-overhead
  HEAD_ARGS="--classes 20 --present 3 --reps 10 --loop-reps 2 --resnet-reps 10 --layouts channels-last"
fi
say "python $PY, device $DEV: $("$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1)"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/pot-bench-inductor}
export PYTHONUNBUFFERED=1

# ---- pre-flight: which modules each section lacks, before anything runs ---------------------------------------------
rm -f "$DEST"/pot-step.json "$DEST"/pot-head.json "$DEST"/clip-es.json "$DEST"/deeplab.json "$DEST"/gpu.json "$DEST"/gpu.md "$DEST"/*.tmp
PRE=$("$PY" bench/gpu_bench.py --preflight --json "$DEST/gpu.json" 2>&1)
echo "$PRE" | sed 's/^/  pre-flight: /' | tee -a "$LOG"
SKIP=" $(echo "$PRE" | sed -n 's/^skip: //p') "

# ---- sections, each with its share of the budget --------------------------------------------------------------------
BUDGET=${POT_BENCH_BUDGET:-450}
SECTIONS=("$DEST"/pot-step.json "$DEST"/pot-head.json "$DEST"/clip-es.json "$DEST"/deeplab.json)
summarise() { "$PY" bench/gpu_bench.py --summary "${SECTIONS[@]}" --wall-s $(( $(date +%s) - T0 )) $TINY --json "$DEST/gpu.json" > "$DEST/gpu.md" 2>>"$LOG"; }
run() {   # name seconds command...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [[ "$SKIP" == *" $name "* ]]; then
    say "$name: skipped, missing modules (pre-flight)"
    "$PY" bench/gpu_bench.py --json "$DEST/$name.json" --mark-failed "$name" "skipped: missing modules $(echo "$PRE" | sed -n "s/^  $name: missing //p")"
  elif [ "$limit" -lt 15 ]; then
    say "$name: skipped, time budget spent"
    "$PY" bench/gpu_bench.py --json "$DEST/$name.json" --mark-failed "$name" "skipped: time budget spent"
  else
    say "$name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v -e "^USDT" -e "^ERROR:.*DeviceProperties"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
      say "$name: exit status $rc"
      "$PY" bench/gpu_bench.py --json "$DEST/$name.json" --mark-failed "$name" "exit status $rc (timeout: 124); see gpu.log"
    fi
  fi
  summarise
}
run pot-step 180 "$PY" bench/gpu_bench.py --section pot-step --device $DEV $TINY $STEP_ARGS --json "$DEST/pot-step.json"
run pot-head 150 "$PY" bench/pot_head.py --device $DEV $HEAD_ARGS --no-memory --json "$DEST/pot-head.json"
run clip-es   60 "$PY" bench/gpu_bench.py --section clip-es  --device $DEV $TINY --json "$DEST/clip-es.json"
run deeplab   60 "$PY" bench/gpu_bench.py --section deeplab  --device $DEV $TINY --json "$DEST/deeplab.json"
cat "$DEST/gpu.md"
say "done: $DEST/gpu.json, $DEST/gpu.md"
