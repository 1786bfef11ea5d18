"""Helpers of the test files: the environment of training subprocesses, killing a run at its first checkpoint, and
checking a notebook's papermill parameters against its config dataclass."""
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

from pot.experiments import notebook_parameters

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    "The environment of a training subprocess: one intra-op thread (runs compared bit for bit then use the same kernels and reduction order) and the repo on PYTHONPATH."
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path)


def kill_at_checkpoint(cmd: list, last: Path, final: Path, timeout: float = 300) -> None:
    "Run `cmd` and SIGKILL it (no clean-up of any kind) as soon as its checkpoint `last` exists; check it died before writing `final`."
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not last.exists() and p.poll() is None and time.time() - t0 < timeout: time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert last.exists() and not final.exists(), "the run was not killed between its first checkpoint and the end"


def check_parameters_match(nb: Path, config_cls) -> dict:
    "Check that the parameters cell of `nb` lists every `config_cls` field, in order, with its default; return the parameters."
    params, defaults = notebook_parameters(nb), config_cls().to_dict()
    fields = [f.name for f in dataclasses.fields(config_cls)]
    assert [k for k in params if k in defaults] == fields, f"parameters must list every {config_cls.__name__} field, in order"
    assert {k: params[k] for k in fields} == defaults
    return params


def cli_error(cli, argv: list, capsys) -> str:
    "Run console script `cli` on `argv`, check it ends on bad input as every console script must (exit 2, one line 'error: ...' on stderr); return that line."
    import pytest
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (e.value.code, err)
    return err
