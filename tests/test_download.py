"""kit.download: layout, idempotence, safe unpacking, and every user error as one clear paragraph."""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import requests

from conftest import ROOT, run_kit, small_synthetic
from kit.cli import KitError
from kit.config import COMPETITION, COMPETITION_CLASSES, COMPETITION_URL, Workdir
from kit.dataset import load_split, parse_fold, read_train
from kit.dataset import describe, is_verified, read_description
from kit.download import download


def competition_archive(source: Workdir, target: Path) -> Path:
    """A zip shaped like the real one: train.csv, sample-submission.csv, train.zip, test.zip."""
    def folder_zip(folder: Path, prefix: str) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            for file in sorted(folder.rglob("*.jpg")):
                z.write(file, f"{prefix}/{file.relative_to(folder).as_posix()}")
        return buffer.getvalue()

    with zipfile.ZipFile(target, "w") as z:
        z.write(source.train_csv, "train.csv")
        z.write(source.sample_submission, "sample-submission.csv")
        z.writestr("train.zip", folder_zip(source.train_dir, "train"))
        z.writestr("test.zip", folder_zip(source.test_dir, "test_upload"))
    return target


class FakeKaggle:
    """Shaped like kaggle's KaggleApi: downloads <path>/<competition>.zip, or raises what it raises."""

    def __init__(self, archive: Path | None = None, error: BaseException | None = None):
        self.archive, self.error, self.calls = archive, error, []

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
        self.calls.append((dataset, path))
        if self.error:
            raise self.error
        shutil.copy(self.archive, Path(path) / f"{dataset.split('/')[1]}.zip")

    def competition_download_files(self, competition, path=None, force=False, quiet=True):
        self.calls.append((competition, path))
        if self.error:
            raise self.error
        shutil.copy(self.archive, Path(path) / f"{competition}.zip")

    def competition_submit(self, file_name, message, competition, quiet=False):
        self.calls.append((file_name, message, competition))
        if self.error:
            raise self.error
        return type("ApiCreateSubmissionResponse", (), {"message": "Successfully submitted"})()


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.url = f"https://www.kaggle.com/api/v1/competitions/data/download-all/{COMPETITION}"
    return requests.HTTPError(f"{status} Client Error", response=response)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    source = small_synthetic(root, per_class=4, test=5)
    return competition_archive(source, root / "archive.zip")


def test_synthetic_layout_is_the_competitions(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=3, test=4)
    description = describe(workdir, "synthetic", "synthetic pictures")
    assert description.class_counts == (3,) * 10 and description.test_images == 4
    assert description.classes == COMPETITION_CLASSES and description.labels == tuple("0123456789")
    train = pd.read_csv(workdir.train_csv, dtype={"Id": str})
    assert list(train.columns) == ["Id", "Category"]
    assert all((workdir.train_dir / str(c) / i).is_file() for i, c in zip(train.Id, train.Category))
    assert all(i.endswith(".jpg") and i[:-4].isdigit() for i in train.Id)


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    a, b = small_synthetic(tmp_path / "a", seed=3), small_synthetic(tmp_path / "b", seed=3)
    files = sorted(p.relative_to(a.data) for p in a.data.rglob("*.jpg"))
    assert files == sorted(p.relative_to(b.data) for p in b.data.rglob("*.jpg"))
    assert all((a.data / f).read_bytes() == (b.data / f).read_bytes() for f in files)


def test_replica_in_the_real_id_space(tmp_path, shared):
    workdir = small_synthetic(tmp_path, per_class=20, test=15, ids_from=shared)
    real_train = pd.read_csv(shared / "train.csv", dtype={"Id": str})
    real_test = pd.read_csv(shared / "sample-submission.csv", dtype={"Id": str})
    train = pd.read_csv(workdir.train_csv, dtype={"Id": str})
    test = pd.read_csv(workdir.sample_submission, dtype={"Id": str})
    assert set(train.Id) <= set(real_train.Id) and set(test.Id) <= set(real_test.Id)
    real_labels = dict(zip(real_train.Id, real_train.Category))
    assert all(real_labels[i] == c for i, c in zip(train.Id, train.Category))
    assert read_description(workdir).class_counts == tuple(train.Category.value_counts().sort_index())
    # Class proportions follow the real ones (class 1 is the largest, class 7 the smallest).
    counts = train.Category.value_counts()
    assert counts[1] > counts[7]


def test_download_through_the_api_unpacks_and_verifies(tmp_path, archive, capsys):
    api = FakeKaggle(archive)
    summary = download(Workdir(tmp_path), api=api)
    assert api.calls == [(COMPETITION, str(tmp_path / "downloads"))]
    assert summary.class_counts == (4,) * 10 and summary.test_images == 5
    assert is_verified(Workdir(tmp_path))
    out = capsys.readouterr().out
    assert "Lada Priora" in out and "test images" in out


def test_second_run_does_nothing(tmp_path, archive, capsys):
    download(Workdir(tmp_path), zip_path=archive)
    capsys.readouterr()
    api = FakeKaggle(error=AssertionError("must not be called"))
    download(Workdir(tmp_path), api=api)
    assert api.calls == [] and "already verified; nothing to do" in capsys.readouterr().out


def test_half_unpacked_dataset_is_finished_not_used(tmp_path, archive):
    workdir = Workdir(tmp_path)
    download(workdir, zip_path=archive)
    victims = sorted(workdir.train_dir.rglob("*.jpg"))[:3]
    for victim in victims:
        victim.unlink()
    (workdir.data / "dataset.json").unlink()  # as after a kill in the middle of unpacking
    with pytest.raises(KitError, match="No verified dataset"):
        load_split(workdir)
    download(workdir, zip_path=archive)
    assert all(v.is_file() for v in victims) and is_verified(workdir)


def test_zip_slip_is_refused(tmp_path):
    for evil in ("../escaped.txt", "/tmp/absolute.txt", "train/../../escaped.txt"):
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("train.csv", "Id,Category\n")
            z.writestr("sample-submission.csv", "Id,Category\n")
            z.writestr("train.zip", b"")
            z.writestr("test.zip", b"")
            z.writestr(evil, "gotcha")
        with pytest.raises(KitError, match="outside"):
            download(Workdir(tmp_path / "work"), zip_path=bad)
        assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "work" / "escaped.txt").exists()


@pytest.mark.parametrize("status, expected", [
    (401, "401 Unauthorized"),
    (403, f"{COMPETITION_URL}/rules"),
    (404, "not found"),
])
def test_http_errors_are_explained(tmp_path, status, expected):
    with pytest.raises(KitError, match=expected.replace("/", ".")):
        download(Workdir(tmp_path), api=FakeKaggle(error=http_error(status)))


def test_no_network_is_explained(tmp_path):
    error = requests.ConnectionError("HTTPSConnectionPool(host='www.kaggle.com', port=443): Max retries exceeded")
    with pytest.raises(KitError, match="could not be reached"):
        download(Workdir(tmp_path), api=FakeKaggle(error=error))


def test_full_disk_is_explained(tmp_path):
    error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KitError, match="disk is full"):
        download(Workdir(tmp_path), api=FakeKaggle(error=error))


def test_corrupt_archive_is_explained(tmp_path, archive):
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(KitError, match="truncated or corrupt"):
        download(Workdir(tmp_path / "work"), zip_path=truncated)


def test_foreign_archive_is_explained(tmp_path):
    foreign = tmp_path / "titanic.zip"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("train.csv", "PassengerId,Survived\n1,0\n")
    with pytest.raises(KitError, match="No class folders were found"):
        download(Workdir(tmp_path / "work"), zip_path=foreign)


def test_no_credentials_message_from_the_real_command(tmp_path):
    env = {"HOME": str(tmp_path), "KAGGLE_CONFIG_DIR": str(tmp_path / "nothing")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    result = run_kit("kit.download", "--workdir", str(tmp_path / "work"), env={**clean, **env, "KAGGLE_API_TOKEN": ""})
    assert result.returncode == 2
    for way in ("KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json", "KAGGLE_API_TOKEN", "Colab"):
        assert way in result.stderr
    assert "Traceback" not in result.stderr
    assert "Authentication required" not in result.stdout  # the kaggle package's own help is kept out


def test_synthetic_command_on_a_fresh_folder(tmp_path):
    result = run_kit("kit.download", "--synthetic", "--per-class", "2", "--test", "3", "--size", "64x48",
                     "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "test images" in result.stdout and is_verified(Workdir(tmp_path))


def test_split_is_stratified_and_stable_across_processes(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=10)
    split = load_split(workdir)
    assert len(split.val) == 20 and split.val.Category.value_counts().eq(2).all()
    assert not set(split.train.Id) & set(split.val.Id)
    code = ("import sys; from kit.config import Workdir; from kit.dataset import load_split;"
            "print(','.join(sorted(load_split(Workdir(sys.argv[1])).val.Id)))")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert other.stdout.strip() == ",".join(sorted(split.val.Id))
    workdir.split_csv.unlink()  # recomputed from the same seed: the very same split
    assert sorted(load_split(workdir).val.Id) == sorted(split.val.Id)


def test_kaggle_input_folder(tmp_path, archive):
    attached = tmp_path / "input"
    with zipfile.ZipFile(archive) as z:
        z.extractall(attached)  # Kaggle attaches the archive's files: CSVs, train.zip, test.zip
    summary = download(Workdir(tmp_path / "work"), from_dir=attached)
    assert summary.class_counts == (4,) * 10 and is_verified(Workdir(tmp_path / "work"))


# ---- class-folder layouts -------------------------------------------------------------------------

def photo(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, format="JPEG")
    return path


def test_class_folders_with_a_validation_folder_and_odd_names(tmp_path):
    names = ["Škoda Octavia", "Lada 2107 (Zhiguli)", "VW, Passat \"B5\""]
    for k, name in enumerate(names):
        for i in range(3 + 5 * k):  # imbalanced: 3, 8, 13
            photo(tmp_path / "cars" / "Train" / name / f"{i}.jpg")
        photo(tmp_path / "cars" / "valid" / name / "v.png")
        photo(tmp_path / "cars" / "test" / f"loose{k}.jpg")  # unlabelled test photos
    workdir = Workdir(tmp_path / "work")
    description = download(workdir, from_dir=tmp_path / "cars")
    assert description.classes == tuple(sorted(names)) and description.class_counts == (9, 14, 4)
    assert description.validation_images == 3 and description.test_images == 3 and not description.test_labelled
    split = load_split(workdir)
    assert len(split.val) == 3 and all("/valid/" in p for p in split.val.path)  # the folder, not a random draw
    assert (workdir.data / "images").is_symlink()  # linked, not copied


def test_just_class_folders_two_classes_and_a_196_class_set(tmp_path):
    for name in ("swift", "wagonr"):
        photo(tmp_path / "two" / name / "a.jpg")
    assert download(Workdir(tmp_path / "w2"), from_dir=tmp_path / "two").classes == ("swift", "wagonr")
    many = [f"Car {k:03d} 2012" for k in range(196)]
    for name in many:
        photo(tmp_path / "many" / "train" / name / "a.jpg")
    description = download(Workdir(tmp_path / "w196"), from_dir=tmp_path / "many")
    assert description.classes == tuple(many) and sum(description.class_counts) == 196


@pytest.mark.parametrize("layout, words", [
    ({"train/a/1.jpg": 1}, "at least 2"),
    ({"train/a/1.jpg": 1, "train/b/1.jpg": 1, "valid/c/1.jpg": 1}, "class folders that the training folder lacks: c"),
    ({"notes/readme.txt": 1}, "No class folders were found"),
])
def test_class_folder_mistakes_are_explained(tmp_path, layout, words):
    for relative in layout:
        target = tmp_path / "data" / relative
        photo(target) if target.suffix == ".jpg" else (target.parent.mkdir(parents=True), target.write_text("x"))
    with pytest.raises(KitError, match=re.escape(words)):
        download(Workdir(tmp_path / "work"), from_dir=tmp_path / "data")
    assert not is_verified(Workdir(tmp_path / "work"))


def test_a_run_refuses_a_dataset_whose_classes_changed(tmp_path):
    from kit.config import PROFILES
    from kit.records import Requested, run_config

    workdir = Workdir(tmp_path)
    config = run_config(None, PROFILES["smoke"], Requested(), workdir, ("jazz", "mazda"))
    saved = dataclasses.asdict(config)
    assert run_config(saved, PROFILES["smoke"], Requested(), workdir, ("jazz", "mazda")) == config
    with pytest.raises(KitError, match="gone: mazda; new: yaris"):
        run_config(saved, PROFILES["smoke"], Requested(), workdir, ("jazz", "yaris"))


def test_a_work_directory_holds_one_dataset(tmp_path, archive):
    for name in ("swift", "wagonr"):
        photo(tmp_path / "two" / name / "a.jpg")
    workdir = Workdir(tmp_path / "work")
    download(workdir, zip_path=archive)
    with pytest.raises(KitError, match=f"already holds {COMPETITION} .*use another --workdir"):
        download(workdir, from_dir=tmp_path / "two")
    assert read_description(workdir).classes == COMPETITION_CLASSES


def test_folds_partition_the_data_stably_and_stratified(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=10, size=(32, 24))
    seen = []
    for k in range(1, 6):
        workdir.split_csv.unlink(missing_ok=True)  # each fold is its own work directory in practice
        split = load_split(workdir, seed=7, fold=f"{k}/5")
        assert len(split.val) == 20 and split.val.Category.value_counts().eq(2).all()
        seen += list(split.val.Id)
    assert sorted(seen) == sorted(read_train(workdir).Id)  # every image validated exactly once
    workdir.split_csv.unlink()
    assert sorted(load_split(workdir, seed=7, fold="3/5").val.Id) == sorted(seen[40:60])  # the same folds again
    for wrong in ("3of5", "6/5", "1/1"):
        with pytest.raises(KitError, match="--fold"):
            parse_fold(wrong)


def test_files_under_image_names_that_are_not_whole_photos_are_skipped_and_listed(tmp_path, real_photos):
    """A web page saved as .jpg, an empty file, a photo cut short: skipped, counted by reason, never indexed."""
    cars = tmp_path / "cars"
    for name in ("lada", "volga"):
        for k, source in enumerate(real_photos[:3]):
            (cars / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, cars / name / f"{k}.jpg")
    (cars / "lada" / "page.jpg").write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    (cars / "lada" / "empty.jpg").touch()
    (cars / "volga" / "cut.jpg").write_bytes(real_photos[3].read_bytes()[:20000])
    description = download(Workdir(tmp_path / "work"), from_dir=cars)
    assert description.class_counts == (3, 3)
    skipped = {reason: what["examples"] for reason, what in description.skipped.items()}
    assert skipped["empty files"] == ["lada/empty.jpg"] and skipped["damaged or truncated images"] == ["volga/cut.jpg"]
    assert [reason for reason in skipped if reason.startswith("files named as images")] and \
        ["lada/page.jpg"] in skipped.values()
    index = pd.read_csv(tmp_path / "work" / "data" / "index.csv")
    assert not index.Id.str.contains("page|empty|cut").any()


def test_a_zip_of_nothing_but_empty_photos_is_refused(tmp_path):
    archive = tmp_path / "cars.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for k in range(60):
            z.writestr(f"train/{'ab'[k % 2]}/{k}.jpg", b"")
    result = run_kit("kit.download", "--zip", str(archive), "--workdir", str(tmp_path / "work"))
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "readable photos" in message and "60 empty files" in message
    assert not is_verified(Workdir(tmp_path / "work"))
