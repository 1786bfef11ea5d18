"""The main job end to end: `papermill nbs/train.ipynb` on a tiny ToyVOC, and its parameters vs POTConfig."""
import dataclasses
import json
from pathlib import Path

import papermill as pm

from pot.core import POTConfig, load_json
from helpers import check_parameters_match

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "train.ipynb"


def test_parameters_match_config():
    params = check_parameters_match(NB, POTConfig)
    assert set(params) - {f.name for f in dataclasses.fields(POTConfig)} == {"toyvoc", "baseline", "baseline_dir", "resume"}


def test_train_notebook_runs(tmp_path):
    out = tmp_path / "run"
    pm.execute_notebook(
        str(NB), str(tmp_path / "train.ipynb"), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
        parameters=dict(data_root=str(tmp_path / "toy"), out_dir=str(out), epochs=1, batch_size=4, crop=64,
                        feature_stride=8, cam_scales=[1.0, 0.5], log_every=2, device="cpu", con_warmup=0.5, con_ramp=0.0,
                        toyvoc=dict(n_train=12, n_val=0, size=64)))
    metrics = load_json(out / "metrics.json")
    assert metrics["cam_split"] == "train"
    for name in ("baseline", "classifier", "pot_k1", "pot"):
        assert 0.0 <= metrics["cam_miou"][name] <= 100.0
        assert metrics["cam_eval"][name]["n_images"] == 12
    assert metrics["baseline_run"] == str(out / "baseline")
    assert load_json(out / "baseline" / "config.json")["config"]["lambda_con"] == 0.0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["lambda_con"] == 0.0 and log[-1]["lambda_con"] == POTConfig().lambda_con and log[-1]["loss_con"] > 0
    assert len(list((out / "cams").glob("*.npz"))) == 12
    assert (out / "figures" / "cam_overlays_train.png").is_file()
    assert (out / "ckpt" / "final.pt").is_file() and (out / "config.json").is_file()
    executed = json.loads((tmp_path / "train.ipynb").read_text())
    assert any("CAM mIoU on the train split" in "".join(o.get("text", ""))
               for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


def test_unknown_parameter_is_refused(tmp_path):
    "A misspelt parameter (`-p tua 0.5`) used to be a warning, and the run went on with the defaults."
    import pytest
    with pytest.raises(pm.PapermillExecutionError, match=r"unknown parameter\(s\) \['tua'\]"):
        pm.execute_notebook(str(NB), str(tmp_path / "train.ipynb"), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
                            parameters=dict(tua=0.5, out_dir=str(tmp_path / "run"), data_root=str(tmp_path / "none")))
    assert not (tmp_path / "run").exists() and not (tmp_path / "none").exists()
