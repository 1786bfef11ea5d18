"""One writer per run folder (`pot.runs.writer_lock`): a second process on a run folder that another process is
writing fails on one line naming the holder's pid (exit status 2 from a console script), and once the holder is
killed (SIGKILL: no clean-up of any kind) the same command runs, resuming where the killed run stopped."""
import os
import signal
import subprocess
import sys
import time

from conftest import POT_TINY, RUNNERS, pot_flags, run_cli
from helpers import make_simulated_run, subprocess_env
from pot.core import BadInputError, load_checkpoint, read_jsonl
from pot.runs import Run

HOLD = "import sys, time; from pot.runs import Run\nwith Run(sys.argv[1]).writing('holder'): print('held', flush=True); time.sleep(300)"


def _refused(argv: list, stage: str, pid: int) -> str:
    "Run the console script of `stage` on `argv`; check it ends on one line naming `pid` with exit status 2; return the line."
    p = subprocess.run([sys.executable, "-c", RUNNERS[stage], *argv], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, (p.returncode, p.stderr[-2000:])
    assert f"is being written by another process (pid {pid} " in p.stderr, p.stderr
    return p.stderr


def test_second_pot_train_fails_and_a_killed_run_resumes(make_toyvoc, tmp_path):
    toy = make_toyvoc(n_train=24, n_val=4, size=96)
    run = Run(tmp_path / "run")
    argv = pot_flags(dict(POT_TINY, epochs=4, dataset="toyvoc", data_root=str(toy), out_dir=str(run.root)))
    first = subprocess.Popen([sys.executable, "-c", RUNNERS["pot"], *argv], env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not run.last_ckpt.exists() and first.poll() is None and time.time() - t0 < 300: time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)                          # still training (24 steps, checkpoint at 4): it holds the folder
        assert first.poll() is None and run.last_ckpt.exists() and not run.final_ckpt.exists()
        err = _refused(argv, "pot", first.pid)
        assert "train run" in err and "kill" in err, err          # names the holder's stage and how to go on
    finally:
        first.send_signal(signal.SIGKILL); first.wait()
    start = load_checkpoint(run.last_ckpt)["step"]
    run_cli("pot", argv)                                           # the killed run's lock is gone: the same command resumes
    assert start > 0 and load_checkpoint(run.final_ckpt)["step"] == 24
    assert [r["step"] for r in read_jsonl(run.log_file)] == list(range(1, 25))


def test_label_writers_refuse_a_held_run(make_toyvoc, tmp_path):
    from pot.crf import make_crf_labels
    from pot.data import load_dataset
    ds = load_dataset("toyvoc", make_toyvoc(n_train=16, n_val=2, size=96, seed=4), "train")
    run = make_simulated_run(tmp_path / "run", ds)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _refused(["--run_dir", str(run), "--stage", "ir", "--preset", "voc"], "irn", holder.pid)
        try: make_crf_labels(run, limit=2, n_workers=1)
        except BadInputError as e: assert f"pid {holder.pid} " in str(e) and "holder" in str(e), e
        else: raise AssertionError("make_crf_labels wrote into a run folder another process holds")
        assert not run.joinpath("pseudo_labels").exists()
    finally:
        holder.send_signal(signal.SIGKILL); holder.wait()
    assert make_crf_labels(run, limit=2, n_workers=1)["n_written"] == 2
    assert os.path.getsize(run / ".writer.lock") == 0                     # a finished writer names no one
