"""The image cache and the batch loader: correct, resumable, identical to the uncached path."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, small_synthetic
from kit.augment import train_transform
from kit.dataset import read_train
from kit.pipeline import Batches, Uncached, cache_folder, open_cache


def images_of(workdir):
    return list(read_train(workdir).path)


# A process that builds the cache of a dataset's training photos: python -c CACHE_CODE CACHE_ROOT WORKDIR SIZE
CACHE_CODE = ("import sys; from kit.config import Workdir; from kit.dataset import read_train;"
              "from kit.pipeline import open_cache;"
              "open_cache(sys.argv[1], 'train', list(read_train(Workdir(sys.argv[2])).path), int(sys.argv[3]), "
              "workers=1)")


def test_cached_batches_equal_uncached_ones_pixel_for_pixel(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=3)
    paths = images_of(workdir)
    labels = read_train(workdir).Category.to_numpy()
    cache = open_cache(tmp_path / "cache", "train", paths, 64, workers=2, progress=False)

    def make():
        return train_transform(64)

    cached = Batches(cache, labels, 7, make, seed=1, stage=2, shuffle=True)
    uncached = Batches(Uncached(paths, 64), labels, 7, make, seed=1, stage=2, shuffle=True, workers=1)
    for (xa, ya), (xb, yb) in zip(cached.epoch(3), uncached.epoch(3)):
        assert xa.dtype == np.uint8 and xa.shape[1:] == (64, 64, 3)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_resumed_epoch_sees_the_same_batches(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=3)
    cache = open_cache(tmp_path / "cache", "train", images_of(workdir), 48, progress=False)
    batches = Batches(cache, read_train(workdir).Category.to_numpy(), 4, lambda: train_transform(48, light=True),
                      seed=5, stage=6, shuffle=True)
    full = list(batches.epoch(2))
    tail = list(batches.epoch(2, start=3))
    assert len(tail) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], tail):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other_epoch = next(iter(batches.epoch(3)))[0]
    assert not np.array_equal(other_epoch, full[0][0])


def test_cache_is_rebuilt_when_an_image_changes(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=2)
    paths = images_of(workdir)
    first = open_cache(tmp_path / "cache", "train", paths, 48, progress=False)
    before = np.array(first[0])
    Image.new("RGB", (100, 80), (255, 0, 0)).save(paths[0], format="JPEG")
    second = open_cache(tmp_path / "cache", "train", paths, 48, progress=False)
    assert second.fingerprint != first.fingerprint
    assert second[0].shape == (55, 69, 3) and not np.array_equal(second[0][:, :48], before[:, :48])
    assert np.abs(second[0].astype(int) - [255, 0, 0]).max() < 10


def test_unreadable_images_are_listed_not_dropped_silently(tmp_path, capsys):
    from kit.dataset import drop_unreadable

    workdir = small_synthetic(tmp_path, per_class=2)
    frame = read_train(workdir)
    broken = frame.path[3]
    data = open(broken, "rb").read()
    open(broken, "wb").write(data[: len(data) // 3])  # truncated JPEG
    open(frame.path[5], "wb").write(b"not an image at all")
    cache = open_cache(tmp_path / "cache", "train", list(frame.path), 48, progress=False)
    assert set(cache.unreadable) == {broken, frame.path[5]}
    kept = drop_unreadable(frame, cache.unreadable, "training")
    assert len(kept) == len(frame) - 2
    out = capsys.readouterr().out
    assert "2 training images could not be read" in out and frame.Id[3] in out and frame.Id[5] in out


@pytest.mark.slow
def test_killed_cache_build_is_finished_by_the_next_run(tmp_path):
    workdir = small_synthetic(tmp_path, per_class=40, size=(640, 480))
    paths = images_of(workdir)
    process = subprocess.Popen([sys.executable, "-c", CACHE_CODE, str(tmp_path / "killed"), str(workdir.root), "224"],
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    folder = cache_folder(tmp_path / "killed", "train", paths, 224)
    end = time.monotonic() + 60
    while not (folder / "pixels.u8").exists() and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert '"complete": false' in (folder / "meta.json").read_text()
    finished = open_cache(tmp_path / "killed", "train", paths, 224, progress=False)
    fresh = open_cache(tmp_path / "fresh", "train", paths, 224, progress=False)
    fresh_folder = cache_folder(tmp_path / "fresh", "train", paths, 224)
    assert (folder / "pixels.u8").read_bytes() == (fresh_folder / "pixels.u8").read_bytes()
    assert finished.unreadable == fresh.unreadable == {}


@pytest.mark.slow
def test_unreadable_images_are_remembered_across_a_killed_build(tmp_path):
    """A killed build marks a broken photo done; the next run must still know it is broken, not black."""
    workdir = small_synthetic(tmp_path, per_class=4, size=(96, 72))
    paths = images_of(workdir)
    broken = paths[0]
    with open(broken, "r+b") as f:  # a truncated upload: the header survives, the pixels do not
        f.truncate(200)
    process = subprocess.Popen([sys.executable, "-c", CACHE_CODE, str(tmp_path / "cache"), str(workdir.root), "64"],
                               env={**os.environ, "PYTHONPATH": str(ROOT), "KIT_FAULT_SLOW_DECODE": "0.3"},
                               stderr=subprocess.DEVNULL)
    done = cache_folder(tmp_path / "cache", "train", paths, 64) / "done.npy"
    end = time.monotonic() + 60
    while not (done.exists() and np.load(done)[0]) and time.monotonic() < end:  # saved every 5 s
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert np.load(done)[0] and not np.load(done).all(), "killed after the broken photo, before the end"
    resumed = open_cache(tmp_path / "cache", "train", paths, 64, progress=False)
    assert broken in resumed.unreadable and "damaged or truncated" in resumed.unreadable[broken]


def test_every_command_finds_the_cache_by_one_rule(tmp_path, monkeypatch):
    """--cache-dir, else $KIT_CACHE_DIR, else <workdir>/cache: the same for each command that reads photos."""
    from kit import __main__ as run_everything, demo, export, predict, report, stage
    from kit.config import PROFILES, Workdir

    monkeypatch.delenv("KIT_CACHE_DIR", raising=False)
    root = tmp_path.resolve()
    assert Workdir.resolve(tmp_path).cache == root / "cache"
    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "local"))
    assert Workdir.resolve(tmp_path).cache == root / "local"
    assert Workdir.resolve(tmp_path, PROFILES["smoke"]).cache == root / "local" / "smoke"
    given = Workdir.resolve(tmp_path, cache_dir=tmp_path / "given")
    assert given.cache == root / "given" and f"--cache-dir {tmp_path / 'given'}" in given.command("kit.predict")
    assert given.compiled == root / "weights" / "compiled"  # XLA's programs stay with the run, not the cache
    for command in (stage, predict, report, export, demo, run_everything):
        args = command.build_parser().parse_args(["--cache-dir", "elsewhere", *(["--all"] if command is stage else [])])
        assert args.cache_dir == Path("elsewhere"), command.__name__


@pytest.mark.slow
def test_two_processes_building_one_cache_build_it_once_and_whole(tmp_path):
    """Both see an unfinished cache; the second waits for the first instead of truncating its pixels."""
    workdir = small_synthetic(tmp_path / "data", per_class=4, size=(96, 72))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KIT_FAULT_SLOW_DECODE": "0.02"}
    builders = [subprocess.Popen([sys.executable, "-c", CACHE_CODE, str(tmp_path / "shared"), str(workdir.root), "64"],
                                 env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    said = [builder.communicate(timeout=120)[0] for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0]
    paths = images_of(workdir)
    fresh = open_cache(tmp_path / "fresh", "train", paths, 64, progress=False)
    shared = open_cache(tmp_path / "shared", "train", paths, 64, progress=False)
    assert shared.unreadable == fresh.unreadable == {}
    for k in range(len(paths)):
        np.testing.assert_array_equal(shared[k], fresh[k])
    assert any("waiting for process" in out for out in said), said  # the builds did overlap


@pytest.mark.slow
def test_runs_on_different_photos_sharing_a_cache_dir_each_train_on_their_own(tmp_path):
    """Two work directories, two datasets, one --cache-dir (the notebooks' KIT_CACHE_DIR), overlapping builds:
    each run trains exactly as it does alone."""
    from conftest import kit_process
    from kit.config import PROFILES, Workdir

    args = ["--profile", "smoke", "--step", "1", "--epochs", "1", "--batch-size", "8", "--deterministic",
            "--workers", "2"]
    runs = {}
    for seed in (1, 2):
        root = tmp_path / f"run{seed}"
        small_synthetic(Workdir.resolve(root, PROFILES["smoke"]).root, per_class=6, test=2, size=(64, 48), seed=seed)
        for copy in ("together", "alone"):
            shutil.copytree(root, tmp_path / f"{copy}{seed}")
        runs[seed] = root

    def stage(root: Path, cache: Path, slow: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "kit.stage", "--workdir", str(root), "--cache-dir", str(cache), *args]
        return kit_process(command, env={"KIT_FAULT_SLOW_DECODE": slow}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)

    together = [stage(tmp_path / f"together{seed}", tmp_path / "shared-cache", "0.02") for seed in runs]
    outputs = [process.communicate(timeout=300)[0] for process in together]
    assert [process.returncode for process in together] == [0, 0], outputs
    for seed in runs:
        alone = stage(tmp_path / f"alone{seed}", tmp_path / f"own-cache{seed}", "0")
        assert alone.wait(timeout=300) == 0, alone.stdout.read()
        logs = [(Workdir.resolve(tmp_path / f"{copy}{seed}", PROFILES["smoke"]).stage_dir(1) / "log.csv").read_text()
                for copy in ("together", "alone")]
        assert logs[0] == logs[1], f"seed {seed}: {logs}"
    assert len(list((tmp_path / "shared-cache").glob("train-*"))) == 2  # a folder per dataset
