"""kit.devices and --devices: data parallel on logical CPU devices, TensorFlow and JAX, and the JAX backend's kit."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import ROOT, run_command, run_kit
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
    """The same global batches on 1 and 2 devices through the kit's step: the same weights and predictions, to
    float tolerance; on one device bit for bit what train_on_batch trains, with its per-step figures; and no
    program compiled again after the first step and the first prediction, the short last batch's included."""
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"{devices}.npz"
        done = run_command([sys.executable, str(ROOT / "tests" / "parallel_steps.py"), str(devices), str(out)],
                           env=on(backend), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[devices] = np.load(out)
    one, two = results[1], results[2]
    weights = [k for k in one.files if "/" in k and not k.startswith("train_on_batch/")]
    assert len(weights) > 20
    assert one["probs"].shape == (7, 5) and not np.isnan(one["probs"]).any()
    assert max(float(np.abs(one[k] - two[k]).max()) for k in weights) <= 1e-5
    assert all(np.array_equal(one[k], one["train_on_batch/" + k]) for k in weights)
    for result in (one, two):
        figures = result["figures"]
        assert figures.shape == (3, 3) and (figures[:, 2] == 8).all() and (figures[:, 0] > 0).all()
        if backend == "jax":
            assert int(result["step_compiles"]) == 0  # the step compiled once, at the first batch
            assert int(result["predict_compiles"]) == 1  # one program for the full and the short batch
        else:
            assert int(result["predict_traces"]) == 1


@JAX
def test_a_stage_on_every_device_of_eight_resumes_exactly_and_moves_to_one(stage_one, tmp_path):
    """On JAX, `--devices all` over 8 devices (a TPU v3-8's cores, simulated on the CPU as XLA's host platform
    splits it), every training option on (the EMA's swap for validation once deleted its averages under JAX),
    SIGKILL mid-epoch: resumed on all 8, the same weights as uninterrupted; on 1, a note.

    (TensorFlow's data parallel shares this loop; its split and reduction are checked by the test above,
    and its single-device exact resume by test_stages.)
    """
    from test_stages import EVERY_OPTION, best_arrays, kill, log_rows, stage_command, start, wait_for

    args = ["--profile", "smoke", "--epochs", "1", "--batch-size", "8", "--deterministic", *EVERY_OPTION,
            "--devices", "all"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **on("jax"), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    reference, interrupted, moved = tmp_path / "reference", tmp_path / "interrupted", tmp_path / "moved"
    shutil.copytree(stage_one, reference)  # stage 1 done on TensorFlow, one device
    shutil.copytree(stage_one, interrupted)

    done = run_command(stage_command(reference, "--step", "2", args=args), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 devices (data parallel), Keras on jax" in done.stdout
    folder = Workdir.resolve(interrupted, PROFILES["smoke"]).stage_dir(2)
    process = start(stage_command(interrupted, "--step", "2", "--save-every", "4", args=args), env=env)
    wait_for(lambda: (folder / checkpoint.checkpoint_name(0, 4)).exists(), process)
    kill(process)
    shutil.copytree(interrupted, moved)  # the same interrupted run, to resume on one device

    resumed = run_command(stage_command(interrupted, "--step", "2", "--resume", args=args), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (Workdir.resolve(root, PROFILES["smoke"]) for root in (reference, interrupted))
    ref, got = best_arrays(a, 2), best_arrays(b, 2)
    assert max(float(np.abs(ref[k].astype(np.float64) - got[k]).max()) for k in ref) <= 1e-6
    assert log_rows(a, 2) == log_rows(b, 2)

    one_device = [*args[:-1], "1"]
    moved_on = run_command(stage_command(moved, "--step", "2", "--resume", args=one_device), env=env)
    assert moved_on.returncode == 0, moved_on.stderr[-3000:]
    assert ("x 8 (data parallel), Keras on jax and continues under float32 on CPU, Keras on jax"
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


def test_jax_trains_in_float32_on_a_gpu_until_a_mixed_setting_is_seen_to_compile():
    from kit.devices import precision_for

    assert precision_for(9.0, "jax") == precision_for(7.5, "jax") == precision_for(None, "jax") == "float32"


def test_a_tpu_under_tensorflow_is_refused_with_the_jax_command(monkeypatch, tmp_path):
    """A TPU runtime under TensorFlow: not a silent stage on the CPU, but the command that trains on the TPU."""
    from kit.cli import KitError
    from kit.devices import device_names, tpu_present

    assert not tpu_present({}, tmp_path)
    (tmp_path / "accel0").touch()  # a TPU v2-v4 VM's device file
    assert tpu_present({}, tmp_path) and tpu_present({"TPU_NAME": "local"}, tmp_path / "none")
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v3-8")
    with pytest.raises(KitError, match="KERAS_BACKEND=jax") as refused:
        device_names()
    assert "jax[tpu]" in str(refused.value) and "--devices all" in str(refused.value)
