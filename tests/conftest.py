"""Fixtures shared by the test files: small ToyVOC sets (one per parameter set, made once per session) and the tiny
finished runs of the three trained stages (POT, IRN, DeepLab) that several files, and the parametrised resume test of
`test_resume.py`, compare against."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_simulated_run, subprocess_env

RUNNERS = {stage: f"import sys; from pot.{mod} import {fn}; {fn}(sys.argv[1:])"
           for stage, mod, fn in (("pot", "train", "train_cli"), ("irn", "irn", "irn_cli"), ("deeplab", "deeplab", "deeplab_cli"))}

# the tiny configurations of the three trained stages (steps per epoch: POT 6, IRN 4, DeepLab 3; two epochs each)
POT_TINY = dict(backbone="resnet18", pretrained=None, crop=64, batch_size=4, feature_stride=8, epochs=2, lr=0.01, K=3, lambda_con=1.0,
                con_warmup=0.0, con_ramp=0.0, detach_pot=False, lr_new_mult=1.0, freeze_stem_bn=False,
                ckpt_every=4, log_every=1, num_workers=0, device="cpu")
IRN_TINY = dict(backbone="resnet18", pretrained="None", crop=48, batch_size=4, epochs=2, lr=0.1, momentum=0.9, radius=5,
                ckpt_every=3, log_every=1, device="cpu")
DEEPLAB_TINY = dict(crop=48, batch_size=4, epochs=2, log_every=1, ckpt_every=2, num_workers=0, device="cpu")


class one_thread:
    "torch with one intra-op thread inside the block (the subprocesses run with OMP_NUM_THREADS=1): runs compared bit for bit use the same kernels."
    def __enter__(self): self.n = torch.get_num_threads(); torch.set_num_threads(1)
    def __exit__(self, *exc): torch.set_num_threads(self.n)


def run_cli(stage: str, argv: list, timeout: float = 400) -> subprocess.CompletedProcess:
    "The console script of `stage` on `argv` in a subprocess (one thread); its exit status is checked."
    p = subprocess.run([sys.executable, "-c", RUNNERS[stage], *argv], env=subprocess_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def pot_flags(cfg: dict) -> list[str]:
    "pot-train flags of a POTConfig dict."
    return [a for k, v in cfg.items() for a in (f"--{k}", str(v))]


def irn_flags(run, cfg: dict, stage: str = "train") -> list[str]:
    "pot-irn flags: the IRNConfig of preset 'voc' with `cfg` applied, on the POT run `run`."
    return ["--run_dir", str(run), "--stage", stage, "--preset", "voc", *[a for k, v in cfg.items() for a in (f"--{k}", str(v))]]


def deeplab_flags(cfg) -> list[str]:
    "pot-deeplab flags of a DeepLabConfig."
    return [a for k, v in cfg.to_dict().items() for a in (f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)]))]


def copy_run(src, dst) -> Path:
    "A fresh run folder sharing the CAMs and IR labels of `src` (no IRN state, no IRN labels)."
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("irn"))
    return Path(dst)


@pytest.fixture(scope="session")
def make_toyvoc(tmp_path_factory):
    "`make_toyvoc(**params)`: the root of a ToyVOC made with `params` (`pot.toyvoc.generate_toyvoc`), generated once per session."
    from pot.toyvoc import generate_toyvoc
    made = {}
    def make(**params):
        key = tuple(sorted(params.items()))
        if key not in made:
            made[key] = generate_toyvoc(tmp_path_factory.mktemp("toyvoc") / "toyvoc", progress=False, **params)
        return made[key]
    return make


@pytest.fixture(scope="session")
def pot_reference(make_toyvoc, tmp_path_factory) -> dict:
    "An uninterrupted tiny POT run (2 epochs × 6 steps) by pot-train; its flags as a dict."
    toy = make_toyvoc(n_train=24, n_val=4, size=96)
    cfg = dict(POT_TINY, dataset="toyvoc", data_root=str(toy), out_dir=str(tmp_path_factory.mktemp("runs") / "ref"))
    run_cli("pot", pot_flags(cfg))
    return cfg


@pytest.fixture(scope="session")
def irn_toy(make_toyvoc):
    "16 ToyVOC training images of 96 px."
    from pot.data import load_dataset
    return load_dataset("toyvoc", make_toyvoc(n_train=16, n_val=2, size=96, seed=4), "train")


@pytest.fixture(scope="session")
def irn_sim(irn_toy, tmp_path_factory):
    "A run with simulated CAMs, its CAM mIoU in metrics.json, and its IR labels."
    from pot.core import save_json
    from pot.irn import cam_to_ir_label
    from pot.metrics import CAMEvaluator
    from pot.runs import Run
    toy = irn_toy
    run = make_simulated_run(tmp_path_factory.mktemp("sim") / "run", toy)
    ev = CAMEvaluator(toy.num_classes + 1)
    for i in range(len(toy)):
        keys, maps = Run(run).image_cams(toy.name(i), "final", toy.labels(i), toy.image_size(i))
        ev.add(toy.mask(i), maps, keys)
    cam = ev.result(split="train", which="final")
    save_json(run / "metrics.json", dict(cam_miou=dict(final=cam["miou"]), cam_split="train"))
    s = cam_to_ir_label(run, n_workers=2)
    assert s["n_written"] == len(toy)
    return run


def irn_tiny_cfg(**kw):
    "The IRNConfig of `IRN_TINY` (what `irn_flags` gives pot-irn), with `kw`."
    from pot.irn import IRNConfig
    return IRNConfig(**{**IRN_TINY, "pretrained": None, **kw})


@pytest.fixture(scope="session")
def irn_reference(irn_sim, tmp_path_factory) -> Path:
    "An uninterrupted tiny IRN training (2 epochs × 4 steps), in this process with one thread; the POT run holding it."
    from pot.irn import train_irn
    run = copy_run(irn_sim, tmp_path_factory.mktemp("ref") / "run")
    with one_thread(): train_irn(run, irn_tiny_cfg())
    return run


@pytest.fixture(scope="session")
def deeplab_toy(make_toyvoc, tmp_path_factory):
    "A tiny ToyVOC (12 train, 4 val images of 64 px) and its train ground truth as a pseudo-label folder."
    from pot.data import load_dataset
    from pot.deeplab import copy_gt_labels
    root = make_toyvoc(n_train=12, n_val=4, size=64)
    labels = copy_gt_labels(load_dataset("toyvoc", root, "train"), tmp_path_factory.mktemp("labels") / "gt")
    return root, labels


def deeplab_config(toy, out, **kw):
    "The tiny DeepLabConfig on `toy` (`deeplab_toy`) writing to `out`."
    from pot.deeplab import DeepLabConfig
    root, labels = toy
    return DeepLabConfig(**{**dict(data_root=str(root), label_dir=str(labels), out_dir=str(out)), **DEEPLAB_TINY, **kw})


@pytest.fixture(scope="session")
def deeplab_reference(deeplab_toy, tmp_path_factory) -> Path:
    "An uninterrupted tiny DeepLab training (2 epochs × 3 steps), in this process with one thread."
    from pot.deeplab import train_deeplab
    with one_thread(): return train_deeplab(deeplab_config(deeplab_toy, tmp_path_factory.mktemp("runs") / "seg"))
