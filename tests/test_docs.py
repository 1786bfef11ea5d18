"""`make docs` (`tests/build_docs.py`) builds the documentation site from the notebooks; check the result."""
import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sha(p: Path) -> str: return hashlib.sha256(p.read_bytes()).hexdigest()


def test_make_docs():
    "`tests/build_docs.py` (what `make docs` runs) builds the site and leaves README.md and pot/ alone."
    kept = [ROOT / "README.md", *sorted((ROOT / "pot").glob("*.py"))]
    before = {p: _sha(p) for p in kept}
    r = subprocess.run([sys.executable, "tests/build_docs.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"tests/build_docs.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert {p: _sha(p) for p in kept} == before, "the docs build changed README.md or pot/"
    docs = ROOT / "_docs"
    index = (docs / "index.html").read_text(encoding="utf-8")
    assert "pot-wsss" in index and "Prototypical Optimal Transport" in index
    for name in ("transport", "reproduce", "train", "experiment-train"):
        assert re.search(rf'href="(\./)?{name}\.html"', index), f"index.html does not link to {name}.html"
    page = (docs / "transport.html").read_text(encoding="utf-8")  # nbs/06_transport.ipynb
    assert "similarity-aware" in page and "sinkhorn" in page and "allocate" in page
    assert 'id="train"' in (docs / "train.html").read_text(encoding="utf-8")  # nbs/10_train.ipynb, module pot.train
    assert 'id="fit"' in (docs / "runs.html").read_text(encoding="utf-8")    # nbs/04a_runs.ipynb, the run layer
    assert "Train POT and score its CAMs" in (docs / "experiment-train.html").read_text(encoding="utf-8")  # nbs/train.ipynb
    repro = (docs / "reproduce.html").read_text(encoding="utf-8")
    assert "Reproducing the paper" in repro and "76.1" in repro and "POT against its baseline" in repro
