"""Benchmark of `pot.crf.make_crf_labels`: CPU and wall seconds per image, serial against a pool of 2, on ToyVOC at
160 px and at `size=500` (VOC's image sizes), with CAM-like maps simulated from the ground truth.

    .venv/bin/python bench/crf_labels.py [--n_toy 24] [--n_large 8]

Prints one JSON line per (images, workers). CPU time includes reading the image and CAM file and writing the PNG.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import make_simulated_run          # CAM-like maps from ground truth

from pot.crf import make_crf_labels
from pot.data import load_dataset
from pot.toyvoc import generate_toyvoc


def bench_crf(tmp, n_toy: int = 24, n_large: int = 8) -> dict:
    "CPU s / image and wall s / image of make_crf_labels, serial vs a pool of 2, on ToyVOC at 160 px and at 500 px."
    tmp = Path(tmp); out = {}
    toy = load_dataset("toyvoc", generate_toyvoc(tmp / "toyvoc", n_train=n_toy, n_val=1, seed=1, progress=False), "train")
    big = load_dataset("toyvoc", generate_toyvoc(tmp / "big", n_train=n_large, n_val=1, size=500, seed=1, progress=False), "train")
    for name, ds in (("toyvoc", toy), ("500px", big)):
        run = make_simulated_run(tmp / f"run_{name}", ds)
        for w in (1, 2):
            s = make_crf_labels(run, out=tmp / f"{name}_{w}", n_workers=w)
            out[(name, w)] = dict(size=ds.image(0).shape[:2], cpu_s_per_image=s["cpu_s_per_image"], wall_s_per_image=s["wall_s"] / s["n_images"])
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_toy", type=int, default=24)
    p.add_argument("--n_large", type=int, default=8)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for (name, w), r in bench_crf(d, a.n_toy, a.n_large).items(): print(json.dumps(dict(images=name, workers=w, **r)))
