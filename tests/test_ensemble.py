"""kit.ensemble: means, weights, sample-submission order, validation figures, out-of-fold members, refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import run_kit, small_synthetic
from kit.config import COMPETITION_CLASSES, Workdir
from kit.dataset import fold_split, read_train
from kit.manifest import Manifest

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


# ---- out-of-fold members ------------------------------------------------------------------------------------

def fold_runs(root, name: str, n: int, rng, skill: float, seed: int = 42, folds=None):
    """N fold work directories of one configuration: a real dataset each, the manifest's fold, and what kit.predict
    leaves (test probabilities; validation probabilities of the fold's photos, which fold_split names)."""
    runs = []
    for k in folds or range(1, n + 1):
        workdir = small_synthetic(root / f"{name}{k}", per_class=3, test=8, size=(32, 24))
        Manifest(workdir, config={"fold": f"{k}/{n}", "seed": seed}).save()
        train = read_train(workdir)
        is_val = fold_split(train.Category.to_numpy(), f"{k}/{n}", seed)
        labels = train.Category.to_numpy()[is_val]
        ids = pd.read_csv(workdir.sample_submission, dtype=str).Id.tolist()
        write_run(workdir.root, ids, random_probs(rng, 8), train.Id[is_val].tolist(),
                  skilled_probs(rng, labels, skill), labels)
        runs.append(workdir.root)
    return runs


def skilled_probs(rng, labels, skill: float) -> np.ndarray:
    """Probabilities that put `skill` on the true class, the rest at random."""
    noise = random_probs(rng, len(labels))
    return skill * np.eye(len(CLASSES))[labels] + (1 - skill) * noise


def test_out_of_fold_members_are_scored_on_every_photo_and_weighted_by_their_oof_probabilities(tmp_path):
    rng = np.random.default_rng(1)
    good, poor = fold_runs(tmp_path, "good", 3, rng, 0.7), fold_runs(tmp_path, "poor", 3, rng, 0.05)
    out = tmp_path / "oof.csv"
    result = run_kit("kit.ensemble", "--oof", *map(str, good), "--oof", *map(str, poor), "--weights", "oof",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    said = " ".join(result.stdout.split())
    assert "member 1 (3 folds) cross-validated accuracy 1.0000 on 30 of 30 training photos" in said
    assert "member 1 fold 2/3" in said and "(10 photos)" in said
    weights = [float(w) for w in said.split("weights ")[1].split(" (fitted")[0].split(", ")]
    assert weights[0] > 0.8 and abs(sum(weights) - 1) < 1e-3, weights  # the poor member barely counts

    # The test prediction: each member the mean of its folds, the members by their weights.
    def test_probs(runs):
        return np.mean([pd.read_csv(r / "submissions" / "probabilities.csv")[CLASSES].to_numpy() for r in runs], axis=0)

    expected = weights[0] * test_probs(good) + weights[1] * test_probs(poor)
    written = pd.read_csv(tmp_path / "oof.probabilities.csv")[CLASSES].to_numpy()
    np.testing.assert_allclose(written, expected, atol=1e-3)


@pytest.mark.parametrize("spoil, words", [
    ("missing", "each fold K/N of one N exactly once"),
    ("seeds", "validation photos overlap"),
    ("not-folds", "is not a fold run"),
    ("val", "use --weights oof"),
])
def test_fold_runs_that_do_not_partition_the_photos_are_refused(tmp_path, spoil, words):
    rng = np.random.default_rng(2)
    runs = fold_runs(tmp_path, "a", 3, rng, 0.7, folds=[1, 2] if spoil == "missing" else None)
    extra = ["--weights", "val"] if spoil == "val" else []
    if spoil == "seeds":  # fold 3 of another seed's split covers photos folds 1 and 2 hold already
        runs[2:] = fold_runs(tmp_path, "b", 3, rng, 0.7, seed=7, folds=[3])
    if spoil == "not-folds":
        Manifest(Workdir(runs[0]), config={"fold": "", "seed": 42}).save()
    result = run_kit("kit.ensemble", "--oof", *map(str, runs), *extra, "--out", str(tmp_path / "x.csv"))
    assert result.returncode == 2 and words in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not (tmp_path / "x.csv").exists()
