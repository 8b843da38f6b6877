"""Shared fixtures: real files, real processes. The real competition files live in ../shared."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

from fork_server import Forked

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
    """`python -m kit...` as a real process, as a user runs it (forked from a process that imported once)."""
    return run_command([sys.executable, "-m", *args], env=env, timeout=timeout, cwd=cwd)


def kit_process(command: list[str], env: dict | None = None, cwd: Path | None = None, stdout=None, stderr=None):
    """A real process for `command`, started as subprocess.Popen starts one; `python -m kit...` commands and the tests'
    own scripts are forks of a process that imported TensorFlow and the kit once (tests/fork_server.py), unless
    KIT_TEST_FORK=0."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    kit_module = command[:2] == [sys.executable, "-m"] and command[2].split(".")[0] == "kit"
    test_script = command[0] == sys.executable and len(command) > 1 and command[1].startswith(str(ROOT / "tests"))
    if (kit_module or test_script) and os.environ.get("KIT_TEST_FORK", "1") != "0":
        return Forked(fork_server(full_env.get("KERAS_BACKEND", "tensorflow")), command[2] if kit_module else None,
                      command[3:] if kit_module else command[2:], full_env, cwd or ROOT, stdout=stdout, stderr=stderr,
                      script=None if kit_module else command[1])
    return subprocess.Popen(command, env=full_env, cwd=cwd or ROOT, stdout=stdout, stderr=stderr, text=True)


def run_command(command: list[str], env: dict | None = None, timeout: float = 600,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True) through kit_process."""
    process = kit_process(command, env, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


# One fork server per Keras backend for the whole run, shared by the pytest-xdist workers (each costs about 12 s
# of CPU to start): the process pytest started names a folder before it starts the workers, which inherit its
# environment; the first worker to need a backend starts that server there, and the first process kills them all.
FORK_DIR = "KIT_TEST_FORK_DIR"
_OWNS_SERVERS = pytest.StashKey[bool]()
_SERVERS: dict[str, str] = {}


def pytest_configure(config):
    if FORK_DIR not in os.environ:
        os.environ[FORK_DIR] = tempfile.mkdtemp(prefix="kitfork")
        config.stash[_OWNS_SERVERS] = True
        # One JAX compilation cache for the run's processes (the kit takes a JAX_COMPILATION_CACHE_DIR of the
        # user's over the run's own weights/compiled): each JAX process otherwise compiles the same initializers
        # and steps again, 5-10 s on these cores. The smoke run keeps its own, as a user's run does.
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ[FORK_DIR], "jax-compiled"))


def fork_server(backend: str) -> str:
    """The socket of the run's fork server for a Keras backend, started (about 12 s) when first needed."""
    if backend not in _SERVERS:
        folder = Path(os.environ[FORK_DIR])
        path, pid_file = folder / backend, folder / f"{backend}.pid"
        with FileLock(str(folder / f"{backend}.lock")):
            if not pid_file.is_file():
                env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": backend}
                server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fork_server.py"), str(path)],
                                          env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
                if server.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"the {backend} fork server did not start (exit {server.wait()})")
                pid_file.write_text(str(server.pid))
        _SERVERS[backend] = str(path)
    return _SERVERS[backend]


def pytest_sessionfinish(session, exitstatus):
    if session.config.stash.get(_OWNS_SERVERS, False):  # the workers are done: no test needs a server now
        folder = Path(os.environ[FORK_DIR])
        for pid_file in folder.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(folder, ignore_errors=True)


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
                         env={"KERAS_BACKEND": SMOKE_BACKEND, "JAX_COMPILATION_CACHE_DIR": ""})
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


# Modules whose tests share a run too costly to build twice: all of a module's tests go to one pytest-xdist worker,
# collected first so it starts at once while the other worker takes everything else.
ONE_WORKER = ("tests/test_real_cars.py",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in item.fixturenames for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in ONE_WORKER)  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's load scheduling, but ONE_WORKER modules as single units. (xdist_group would say the same;
    pytest 9.2 stops xdist honouring it: pytest-xdist issue #1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class Grouped(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if module in ONE_WORKER else nodeid

    return Grouped(config, log)


@contextlib.contextmanager
def demo_process(*args: str, env: dict | None = None):
    """`python -m kit.demo ARGS --port P` as a real process; yields (gradio_client.Client, port) once it answers."""
    import gradio_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = kit_process([sys.executable, "-m", "kit.demo", *args, "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def first_known(loaded, paths: list[Path]) -> Path:
    """The first photo the model counts as one of the cars it was taught (kit.novelty on its plain view)."""
    from kit.pipeline import Uncached  # late: conftest imports nothing of the kit before pytest_configure has run
    from kit.predict import photo_features

    features, plain = photo_features(loaded, Uncached(list(map(str, paths)), loaded.image_size), list(map(str, paths)))
    return paths[list(loaded.known.is_known(features, plain)).index(True)]
