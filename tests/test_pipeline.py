"""`pipeline.ipynb` and `pipeline_seeds.ipynb` end to end on a tiny ToyVOC (`quick=True`), and that a rerun skips every finished stage."""
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


def test_pipeline_seeds_quick(tmp_path):
    """`pipeline_seeds.ipynb`: both arms through CRF, IRN and DeepLab, in the JSON layout the README reads; a rerun skips."""
    def run():
        pm.execute_notebook(str(ROOT / "nbs" / "pipeline_seeds.ipynb"), str(tmp_path / "ps.ipynb"), kernel_name="python3",
                            cwd=str(ROOT), progress_bar=False,
                            parameters=dict(quick=True, out_root=str(tmp_path / "root"), seeds=[0],
                                            base=dict(data_root=str(tmp_path / "toy"), device="cpu"),
                                            segmentation=dict(device="cpu", crf=False), pseudo=dict(device="cpu")))
        return load_json(tmp_path / "root" / "pipeline_seeds.json")
    res = run()
    assert set(res) == {"0"} and set(res["0"]) == {"baseline", "pot"}
    for arm in res["0"].values(): assert set(arm) == {"cam", "crf", "irn", "seg"}
    pot_run, base_run = tmp_path / "root" / "tau0.7_K3", tmp_path / "root" / "baseline_seed0"
    # each arm's labels come from its own CAM and its DeepLab from its own encoder
    assert load_json(pot_run / "stages" / "pseudo_labels_crf.json")["parameters"]["which"] == "final"
    assert load_json(base_run / "stages" / "pseudo_labels_crf.json")["parameters"]["which"] == "cls"
    assert load_json(base_run / "segmentation" / "config.json")["config"]["pretrained"] == str(base_run / "ckpt" / "final.pt")
    assert res["0"]["baseline"]["cam"] == load_json(pot_run / "metrics.json")["cam_miou"]["baseline"]
    assert "DeepLab (val): POT − baseline" in (tmp_path / "root" / "pipeline_seeds.md").read_text()
    mtime = (pot_run / "segmentation" / "metrics.json").stat().st_mtime
    assert run() == res and (pot_run / "segmentation" / "metrics.json").stat().st_mtime == mtime   # nothing ran again
