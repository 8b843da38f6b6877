"""kit.stage: exact resume after SIGKILL, chaining, refusals, status, atomic checkpoints, the smoke run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_kit, small_synthetic
from kit import checkpoint
from kit.cli import KitError
from kit.config import PROFILES, Workdir, override_stage, stage_of
from kit.stages import Options, run_config, run_stage, stage_status, status_table

SMOKE = PROFILES["smoke"]
# Stage 2 of the smoke table, made long enough to be killed twice: 2 epochs of 12 batches of 8.
STAGE_ARGS = ["--profile", "smoke", "--epochs", "2", "--batch-size", "8", "--deterministic", "--workers", "2"]


def smoke_workdir(root: Path) -> Workdir:
    workdir = Workdir.resolve(root, SMOKE)
    small_synthetic(workdir.root, per_class=12, test=4, size=(96, 72))
    return workdir


def stage_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kit.stage", "--workdir", str(root), *STAGE_ARGS, *extra]


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def best_arrays(workdir: Workdir, step: int) -> dict[str, np.ndarray]:
    arrays, _ = checkpoint.read(workdir.stage_dir(step) / "best.weights.npz")
    return arrays


def val_accuracies(workdir: Workdir, step: int) -> list[str]:
    lines = (workdir.stage_dir(step) / "log.csv").read_text().splitlines()
    column = lines[0].split(",").index("val_accuracy")
    return [line.split(",")[column] for line in lines[1:]]


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory) -> Path:
    """A work directory whose stage 1 is done: the starting point of the resume test."""
    root = tmp_path_factory.mktemp("stage1")
    smoke_workdir(root)
    result = run_kit("kit.stage", "--step", "1", "--workdir", str(root), *STAGE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_resume_after_sigkill_is_exact(stage_one, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    shutil.copytree(stage_one, reference)
    shutil.copytree(stage_one, interrupted)

    done = subprocess.run(stage_command(reference, "--step", "2"), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    folder = Workdir.resolve(interrupted, SMOKE).stage_dir(2)
    # Kill 1, mid-epoch: checkpoints every 4 batches; killed as soon as the one after batch 4 exists.
    first = subprocess.Popen(stage_command(interrupted, "--step", "2", "--save-every", "4"), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (folder / checkpoint.checkpoint_name(0, 4)).exists(), first)
    kill(first)
    assert stage_status(Workdir.resolve(interrupted, SMOKE), 2) == "interrupted"

    # Kill 2, during a checkpoint write: each write is stretched to 5 s; killed while the temp file is there.
    second = subprocess.Popen(stage_command(interrupted, "--step", "2", "--save-every", "4", "--resume"),
                              env={**env, "KIT_FAULT_SLOW_WRITE": "5"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: any(folder.glob(".checkpoint-e001*.tmp")), second)
    kill(second)
    assert list(folder.glob(".checkpoint-*.tmp")), "the kill was meant to land inside a write"

    finish = subprocess.run(stage_command(interrupted, "--step", "2", "--resume"), capture_output=True,
                            text=True, env=env)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "Stage 2: resuming from checkpoint-" in finish.stdout

    a, b = Workdir.resolve(reference, SMOKE), Workdir.resolve(interrupted, SMOKE)
    ref, got = best_arrays(a, 2), best_arrays(b, 2)
    assert ref.keys() == got.keys()
    assert max(float(np.abs(ref[k].astype(np.float64) - got[k]).max()) for k in ref) <= 1e-6
    assert val_accuracies(a, 2) == val_accuracies(b, 2)
    assert not list(folder.glob(".*.tmp")) and not checkpoint.list_checkpoints(folder)


def test_stage_needs_the_previous_one(tmp_path):
    workdir = smoke_workdir(tmp_path)
    config = run_config(workdir, SMOKE, None, None, 42, 0.2)
    with pytest.raises(KitError, match="stage 2 is not started.*--step 2"):
        run_stage(workdir, stage_of(SMOKE, 3), config, Options())


def test_interrupted_stage_is_never_overwritten(tmp_path):
    workdir = smoke_workdir(tmp_path)
    config = run_config(workdir, SMOKE, None, None, 42, 0.2)
    stage = override_stage(stage_of(SMOKE, 1), batch_size=8)
    # A budget too short for one batch: stops at once, with a checkpoint.
    assert run_stage(workdir, stage, config, Options(time_budget_s=0.5)) == "stopped"
    assert stage_status(workdir, 1) == "interrupted"
    assert "interrupted at epoch 1 step 0" in status_table(workdir, SMOKE.stages)
    with pytest.raises(KitError, match=r"interrupted at epoch 1, step 0.*--resume.*--restart"):
        run_stage(workdir, stage, config, Options())
    with pytest.raises(KitError, match="other settings \\(batch_size\\)"):
        run_stage(workdir, stage_of(SMOKE, 1), config, Options(resume=True))
    assert run_stage(workdir, stage, config, Options(resume=True)) == "done"
    table = status_table(workdir, SMOKE.stages)
    assert table.splitlines()[1].split()[4] == "done" and "not started" in table.splitlines()[2]
    best = (workdir.stage_dir(1) / "best.weights.npz").read_bytes()
    with pytest.raises(KitError, match="already done.*--restart"):
        run_stage(workdir, stage, config, Options())
    assert (workdir.stage_dir(1) / "best.weights.npz").read_bytes() == best
    assert run_stage(workdir, stage, config, Options(restart=True)) == "done"


def test_best_weights_never_get_worse(tmp_path):
    workdir = smoke_workdir(tmp_path)
    config = run_config(workdir, SMOKE, None, None, 42, 0.2)
    run_stage(workdir, override_stage(stage_of(SMOKE, 1), epochs=4, batch_size=8), config, Options())
    _, state = checkpoint.read(workdir.stage_dir(1) / "best.weights.npz")
    history = (workdir.stage_dir(1) / "log.csv").read_text().splitlines()
    accuracies = [float(line.split(",")[4]) for line in history[1:]]
    assert state["val_accuracy"] == pytest.approx(max(accuracies))
    assert state["epoch"] == accuracies.index(max(accuracies)) + 1
    manifest = json.loads(workdir.manifest.read_text())
    assert manifest["stages"]["1"]["status"] == "done"
    assert (workdir.stage_dir(1) / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_truncated_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    import keras

    from kit.backbones import build_model

    model = build_model("tiny-cnn", 32, "none")
    for step in (1, 2):
        checkpoint.save(tmp_path / checkpoint.checkpoint_name(0, step), model, {"step": step})
    newest = tmp_path / checkpoint.checkpoint_name(0, 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    path, arrays, state = checkpoint.newest_readable(tmp_path)
    assert path.name == checkpoint.checkpoint_name(0, 1) and state == {"step": 1}
    assert "damaged checkpoint" in capsys.readouterr().out
    checkpoint.assign(model.variables, arrays, "model", path)
    keras.backend.clear_session()


def test_status_command(stage_one):
    result = run_kit("kit.stage", "--status", "--profile", "smoke", "--workdir", str(stage_one))
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "smoke profile" in lines[0] and lines[2].split()[4] == "done" and "not started" in lines[3]


def test_refusal_is_one_paragraph_without_traceback(stage_one):
    result = run_kit("kit.stage", "--step", "4", "--profile", "smoke", "--workdir", str(stage_one))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Run 'python -m kit.stage --step 3" in " ".join(result.stderr.split())


def test_smoke_run_learns(smoke_run):
    manifest = json.loads((smoke_run / "weights" / "state.json").read_text())
    assert [manifest["stages"][str(s)]["status"] for s in range(1, 8)] == ["done"] * 7
    assert manifest["stages"]["7"]["best_val_accuracy"] >= 0.90
