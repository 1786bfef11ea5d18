"""Helpers of the test files (and of the notebooks' examples): synthetic data with a known answer (feature maps,
CAM-like maps from ground truth, a run folder of them), the environment of training subprocesses, killing a run at its
first checkpoint, and checking a notebook's papermill parameters against its config dataclass."""
import dataclasses
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn

from PIL import Image

from pot.core import POTConfig, save_json, save_npz
from pot.data import save_palette_png, write_split
from pot.experiments import notebook_parameters
from pot.metrics import to_numpy

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    "The environment of a training subprocess: one intra-op thread (runs compared bit for bit then use the same kernels and reduction order) and the repo on PYTHONPATH."
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path)


def kill_at_checkpoint(cmd: list, last: Path, final: Path, timeout: float = 300) -> None:
    "Run `cmd` and SIGKILL it (no clean-up of any kind) as soon as its checkpoint `last` exists; check it died before writing `final`."
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not last.exists() and p.poll() is None and time.time() - t0 < timeout: time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert last.exists() and not final.exists(), "the run was not killed between its first checkpoint and the end"


def check_parameters_match(nb: Path, config_cls) -> dict:
    "Check that the parameters cell of `nb` lists every `config_cls` field, in order, with its default; return the parameters."
    params, defaults = notebook_parameters(nb), config_cls().to_dict()
    fields = [f.name for f in dataclasses.fields(config_cls)]
    assert [k for k in params if k in defaults] == fields, f"parameters must list every {config_cls.__name__} field, in order"
    assert {k: params[k] for k in fields} == defaults
    return params


def cli_error(cli, argv: list, capsys) -> str:
    "Run console script `cli` on `argv`, check it ends on bad input as every console script must (exit 2, one line 'error: ...' on stderr); return that line."
    import pytest
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (e.value.code, err)
    return err


def synthetic_feature_maps(N: int = 8, C: int = 3, size: int = 32, D: int = 32, parts: int = 3, noise: float = 1.0,
                           seed_cover: float = 0.6, n_present: tuple = (1, 3), seed: int = 0) -> dict:
    "Toy batch with known answer: dict(F (N,D,h,w) unit features, seeds (N,C,h,w) incomplete, labels (N,C), gt (N,h,w))."
    g = torch.Generator().manual_seed(seed)
    def ri(lo, hi): return int(torch.randint(lo, hi + 1, (1,), generator=g))
    dirs = Fn.normalize(torch.randn(C + 1, parts, D, generator=g), dim=-1)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    gt = torch.zeros(N, size, size, dtype=torch.long); labels = torch.zeros(N, C); seeds = torch.zeros(N, C, size, size)
    part = (xx * parts / size).long().clamp_max(parts - 1).repeat(N, 1, 1)      # background parts: vertical bands
    for n in range(N):                                                          # data generation, not a hot path
        for c in (torch.randperm(C, generator=g)[:ri(*n_present)] + 1).tolist():
            hh, ww = ri(size // 4, size // 2), ri(size // 4, size // 2)
            y0, x0 = ri(0, size - hh), ri(0, size - ww)
            gt[n, y0:y0 + hh, x0:x0 + ww] = c; labels[n, c - 1] = 1
        for c in labels[n].nonzero()[:, 0].tolist():
            m = gt[n] == c + 1
            if not m.any(): labels[n, c] = 0; continue                          # fully covered by a later object
            ys, xs = m.nonzero(as_tuple=True)
            cy, cx = ys.float().mean(), xs.float().mean()
            r = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
            part[n][m] = ((torch.atan2(yy - cy, xx - cx)[m] / (2 * math.pi) + 1) * parts).long() % parts
            seeds[n, c] = torch.where(m, (1 - r / (r[m].max().clamp_min(1) * seed_cover)).clamp(0, 1).sqrt(), 0.0)
    F = Fn.normalize(dirs[gt, part] + noise * torch.randn(N, size, size, D, generator=g) / math.sqrt(D), dim=-1)
    return dict(F=F.permute(0, 3, 1, 2).contiguous(), seeds=seeds, labels=labels, gt=gt)


def simulate_cams(mask, keys, shift: float = 5.0, ramp: float = 6.0, stride: int = 8, seed: int = 0) -> np.ndarray:
    "float32 (n,H,W) blurry CAM-like maps in [0,1] of classes `keys` from a label mask (H,W): edges moved by up to ±`shift` px, ramp `ramp` px, `stride`-px grid."
    from scipy.ndimage import distance_transform_edt
    mask = to_numpy("mask", mask)
    rng = np.random.default_rng(seed)
    maps = []
    for k in np.asarray(keys).reshape(-1):                                  # loop over the few present classes
        inside = mask == k
        sd = distance_transform_edt(inside) - distance_transform_edt(~inside)  # > 0 inside, < 0 outside
        maps.append(np.clip(0.5 + (sd + rng.uniform(-shift, shift)) / (2 * ramp), 0, 1))
    x = torch.from_numpy(np.stack(maps).astype(np.float32))[None]
    grid = (max(1, round(mask.shape[0] / stride)), max(1, round(mask.shape[1] / stride)))
    x = Fn.interpolate(Fn.adaptive_avg_pool2d(x, grid), size=mask.shape, mode="bilinear", align_corners=False)[0].numpy()
    return x / np.maximum(x.reshape(len(x), -1).max(1), 1e-5)[:, None, None]


def make_simulated_run(run_dir, ds, dataset: str = "toyvoc", **kw) -> Path:
    "A run folder (config.json + cams/<id>.npz with all four map kinds) holding `simulate_cams` of every image of `ds`; for tests."
    run_dir = Path(run_dir)
    for i in range(len(ds)):
        gt, keys = ds.mask(i), np.flatnonzero(ds.labels(i)) + 1
        m = simulate_cams(gt, keys, **{"seed": i, **kw}).astype(np.float16)
        save_npz(run_dir / "cams" / f"{ds.name(i)}.npz", keys=keys.astype(np.int64), **{w: m for w in ("cls", "pot", "pot_k1", "final")})
    save_json(run_dir / "config.json", dict(config=POTConfig(dataset=dataset, data_root=str(ds.root), eval_split=ds.split).to_dict()))
    return run_dir


def make_tiny_voc(root, classes=("cat", "dog"), xml=True) -> Path:
    "A VOC-layout folder of four small random images (train: im0–im2, val: im3) with masks, XML labels and classes.txt."
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True); (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    if xml: (root / "Annotations").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)
    specs = {"im0": (40, 60, [1]), "im1": (50, 30, [2]), "im2": (36, 36, [1, 2]), "im3": (20, 44, [2])}
    for name, (h, w, cls) in specs.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        m = np.zeros((h, w), np.uint8)
        for k, c in enumerate(cls): m[5 + 8 * k:15 + 8 * k, 5:w - 5] = c
        m[4, 5:w - 5] = 255
        save_palette_png(root / "SegmentationClass" / f"{name}.png", m)
        if xml:
            objs = "".join(f"<object><name>{classes[c - 1]}</name><difficult>0</difficult></object>" for c in cls)
            (root / "Annotations" / f"{name}.xml").write_text(f"<annotation><filename>{name}.jpg</filename>{objs}</annotation>")
    write_split(root / "ImageSets/Segmentation/train.txt", ["im0", "im1", "im2"])
    write_split(root / "ImageSets/Segmentation/val.txt", ["im3"])
    return root
