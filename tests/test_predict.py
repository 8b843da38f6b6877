"""kit.predict, kit.report, kit.submit: alignment, real Ids, determinism, validation, the API call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_kit, small_synthetic
from kit.cli import KitError
from kit.config import COMPETITION, COMPETITION_CLASSES, Workdir
from kit.pipeline import Uncached
from kit.predict import Predictor, load_model, predict_test, predict_validation, weights_path
from kit.submit import submit, validate
from test_download import FakeKaggle, http_error

LABELS = [str(k) for k in range(len(COMPETITION_CLASSES))]


@pytest.fixture(scope="module")
def smoke_workdir(smoke_run) -> Workdir:
    return Workdir(smoke_run)


@pytest.fixture(scope="module")
def smoke_model(smoke_workdir):
    return load_model(weights_path(smoke_workdir))


def test_submission_covers_every_real_id_in_order(tmp_path, shared, smoke_model):
    workdir = small_synthetic(tmp_path, per_class=2, test=6675, size=(24, 18), ids_from=shared)
    submission, unreadable, written = predict_test(workdir, smoke_model, tta=0, workers=2)
    expected = pd.read_csv(shared / "sample-submission.csv", dtype={"Id": str}).Id
    written = pd.read_csv(workdir.submissions / "submission.csv", dtype={"Id": str})
    assert unreadable == {} and written.Id.tolist() == expected.tolist()
    assert validate(workdir.submissions / "submission.csv", shared / "sample-submission.csv", LABELS) == []
    probabilities = pd.read_csv(workdir.submissions / "probabilities.csv", dtype={"Id": str})
    assert probabilities.Id.tolist() == expected.tolist()
    assert np.allclose(probabilities.iloc[:, 1:].sum(axis=1), 1, atol=1e-4)


def test_tta_predictions_are_aligned_with_their_ids(smoke_workdir, smoke_model):
    labels = pd.read_csv(smoke_workdir.data / "test_labels.csv", dtype={"Id": str})
    submission = pd.read_csv(smoke_workdir.submissions / "submission.csv", dtype={"Id": str})
    assert submission.Id.tolist() == labels.Id.tolist()
    manifest = json.loads(smoke_workdir.manifest.read_text())
    val_accuracy = manifest["stages"]["7"]["best_val_accuracy"]
    assert (submission.Category == labels.Category).mean() >= val_accuracy - 0.15  # chance would be 0.1

    paths = [str(smoke_workdir.test_dir / i) for i in labels.Id]
    predictor = Predictor(smoke_model, tta=4, workers=2)
    straight, _ = predictor.predict_many(Uncached(paths, smoke_model.image_size), list(labels.Id), progress=False)
    order = np.random.default_rng(0).permutation(len(paths))
    shuffled, _ = predictor.predict_many(Uncached([paths[i] for i in order], smoke_model.image_size),
                                         [labels.Id[i] for i in order], progress=False)
    np.testing.assert_allclose(shuffled, straight[order], atol=1e-6)


def test_prediction_is_deterministic(smoke_workdir, smoke_model):
    """The same TTA draws every time: predicting twice writes the same bytes (the run's own file was JAX's)."""
    predict_test(smoke_workdir, smoke_model, tta=10, workers=2)
    first = (smoke_workdir.submissions / "probabilities.csv").read_bytes()
    predict_test(smoke_workdir, smoke_model, tta=10, workers=4)
    assert (smoke_workdir.submissions / "probabilities.csv").read_bytes() == first


def test_real_photos_go_through_tta(real_photos, smoke_model):
    probs, unreadable = Predictor(smoke_model, tta=10).predict_many(
        Uncached([str(p) for p in real_photos], smoke_model.image_size), [p.name for p in real_photos], progress=False)
    assert len(real_photos) == 30 and unreadable == {}
    assert probs.shape == (30, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)


def test_one_decode_gives_the_tta_answer_and_what_novelty_judges(tmp_path, real_photos, smoke_model):
    """describe_many's probabilities are predict_many's; its plain view's are the prediction without TTA, and its
    features the head's on that view (as photo_features, one photo at a time, has them); a damaged photo: NaN."""
    from kit.predict import photo_features

    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths = [str(p) for p in real_photos[:5]] + [str(damaged)]
    images, keys = Uncached(paths, smoke_model.image_size), [Path(p).name for p in paths]
    predictor = Predictor(smoke_model, tta=3, workers=2, batch_views=6)  # two photos a batch, the last one short
    views, _ = predictor.predict_many(images, keys, progress=False, each_view=True)
    probs, features, plain, unreadable = predictor.describe_many(images, keys)
    assert list(unreadable) == ["damaged.jpg"]
    np.testing.assert_allclose(probs, views.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(plain, views[:, 0], atol=1e-6)
    alone, alone_plain = photo_features(smoke_model, Uncached(paths[:1], smoke_model.image_size), keys[:1])
    np.testing.assert_allclose(features[:1], alone, atol=1e-5)
    np.testing.assert_allclose(plain[:1], alone_plain, atol=1e-6)
    assert np.isnan(features[-1]).all() and np.isnan(probs[-1]).all() and not np.isnan(features[:-1]).any()


def test_unreadable_test_image_gets_a_row_and_a_failing_exit(tmp_path, smoke_workdir):
    workdir = small_synthetic(tmp_path / "smoke", per_class=3, test=5, size=(96, 72))
    broken = pd.read_csv(workdir.sample_submission, dtype={"Id": str}).Id[2]
    (workdir.test_dir / broken).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    weights = weights_path(smoke_workdir)
    result = run_kit("kit.predict", "--workdir", str(tmp_path / "smoke"), "--weights", str(weights), "--tta", "2")
    assert result.returncode == 1 and broken in result.stdout and "class prior" in result.stdout
    written = pd.read_csv(workdir.submissions / "submission.csv", dtype={"Id": str})
    assert len(written) == 5 and broken in written.Id.tolist()


def test_report_writes_metrics_and_pictures(smoke_workdir, smoke_model):
    from kit.report import write_report

    metrics = write_report(smoke_workdir, smoke_model, tta=4, seed=42, workers=2)
    validation = metrics["validation"]
    assert set(validation["accuracy"]) == {"no TTA", "TTA 4"} and "test" not in metrics  # synthetic: no labels
    manifest = json.loads(smoke_workdir.manifest.read_text())
    assert validation["accuracy"]["no TTA"] == pytest.approx(manifest["stages"]["7"]["best_val_accuracy"])
    assert np.array(validation["confusion_matrix"]).sum() == validation["images"]
    assert [row["name"] for row in validation["per_class"]] == list(COMPETITION_CLASSES)
    for picture in ("confusion_matrix.png", "curves.png"):
        assert (smoke_workdir.report / picture).read_bytes()[:4] == b"\x89PNG"

    # One pass for both figures (view 0 is the plain one); kit.predict after the report (or the report again) scores
    # the validation photos no more: kept per view count.
    assert not (smoke_workdir.report / "validation_views1.npz").exists()
    kept = {4: smoke_workdir.report / "validation_views4.npz"}
    written = {views: path.stat().st_mtime_ns for views, path in kept.items()}
    said = predict_validation(smoke_workdir, smoke_model, tta=4, seed=42, workers=2)
    assert f"(TTA 4): {validation['accuracy']['TTA 4']:.4f}" in said
    assert write_report(smoke_workdir, smoke_model, tta=4, seed=42, workers=2)["validation"] == validation
    assert {views: path.stat().st_mtime_ns for views, path in kept.items()} == written
    predict_validation(smoke_workdir, smoke_model, tta=4, seed=7, workers=2)  # other TTA draws: scored anew
    assert kept[4].stat().st_mtime_ns != written[4]


def test_no_weights_names_the_command(tmp_path):
    with pytest.raises(KitError, match="python -m kit.stage --all"):
        weights_path(Workdir(tmp_path))


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample.csv"
    path.write_text("Id,Category\n1.jpg,0\n2.jpg,0\n3.jpg,0\n")
    return path


@pytest.mark.parametrize("content, problem", [
    ("Id,Category\n1.jpg,0\n2.jpg,1\n", "1 Ids of the sample submission are missing (3.jpg)"),
    ("Id,Category\n1.jpg,0\n2.jpg,1\n3.jpg,2\n3.jpg,2\n", "1 Ids appear more than once (3.jpg)"),
    ("Id,Category\n1.jpg,0\n2.jpg,1\n3.jpg,2\n4.jpg,2\n", "1 Ids are not in the sample submission (4.jpg)"),
    ("Id,Category\n1.jpg,0\n2.jpg,10\n3.jpg,2\n", "1 labels are not among the dataset's 10"),
    ("Id,Category\n1.jpg,0\n2.jpg,1.0\n3.jpg,2\n", "2.jpg='1.0'"),
    ("id,label\n1.jpg,0\n2.jpg,1\n3.jpg,2\n", "must be exactly 'Id,Category'"),
    ("", "is empty"),
])
def test_validator_rejects(tmp_path, sample, content, problem):
    file = tmp_path / "submission.csv"
    file.write_text(content)
    assert any(problem in p for p in validate(file, sample, LABELS)), validate(file, sample, LABELS)
    api = FakeKaggle()
    with pytest.raises(KitError, match="was not submitted"):
        submit(file, sample, LABELS, "msg", COMPETITION, api=api)
    assert api.calls == []


def test_submit_calls_the_api_with_competition_file_and_message(tmp_path, sample):
    file = tmp_path / "submission.csv"
    file.write_text("Id,Category\n1.jpg,0\n2.jpg,9\n3.jpg,4\n")
    api = FakeKaggle()
    answer = submit(file, sample, LABELS, "B6 seven stages, TTA 10", COMPETITION, api=api)
    assert api.calls == [(str(file), "B6 seven stages, TTA 10", COMPETITION)]
    assert answer.message == "Successfully submitted"
    with pytest.raises(KitError, match="rules"):
        submit(file, sample, LABELS, "again", COMPETITION, api=FakeKaggle(error=http_error(403)))


def test_check_command(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=1, test=3, size=(32, 24))
    (workdir.submissions).mkdir(parents=True, exist_ok=True)
    (workdir.submissions / "submission.csv").write_text(workdir.sample_submission.read_text())
    result = run_kit("kit.submit", "--check", "--workdir", str(tmp_path))
    assert result.returncode == 0 and "is valid" in result.stdout
    (workdir.submissions / "submission.csv").write_text("Id,Category\n")
    result = run_kit("kit.submit", "--check", "--workdir", str(tmp_path))
    assert result.returncode == 2 and "3 Ids of the sample submission are missing" in result.stderr


def test_submit_refuses_a_submission_made_on_synthetic_data(smoke_run):
    """The smoke run's file is valid, but Kaggle would score it at chance: no daily submission is spent on it."""
    root = smoke_run.parent
    checked = run_kit("kit.submit", "--check", "--profile", "smoke", "--workdir", str(root))
    assert checked.returncode == 0, checked.stderr[-2000:]
    result = run_kit("kit.submit", "--message", "smoke", "--profile", "smoke", "--workdir", str(root),
                     env={"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "0" * 32})
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "synthetic pictures" in message and "Traceback" not in result.stderr
