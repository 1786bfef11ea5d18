"""Installation: torch/torchvision are a range in the package metadata (the tested pair is pinned only in
constraints-ci.txt), DenseCRF and the notebook/test tools are extras, scipy is declared; without pydensecrf the
package imports and trains, and the stages that need a CRF say on one line how to install it."""
import configparser
import runpy
import subprocess
import sys

import setuptools
from packaging.requirements import Requirement

from conftest import deeplab_config, deeplab_flags
from helpers import ROOT, make_simulated_run, subprocess_env

NO_CRF = "import sys; sys.modules['pydensecrf'] = None\n"        # `import pydensecrf` now raises ImportError


def _settings() -> dict:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return {k: {Requirement(r).name.lower(): Requirement(r) for r in v.split()} for k, v in cfg["DEFAULT"].items() if k.endswith("requirements")}


def test_requirements_are_ranges_and_extras(monkeypatch):
    s = _settings()
    req = s["requirements"]
    pins = {Requirement(l).name: Requirement(l) for l in (ROOT / "constraints-ci.txt").read_text().splitlines() if l and not l.startswith("#")}
    for pkg in ("torch", "torchvision"):
        spec = req[pkg].specifier
        assert not any(x.operator == "==" for x in spec) and len(spec) == 2, f"{pkg}: {spec} is not a range"
        pinned = next(iter(pins[pkg].specifier)).version
        assert spec.contains(pinned), f"constraints-ci.txt pins {pkg} {pinned} outside the package's range {spec}"
    assert "scipy" in req and "pycocotools" in req
    for tool in ("pydensecrf2", "jupyterlab", "scikit-image", "scikit-learn", "pot", "papermill", "ipykernel"):
        assert tool not in req, f"{tool} is a runtime requirement; it belongs in an extra"
    assert set(s["crf_requirements"]) == {"pydensecrf2"} and {"papermill", "jupyterlab"} <= set(s["notebooks_requirements"])
    make = (ROOT / "Makefile").read_text()
    assert '-c constraints-ci.txt -e ".[dev]"' in make                   # make venv: the tested pair, every extra
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    runpy.run_path(str(ROOT / "setup.py"))                               # what setup.py hands setuptools
    extras = seen["extras_require"]
    assert set(extras) == {"crf", "photos", "notebooks", "dev"} and [r for r in seen["install_requires"] if "torch" in r][:2] == \
        ["torch>=2.4,<2.15", "torchvision>=0.19,<0.30"]
    assert {"pydensecrf2", "papermill", "jupyterlab", "scikit-image", "scikit-learn", "POT>=0.9.5"} <= set(extras["dev"]), extras["dev"]


def test_imports_and_cli_without_pydensecrf(irn_toy, deeplab_toy, tmp_path):
    p = subprocess.run([sys.executable, "-c", NO_CRF + "import pot.train, pot.cams, pot.activation, pot.crf, pot.irn, pot.deeplab"],
                       env=subprocess_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    run = make_simulated_run(tmp_path / "run", irn_toy)
    cfg = deeplab_config(deeplab_toy, tmp_path / "seg")
    for cli, argv in (("pot.irn import irn_cli as cli", ["--run_dir", str(run), "--stage", "ir", "--preset", "voc"]),
                      ("pot.deeplab import deeplab_cli as cli", deeplab_flags(cfg))):
        p = subprocess.run([sys.executable, "-c", NO_CRF + f"from {cli}; cli(sys.argv[1:])", *argv], env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, (cli, p.stderr[-2000:])
        assert 'pip install "pot-wsss[crf]"' in p.stderr, p.stderr
    assert not (tmp_path / "seg" / "ckpt").exists() and not (run / "pseudo_labels").exists()   # refused before any work
