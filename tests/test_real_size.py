"""Real-size smoke test of the paper's VOC configuration: every stage on images of PASCAL VOC's sizes.

A generated 6-image dataset in the VOC layout (4 train, 2 val; 500×375, 375×500 and 500×333 images, the 20 VOC
classes, 1–4 per image, 255 boundaries, no classes.txt) goes through the `voc` presets' shapes: POT (ResNet-50,
crop 512, feature stride 16), CAMs at scales 1/0.5/1.5/2, CRF and IR pseudo labels, IRN (crop 512), IRN labels,
DeepLabV2 (ResNet-101, output stride 8, crop 321) with its test scales and CRF, and CLIP-ES seeds (random
ViT-B/16) with POT trained and inferred on them. One or two steps or images each: what is proved is that a first
VOC run cannot fail on a shape, a class count or a memory surprise, not that it learns.

Each stage runs in its own subprocess (≤ 2 intra-op threads) and its peak RSS and wall time are tabled
(printed with -s, and written as stages.md in the module's temporary folder). The stage is started by a small
launcher that `os.wait4`s it: waited for by pytest itself, its ru_maxrss would be at least pytest's own peak,
since Linux carries the parent's high-water mark across vfork + exec.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from helpers import subprocess_env
from pot.clip_es import load_seed_cam, read_clip_cam
from pot.core import PAPER_CAM_SCALES, load_checkpoint, load_json, load_npz, read_jsonl
from pot.data import VOC_CLASSES, load_dataset, write_split
from pot.data import read_label_png, save_palette_png

# id -> (H, W, number of classes); VOC's commonest sizes, a portrait and odd sides
TRAIN = {"2007_000001": (375, 500, 1), "2007_000002": (375, 500, 4), "2007_000003": (500, 375, 2),
         "2007_000004": (333, 500, 3)}
VAL = {"2007_000005": (375, 500, 2), "2007_000006": (500, 334, 3)}
N = len(VOC_CLASSES) + 1                          # 21 labels: background + 20
MAX_RSS_MIB = 6 * 1024                            # per stage; batch 2 on CPU (the table shows the measured peaks)
LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter(); p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0); p.returncode = rc = os.waitstatus_to_exitcode(status)
json.dump(dict(rc=rc, wall_s=time.perf_counter() - t0, rss_mib=ru.ru_maxrss / 1024, cpu_s=ru.ru_utime + ru.ru_stime),
          open(sys.argv[1], "w"))
"""


def _image(rng, H, W, keys):
    "uint8 (H,W,3) picture and uint8 (H,W) mask of one ellipse or polygon per class in `keys`, 255 on a 5-px boundary band."
    for _ in range(50):
        mask = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(mask)
        for k in keys:
            w, h = rng.uniform(0.25, 0.5) * W, rng.uniform(0.25, 0.5) * H
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            if rng.random() < 0.5: draw.ellipse([x, y, x + w, y + h], fill=int(k))
            else:
                a = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 9))))
                r = rng.uniform(0.6, 1.0, len(a))
                pts = np.stack([x + w / 2 * (1 + r * np.cos(a)), y + h / 2 * (1 + r * np.sin(a))], 1)
                draw.polygon([tuple(p) for p in pts], fill=int(k))
        m = np.array(mask)
        edge = ndimage.maximum_filter(m, 3) != ndimage.minimum_filter(m, 3)
        m[ndimage.binary_dilation(edge, iterations=2)] = 255
        if all((m == k).sum() >= 400 for k in keys): break
    else: raise RuntimeError("could not place the objects")
    yy, xx = np.mgrid[0:H, 0:W] / max(H, W)
    img = 90 + 60 * np.stack([yy, xx, 1 - yy], -1) + rng.normal(0, 12, (H, W, 3))
    colours = rng.uniform(30, 230, (N, 3))
    for k in keys: img[m == k] = colours[k] + rng.normal(0, 12, ((m == k).sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8), m


def _xml(name, H, W, mask, keys):
    objs = []
    for k in keys:
        ys, xs = np.nonzero(mask == k)
        objs.append(f"<object><name>{VOC_CLASSES[k - 1]}</name><pose>Unspecified</pose><difficult>0</difficult>"
                    f"<bndbox><xmin>{xs.min() + 1}</xmin><ymin>{ys.min() + 1}</ymin><xmax>{xs.max() + 1}</xmax>"
                    f"<ymax>{ys.max() + 1}</ymax></bndbox></object>")
    return (f"<annotation><folder>VOC2012</folder><filename>{name}.jpg</filename><size><width>{W}</width>"
            f"<height>{H}</height><depth>3</depth></size><segmented>1</segmented>{''.join(objs)}</annotation>")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    "The dataset: base (the module's folder), root, {id: (H, W)}, {id: sorted label indices 1..20}."
    root = tmp_path_factory.mktemp("real_size") / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "Annotations"): (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(np.arange(1, N))
    sizes, labels, used = {}, {}, 0
    for name, (H, W, n) in {**TRAIN, **VAL}.items():
        keys = sorted(order[(used + np.arange(n)) % (N - 1)].tolist()); used += n
        img, mask = _image(rng, H, W, keys)
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        save_palette_png(root / "SegmentationClass" / f"{name}.png", mask)
        (root / "Annotations" / f"{name}.xml").write_text(_xml(name, H, W, mask, keys))
        sizes[name], labels[name] = (H, W), keys
    write_split(root / "ImageSets" / "Segmentation" / "train.txt", list(TRAIN))
    write_split(root / "ImageSets" / "Segmentation" / "val.txt", list(VAL))
    return dict(base=root.parent, root=root, sizes=sizes, labels=labels)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class Stages:
    "Runs stage snippets in subprocesses, one at a time, and keeps the table of their peak RSS, times and bytes written."
    def __init__(self, base: Path):
        self.base, self.rows = base, {}
        self.env = dict(subprocess_env(), OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", TQDM_DISABLE="1")

    def run(self, name: str, code: str, **params) -> dict:
        "Run `code` (it sees the dict `P` of `params`, paths as strings, and may set `result`, saved as JSON); return its row."
        tag = f"{len(self.rows):02d}"
        log, usage, out = (self.base / f"{tag}.{ext}" for ext in ("log", "usage.json", "result.json"))
        P = json.dumps(params, default=str)
        src = (f"import json\nP = json.loads({P!r})\nresult = None\n" + textwrap.dedent(code)
               + f"\njson.dump(result, open({str(out)!r}, 'w'), default=str)\n")
        before = _bytes(self.base)
        with open(log, "w") as f:
            subprocess.run([sys.executable, "-c", LAUNCHER, str(usage), sys.executable, "-c", src], env=self.env,
                           stdout=f, stderr=subprocess.STDOUT, check=True)
        row = dict(load_json(usage), name=name, log=log, written_mib=(_bytes(self.base) - before) / 2**20)
        row["result"] = json.loads(out.read_text()) if row["rc"] == 0 else None
        self.rows[name] = row
        return row

    def table(self) -> str:
        lines = ["| stage | exit | peak RSS (MiB) | wall (s) | CPU (s) | written (MiB) |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {r['rc']} | {r['rss_mib']:.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['written_mib']:.1f} |"
                  for n, r in self.rows.items()]
        return "\n".join(lines) + "\n"


def ok(row: dict) -> dict:
    "The row of a stage that exited 0 within the memory bound; else a failure showing the end of its log."
    tail = "\n".join(row["log"].read_text().splitlines()[-40:])
    assert row["rc"] == 0, f"stage {row['name']!r} exited {row['rc']}:\n{tail}"
    assert row["rss_mib"] < MAX_RSS_MIB, f"stage {row['name']!r} peaked at {row['rss_mib']:.0f} MiB"
    return row


def need(row: dict) -> dict:
    "Skip a later stage whose input stage failed (its own test reports why)."
    if row["rc"] != 0: pytest.skip(f"needs stage {row['name']!r}, which failed")
    return row


@pytest.fixture(scope="module")
def stages(voc):
    "The stage runner; at the end of the module the table is printed and written to stages.md."
    s = Stages(voc["base"])
    s.run("baseline: python + import pot", "import pot.train, pot.cams, pot.crf, pot.irn, pot.deeplab, pot.clip_es")
    yield s
    path = voc["base"] / "stages.md"
    path.write_text(s.table())
    print(f"\n\nreal-size stages (peak RSS of each stage's process, 2 threads):\n{s.table()}written to {path}")


def pot_cfg(voc, out: str, **kw) -> dict:
    """Overrides of POTConfig.preset('voc'): this dataset, one epoch of 2 steps of 2 crops, random weights, CPU, lr 1e-3.
    The preset's lr 0.1 (1.0 for the classifier) from random weights diverges in 2 steps and leaves all-zero CAMs, on
    which every later stage would run on nothing; lr changes no shape."""
    return dict(data_root=str(voc["root"]), out_dir=str(voc["base"] / out), train_split="train", eval_split="train",
                epochs=1, batch_size=2, lr=1e-3, ckpt_every=1, log_every=1, pretrained=None, device="cpu", **kw)


TRAIN_POT = """
from pot.core import POTConfig
from pot.train import train
result = str(train(POTConfig.preset("voc", **P["cfg"])))
"""
CAMS = """
from pot.cams import infer_cams, evaluate_cams
infer_cams(P["run"], device="cpu", limit=P["limit"])
result = evaluate_cams(P["run"]) if P["evaluate"] else None
"""


@pytest.fixture(scope="module")
def pot_run(voc, stages):
    return stages.run("train POT (ResNet-50, crop 512)", TRAIN_POT, cfg=pot_cfg(voc, "pot"))


@pytest.fixture(scope="module")
def cams(voc, pot_run, stages):
    need(pot_run)
    return stages.run("CAMs (scales 1, 0.5, 1.5, 2) + eval", CAMS, run=voc["base"] / "pot", limit=None, evaluate=True)


@pytest.fixture(scope="module")
def crf(voc, cams, stages):
    need(cams)
    return stages.run("CRF pseudo labels + eval", """
        from pot.crf import make_crf_labels, evaluate_pseudo_labels
        make_crf_labels(P["run"], n_workers=1)
        result = evaluate_pseudo_labels(P["run"])
        """, run=voc["base"] / "pot")


@pytest.fixture(scope="module")
def ir(voc, cams, stages):
    need(cams)
    return stages.run("IR labels", "from pot.irn import cam_to_ir_label\nresult = cam_to_ir_label(P['run'], n_workers=1)",
                      run=voc["base"] / "pot")


@pytest.fixture(scope="module")
def irn(voc, ir, stages):
    need(ir)
    return stages.run("train IRN (ResNet-50, crop 512)", """
        from pot.irn import IRNConfig, train_irn
        cfg = IRNConfig.preset("voc", epochs=1, batch_size=2, ckpt_every=1, log_every=1, device="cpu")
        result = str(train_irn(P["run"], cfg))
        """, run=voc["base"] / "pot")


@pytest.fixture(scope="module")
def irn_labels(voc, irn, stages):
    need(irn)
    return stages.run("IRN labels (random walk) + eval", """
        from pot.irn import make_irn_labels
        from pot.crf import evaluate_pseudo_labels
        make_irn_labels(P["run"], device="cpu", n_figure=1)
        result = evaluate_pseudo_labels(P["run"], method="irn")
        """, run=voc["base"] / "pot")


@pytest.fixture(scope="module")
def deeplab(voc, irn_labels, stages):
    need(irn_labels)
    cfg = dict(data_root=str(voc["root"]), train_split="train", label_dir=str(voc["base"] / "pot" / "pseudo_labels" / "irn"),
               out_dir=str(voc["base"] / "seg"), epochs=1, batch_size=2, ckpt_every=1, log_every=1, device="cpu",
               pretrained=None)
    return stages.run("train DeepLabV2 (ResNet-101, crop 321)", """
        from pot.deeplab import DeepLabConfig, train_deeplab
        result = str(train_deeplab(DeepLabConfig.preset("voc", **P["cfg"])))
        """, cfg=cfg)


@pytest.fixture(scope="module")
def segmentation(voc, deeplab, stages):
    need(deeplab)
    return stages.run("DeepLab val (scales 0.5, 0.75, 1, flip, CRF) + eval", """
        from pot.deeplab import infer_segmentation, evaluate_segmentation
        infer_segmentation(P["run"], "val", device="cpu", n_workers=1)
        result = evaluate_segmentation(P["run"], "val")
        """, run=voc["base"] / "seg")


@pytest.fixture(scope="module")
def clip_cache(voc, stages):
    return stages.run("CLIP-ES cache (random ViT-B/16)", """
        from pot.clip_es import build_clip_cache
        result = build_clip_cache(P["root"], "train", P["out"], dataset="voc", pretrained=None, device="cpu", progress=False)
        """, root=voc["root"], out=voc["base"] / "clip_cache")


@pytest.fixture(scope="module")
def clip_run(voc, clip_cache, stages):
    need(clip_cache)
    cfg = pot_cfg(voc, "pot_clip", seed_source="clip-es", seed_dir=str(voc["base"] / "clip_cache"))
    return stages.run("train POT on CLIP-ES seeds", TRAIN_POT, cfg=cfg)


@pytest.fixture(scope="module")
def clip_cams(voc, clip_run, stages):
    need(clip_run)
    return stages.run("CAMs fused with CLIP-ES (2 images)", CAMS, run=voc["base"] / "pot_clip", limit=2, evaluate=False)


# ------------------------------------------------------------------------------------------------------------------
def test_dataset_reads_as_voc_without_classes_txt(voc):
    "dataset='voc' without classes.txt assumes the 20 VOC classes; labels (XML) and masks (palette, 255) read at image size."
    assert not (voc["root"] / "classes.txt").exists()
    for split, ids in (("train", TRAIN), ("val", VAL)):
        ds = load_dataset("voc", voc["root"], split)
        assert ds.classes == list(VOC_CLASSES) and ds.num_classes == 20 and ds.ids == list(ids) and ds.label_source == "xml"
        for i, name in enumerate(ds.ids):
            m = ds.mask(i)
            assert ds.image_size(i) == m.shape == ds.image(i).shape[:2] == voc["sizes"][name]
            assert (np.flatnonzero(ds.labels(i)) + 1).tolist() == voc["labels"][name]
            assert set(np.unique(m).tolist()) == {0, 255, *voc["labels"][name]}
    assert sorted({len(k) for k in voc["labels"].values()}) == [1, 2, 3, 4]


def test_pot_trains_at_voc_size(voc, pot_run):
    "One epoch (2 steps of 2 crops of 512) of the voc preset: ResNet-50, stride-16 features, 20 classes, L_con on from step 0."
    run = Path(ok(pot_run)["result"])
    cfg = load_json(run / "config.json")
    assert cfg["config"]["cam_scales"] == list(PAPER_CAM_SCALES) and cfg["config"]["crop"] == 512 and cfg["total_steps"] == 2
    log = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) and r["loss_con"] > 0 for r in log)
    assert load_checkpoint(run / "ckpt" / "final.pt")["model"]["classifier.weight"].shape[:2] == (20, 2048)


def _check_cams(voc, run, names):
    "Every map kind of every image: float16 (n_present, H, W) in [0, 1], the image's classes, not all zero."
    for name in names:
        z = load_npz(run / "cams" / f"{name}.npz", required=("keys", "cls", "pot", "pot_k1", "final"))
        assert z["keys"].tolist() == voc["labels"][name]
        for w in ("cls", "pot", "pot_k1", "final"):
            assert z[w].shape == (len(voc["labels"][name]), *voc["sizes"][name]) and z[w].dtype == np.float16, (name, w)
            assert np.isfinite(z[w]).all() and z[w].min() >= 0 and z[w].max() == 1, (name, w)


def test_cams_at_image_size_and_21_class_eval(voc, cams):
    "Four-scale + flip CAMs are (n_present, H, W) per image, portrait and odd sizes included; the evaluation scores 21 classes."
    m = ok(cams)["result"]
    _check_cams(voc, voc["base"] / "pot", TRAIN)
    assert m["cam_settings"]["cam_scales"] == list(PAPER_CAM_SCALES)
    for w in ("classifier", "pot", "pot_k1", "final"):
        r = m["cam_eval"][w]
        assert r["n_images"] == 4 and len(r["class_names"]) == len(r["iou"]) == N and r["class_names"][0] == "background"
        assert r["class_names"][1:] == list(VOC_CLASSES) and 0 <= r["miou"] <= 100


def _check_labels(voc, folder, names, allow_unsure=True):
    "Label PNGs at image size holding only 0, the image's classes (and 255); some foreground, so later stages get some."
    fg = 0
    for name in names:
        lab = read_label_png(folder / f"{name}.png")
        assert lab.shape == voc["sizes"][name], (folder.name, name, lab.shape)
        assert set(np.unique(lab).tolist()) <= {0, *voc["labels"][name], *([255] if allow_unsure else [])}
        fg += int(np.isin(lab, voc["labels"][name]).sum())
    assert fg > 0, f"{folder}: no foreground pixel in any label"


def test_crf_pseudo_labels(voc, crf):
    "DenseCRF pseudo labels are image-size palette PNGs holding only background, the image's classes and 255; 21-class eval."
    r = ok(crf)["result"]
    _check_labels(voc, voc["base"] / "pot" / "pseudo_labels" / "crf", TRAIN)
    assert r["n_images"] == 4 and len(r["iou"]) == N and r["class_names"][1:] == list(VOC_CLASSES)


def test_ir_labels(voc, ir):
    "IR labels (confident foreground, background, 255 between) at image size for every training image."
    r = ok(ir)["result"]
    assert r["n_written"] == 4
    _check_labels(voc, voc["base"] / "pot" / "pseudo_labels" / "ir", TRAIN)


def test_irn_trains_at_crop_512(irn):
    "IRN (voc preset: ResNet-50, crop 512, radius 10) trains 2 steps on the IR labels: finite losses over real pixel pairs."
    run = Path(ok(irn)["result"])
    cfg = load_json(run / "config.json")
    assert cfg["config"]["crop"] == 512 and cfg["config"]["radius"] == 10 and (run / "ckpt" / "final.pt").is_file()
    log = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) and r["n_fg_pos"] > 0 and r["n_neg"] > 0 for r in log)


def test_irn_labels(voc, irn_labels):
    "The random walk on IRN's boundaries gives image-size labels (no 255) for every image; scored with 21 classes."
    r = ok(irn_labels)["result"]
    _check_labels(voc, voc["base"] / "pot" / "pseudo_labels" / "irn", TRAIN, allow_unsure=False)
    assert r["n_images"] == 4 and len(r["iou"]) == N


def test_deeplab_trains_at_crop_321(deeplab):
    "DeepLabV2 (ResNet-101, output stride 8, crop 321) trains on the IRN labels with 21 output channels."
    run = Path(ok(deeplab)["result"])
    cfg = load_json(run / "config.json")
    assert cfg["config"]["backbone"] == "resnet101" and cfg["config"]["crop"] == 321 and cfg["classes"] == list(VOC_CLASSES)
    assert all(np.isfinite(r["loss"]) for r in read_jsonl(run / "metrics.jsonl"))
    assert load_checkpoint(run / "ckpt" / "final.pt")["model"]["aspp.branches.0.weight"].shape[0] == N


def test_deeplab_val_predictions(voc, deeplab, segmentation):
    "Multi-scale + flip predictions (raw and CRF) on val are at image size (portrait too); the confusion matrix is 21×21."
    m = ok(segmentation)["result"]
    base = Path(deeplab["result"]) / "pred" / "val"
    for kind in ("raw", "crf"):
        for name in VAL:
            p = read_label_png(base / kind / f"{name}.png")
            assert p.shape == voc["sizes"][name] and p.max() < N
        r = m["seg_eval"][kind]
        assert r["n_images"] == 2 and np.shape(r["confusion"]) == (N, N) and len(r["iou"]) == N
    assert load_json(base / "params.json")["scales"] == [0.5, 0.75, 1.0]


def test_clip_es_cache(voc, clip_cache):
    "CLIP-ES at full resolution (500×375 → 32×24 patches): one map per present class on the ceil(H/16)×ceil(W/16) grid."
    s = ok(clip_cache)["result"]
    assert s["n_computed"] == 4
    cache = voc["base"] / "clip_cache"
    for name in TRAIN:
        z = read_clip_cam(cache / f"{name}.npz")
        H, W = voc["sizes"][name]
        assert z["keys"].tolist() == voc["labels"][name] and tuple(z["size"]) == (H, W)
        assert z["cams"].shape == (len(voc["labels"][name]), -(-H // 16), -(-W // 16))
        labels = np.isin(np.arange(1, N), voc["labels"][name])
        assert load_seed_cam(cache, name, labels, (H, W)).shape == (20, H, W)


def test_pot_on_clip_es_seeds(voc, clip_run, clip_cams):
    "POT trains on CLIP-ES seeds at crop 512, and its CAMs fused with the CLIP maps keep the (n_present, H, W) shape."
    run = Path(ok(clip_run)["result"])
    assert load_json(run / "config.json")["config"]["seed_source"] == "clip-es"
    assert all(np.isfinite(r["loss"]) and r["loss_con"] > 0 for r in read_jsonl(run / "metrics.jsonl"))
    ok(clip_cams)
    _check_cams(voc, run, list(TRAIN)[:2])
