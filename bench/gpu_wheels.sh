#!/usr/bin/env bash
# Download the wheels that the lent GPU machine lacks into .wheels/ (ignored by git), for bench/gpu.sh's CLIP-ES section:
# exactly open_clip_torch, ftfy and wcwidth (the device image has torch, torchvision, timm, regex, tqdm, huggingface_hub,
# safetensors, numpy, pillow, opencv; see the device tool's KINDS.md). The versions are the ones this project's venv runs.
# Needs a package index here; nothing is installed. Usage: bash bench/gpu_wheels.sh [dest folder, default .wheels]
set -eu
cd "$(dirname "$0")/.."
DEST=${1:-.wheels}
PY=${POT_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5"
mkdir -p "$DEST"
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d "$DEST" $WHEELS
ls -l "$DEST"
