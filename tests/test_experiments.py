"""The experiment notebooks end to end on a tiny ToyVOC (`quick=True`): cost, ablation and figures share their runs."""
import json
from pathlib import Path

import pandas as pd
import papermill as pm

from pot.core import load_json

ROOT = Path(__file__).resolve().parents[1]


def run_nb(name, tmp_path, **params):
    out = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(ROOT / "nbs" / f"{name}.ipynb"), str(out), kernel_name="python3", cwd=str(ROOT),
                        progress_bar=False, parameters=params)
    return json.loads(out.read_text())


def outputs_text(nb) -> str:
    return "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


def test_cost_ablation_figures(tmp_path):
    root, base = tmp_path / "runs", dict(data_root=str(tmp_path / "toy"), device="cpu")
    nb = run_nb("cost", tmp_path, quick=True, out_root=str(root), base=base)
    md = (root / "cost.md").read_text()
    assert "classifier CAM (baseline)" in md and "POT (K=3)" in md and "single prototype (K=1)" in md
    baseline = load_json(root / "baseline_seed0" / "config.json")["config"]
    assert baseline["lambda_con"] == 0.0

    nb = run_nb("ablation", tmp_path, quick=True, out_root=str(root), base=base)
    df = pd.read_csv(root / "ablation.csv")
    assert sorted(df.point) == ["tau0.65_K3", "tau0.7_K1", "tau0.7_K3"]
    assert df.set_index("point").loc[["tau0.7_K1", "tau0.7_K3"], "reused"].all()   # made by cost.ipynb
    assert df[["classifier", "pot", "pot_k1"]].apply(lambda c: c.between(0, 100)).all().all()
    assert (root / "figures" / "ablation_tau_K.png").stat().st_size > 10_000
    assert "best τ at K=3" in outputs_text(nb)
    assert df.baseline.nunique() == 1                                              # one shared baseline per seed
    assert "POT − baseline (paired)" in (root / "seeds.md").read_text()

    run_nb("figures", tmp_path, quick=True, out_root=str(root), base=base, n_images=2)
    assert (root / "figures" / "qualitative_train.png").stat().st_size > 10_000
    for run in ("baseline_seed0", "tau0.7_K3"):
        m = load_json(root / run / "metrics.json")
        assert 0 <= m["pseudo_label_miou"]["crf"] <= 100
