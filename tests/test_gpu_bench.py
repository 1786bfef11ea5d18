"""bench/gpu.sh must run right the first time on a lent GPU machine: run the device command that bench/README.md documents,
verbatim, on the CPU with tiny sizes, as that machine would — a bare `python3` (here a wrapper around this interpreter),
the project found through PYTHONPATH only (open_clip, ftfy, wcwidth and an installed `pot` hidden), the wheels from the
folder — with a temporary $OUT, one section and one variant failing on purpose."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("open_clip_torch", "ftfy", "wcwidth")       # what bench/gpu_wheels.sh downloads: the device machine lacks them


def device_command() -> str:
    "The command line under the `device-command` marker of bench/README.md."
    text = (ROOT / "bench" / "README.md").read_text()
    m = re.search(r"<!-- device-command[^>]*-->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, "bench/README.md has no device-command block"
    return m.group(1).strip()


def wheel_from_installed(name: str, dest: Path) -> Path:
    "A wheel of an installed distribution (its files and dist-info), for when .wheels/ was not downloaded (CI has no index)."
    dist = importlib.metadata.distribution(name)
    whl = dest / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for f in dist.files:
            src = Path(dist.locate_file(f))
            if not str(f).startswith("..") and "__pycache__" not in str(f) and src.is_file(): z.write(src, str(f))
    return whl


def test_device_command_on_cpu(tmp_path):
    cmd = device_command()
    assert "bench/gpu.sh" in cmd and ".venv" not in cmd
    readme = (ROOT / "bench" / "README.md").read_text()
    assert 'carry: [".wheels"]' in readme and "timeout_s: 560" in readme
    # the device machine: python3 with torch, no `pot` installed, no open_clip / ftfy / wcwidth
    bin_ = tmp_path / "bin"; bin_.mkdir()
    (bin_ / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n'); (bin_ / "python3").chmod(0o755)
    hide = tmp_path / "hide"
    for mod in ("open_clip", "ftfy", "wcwidth", "pot"):
        (hide / mod).mkdir(parents=True)
        (hide / mod / "__init__.py").write_text(f"raise ModuleNotFoundError('{mod} is hidden: the device lacks it', name='{mod}')\n")
    wheels = ROOT / ".wheels"
    if not all(list(wheels.glob(f"{w}-*.whl")) for w in WHEELS):
        wheels = tmp_path / "wheels"; wheels.mkdir()
        for w in WHEELS: wheel_from_installed(w, wheels)
    out = tmp_path / "out"; out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POT_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{bin_}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(hide), OUT=str(out), POT_BENCH_CPU="1",
               POT_WHEELS=str(wheels), POT_SITE=str(tmp_path / "site"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               POT_BENCH_FAIL="deeplab,pot-step:check_every", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout[-4000:] + p.stderr[-2000:]
    assert p.returncode == 0, log
    # everything under $OUT, within what the device tool returns: <= 8 plain files, no sub-folders, plain names
    files = [f for f in out.rglob("*")]
    assert all(f.is_file() and f.parent == out and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files), files
    assert len(files) <= 8, files
    assert {f.name for f in files} == {"gpu.log", "gpu.json", "gpu.md", "pot-step.json", "pot-head.json", "clip-es.json", "deeplab.json"}
    assert not (ROOT / "bench-gpu" / "gpu.json").exists() or (ROOT / "bench-gpu" / "gpu.json").stat().st_mtime < out.stat().st_ctime
    assert "installing the carried wheels" in p.stdout and "pre-flight" in p.stdout
    res = json.loads((out / "gpu.json").read_text())
    assert res["preflight"]["sections"] == {"pot-step": [], "pot-head": [], "clip-es": [], "deeplab": []}, res["preflight"]
    sec = res["sections"]
    # the section failing on purpose is recorded, the others keep their numbers
    assert "POT_BENCH_FAIL" in sec["deeplab"]["error"]
    for name in ("pot-step", "pot-head", "clip-es"): assert "error" not in sec[name], (name, sec[name])
    step = sec["pot-step"]
    assert step["network"]["ms"] > 0
    failed = [k for k, h in step["heads"].items() if "error" in h]
    assert failed == ["POTHead eager, check_every=8"], failed            # the variant failing on purpose, alone
    for k, h in step["heads"].items():
        if k not in failed: assert h["step_ms"] > 0 and h["head_ms"] > 0 and h["step_peak_mib"] > 0, (k, h)
    assert len(step["heads"]) == 3                                        # pot_cams, eager, eager check_every (no compiling here)
    static = sec["pot-head"]["static"]
    assert set(static) == {"static eager, all C+1 slots", "static eager", "static eager, check_every=8"}
    for v in static.values(): assert v["counts_forward"]["host_syncs"] == 0 or "check_every" in str(v), v
    assert static["static eager"]["counts_forward"]["host_syncs"] == 0    # the GPU path reads nothing back
    assert sec["pot-head"]["layouts"]["channels-last"]["a_counts_forward"]["host_syncs"] > 0
    assert set(sec["clip-es"]) >= {"64x64", "80x48"}                     # open_clip from the carried wheels
    table = (out / "gpu.md").read_text()
    assert "## pot-step" in table and "network only" in table and "## deeplab: RuntimeError: POT_BENCH_FAIL" in table
