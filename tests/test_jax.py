"""The JAX backend end to end. The shared smoke run (conftest) trains on JAX; here prediction, the report and
the demo run on its weights as real processes under KERAS_BACKEND=jax, and this (TensorFlow) process predicts
the same photos with the same weights to the same probabilities."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, SMOKE_BACKEND, demo_process, run_command, run_kit
from kit.config import COMPETITION_CLASSES, PROFILES, STEPS, Workdir
from kit.demo import unknown_headline
from kit.manifest import Manifest

pytest.importorskip("jax")
gradio_client = pytest.importorskip("gradio_client")

JAX = {"KERAS_BACKEND": "jax"}


def test_the_smoke_run_trains_every_stage_with_xla_on_jax(smoke_run):
    """Every stage done, recorded as compiled by XLA on JAX; the compiled programs kept for the next session."""
    assert SMOKE_BACKEND == "jax"
    workdir = Workdir(smoke_run)
    records = json.loads(workdir.manifest.read_text())["stages"]
    for step in STEPS:
        assert Manifest.read(workdir).status(step) == "done"
        assert records[str(step)]["runtime"] == {"precision": "float32", "device": "CPU", "jit": True,
                                                 "devices": 1, "backend": "jax"}
    assert any(workdir.compiled.iterdir()), "XLA's compiled programs are kept with the run"


def test_weights_trained_on_jax_predict_the_same_on_tensorflow(smoke_run, real_photos, tmp_path):
    """`kit.predict --folder` under JAX, and the same call in this TensorFlow process: the same TTA probabilities."""
    import keras

    from kit.predict import load_model, predict_folder, weights_path

    assert keras.backend.backend() == "tensorflow"
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in real_photos[:8]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    args = ("--workdir", str(smoke_run.parent), "--profile", "smoke")
    result = run_kit("kit.predict", *args, "--folder", str(folder), "--out", str(tmp_path / "jax.csv"), env=JAX)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    workdir = Workdir(smoke_run)
    loaded = load_model(weights_path(workdir))
    on_tensorflow, _ = predict_folder(folder, loaded, tmp_path / "tf.csv", seed=loaded.config.seed)
    on_jax = pd.read_csv(tmp_path / "jax.csv")
    assert list(on_jax.path) == list(on_tensorflow.path) and list(on_jax["class"]) == list(on_tensorflow["class"])
    columns = list(COMPETITION_CLASSES)
    np.testing.assert_allclose(on_jax[columns].to_numpy(), on_tensorflow[columns].to_numpy(), atol=1e-4)


def test_report_and_demo_run_on_jax(smoke_run, real_photos):
    args = ("--workdir", str(smoke_run.parent), "--profile", "smoke")
    report = run_kit("kit.report", *args, "--tta", "2", env=JAX)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    folder = Workdir.resolve(smoke_run.parent, PROFILES["smoke"]).submissions / "report"
    for picture in ("confusion_matrix.png", "top_losses.png", "curves.png"):
        assert Image.open(folder / picture).size[0] > 100

    env = {**os.environ, "PYTHONPATH": str(ROOT), **JAX}
    with demo_process(*args, env=env) as (client, _):
        photo = gradio_client.handle_file(str(real_photos[0]))
        answer = client.predict(photo, True, api_name="/classify")
        # The smoke model learnt synthetic pictures: a real car is none of them (kit.novelty, under JAX too).
        assert answer["label"] == unknown_headline(COMPETITION_CLASSES) and len(answer["confidences"]) == 5
        assert {c["label"] for c in answer["confidences"]} <= set(COMPETITION_CLASSES)
        heat = Image.open(client.predict(photo, True, api_name="/explain"))  # Grad-CAM through jax.grad
        width, height = Image.open(real_photos[0]).size
        assert abs(heat.size[0] / heat.size[1] - width / height) < 0.02


def test_an_export_killed_midway_is_done_again_from_jax_to_the_keras_models_function(smoke_run, real_photos,
                                                                                      tmp_path):
    """SIGKILL while the ONNX file is written leaves its temporary file; the next export, asked for under JAX (which
    converts under TensorFlow), clears it and writes a file that predicts what the Keras model does."""
    from test_stages import kill, start, wait_for

    from kit.export import check_views
    from kit.predict import OnnxModel, load_model, weights_path

    out = tmp_path / "export"
    command = [sys.executable, "-m", "kit.export", "--workdir", str(smoke_run.parent), "--profile", "smoke",
               "--format", "onnx", "--out", str(out), "--photos", str(real_photos[0].parent)]
    first = start(command)
    wait_for(lambda: any(out.glob(".model.onnx.*")), first)
    kill(first)
    assert any(out.glob(".model.onnx.*")) and not (out / "model.onnx").exists()

    again = run_command(command, env=JAX)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "converts under TensorFlow" in again.stdout
    # The model, its metadata, and what tells a car it never saw (the features' graph and the training photos' bank).
    assert sorted(p.name for p in out.iterdir()) == ["features.onnx", "known.npz", "model.json", "model.onnx"]
    loaded = load_model(weights_path(Workdir(smoke_run)))
    views = check_views(loaded, real_photos)
    assert np.abs(OnnxModel(out / "model.onnx").predict_on_batch(views) - loaded.model.predict_on_batch(views)).max() \
        <= 1e-4
