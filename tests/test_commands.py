"""Errors name the command to run, not a Python function: pot-irn (and pot-crf) on a run without CAMs say `pot-cams --run_dir …`."""
import shutil
import subprocess
import sys

from conftest import RUNNERS
from helpers import make_simulated_run, subprocess_env


def test_label_stages_without_cams_name_pot_cams(irn_toy, tmp_path):
    run = make_simulated_run(tmp_path / "run", irn_toy)
    shutil.rmtree(run / "cams")
    for code, argv in ((RUNNERS["irn"], ["--run_dir", str(run), "--stage", "ir", "--preset", "voc"]),
                       ("import sys; from pot.crf import crf_cli; crf_cli(sys.argv[1:])", ["--run_dir", str(run)])):
        p = subprocess.run([sys.executable, "-c", code, *argv], env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr[-2000:]
        assert f"pot-cams --run_dir {run} --split train" in p.stderr and "infer_cams" not in p.stderr, p.stderr
