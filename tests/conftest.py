"""Shared fixtures: real files, real processes. The real competition files live in ../shared."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "competition"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "train.csv").is_file():
        pytest.skip(f"the real competition files are not at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def real_photos(shared) -> list[Path]:
    return sorted((shared / "test_upload_sample").glob("*.jpg"))


def run_kit(*args: str, env: dict | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m kit...` in a real subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd or ROOT)


# The shared smoke run trains on JAX where it is installed (CI installs it): the demo, prediction and export
# tests then read its weights in this TensorFlow process, so every one of them also checks that checkpoints
# do not depend on the backend. The TensorFlow smoke run, as a new user runs it, is test_session's.
SMOKE_BACKEND = "jax" if importlib.util.find_spec("jax") else "tensorflow"


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A work directory built once per test run, whatever the number of pytest-xdist workers.

    The first worker to ask builds it under a file lock in the run's shared temporary folder; every
    worker then gets a copy of its own, so tests that write into it never race another worker.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        root = tmp_path_factory.mktemp(name)
        build(root)
        return root
    built = tmp_path_factory.getbasetemp().parent / f"built-{name}"
    with FileLock(f"{built}.lock"):
        if not (built / ".complete").is_file():
            shutil.rmtree(built, ignore_errors=True)
            built.mkdir()
            build(built)
            (built / ".complete").touch()
    mine = tmp_path_factory.mktemp(name)
    shutil.copytree(built, mine, symlinks=True, dirs_exist_ok=True)
    return mine


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One full `python -m kit --smoke` (all seven stages and prediction); returns its work directory."""
    def build(root: Path) -> None:
        result = run_kit("kit", "--smoke", "--workdir", str(root), "--deterministic",
                         env={"KERAS_BACKEND": SMOKE_BACKEND})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return built_once(tmp_path_factory, "smoke", build) / "smoke"


# Stage runs of the resume tests: the smoke table's stages made long enough to be killed twice, 2 epochs of
# 12 batches of 8 on the smoke profile's synthetic pictures.
STAGE_ARGS = ["--profile", "smoke", "--epochs", "2", "--batch-size", "8", "--deterministic", "--workers", "2"]


def smoke_workdir(root: Path):
    """The smoke profile's work directory under `root`, with 12 synthetic pictures per class."""
    from kit.config import PROFILES, Workdir

    workdir = Workdir.resolve(root, PROFILES["smoke"])
    small_synthetic(workdir.root, per_class=12, test=4, size=(96, 72))
    return workdir


@pytest.fixture(scope="session")
def stage_one(tmp_path_factory) -> Path:
    """A work directory whose stage 1 is done (TensorFlow): the starting point of the resume tests."""
    def build(root: Path) -> None:
        smoke_workdir(root)
        result = run_kit("kit.stage", "--step", "1", "--workdir", str(root), *STAGE_ARGS)
        assert result.returncode == 0, result.stderr[-3000:]

    return built_once(tmp_path_factory, "stage1", build)


# Fixtures that train or run whole commands: a test using one is slow (`python -m pytest -m "not slow"` skips it).
SLOW_FIXTURES = ("smoke_run", "stage_one", "stanford", "exported", "trained")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in item.fixturenames for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)


@contextlib.contextmanager
def demo_process(*args: str, env: dict | None = None):
    """`python -m kit.demo ARGS --port P` as a real process; yields (gradio_client.Client, port) once it answers."""
    import gradio_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "kit.demo", *args, "--port", str(port)], cwd=ROOT,
                               env=env or {**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(120):
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not listening yet
                assert process.poll() is None, process.stdout.read()[-3000:]
                time.sleep(0.5)
        else:
            raise AssertionError("the demo did not answer within a minute")
        yield client, port
    finally:
        process.terminate()
        process.wait(timeout=30)


def small_synthetic(root: Path, per_class: int = 8, test: int = 6, size: tuple[int, int] = (96, 72), **kwargs):
    from kit.config import Workdir
    from kit.synthetic import write_synthetic

    workdir = Workdir(root)
    write_synthetic(workdir, per_class=per_class, test=test, size=size, **kwargs)
    return workdir
