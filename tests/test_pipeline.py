"""`pipeline.ipynb` end to end on a tiny ToyVOC (`quick=True`), and that a rerun skips every finished stage."""
from pathlib import Path

import papermill as pm

from pot.core import load_json

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(tmp_path, out):
    pm.execute_notebook(str(ROOT / "nbs" / "pipeline.ipynb"), str(tmp_path / "pipeline.ipynb"), kernel_name="python3",
                        cwd=str(ROOT), progress_bar=False,
                        parameters=dict(quick=True, out_dir=str(out), train=dict(data_root=str(tmp_path / "toy"), device="cpu"),
                                        segmentation=dict(device="cpu", crf=False)))
    return load_json(out / "pipeline.json")


def test_pipeline_quick_and_resume(tmp_path):
    out = tmp_path / "pipe"
    p = run_pipeline(tmp_path, out)
    for k in ("cam_miou", "pseudo_label_miou", "segmentation_miou"):
        assert 0 <= p[k] <= 100, k
    assert p["segmentation_split"] == "val"
    stages = {s["stage"]: s for s in p["stages"]}
    assert set(stages) == {"train", "pseudo_labels", "segmentation"}
    assert not any(s["skipped"] for s in stages.values())
    for name in stages: assert (out / f"{name}.ipynb").is_file()
    assert "segmentation mIoU (val)" in (out / "pipeline.md").read_text()
    seg_cfg = load_json(out / "segmentation" / "config.json")["config"]
    assert seg_cfg["pretrained"] == str(out / "ckpt" / "final.pt")      # DeepLab starts from POT's encoder
    again = run_pipeline(tmp_path, out)                                   # a rerun skips every finished stage
    assert all(s["skipped"] for s in again["stages"])
    assert again["segmentation_miou"] == p["segmentation_miou"]
