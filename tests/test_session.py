"""A real session's life: the work-directory lock, the notebooks' logic, installing the kit with pip."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, run_kit, small_synthetic
from kit.files import LockHeld, WorkdirLock


def holder(lock: Path) -> subprocess.Popen:
    """Another process holding the lock, as a second Colab tab would."""
    code = ("import sys, time; from kit.files import WorkdirLock; lock = WorkdirLock(sys.argv[1], 'training run');"
            "lock.acquire(); print('held', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_is_refused_by_the_lock(tmp_path):
    workdir = small_synthetic(tmp_path / "smoke", per_class=4)
    process = holder(workdir.lock)
    try:
        result = run_kit("kit.stage", "--step", "1", "--profile", "smoke", "--workdir", str(tmp_path))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        message = " ".join(result.stderr.split())
        assert f"process {process.pid} on {socket.gethostname()}" in message and "started" in message
        assert not (workdir.weights / "state.json").exists(), "the refused process wrote nothing"
    finally:
        process.kill()
        process.wait()


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    lock = tmp_path / ".kit.lock"
    # A Colab runtime that vanished: another host, heartbeat ten minutes old.
    lock.write_text(json.dumps({"host": "colab-vm-1", "pid": 4242, "token": "x", "started": time.time() - 3600,
                                "heartbeat": time.time() - 600, "command": "training run"}))
    with WorkdirLock(lock, "training run"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert "took over the lock" in out and "its last heartbeat was 10 minutes ago" in out
    assert not lock.exists()
    # A process of this very host that is gone: no need to wait for its heartbeat to age.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "y",
                                "started": time.time(), "heartbeat": time.time(), "command": "training run"}))
    with WorkdirLock(lock, "training run"):
        pass
    assert "its process no longer exists" in capsys.readouterr().out


def test_a_live_lock_of_another_host_is_respected(tmp_path):
    lock = tmp_path / ".kit.lock"
    lock.write_text(json.dumps({"host": "colab-vm-2", "pid": 1, "token": "z", "started": time.time(),
                                "heartbeat": time.time() - 5, "command": "training run"}))
    with pytest.raises(LockHeld, match="process 1 on colab-vm-2"):
        WorkdirLock(lock, "training run").acquire()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = tmp_path / ".kit.lock"
    with WorkdirLock(lock, "training run", heartbeat_s=0.05):
        first = json.loads(lock.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lock.read_text())["heartbeat"] > first


# ---- the notebooks ----------------------------------------------------------------------------------

def notebook_code(name: str) -> list[str]:
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def helper_namespace(name: str) -> dict:
    """The notebook's own `kit()` helper cell, run as it is."""
    cell = next(c for c in notebook_code(name) if "def kit(" in c)
    namespace: dict = {}
    exec(cell, namespace)  # noqa: S102 - the notebook's cell, to test its behaviour rather than its text
    return namespace


@pytest.mark.parametrize("name", ["colab.ipynb", "kaggle.ipynb"])
def test_notebook_stops_run_all_on_failure_and_on_a_budget_stop(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    kit = helper_namespace(name)["kit"]
    kit("kit.stage", "--status", "--workdir", str(tmp_path))  # exit 0: returns
    assert "not started" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exit code 2"):
        kit("kit.predict", "--workdir", str(tmp_path))  # no weights: a user error
    assert "No trained weights" in capsys.readouterr().out  # its message reached the notebook
    small_synthetic(tmp_path / "smoke", per_class=4)
    with pytest.raises(SystemExit, match="Run the notebook again"):
        kit("kit.stage", "--all", "--profile", "smoke", "--workdir", str(tmp_path), "--time-budget", "0.001")


@pytest.mark.parametrize("name", ["colab.ipynb", "kaggle.ipynb"])
def test_notebook_predicts_and_submits_only_through_the_guarded_helper(name):
    cells = notebook_code(name)
    text = "\n".join(cells)
    assert "!python -m kit" not in text, "a shell escape would not stop 'Run all' on failure"
    training = next(k for k, c in enumerate(cells) if "'--all'" in c)
    for k, cell in enumerate(cells):
        if "kit.predict" in cell or "kit.submit" in cell:
            assert k > training and "kit('kit." in cell
    assert "KIT_SESSION_START" in text and "constraints" in text


def test_placeholder_repository_stops_the_notebook_first():
    for name in ("colab.ipynb", "kaggle.ipynb"):
        first = notebook_code(name)[0]
        assert "KIT_REPO" in first
        namespace: dict = {}
        with pytest.raises(SystemExit, match="KIT_REPO"):
            exec(first.replace("os.environ.get('KIT_REPO'", "({}).get('KIT_REPO'"), namespace)  # noqa: S102


# ---- installing -----------------------------------------------------------------------------------

def test_pip_install_then_the_smoke_run_from_another_folder(tmp_path):
    """`pip install .` (as `pip install git+URL` does), then `python -m kit` works outside the clone."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # the heavy dependencies are already here
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True,
                             text=True, env=clean, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import kit; print(kit.__file__)"], capture_output=True, text=True,
                           env=clean, cwd=elsewhere)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr
    smoke = subprocess.run([str(python), "-m", "kit", "--smoke", "--workdir", "run"], capture_output=True,
                           text=True, env=clean, cwd=elsewhere, timeout=600)
    assert smoke.returncode == 0, smoke.stdout[-2000:] + smoke.stderr[-2000:]
    assert (elsewhere / "run" / "smoke" / "submissions" / "submission.csv").is_file()
    assert re.search(r"Next: python -m kit.report --profile smoke --workdir run", smoke.stdout)
