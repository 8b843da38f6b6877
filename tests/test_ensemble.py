"""kit.ensemble: means, weights, sample-submission order, validation figures, and the runs it refuses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import run_kit, small_synthetic
from kit.config import COMPETITION_CLASSES

CLASSES = list(COMPETITION_CLASSES)


def write_run(folder, ids, probs, val_ids, val_probs, val_labels, classes=CLASSES):
    """What kit.predict and kit.report leave in a work directory."""
    (folder / "submissions" / "report").mkdir(parents=True, exist_ok=True)
    test = pd.DataFrame(probs, columns=classes)
    test.insert(0, "Id", ids)
    test.to_csv(folder / "submissions" / "probabilities.csv", index=False)
    val = pd.DataFrame(val_probs, columns=classes)
    val.insert(0, "Id", val_ids)
    val.insert(1, "label", [classes[k] for k in val_labels])
    val.to_csv(folder / "submissions" / "report" / "validation_probabilities.csv", index=False)


def random_probs(rng, rows):
    p = rng.random((rows, len(CLASSES))) ** 4
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    workdir = small_synthetic(tmp_path / "a", per_class=1, test=8, size=(32, 24))
    ids = pd.read_csv(workdir.sample_submission, dtype=str).Id.tolist()
    val_ids, labels = [f"v{k}.jpg" for k in range(40)], rng.integers(0, 10, 40)
    a, b = random_probs(rng, 8), random_probs(rng, 8)
    va, vb = random_probs(rng, 40), random_probs(rng, 40)
    write_run(tmp_path / "a", ids, a, val_ids, va, labels)
    order = rng.permutation(8)  # b lists its rows in another order: the ensemble matches them by Id
    write_run(tmp_path / "b", [ids[k] for k in order], b[order], val_ids, vb, labels)
    return tmp_path, ids, a, b, va, vb, labels


def test_arithmetic_mean_in_sample_submission_order_with_validation_figures(runs):
    root, ids, a, b, va, vb, labels = runs
    out = root / "ensemble.csv"
    result = run_kit("kit.ensemble", str(root / "a"), str(root / "b"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    submission = pd.read_csv(out, dtype=str)
    assert list(submission.columns) == ["Id", "Category"] and submission.Id.tolist() == ids
    assert submission.Category.tolist() == [str(k) for k in ((a + b) / 2).argmax(axis=1)]
    probabilities = pd.read_csv(root / "ensemble.probabilities.csv", dtype={"Id": str})
    np.testing.assert_allclose(probabilities[CLASSES].to_numpy(), (a + b) / 2, atol=1e-6)
    expected = ((va + vb) / 2).argmax(axis=1) == labels
    assert f"ensemble validation accuracy {expected.mean():.4f}" in " ".join(result.stdout.split())


def test_geometric_mean_weighted_by_validation_accuracy(runs):
    root, ids, a, b, va, vb, labels = runs
    out = root / "geo.csv"
    result = run_kit("kit.ensemble", str(root / "a"), str(root / "b"), "--out", str(out), "--mean", "geometric",
                     "--weights", "val")
    assert result.returncode == 0, result.stderr[-2000:]
    wa, wb = (va.argmax(axis=1) == labels).mean(), (vb.argmax(axis=1) == labels).mean()
    geo = np.exp((wa * np.log(a) + wb * np.log(b)) / (wa + wb))
    probabilities = pd.read_csv(root / "geo.probabilities.csv", dtype={"Id": str})
    np.testing.assert_allclose(probabilities[CLASSES].to_numpy(), geo / geo.sum(axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("spoil, words", [
    ("order", "do not share their classes in the same order"),
    ("ids", "predict different photos"),
    ("weights", "--weights needs 2 non-negative numbers"),
])
def test_runs_that_cannot_be_combined_are_refused(runs, spoil, words):
    root, ids, a, b, va, vb, labels = runs
    extra = []
    if spoil == "order":
        write_run(root / "b", ids, b, ["v0.jpg"], vb[:1], labels[:1], classes=CLASSES[::-1])
    elif spoil == "ids":
        write_run(root / "b", ids[:-1] + ["other.jpg"], b, ["v0.jpg"], vb[:1], labels[:1])
    else:
        extra = ["--weights", "1", "2", "3"]
    result = run_kit("kit.ensemble", str(root / "a"), str(root / "b"), "--out", str(root / "x.csv"), *extra)
    assert result.returncode == 2 and words in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not (root / "x.csv").exists()
