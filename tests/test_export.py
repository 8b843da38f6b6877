"""kit.export: each format against the Keras model on real photos, the demo on ONNX without TensorFlow, publishing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, demo_process, run_kit
from kaggle_server import USER, Kaggle, serve
from kit.cli import KitError
from kit.config import COMPETITION_CLASSES, PROFILES, Workdir
from kit.demo import unknown_headline
from kit.export import FORMATS, check_views, litert_probabilities
from kit.kaggle_api import kaggle_api
from kit.predict import OnnxModel, learn_known, load_model, load_onnx, weights_path
from kit.publish import format_for, publish

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")


@pytest.fixture(scope="module")
def exported(smoke_run, shared, tmp_path_factory) -> Path:
    """The smoke run's model exported to every format, checked on the real test photos."""
    folder = tmp_path_factory.mktemp("export")
    result = run_kit("kit.export", "--workdir", str(smoke_run.parent), "--profile", "smoke", "--out", str(folder),
                     "--format", "onnx", "keras", "savedmodel", "tflite", "--photos", str(shared / "test_upload_sample"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return folder


def test_every_format_matches_the_keras_model_on_real_photos(exported, smoke_run, real_photos):
    meta = json.loads((exported / "model.json").read_text())
    assert meta["classes"] == list(COMPETITION_CLASSES) and meta["stage"] == 7 and meta["image_size"] == 64
    assert meta["check"]["photos"] == 16 and set(meta["files"]) == {"onnx", "keras", "savedmodel", "tflite"}
    assert all(d <= 1e-4 for d in meta["check"]["max_abs_difference"].values())

    import keras

    loaded = load_model(weights_path(Workdir(smoke_run)))
    views = check_views(loaded, real_photos)  # all 30, not only the 16 the command checked
    expected = loaded.model.predict_on_batch(views)
    assert np.abs(OnnxModel(exported / "model.onnx").predict_on_batch(views) - expected).max() <= 1e-4
    reloaded = keras.saving.load_model(exported / "model.keras", compile=False)
    assert np.abs(reloaded.predict_on_batch(views) - expected).max() <= 1e-4
    assert np.abs(litert_probabilities(exported / "model.tflite", views) - expected).max() <= 1e-4
    onnx = load_onnx(exported / "model.onnx")
    assert onnx.classes == loaded.classes and onnx.image_size == loaded.image_size
    # What tells an unknown car travels with the export: the features' own ONNX file and the bank, same answers.
    assert meta["unknown_cars"]["features"] == "features.onnx" and onnx.known is not None
    assert meta["unknown_cars"]["bank"] == len(onnx.known.bank) and onnx.known.k >= 1
    learnt = learn_known(Workdir(smoke_run), loaded)
    features = np.asarray(loaded.features.predict_on_batch(views))
    assert np.abs(onnx.features.predict_on_batch(views) - features).max() <= 1e-3 * max(1, np.abs(features).max())
    probs = np.asarray(expected)
    assert (onnx.known.is_known(features, probs) == learnt.is_known(features, probs)).all()


def test_an_onnx_file_without_its_metadata_is_refused(exported, tmp_path):
    shutil.copy(exported / "model.onnx", tmp_path / "model.onnx")
    result = run_kit("kit.demo", "--model", str(tmp_path / "model.onnx"))
    assert result.returncode == 2 and "model.json is missing" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_the_demo_serves_the_onnx_model_where_tensorflow_cannot_be_imported(exported, real_photos, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    poison = tmp_path / "poison"
    for name in ("tensorflow", "keras"):  # found before the real packages: importing either fails loudly
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported by the demo')")
    env = {**os.environ, "PYTHONPATH": f"{poison}{os.pathsep}{ROOT}"}
    with demo_process("--model", str(exported / "model.onnx"), "--workdir", str(tmp_path), env=env) as (client, _):
        assert "/explain" not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        for tta in (False, True):
            result = client.predict(gradio_client.handle_file(str(real_photos[0])), tta, api_name="/classify")
            labels = [c["label"] for c in result["confidences"]]
            assert len(labels) == 5 and set(labels) <= set(COMPETITION_CLASSES)
            # The smoke model was taught synthetic pictures: a real car is none of what it knows, and it says so.
            assert result["label"] == unknown_headline(COMPETITION_CLASSES)
        (tmp_path / "notes.txt").write_text("not a photo")
        with pytest.raises(gradio_client.exceptions.AppError, match="could not be read as a photo"):
            client.predict(gradio_client.handle_file(str(tmp_path / "notes.txt")), False, api_name="/classify")


def test_export_on_a_gpu_machine_writes_the_float32_graph(exported, smoke_run, tmp_path):
    """A GPU's default policy is mixed precision; the export is float32 and equal to the CPU's export."""
    import keras
    import onnxruntime

    from kit.export import build_parser, main as export_main

    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # what --precision auto picks on an H100
    try:
        assert export_main(["--workdir", str(smoke_run.parent), "--profile", "smoke", "--out", str(tmp_path),
                            "--format", "onnx", "--photos", str(ROOT.parent / "shared" / "competition" /
                                                                "test_upload_sample")]) == 0
        assert keras.mixed_precision.global_policy().name == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].type == "tensor(float)"
    views = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(OnnxModel(tmp_path / "model.onnx").predict_on_batch(views),
                               OnnxModel(exported / "model.onnx").predict_on_batch(views), atol=1e-6)
    with pytest.raises(SystemExit):  # nothing to choose: the float32 graph is the only one exported
        build_parser().parse_args(["--precision", "mixed_bfloat16"])


def test_publish_uploads_the_export_with_its_card_to_kaggle_models(smoke_run, shared, tmp_path, monkeypatch):
    """The real kaggle package against the local Kaggle: a new model and variation, then a new version."""
    server = Kaggle()
    http = serve(server)
    try:
        env = server.environment(tmp_path / "no-config")
        target = f"kaggle:{USER}/lada-classifier/onnx/smoke"
        args = ["kit.export", "--workdir", str(smoke_run.parent), "--profile", "smoke", "--out", str(tmp_path / "x"),
                "--format", "keras", "--photos", str(shared / "test_upload_sample"), "--publish", target]
        first = run_kit(*args, env=env)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        assert f"https://www.kaggle.com/models/{USER}/lada-classifier/onnx/smoke" in first.stdout
        model = server.models[f"{USER}/lada-classifier"]
        assert model["isPrivate"] is True and "Lada Priora" in model["description"]
        instance = server.instances[f"{USER}/lada-classifier/onnx/smoke"]["body"]
        assert instance["framework"] == "MODEL_FRAMEWORK_ONNX" and instance["licenseName"] == "Apache 2.0"
        card = instance["overview"]
        assert "## Classes" in card and "## Metrics" in card and "## How to run" in card and "tiny-cnn" in card
        assert "onnxruntime" in instance["usage"]
        uploaded = server.versions[f"{USER}/lada-classifier/onnx/smoke"][0]
        assert set(uploaded) == {"model.onnx", "model.json", "MODEL_CARD.md"}  # onnx added for the framework
        assert uploaded["model.onnx"] == (tmp_path / "x" / "model.onnx").read_bytes()
        assert json.loads(uploaded["model.json"])["classes"] == list(COMPETITION_CLASSES)

        # The card's snippet, run as a stranger would on what was uploaded, names what the kit names.
        downloaded = tmp_path / "downloaded"
        downloaded.mkdir()
        for name, data in uploaded.items():
            (downloaded / name).write_bytes(data)
        photo = sorted((shared / "test_upload_sample").glob("*.jpg"))[0]
        snippet = card.split("```python\n")[1].split("```")[0].replace("car.jpg", str(photo))
        said = subprocess.run([sys.executable, "-c", snippet], cwd=downloaded, capture_output=True, text=True,
                              check=True).stdout.rsplit(" ", 1)
        loaded = load_onnx(downloaded / "model.onnx")
        expected = loaded.model.predict_on_batch(check_views(loaded, [photo]))[0]
        assert said[0] == loaded.classes[int(expected.argmax())] and abs(float(said[1]) - expected.max()) < 1e-5

        # Again, in this process (the export is done): the variation exists, so it gets a second version.
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        loaded, export_dir = load_onnx(tmp_path / "x" / "model.onnx"), tmp_path / "x"
        workdir = Workdir.resolve(smoke_run.parent, PROFILES["smoke"])
        publish(kaggle_api(), target, export_dir, FORMATS, loaded, workdir, public=False, notes="again")
        assert len(server.versions[f"{USER}/lada-classifier/onnx/smoke"]) == 2 and len(server.models) == 1
        with pytest.raises(KitError, match="403 Forbidden"):
            publish(kaggle_api(), "kaggle:someone-else/lada-classifier/onnx/smoke", export_dir, FORMATS, loaded,
                    workdir, public=False, notes="")
        with pytest.raises(KitError, match="OWNER/MODEL/FRAMEWORK/VARIATION"):
            format_for("kaggle:carfan/lada")
    finally:
        http.shutdown()
        http.server_close()
