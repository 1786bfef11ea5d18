"""End-to-end tests of stage 4 (`pot.deeplab`): training that stays finite on all-255 and mostly-255 labels,
the CRF process pool (exact resume after SIGKILL: `test_resume.py`), clear errors, and
`papermill nbs/segmentation.ipynb` on a tiny ToyVOC. Tiny settings (ToyVOC images of 64 px, ResNet-18,
48-px crops, one intra-op thread) keep the file within a couple of minutes on a busy 2-core CPU.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import deeplab_config as config, one_thread
from helpers import ROOT, check_parameters_match
from pot.core import BadInputError, load_json, read_jsonl
from pot.data import load_dataset, read_label_png, save_palette_png

NB = ROOT / "nbs" / "segmentation.ipynb"
@pytest.fixture(autouse=True, scope="module")
def single_thread():
    "One intra-op thread for everything in this file (module fixtures included): runs compared bit for bit use the same kernels."
    with one_thread(): yield


@pytest.fixture(scope="module")
def toy(deeplab_toy):
    "A tiny ToyVOC (12 train, 4 val images of 64 px) and its train ground truth as a pseudo-label folder (conftest)."
    return deeplab_toy


def label_folder(toy, out: Path, keep: float) -> Path:
    "The train ground truth with all but a fraction `keep` of each image's pixels set to 255."
    root, _ = toy
    ds = load_dataset("toyvoc", root, "train")
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        m = ds.mask(i).copy()
        m[rng.random(m.shape) >= keep] = 255
        save_palette_png(out / f"{ds.name(i)}.png", m)
    return out


def test_all_ignored_labels_train_to_a_finite_network(toy, tmp_path):
    "Every crop all 255: loss 0, zero gradients, and (without weight decay) weights that do not move."
    from pot.deeplab import train_deeplab, load_deeplab
    cfg = config(toy, tmp_path / "run", label_dir=str(label_folder(toy, tmp_path / "none", 0.0)), weight_decay=0.0)
    run = train_deeplab(cfg)
    log = read_jsonl(run / "metrics.jsonl")
    assert [r["loss"] for r in log] == [0.0] * 6 and [r["grad_norm"] for r in log] == [0.0] * 6
    assert all(r["labelled"] == 0.0 for r in log)
    model, _ = load_deeplab(run)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_mostly_ignored_labels_stay_finite(toy, tmp_path):
    "1% of the pixels labelled: an ordinary, finite loss on every step."
    from pot.deeplab import train_deeplab
    run = train_deeplab(config(toy, tmp_path / "run", label_dir=str(label_folder(toy, tmp_path / "few", 0.01))))
    log = read_jsonl(run / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in log)
    assert all(0 < r["labelled"] < 0.05 for r in log)


def _ddp_rank(rank: int, world: int, port: int, z, y, out: str) -> None:
    "One rank of the DDP loss check: seg_loss of its half of the batch, gradient w.r.t. its logits."
    import torch.distributed as dist
    from pot.deeplab import seg_loss
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        zr = z[rank::world].clone().requires_grad_(True)
        loss = seg_loss(zr, y[rank::world])["loss"]
        loss.backward()
        torch.save(dict(loss=loss.detach(), grad=zr.grad), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_loss_is_the_global_mean(tmp_path):
    "Under DDP (2 gloo ranks) the averaged gradient is that of the global batch's mean, even when one rank has no label."
    import socket
    import torch.multiprocessing as tmp_mp
    from pot.deeplab import seg_loss
    torch.manual_seed(0)
    z = torch.randn(4, 3, 6, 6)
    y = torch.randint(0, 3, (4, 12, 12))
    y[0::2] = 255                     # rank 0 gets only unlabelled images
    y[1, :, 4:] = 255                 # rank 1 a few labelled pixels
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    tmp_mp.start_processes(_ddp_rank, args=(2, port, z, y, str(tmp_path)), nprocs=2, start_method="fork")
    r = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    zz = z.clone().requires_grad_(True)
    ref = seg_loss(zz, y)["loss"]; ref.backward()
    assert r[0]["loss"].item() == 0.0 and torch.count_nonzero(r[0]["grad"]) == 0
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, ref.detach())            # what fit logs
    torch.testing.assert_close(r[1]["grad"] / 2, zz.grad[1::2])                               # DDP averages over 2 ranks


@pytest.fixture(scope="module")
def trained(deeplab_reference):
    "An uninterrupted tiny training (6 steps; conftest)."
    return deeplab_reference


def test_crf_pool_matches_one_process(trained):
    from pot.deeplab import infer_segmentation
    one = infer_segmentation(trained, "val", scales=(1.0,), n_workers=1, device="cpu")
    first = {p.name: p.read_bytes() for p in sorted((one["out"] / "crf").glob("*.png"))}
    two = infer_segmentation(trained, "val", scales=(1.0,), n_workers=2, device="cpu", overwrite=True)
    assert two["n_predicted"] == 4 and len(first) == 4
    assert {p.name: p.read_bytes() for p in sorted((two["out"] / "crf").glob("*.png"))} == first


def test_clear_errors(toy, trained, tmp_path):
    from pot.deeplab import DeepLabConfig, evaluate_segmentation, train_deeplab
    with pytest.raises(BadInputError, match="pretrained"):
        train_deeplab(config(toy, tmp_path / "w", pretrained=str(tmp_path / "resnet101.pth")))
    with pytest.raises(BadInputError, match="no pseudo label"):
        root, labels = toy
        partial = tmp_path / "partial"; partial.mkdir()
        for p in sorted(labels.glob("*.png"))[:5]: (partial / p.name).write_bytes(p.read_bytes())
        train_deeplab(config(toy, tmp_path / "p", label_dir=str(partial)))
    with pytest.raises(BadInputError, match="infer_segmentation"):
        evaluate_segmentation(trained, "train")
    with pytest.raises(BadInputError, match="output_stride"):
        DeepLabConfig(output_stride=32)


def test_parameters_match_config():
    from pot.deeplab import DeepLabConfig, DEFAULT_TEST_SCALES
    params = check_parameters_match(NB, DeepLabConfig)
    assert set(params) - {f.name for f in dataclasses.fields(DeepLabConfig)} == {"split", "test_scales", "crf", "n_workers", "overwrite", "toyvoc"}
    assert tuple(params["test_scales"]) == DEFAULT_TEST_SCALES


def test_segmentation_notebook_runs(toy, tmp_path):
    import papermill as pm
    root, labels = toy
    out = tmp_path / "seg"
    pm.execute_notebook(
        str(NB), str(tmp_path / "segmentation.ipynb"), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
        parameters=dict(data_root=str(root), label_dir=str(labels), out_dir=str(out), epochs=1, batch_size=4, crop=48,
                        log_every=1, device="cpu", test_scales=[1.0, 0.5], n_workers=1))
    metrics = load_json(out / "metrics.json")
    assert metrics["seg_split"] == "val" and set(metrics["seg_miou"]) == {"raw", "crf"}
    assert all(0.0 <= v <= 100.0 for v in metrics["seg_miou"].values())
    assert metrics["seg_eval"]["crf"]["n_images"] == 4
    val = load_dataset("toyvoc", root, "val")
    for kind in ("raw", "crf"):
        assert all(read_label_png(out / "pred" / "val" / kind / f"{n}.png").shape == val.image_size(i)
                   for i, n in enumerate(val.ids))
    for fig in ("seg_confusion_val_crf.png", "seg_confusion_val_raw.png", "seg_iou_val.png", "seg_predictions_val.png"):
        assert (out / "figures" / fig).is_file()
    assert (out / "ckpt" / "final.pt").is_file() and load_json(out / "config.json")["config"]["label_dir"] == str(labels)
    executed = json.loads((tmp_path / "segmentation.ipynb").read_text())
    assert any("Segmentation mIoU on the val split" in "".join(o.get("text", ""))
               for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
