"""Fail when `pot/` is out of step with `nbs/` or a notebook is not clean.

Runs `nbdev_export` and `nbdev_clean` and reports every file they changed; the files are left
as the tools wrote them, so committing them fixes the failure.
"""
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snapshot():
    files = list((ROOT / "pot").rglob("*.py")) + list((ROOT / "nbs").glob("*.ipynb"))
    return {p.relative_to(ROOT): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


before = snapshot()
for tool in ("nbdev_export", "nbdev_clean"):
    subprocess.run([str(BIN / tool)], cwd=ROOT, check=True)
after = snapshot()
changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
if changed:
    print("Out of sync (nbdev_export / nbdev_clean changed these files; commit them):")
    print("\n".join(f"  {p}" for p in changed))
    sys.exit(1)
print(f"in sync: {len(after)} files under pot/ and nbs/")
