"""kit.pseudo: the threshold, the per-class counts, and pseudo-labelled photos kept out of validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import run_kit, small_synthetic
from kit.cli import KitError
from kit.config import COMPETITION_CLASSES
from kit.dataset import load_resized, load_split, read_test
from kit.pipeline import cache_folder, cache_short_side, labelled_paths, open_cache, open_training_cache
from kit.predict import probability_table
from kit.pseudo import select, write_pseudo_labels


def probabilities_of(workdir, confident: dict[int, int]) -> pd.DataFrame:
    """kit.predict's probabilities.csv for the test photos: test photo k gets 0.95 for class confident[k]."""
    test = read_test(workdir)
    probs = np.full((len(test), len(COMPETITION_CLASSES)), 1 / len(COMPETITION_CLASSES))
    for k, label in confident.items():
        probs[k] = 0.05 / (len(COMPETITION_CLASSES) - 1)
        probs[k, label] = 0.95
    return probability_table(test.Id, probs, COMPETITION_CLASSES)


def test_select_keeps_the_photos_at_or_above_the_threshold():
    table = pd.DataFrame([[0.9, 0.1], [0.5, 0.5], [np.nan, np.nan], [0.2, 0.8]], columns=["a", "b"],
                         index=pd.Index(["x", "y", "broken", "z"], name="Id"))
    chosen = select(table, 0.8)
    assert list(chosen.Id) == ["x", "z"] and list(chosen["class"]) == ["a", "b"]
    assert list(select(table, 0.9).Id) == ["x"]  # >=, so 0.9 itself is kept
    assert select(table, 0.95).empty


def test_pseudo_labels_train_but_never_validate(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=6, test=8)
    split = load_split(workdir)
    source = tmp_path / "probabilities.csv"
    source.write_text(probabilities_of(workdir, {0: 3, 2: 3, 5: 7}).to_csv(index=False))
    result = run_kit("kit.pseudo", "--from", str(source), "--threshold", "0.9", "--out", str(tmp_path / "p.csv"))
    assert result.returncode == 0, result.stderr[-2000:]
    printed = " ".join(result.stdout.split())
    assert "total 3 of 8 test photos at probability >= 0.9" in printed
    assert f"{COMPETITION_CLASSES[3]} 2 {COMPETITION_CLASSES[4]} 0" in printed

    with_pseudo = load_split(workdir, pseudo_labels=tmp_path / "p.csv")
    test = read_test(workdir)
    assert with_pseudo.val.equals(split.val)  # the same validation photos, real labels only
    added = with_pseudo.train[with_pseudo.train.subset == "pseudo"]
    assert list(added.Id) == list(test.Id[[0, 2, 5]]) and list(added.Category) == [3, 3, 7]
    assert list(added.path) == list(test.path[[0, 2, 5]])
    assert len(with_pseudo.train) == len(split.train) + 3


def test_a_list_that_does_not_fit_the_dataset_is_refused(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=6, test=4)
    train_id = load_split(workdir).train.Id[0]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"Id,class,probability\n{train_id},Lada Niva,0.99\n{read_test(workdir).Id[0]},Tesla,0.99\n")
    with pytest.raises(KitError, match="classes it does not have \\(Tesla\\); 1 Ids that are not its test photos"):
        load_split(workdir, pseudo_labels=bad)


def test_no_photo_above_the_threshold_says_what_to_do(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=6, test=4)
    source = tmp_path / "probabilities.csv"
    source.write_text(probabilities_of(workdir, {}).to_csv(index=False))
    with pytest.raises(KitError, match=r"the highest is 0.100\). Lower --threshold"):
        write_pseudo_labels(source, 0.5, tmp_path / "p.csv")
    with pytest.raises(KitError, match="give a number above 0 and at most 1"):
        write_pseudo_labels(source, 90, tmp_path / "p.csv")


def test_a_run_that_never_started_takes_the_list_given_now(tmp_path):
    from kit.dataset import keep_pseudo_labels

    workdir = small_synthetic(tmp_path, per_class=6, test=4)
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text(f"Id,class,probability\n{read_test(workdir).Id[0]},Lada Niva,0.99\n")
    second.write_text(f"Id,class,probability\n{read_test(workdir).Id[1]},Lada Kalina,0.98\n")
    keep_pseudo_labels(workdir, first)  # e.g. the first start was killed before stage 1 saved the run
    keep_pseudo_labels(workdir, second)
    assert workdir.pseudo_labels.read_bytes() == second.read_bytes()


def test_a_pseudo_label_run_prediction_and_the_report_share_their_caches(tmp_path):
    """One cache of the labelled photos and one of the test photos per size: no command rebuilds another's."""
    workdir = small_synthetic(tmp_path, per_class=6, test=8)
    test = read_test(workdir)
    listed = tmp_path / "p.csv"
    listed.write_text(f"Id,class,probability\n{test.Id[1]},{COMPETITION_CLASSES[2]},0.99\n")
    with_pseudo, plain, size = load_split(workdir, pseudo_labels=listed), load_split(workdir), 64

    def builds() -> dict[str, int]:
        return {folder.name: (folder / "meta.json").stat().st_mtime_ns for folder in workdir.cache.iterdir()}

    cache, position = open_training_cache(workdir.cache, with_pseudo, size, 1, test_paths=list(test.path))  # a stage
    first = builds()
    assert sorted(first) == sorted(cache_folder(workdir.cache, name, paths, size).name
                                   for name, paths in (("test", list(test.path)), ("train", labelled_paths(plain))))
    np.testing.assert_array_equal(cache[position[test.path[1]]], load_resized(test.path[1], cache_short_side(size)))
    open_cache(workdir.cache, "test", list(test.path), size, 1)  # kit.predict
    open_training_cache(workdir.cache, plain, size, 1)  # kit.report's validation photos
    open_training_cache(workdir.cache, with_pseudo, size, 1, test_paths=list(test.path))  # the next stage
    assert builds() == first
