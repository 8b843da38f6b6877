"""The real kaggle package against a local Kaggle: competition and dataset downloads, submit, 401/403/404.

Every call goes through `python -m kit.download` / `kit.submit` in a real process, with the
installed kaggle package doing the HTTP (see kaggle_server.py for how it reaches localhost).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_kit, small_synthetic
from kaggle_server import KEY, Kaggle, serve
from kit.config import COMPETITION, COMPETITION_CLASSES, Workdir
from test_download import competition_archive

STANFORD5 = Path(__file__).resolve().parents[2] / "shared" / "real-cars" / "stanford5"
DATASET = "jutrera/stanford-car-dataset-by-classes-folder"


def class_folder_archive(target: Path, per_class: int = 3) -> Path:
    """Shaped like the Stanford Cars dataset on Kaggle: car_data/car_data/{train,test}/<class>/<photo>,
    with the clutter real archives carry (a hidden file, a note, a nested folder)."""
    with zipfile.ZipFile(target, "w") as z:
        for subset in ("train", "test"):
            for folder in sorted((STANFORD5 / subset).iterdir()):
                for photo in sorted(folder.iterdir())[:per_class]:  # mazda's are .JPG
                    z.write(photo, f"car_data/car_data/{subset}/{folder.name}/{photo.name}")
        z.writestr("car_data/car_data/train/jazz/.DS_Store", b"\0")
        z.writestr("car_data/car_data/train/mazda/notes.txt", "where these came from")
        z.write(sorted((STANFORD5 / "train" / "yaris").glob("*.jpg"))[0], "car_data/car_data/train/yaris/old/x.jpg")
        z.writestr("names.csv", "AM General Hummer SUV 2000\n")
    return target


def other_competition_archive(source: Workdir, target: Path) -> Path:
    """Another competition's shape: labels.csv (id without extension, a text label), train/ and test/ folders."""
    train = pd.read_csv(source.train_csv, dtype={"Id": str})
    test = pd.read_csv(source.sample_submission, dtype={"Id": str})
    breeds = {0: "sedan", 1: "hatchback", 2: "wagon"}
    with zipfile.ZipFile(target, "w") as z:
        rows = []
        for image_id, category in zip(train.Id, train.Category):
            if category in breeds:
                z.write(source.train_dir / str(category) / image_id, f"train/{image_id}")
                rows.append((image_id[:-4], breeds[category]))
        z.writestr("labels.csv", pd.DataFrame(rows, columns=["id", "body"]).to_csv(index=False))
        for image_id in test.Id:
            z.write(source.test_dir / image_id, f"test/{image_id}")
        sample = pd.DataFrame({"id": [i[:-4] for i in test.Id], "body": "sedan"})
        z.writestr("sample_submission.csv", sample.to_csv(index=False))
    return target


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    if not STANFORD5.is_dir():
        pytest.skip(f"the real class-folder photos are not at {STANFORD5}")
    root = tmp_path_factory.mktemp("kaggle")
    source = small_synthetic(root / "source", per_class=3, test=4, size=(64, 48))
    server = Kaggle(
        competitions={COMPETITION: competition_archive(source, root / "competition.zip"),
                      "car-body-types": other_competition_archive(source, root / "other.zip"),
                      "rules-not-accepted": root / "competition.zip"},
        datasets={DATASET: class_folder_archive(root / "dataset.zip"), "someone/private-cars": root / "dataset.zip"},
        forbidden={"rules-not-accepted", "someone/private-cars"})
    http = serve(server)
    yield server, root
    http.shutdown()
    http.server_close()


def kit(kaggle, *args: str, key: str = KEY):
    server, root = kaggle
    env = server.environment(root / "no-config")
    env["KAGGLE_KEY"] = key
    return run_kit(*args, env=env, timeout=120)


def test_competition_download_through_the_real_package(kaggle, tmp_path):
    result = kit(kaggle, "kit.download", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    description = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert description["source"] == "kaggle" and description["competition"] == COMPETITION
    assert description["classes"] == list(COMPETITION_CLASSES) and description["class_counts"] == [3] * 10
    assert description["test_images"] == 4 and "Lada Priora" in result.stdout
    assert not list((tmp_path / "data").glob("*.zip"))  # inner archives removed once verified


def test_dataset_download_finds_the_class_folders_below_wrappers(kaggle, tmp_path):
    result = kit(kaggle, "kit.download", "--dataset", DATASET, "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    description = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert description["source"] == "kaggle-dataset" and description["layout"] == "class-folders"
    assert description["classes"] == ["jazz", "mazda", "mini cooper", "outlander", "yaris"]
    assert description["class_counts"] == [3] * 5 and description["test_images"] == 15
    assert description["test_labelled"] is True
    assert {reason: what["count"] for reason, what in description["skipped"].items()} == {
        "hidden files": 1, "files that are not images": 1, "images in nested folders": 1}
    assert "skipped 1 images in nested folders: train/yaris/old/x.jpg" in result.stdout


def test_another_competition_with_text_labels_and_bare_ids(kaggle, tmp_path):
    result = kit(kaggle, "kit.download", "--competition", "car-body-types", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    description = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert description["classes"] == ["hatchback", "sedan", "wagon"] and description["class_counts"] == [3, 3, 3]
    assert description["competition"] == "car-body-types" and description["sample_submission"] == "sample_submission.csv"
    index = pd.read_csv(tmp_path / "data" / "index.csv", dtype=str)
    assert (index[index.subset == "test"].path.str.startswith("test/")).all()


@pytest.mark.parametrize("args, key, status, words", [
    ((), "0" * 32, 401, "401 Unauthorized"),
    (("--competition", "rules-not-accepted"), KEY, 403, "/competitions/rules-not-accepted/rules"),
    (("--dataset", "someone/private-cars"), KEY, 403, "https://www.kaggle.com/datasets/someone/private-cars"),
    (("--dataset", "nobody/no-such-cars"), KEY, 404, "'nobody/no-such-cars' was not found (404)"),
    (("--competition", "no-such-competition"), KEY, 404, "'no-such-competition' was not found (404)"),
])
def test_kaggle_refusals_are_one_paragraph(kaggle, tmp_path, args, key, status, words):
    result = kit(kaggle, "kit.download", *args, "--workdir", str(tmp_path), key=key)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and words in message and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "dataset.json").exists()


def test_submit_uploads_the_file_and_names_the_competition(kaggle, tmp_path):
    server, _ = kaggle
    assert kit(kaggle, "kit.download", "--workdir", str(tmp_path)).returncode == 0
    submission = tmp_path / "submissions" / "submission.csv"
    submission.parent.mkdir()
    submission.write_text((tmp_path / "data" / "sample-submission.csv").read_text().replace(",0", ",7"))
    result = kit(kaggle, "kit.submit", "--message", "B6, TTA 10", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Successfully submitted" in result.stdout
    assert server.submissions[-1]["competitionName"] == COMPETITION
    assert server.submissions[-1]["submissionDescription"] == "B6, TTA 10"
    assert server.uploads[server.submissions[-1]["blobFileTokens"]] == submission.read_bytes()

    # A notebook's next Run all: the same file is not sent again (exit 0: the notebook goes on, saying so).
    again = kit(kaggle, "kit.submit", "--message", "B6, TTA 10", "--workdir", str(tmp_path))
    assert again.returncode == 0 and "already submitted" in again.stdout and "--again" in again.stdout
    sent = len(server.submissions)
    assert server.submissions[-1]["submissionDescription"] == "B6, TTA 10"
    assert kit(kaggle, "kit.submit", "-m", "on purpose", "--again", "--workdir", str(tmp_path)).returncode == 0
    submission.write_text(submission.read_text().replace(",7", ",3"))  # a new prediction is a new file
    assert kit(kaggle, "kit.submit", "-m", "new", "--workdir", str(tmp_path)).returncode == 0
    assert [s["submissionDescription"] for s in server.submissions[sent - 1:]] == ["B6, TTA 10", "on purpose", "new"]
    record = json.loads((tmp_path / "submissions" / "submitted.json").read_text())
    assert [r["message"] for r in record] == ["B6, TTA 10", "on purpose", "new"]
    assert record[0]["sha256"] == record[1]["sha256"] != record[2]["sha256"]


def test_submit_refuses_a_class_folder_dataset(kaggle, tmp_path):
    assert kit(kaggle, "kit.download", "--dataset", DATASET, "--workdir", str(tmp_path)).returncode == 0
    result = kit(kaggle, "kit.submit", "--message", "x", "--workdir", str(tmp_path))
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "not a Kaggle competition" in message


def test_archive_zip_of_class_folders_without_kaggle(tmp_path):
    """The same dataset downloaded by hand: --zip, no network."""
    if not STANFORD5.is_dir():
        pytest.skip(f"the real class-folder photos are not at {STANFORD5}")
    archive = class_folder_archive(tmp_path / "stanford.zip", per_class=2)
    result = run_kit("kit.download", "--zip", str(archive), "--workdir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr[-2000:]
    description = json.loads((tmp_path / "work" / "data" / "dataset.json").read_text())
    assert description["class_counts"] == [2] * 5 and description["source"] == "zip"
    assert zipfile.is_zipfile(archive)  # the user's archive is left where it was
