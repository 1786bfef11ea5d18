# Every target creates and reuses .venv in the repo root; nothing else on the machine is assumed.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test check-sync nbtest pytest export demo seeds seeds-photo pipeline-seeds pipeline-seeds-photo docs pipeline ablation cost figures segmentation bench-deeplab bench-gpu gpu-wheels

venv: $(STAMP)

# .[dev] holds every extra (crf, photos, notebooks) and the test tools; constraints-ci.txt pins the tested torch pair
$(STAMP): settings.ini setup.py constraints-ci.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-ci.txt -e ".[dev]"
	touch $(STAMP)

## export the notebooks into pot/ and clean them (what a contributor runs before committing)
export: venv
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

## fail when pot/ is out of step with nbs/ or a notebook is not clean
check-sync: venv
	$(PY) tests/check_sync.py

nbtest: venv
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: venv
	$(BIN)/pytest -q tests

test: check-sync nbtest pytest

## the main job on the embedded default: ToyVOC (generated on first use), train the baseline and POT, infer and score CAMs (DEMO=folder for another run folder)
DEMO := outputs/demo
demo: venv
	mkdir -p $(DEMO)
	$(BIN)/papermill nbs/train.ipynb $(DEMO)/train.ipynb -k python3 --cwd . --log-output -p out_dir $(DEMO) $(ARGS)
	$(PY) -c 'from pot.cams import print_summary; print_summary("$(DEMO)")'

## the headline table: baseline, POT-trained classifier, POT K=1 and POT over seeds 0, 1, 2 (mean ± sd) on ToyVOC
SEEDS_GRID := -y "{taus: [0.7], Ks: [3], allocation: false, seeds: [0, 1, 2]}"
seeds: venv
	mkdir -p outputs/seeds
	$(BIN)/papermill nbs/ablation.ipynb outputs/seeds/ablation.ipynb -k python3 --cwd . --log-output -p out_root outputs/seeds $(SEEDS_GRID) $(ARGS)
	cat outputs/seeds/seeds.md

## the same on the second benchmark (other classes on photographs, 02_toyvoc's PHOTO_TOYVOC) in data/photovoc
PHOTO := -p data_root data/photovoc -y "{base: {toyvoc: {classes: [tree, umbrella, cup, lamp, kite], background: photos, seed: 1}}}"
seeds-photo: venv
	mkdir -p outputs/seeds_photovoc
	$(BIN)/papermill nbs/ablation.ipynb outputs/seeds_photovoc/ablation.ipynb -k python3 --cwd . --log-output -p out_root outputs/seeds_photovoc \
	  $(PHOTO) $(SEEDS_GRID) $(ARGS)
	cat outputs/seeds_photovoc/seeds.md

## both arms of `make seeds` through CRF and IRN pseudo labels and DeepLab, seeds 0, 1, 2, paired (reuses make seeds' runs)
pipeline-seeds: venv
	mkdir -p outputs/pipeline_seeds
	$(BIN)/papermill nbs/pipeline_seeds.ipynb outputs/pipeline_seeds/pipeline_seeds.ipynb -k python3 --cwd . --log-output \
	  -p out_root outputs/pipeline_seeds -p train_root outputs/seeds $(ARGS)
	cat outputs/pipeline_seeds/pipeline_seeds.md

## the same on the photo benchmark (reuses make seeds-photo's runs)
pipeline-seeds-photo: venv
	mkdir -p outputs/pipeline_seeds_photovoc
	$(BIN)/papermill nbs/pipeline_seeds.ipynb outputs/pipeline_seeds_photovoc/pipeline_seeds.ipynb -k python3 --cwd . --log-output \
	  -p out_root outputs/pipeline_seeds_photovoc -p train_root outputs/seeds_photovoc $(PHOTO) $(ARGS)
	cat outputs/pipeline_seeds_photovoc/pipeline_seeds.md

## the documentation site, built from the notebooks into _docs/ (Quarto when on PATH, else nbconvert); README.md is left alone
docs: venv
	$(PY) tests/build_docs.py

## every stage on ToyVOC: seeds, POT, CAMs, pseudo labels, DeepLab, val mIoU (outputs/pipeline/pipeline.md)
pipeline: venv
	mkdir -p outputs/pipeline
	$(BIN)/papermill nbs/pipeline.ipynb outputs/pipeline/pipeline_run.ipynb -k python3 --cwd . --log-output $(ARGS)
	cat outputs/pipeline/pipeline.md

## Fig. A1: the τ and K sweeps and the allocation ablations on ToyVOC (one train.ipynb run per point, reused)
ablation: venv
	mkdir -p outputs/ablation
	$(BIN)/papermill nbs/ablation.ipynb outputs/ablation/ablation.ipynb -k python3 --cwd . --log-output $(ARGS)

## Table A1: baseline, K=1 and POT trained side by side (reuses the ablation runs)
cost: venv
	mkdir -p outputs/ablation
	$(BIN)/papermill nbs/cost.ipynb outputs/ablation/cost.ipynb -k python3 --cwd . --log-output $(ARGS)
	cat outputs/ablation/cost.md

## Figs. A3-A4: image, ground truth, baseline and POT pseudo labels (reuses the ablation runs)
figures: venv
	mkdir -p outputs/ablation
	$(BIN)/papermill nbs/figures.ipynb outputs/ablation/figures.ipynb -k python3 --cwd . --log-output $(ARGS)

## stage 4 alone: DeepLabV2 on a run's pseudo labels, val mIoU (pass label_dir, e.g. ARGS="-p label_dir outputs/demo/pseudo_labels/crf")
segmentation: venv
	$(BIN)/papermill nbs/segmentation.ipynb outputs/demo/segmentation.ipynb -k python3 --cwd . --log-output $(ARGS)

## ResNet-101 DeepLabV2 training step time, batch 10, 321x321 (CPU, or CUDA when present)
bench-deeplab: venv
	$(PY) bench/deeplab_step.py $(ARGS)

## on a CUDA machine: POT step (network vs head, eager vs compiled), CLIP-ES, DeepLabV2 step, peak memory -> bench-gpu/gpu.json (POT_BENCH_CPU=1: tiny CPU run)
bench-gpu:
	bash bench/gpu.sh

## the wheels the lent GPU machine lacks (open_clip_torch, ftfy, wcwidth) into .wheels/, carried by the device call (bench/README.md)
gpu-wheels:
	bash bench/gpu_wheels.sh
