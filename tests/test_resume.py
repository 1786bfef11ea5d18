"""The training loop every trained stage shares (`pot.runs.fit`), tested once per stage: a run killed by SIGKILL right
after a checkpoint and started again with the same command ends bit-identical to the uninterrupted reference, its log
holds every step once with the same losses, the finished run is returned untouched by a rerun, and a rerun with other
training parameters is refused on one line."""
import sys
import subprocess

import pytest
import torch

from conftest import RUNNERS, IRN_TINY, copy_run, deeplab_config, deeplab_flags, irn_flags, pot_flags, run_cli
from helpers import kill_at_checkpoint, subprocess_env
from pot.core import load_checkpoint, read_jsonl
from pot.runs import Run


def pot_case(request, tmp_path):
    ref = request.getfixturevalue("pot_reference")
    return dict(argv=pot_flags(dict(ref, out_dir=str(tmp_path / "killed"))), run=Run(tmp_path / "killed"), reference=Run(ref["out_dir"]),
                steps=12, checkpoints=(4, 8), other=["--lr", "0.02"])


def irn_case(request, tmp_path):
    ref = request.getfixturevalue("irn_reference")
    run = copy_run(request.getfixturevalue("irn_sim"), tmp_path / "run")
    return dict(argv=irn_flags(run, IRN_TINY), run=Run(run).sub("irn"), reference=Run(ref).sub("irn"), steps=8, checkpoints=(3, 6),
                other=["--lr", "0.05"])


def deeplab_case(request, tmp_path):
    ref = request.getfixturevalue("deeplab_reference")
    cfg = deeplab_config(request.getfixturevalue("deeplab_toy"), tmp_path / "killed")
    return dict(argv=[*deeplab_flags(cfg), "--train-only"], run=Run(tmp_path / "killed"), reference=Run(ref), steps=6,
                checkpoints=(2, 4), other=["--lr", "0.002"])


@pytest.mark.parametrize("stage, case", [("pot", pot_case), ("irn", irn_case), ("deeplab", deeplab_case)], ids=["pot", "irn", "deeplab"])
def test_kill_and_resume_is_bit_identical(stage, case, request, tmp_path):
    c = case(request, tmp_path)
    run, ref = c["run"], c["reference"]
    kill_at_checkpoint([sys.executable, "-c", RUNNERS[stage], *c["argv"]], run.last_ckpt, run.final_ckpt)
    assert load_checkpoint(run.last_ckpt)["step"] in c["checkpoints"]
    run_cli(stage, c["argv"])                                             # the same command again: resumes from last.pt
    a, b = (load_checkpoint(r.final_ckpt)["model"] for r in (ref, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    la, lb = read_jsonl(ref.log_file), read_jsonl(run.log_file)
    assert [r["step"] for r in lb] == list(range(1, c["steps"] + 1)) and [r["loss"] for r in la] == [r["loss"] for r in lb]
    mtime = run.final_ckpt.stat().st_mtime_ns
    run_cli(stage, c["argv"])                                             # finished: returned as it is
    assert run.final_ckpt.stat().st_mtime_ns == mtime and not run.last_ckpt.exists()
    p = subprocess.run([sys.executable, "-c", RUNNERS[stage], *c["argv"], *c["other"]], env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "other parameters (lr:" in p.stderr, p.stderr[-2000:]
    hint = p.stderr.rsplit(";", 1)[-1]                                   # how to go on: with flags every stage's CLI has
    assert "--no-resume" in hint and "out_dir" not in hint, hint
