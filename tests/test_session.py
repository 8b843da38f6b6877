"""A real session's life: the work-directory lock, the notebooks' logic, installing the kit with pip."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, STAGE_ARGS, run_kit, small_synthetic, smoke_workdir
from kit.config import PROFILES, Workdir
from kit.files import LockHeld, WorkdirLock


def holder(lock: Path) -> subprocess.Popen:
    """Another process holding the lock, as a second Colab tab would."""
    code = ("import sys, time; from kit.files import WorkdirLock; lock = WorkdirLock(sys.argv[1], 'training run');"
            "lock.acquire(); print('held', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.slow
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
    """The notebook's own helper cell, run as it is: it imports `kit()` from the installed kit."""
    cell = next(c for c in notebook_code(name) if "kit.notebook" in c)
    namespace: dict = {}
    exec(cell, namespace)  # noqa: S102 - the notebook's cell, to test its behaviour rather than its text
    return namespace


def test_the_notebooks_are_what_their_one_source_makes():
    result = subprocess.run([sys.executable, str(ROOT / "notebooks" / "make.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_notebook_stops_run_all_on_failure_and_on_a_budget_stop(tmp_path, monkeypatch, capsys):
    """Both notebooks' helper cell is make.py's one HELPER (checked above), so one of them is run here."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    kit = helper_namespace("kaggle.ipynb")["kit"]
    kit("kit.stage", "--status", "--workdir", str(tmp_path))  # exit 0: returns
    assert "not started" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exit code 2"):
        kit("kit.stage", "--step", "1", "--devices", "0", "--workdir", str(tmp_path))  # a user error, refused at once
    assert "takes a number of devices" in capsys.readouterr().out  # its message reached the notebook
    small_synthetic(tmp_path / "smoke", per_class=4)
    with pytest.raises(SystemExit, match="Run the notebook again"):
        kit("kit.stage", "--all", "--profile", "smoke", "--workdir", str(tmp_path), "--time-budget", "0.001")


KERNEL = """
import sys
from kit.notebook import kit
try:
    kit('kit.stage', '--step', '1', '--workdir', sys.argv[1], *sys.argv[2:])
except SystemExit as stop:
    print('KERNEL:', stop)
"""


@pytest.mark.slow
def test_the_stop_button_stops_the_command_with_a_checkpoint_and_leaves_nothing_running(tmp_path):
    """Colab's stop button interrupts the kernel (SIGINT to it, not to the child): the helper passes it on."""
    smoke_workdir(tmp_path)
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, str(tmp_path), *STAGE_ARGS, "--epochs", "100"],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    output = []
    for line in kernel.stdout:  # until the stage is training (its first lines are printed)
        output.append(line)
        if line.startswith("Stage 1:"):
            break
    time.sleep(2)
    kernel.send_signal(signal.SIGINT)
    output += kernel.stdout.readlines()
    assert kernel.wait(timeout=120) == 0
    text = "".join(output)
    assert "KERNEL: Interrupted: python -m kit.stage" in text and "with a checkpoint" in text, text[-2000:]
    workdir = Workdir.resolve(tmp_path, PROFILES["smoke"])
    assert list(workdir.stage_dir(1).glob("checkpoint-*.npz")), "the interrupted stage saved where it was"
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path) in _cmdline(p)], "no command left running"
    assert not workdir.lock.exists(), "the lock is released: the next cell is not refused"


def _cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


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

@pytest.mark.slow
def test_pip_install_then_the_commands_run_from_another_folder(tmp_path):
    """`pip install .` (as `pip install git+URL` does), then the commands work outside the clone.

    The installed package is what is tested here; training itself is tested by the smoke runs.
    """
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # the heavy dependencies are already here
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True,
                             text=True, env=clean, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import kit.notebook; print(kit.__file__)"],  # the commands load TF
                           capture_output=True, text=True, env=clean, cwd=elsewhere)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr
    for command in (["kit.download", "--synthetic"], ["kit.stage", "--status"]):
        result = subprocess.run([str(python), "-m", *command, "--profile", "smoke", "--workdir", "run"],
                                capture_output=True, text=True, env=clean, cwd=elsewhere, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (elsewhere / "run" / "smoke" / "data" / "dataset.json").is_file()
    assert "not started" in result.stdout and "smoke profile in" in result.stdout
