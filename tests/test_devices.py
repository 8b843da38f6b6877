"""kit.devices and --devices: data parallel on logical CPU devices, TensorFlow and JAX, and the JAX backend's kit."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_kit
from kit import checkpoint
from kit.config import PROFILES, Workdir
from kit.manifest import Manifest

JAX = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed (pip install jax)")
BACKENDS = ["tensorflow", pytest.param("jax", marks=JAX)]


def on(backend: str) -> dict:
    return {"KERAS_BACKEND": backend}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_devices_train_the_same_weights_as_one(tmp_path, backend):
    """The same global batches on 1 and 2 devices: the same weights and predictions, to float tolerance."""
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"{devices}.npz"
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_steps.py"), str(devices), str(out)],
                              capture_output=True, text=True, env={**os.environ, **on(backend)}, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[devices] = np.load(out)
    one, two = results[1], results[2]
    assert sorted(one.files) == sorted(two.files) and len(one.files) > 20
    assert one["probs"].shape == (7, 5)
    assert max(float(np.abs(one[k] - two[k]).max()) for k in one.files) <= 1e-5


@JAX
def test_a_stage_on_two_devices_resumes_exactly_and_moves_to_one(stage_one, tmp_path):
    """On JAX, SIGKILL mid-epoch on 2 devices: resumed on 2, the same weights as uninterrupted; on 1, a note.

    (TensorFlow's data parallel shares this loop; its split and reduction are checked by the test above,
    and its single-device exact resume by test_stages.)
    """
    from test_stages import best_arrays, kill, log_rows, stage_command, start, wait_for

    args = ["--profile", "smoke", "--epochs", "1", "--batch-size", "8", "--deterministic", "--devices", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **on("jax")}
    reference, interrupted, moved = tmp_path / "reference", tmp_path / "interrupted", tmp_path / "moved"
    shutil.copytree(stage_one, reference)  # stage 1 done on TensorFlow, one device
    shutil.copytree(stage_one, interrupted)

    done = subprocess.run(stage_command(reference, "--step", "2", args=args), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 devices (data parallel), Keras on jax" in done.stdout
    folder = Workdir.resolve(interrupted, PROFILES["smoke"]).stage_dir(2)
    process = start(stage_command(interrupted, "--step", "2", "--save-every", "4", args=args), env=env)
    wait_for(lambda: (folder / checkpoint.checkpoint_name(0, 4)).exists(), process)
    kill(process)
    shutil.copytree(interrupted, moved)  # the same interrupted run, to resume on one device

    resumed = subprocess.run(stage_command(interrupted, "--step", "2", "--resume", args=args), capture_output=True,
                             text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (Workdir.resolve(root, PROFILES["smoke"]) for root in (reference, interrupted))
    ref, got = best_arrays(a, 2), best_arrays(b, 2)
    assert max(float(np.abs(ref[k].astype(np.float64) - got[k]).max()) for k in ref) <= 1e-6
    assert log_rows(a, 2) == log_rows(b, 2)

    one_device = [*args[:-1], "1"]
    moved_on = subprocess.run(stage_command(moved, "--step", "2", "--resume", args=one_device), capture_output=True,
                              text=True, env=env)
    assert moved_on.returncode == 0, moved_on.stderr[-3000:]
    assert ("x 2 (data parallel), Keras on jax and continues under float32 on CPU, Keras on jax"
            in " ".join(moved_on.stdout.split()))
    assert Manifest.read(Workdir.resolve(moved, PROFILES["smoke"])).status(2) == "done"


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_devices_value_is_refused_in_one_paragraph(tmp_path, value, capsys):
    from kit.stage import main as stage_main  # refused while parsing, before any backend starts: in this process

    assert stage_main(["--step", "1", "--workdir", str(tmp_path), "--profile", "smoke", "--devices", value]) == 2
    error = capsys.readouterr().err
    assert "takes a number of devices" in error and "Traceback" not in error


@pytest.mark.slow
def test_a_batch_the_devices_cannot_share_evenly_is_refused(tmp_path):
    from conftest import smoke_workdir

    smoke_workdir(tmp_path)
    result = run_kit("kit.stage", "--step", "1", "--workdir", str(tmp_path), "--profile", "smoke", "--batch-size", "7",
                     "--devices", "2")
    assert result.returncode == 2 and "does not split evenly over 2 devices" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("capability, expected", [(None, "float32"), (6.0, "float32"), (7.0, "mixed_float16"),
                                                  (7.5, "mixed_float16"), (8.0, "mixed_bfloat16"),
                                                  (9.0, "mixed_bfloat16")])
def test_auto_precision_follows_the_gpu_generation(capability, expected):
    """A CPU and a P100 (6.0) train in float32, a T4 (7.5) in float16, an A100 or H100 in bfloat16."""
    from kit.devices import precision_for

    assert precision_for(capability) == expected
