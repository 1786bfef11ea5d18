"""bench/gpu.sh must run right the first time on a GPU machine: run the same script on the CPU with tiny sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_cpu_fallback(tmp_path):
    env = dict(os.environ, POT_BENCH_CPU="1", POT_PYTHON=sys.executable, POT_BENCH_OUT=str(tmp_path / "out"),
               POT_BENCH_BUDGET="400", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert set(res["sections"]) == {"pot-step", "pot-head", "clip-es", "deeplab"}
    for name, sec in res["sections"].items(): assert "error" not in sec, (name, sec)
    step = res["sections"]["pot-step"]
    assert step["network"]["ms"] > 0 and len(step["heads"]) == 3
    for h in step["heads"].values(): assert h["step_ms"] > 0 and h["head_ms"] > 0 and h["step_peak_mib"] > 0
    static = res["sections"]["pot-head"]["static"]["static eager"]
    assert static["counts_forward"]["host_syncs"] == 0                         # the GPU path reads nothing back
    assert res["sections"]["pot-head"]["layouts"]["channels-last"]["a_counts_forward"]["host_syncs"] > 0
    assert set(res["sections"]["clip-es"]) >= {"64x64", "80x48"}
    assert res["sections"]["deeplab"]["sec_per_step"] > 0
    table = (tmp_path / "out" / "gpu.md").read_text()
    assert "## pot-step" in table and "network only" in table and "## deeplab" in table
