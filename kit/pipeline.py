"""The input pipeline: an on-disk cache of resized images and a parallel, resumable batch loader.

Decoding a 640x480 JPEG costs more than augmenting its 256 px copy, and the recipe decoded every
photo again in every epoch. The cache decodes each photo once per stage size into one flat
uint8 file, memory-mapped, so it lives on disk rather than in RAM and every later stage, resumed
run, prediction and report reads raw pixels. Batches leave the CPU as uint8; the float
conversion and normalisation are the model's first layers, on the accelerator.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from kit import augment
from kit.cli import KitError, stop_if_terminated
from kit.config import CACHE_SCALE
from kit.dataset import Split, UnreadableImage, load_resized, resized_short_side
from kit.files import WorkdirLock, write_bytes, write_text

CACHE_VERSION = 1  # bump when load_resized changes, so old caches are rebuilt
FLUSH_S = 5.0  # how often a build saves its progress
FREE_MARGIN = 64 * 2 ** 20  # left free beside a cache: its small files, and the checkpoints written next
DEFAULT_WORKERS = os.cpu_count() or 2

_EXIF_ORIENTATION = 0x0112


def cache_short_side(image_size: int) -> int:
    return round(image_size * CACHE_SCALE)


def fingerprint(paths: Sequence[str], short_side: int) -> str:
    """Changes when any source file changes (size or modification time), the file list, or the size."""
    digest = hashlib.sha1(f"v{CACHE_VERSION} {short_side}\n".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def identity(paths: Sequence[str]) -> str:
    """A short name for a list of photos: two lists (two datasets, two runs sharing --cache-dir) never share a folder.

    The file list alone, not the files' times, so it is cheap to compute (no stat) and a photo that changed
    rebuilds its own folder instead of leaving a stale one beside a new one.
    """
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()[:12]


class ImageCache:
    """Resized images of a fixed list of files, in `folder`, addressed by position in that list.

    Files: layout.npz (offsets and shapes, written first), pixels.u8 (all pixels back to back),
    done.npy (which images are written and flushed), meta.json (written last: complete).
    An interrupted build is continued from done.npy; a mismatched fingerprint starts over. With a
    `deadline` (time.time() seconds) a build that would run past it stops there, its progress
    saved, and raises CacheIncomplete: the next run continues it.
    """

    def __init__(self, folder: Path, paths: Sequence[str], short_side: int, workers: int = DEFAULT_WORKERS,
                 progress: bool = True, deadline: float = math.inf):
        self.folder, self.paths, self.short_side = folder, list(paths), short_side
        self.fingerprint = fingerprint(self.paths, short_side)
        # One process at a time checks, builds and opens a folder: two builders would truncate the pixels under
        # each other's memory maps and mark black images done. Another process's build is waited for.
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = WorkdirLock(folder.with_name(folder.name + ".lock"), f"building the image cache {folder.name}")
        if not lock.wait(deadline):
            raise CacheIncomplete(f"the time budget, while another process built the image cache in {folder}")
        try:
            meta = self._read_meta()
            if meta.get("fingerprint") != self.fingerprint:  # the same photos' files changed: built again
                shutil.rmtree(folder, ignore_errors=True)
                meta = {}
            if not meta.get("complete"):
                self._build(workers, progress, deadline)
                meta = self._read_meta()
            self.unreadable: dict[str, str] = meta["unreadable"]
            layout = np.load(folder / "layout.npz")
            self.offsets, self.shapes = layout["offsets"], layout["shapes"]
            self.pixels = np.memmap(folder / "pixels.u8", np.uint8, mode="r")
        finally:
            lock.release()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        if self.paths[index] in self.unreadable:
            raise UnreadableImage(self.unreadable[self.paths[index]])
        h, w = self.shapes[index]
        start = int(self.offsets[index])
        return self.pixels[start:start + h * w * 3].reshape(h, w, 3)

    def _read_meta(self) -> dict:
        return _read_meta(self.folder)

    def _build(self, workers: int, progress: bool, deadline: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # What a killed build found unreadable stays known: done.npy marks those images done, and
        # forgetting why would let them pass as black pictures trained under their label.
        unreadable = self._read_meta().get("unreadable", {})
        self._write_meta(unreadable, complete=False)
        layout_file, pixels_file, done_file = (self.folder / n for n in ("layout.npz", "pixels.u8", "done.npy"))
        if not layout_file.is_file():
            shapes = np.array([self._planned_shape(p) for p in self.paths], np.int64).reshape(-1, 2)
            sizes = shapes[:, 0] * shapes[:, 1] * 3
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            with open(pixels_file, "wb") as f:
                f.truncate(max(1, int(sizes.sum())))  # sparse: no disk is used until written
            _save_npz(layout_file, offsets=offsets, shapes=shapes)
        layout = np.load(layout_file)
        offsets, shapes = layout["offsets"], layout["shapes"]
        done = np.load(done_file) if done_file.is_file() else np.zeros(len(self.paths), bool)
        check_free_space(self.folder, int((shapes[~done, 0] * shapes[~done, 1] * 3).sum()), self.short_side)
        pixels = np.memmap(pixels_file, np.uint8, mode="r+")
        todo = np.flatnonzero(~done)

        slow = float(os.environ.get("KIT_FAULT_SLOW_DECODE", "0") or 0)  # tests stretch a build to test budgets

        def decode(index: int) -> tuple[int, np.ndarray | str]:
            time.sleep(slow)
            try:
                return index, load_resized(self.paths[index], self.short_side)
            except UnreadableImage as error:
                return index, str(error)

        last_flush, started, built = time.monotonic(), time.time(), 0
        with tqdm(total=len(todo), desc=f"caching images at {self.short_side} px",
                  disable=not progress or not len(todo), mininterval=1.0) as bar:
            for index, result in ordered_map(decode, todo, workers, ahead=4 * workers):
                built += 1
                per_image = (time.time() - started) / built
                if time.time() + per_image + FLUSH_S > deadline:  # room to save what is built
                    self._checkpoint(pixels, done, unreadable, complete=False)
                    raise CacheIncomplete(f"the time budget, while caching images at {self.short_side} px "
                                          f"({int(done.sum())} of {len(done)} done; the next run continues)")
                h, w = shapes[index]
                if isinstance(result, str) or result.shape != (h, w, 3):
                    unreadable[self.paths[index]] = result if isinstance(result, str) else "size changed while caching"
                else:
                    start = int(offsets[index])
                    pixels[start:start + h * w * 3] = result.reshape(-1)
                done[index] = True
                bar.update()
                if time.monotonic() - last_flush > FLUSH_S:
                    self._checkpoint(pixels, done, unreadable, complete=False)
                    last_flush = time.monotonic()
        self._checkpoint(pixels, done, unreadable, complete=True)

    def _checkpoint(self, pixels: np.memmap, done: np.ndarray, unreadable: dict, complete: bool) -> None:
        # Pixels reach the disk before done.npy claims them; the unreadable list (in meta.json) before
        # done.npy marks those images done; and meta.json says complete last.
        pixels.flush()
        self._write_meta(unreadable, complete=False)
        write_bytes(self.folder / "done.npy", _npy_bytes(done))
        if complete:
            self._write_meta(unreadable, complete=True)

    def _write_meta(self, unreadable: dict, complete: bool) -> None:
        write_text(self.folder / "meta.json", json.dumps(
            {"fingerprint": self.fingerprint, "complete": complete, "unreadable": unreadable,
             "short_side": self.short_side, "images": len(self.paths)}))

    def _planned_shape(self, path: str) -> tuple[int, int]:
        """(H, W) after resizing, from the header alone; (0, 0) when the header is unreadable."""
        try:
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                    width, height = height, width
        except Exception:  # noqa: BLE001 - any failure here means: unreadable, decided when decoding
            return 0, 0
        if width < 2 or height < 2:
            width, height = 2, 2
        w, h = resized_short_side(width, height, self.short_side)
        return h, w


def check_free_space(folder: Path, needed: int, short_side: int) -> None:
    """Refuse a cache the disk cannot hold: it is written through a memory map, and a full disk there is a SIGBUS."""
    free = shutil.disk_usage(folder).free
    if needed + FREE_MARGIN > free:
        raise KitError(f"The image cache at {short_side} px needs {(needed + FREE_MARGIN) / 1e6:.0f} MB more in "
                       f"{folder}, and that disk has {free / 1e6:.0f} MB free. Free space there, or put the cache on "
                       "another disk with --cache-dir DIR (or $KIT_CACHE_DIR); nothing was lost, and the cache "
                       "continues from what is built.")


def _read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


class CacheIncomplete(Exception):
    """A cache build stopped at its deadline; what it built is kept."""


def open_cache(cache_root: Path, name: str, paths: Sequence[str], image_size: int,
               workers: int = DEFAULT_WORKERS, progress: bool = True, deadline: float = math.inf) -> ImageCache:
    """The cache of `paths` for a stage size, built (or finished) on first use."""
    folder = cache_folder(cache_root, name, paths, image_size)
    return ImageCache(folder, paths, cache_short_side(image_size), workers, progress, deadline)


def cache_folder(cache_root: Path, name: str, paths: Sequence[str], image_size: int) -> Path:
    """<root>/<name>-<short side>-<the photos' identity>: e.g. cache/train-258-3f2a9c01b4de."""
    return Path(cache_root) / f"{name}-{cache_short_side(image_size)}-{identity(paths)}"


def cache_is_complete(cache_root: Path, name: str, paths: Sequence[str], image_size: int) -> bool:
    """Whether the cache of these photos at this size was finished (a cheap look before a budget decision)."""
    return bool(_read_meta(cache_folder(cache_root, name, paths, image_size)).get("complete"))


def labelled_paths(split: Split) -> list[str]:
    """Every labelled photo of the split in the dataset's order, whatever the split: the "train" cache's list."""
    labelled = pd.concat([split.train, split.val])
    return list(labelled[labelled.subset != "pseudo"].sort_values("row").path)


def open_training_cache(cache_root: Path, split: Split, image_size: int, workers: int = DEFAULT_WORKERS,
                        deadline: float = math.inf,
                        test_paths: Sequence[str] = ()) -> tuple[ImageCache | Joined, dict[str, int]]:
    """The images a run trains and validates on, and each path's position among them.

    Every command opens the same two caches per size, so none rebuilds another's: "train" holds
    every labelled photo in the dataset's order, whatever the split, and "test" every test photo
    (`test_paths`, as kit.predict lists them). Pseudo-labelled test photos are read from the test
    cache, so a pseudo-label run, the prediction and the report share both.
    """
    cache = open_cache(cache_root, "train", labelled_paths(split), image_size, workers, deadline=deadline)
    if (split.train.subset == "pseudo").any():  # read_pseudo_labels has made sure they are test photos
        cache = Joined([cache, open_cache(cache_root, "test", list(test_paths), image_size, workers,
                                          deadline=deadline)])
    return cache, {path: k for k, path in enumerate(cache.paths)}


class Joined:
    """Several caches read as one, positions counted through them in order (the training and test caches)."""

    def __init__(self, caches: Sequence[ImageCache]):
        self.caches = list(caches)
        self.paths = [path for cache in self.caches for path in cache.paths]
        self.unreadable = {path: why for cache in self.caches for path, why in cache.unreadable.items()}
        self.starts = np.cumsum([0] + [len(cache) for cache in self.caches])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        which = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.caches[which][index - int(self.starts[which])]


class Uncached:
    """The same interface as ImageCache, decoding every time: the baseline, and tests' reference."""

    def __init__(self, paths: Sequence[str], image_size: int):
        self.paths, self.short_side = list(paths), cache_short_side(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return load_resized(self.paths[index], self.short_side)


class Batches:
    """Batches of (uint8 images, labels), each a pure function of (seed, stage, epoch, step).

    Training order is a seeded permutation per epoch; image i of the epoch is augmented with
    sample_seed(seed, stage, epoch, i). So `epoch(e, start=s)` yields exactly the batches s, s+1, ...
    that an uninterrupted epoch would have: this is what makes resume exact.
    """

    def __init__(self, images: ImageCache | Uncached, labels: np.ndarray, batch_size: int,
                 make_transform: Callable[[], object], seed: int, stage: int, shuffle: bool,
                 workers: int = DEFAULT_WORKERS, steps: int | None = None, positions: np.ndarray | None = None):
        self.images, self.labels = images, np.asarray(labels)
        # Where each labelled image sits in `images` (a split is a subset of the cache).
        self.positions = np.arange(len(self.labels)) if positions is None else np.asarray(positions)
        self.batch_size, self.make_transform = batch_size, make_transform
        self.seed, self.stage, self.shuffle, self.workers = seed, stage, shuffle, workers
        # Training (shuffled) drops each epoch's incomplete last batch: every step then has one shape,
        # so a resumed run compiles the very graph the uninterrupted one used (a first partial batch
        # would make TensorFlow fall back to a dynamic-shape graph with other kernels), and BatchNorm
        # never trains on a batch of one. Reshuffling means no image is left out every epoch.
        full = len(self.labels) // batch_size if shuffle else -(-len(self.labels) // batch_size)
        self.steps = min(steps, full) if steps else full
        self._local = threading.local()

    def __len__(self) -> int:
        return self.steps

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.labels))
        return np.random.default_rng(augment.sample_seed(self.seed, self.stage, epoch)).permutation(len(self.labels))

    def batch(self, epoch: int, step: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        order = self.order(epoch) if order is None else order
        rows = order[step * self.batch_size:(step + 1) * self.batch_size]
        transform = getattr(self._local, "transform", None)
        if transform is None:  # one transform per thread: reseeding a shared one would race
            transform = self._local.transform = self.make_transform()
        first = augment.apply(transform, self.images[self.positions[rows[0]]], self._seed(epoch, step, 0))
        x = np.empty((len(rows),) + first.shape, np.uint8)
        x[0] = first
        for k, row in enumerate(rows[1:], start=1):
            x[k] = augment.apply(transform, self.images[self.positions[row]], self._seed(epoch, step, k))
        return x, self.labels[rows]

    def _seed(self, epoch: int, step: int, k: int) -> int:
        return augment.sample_seed(self.seed, self.stage, epoch, step * self.batch_size + k)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield batches start..steps-1 of `epoch`, built ahead on `workers` threads, in order."""
        order = self.order(epoch)
        yield from ordered_map(lambda step: self.batch(epoch, step, order), range(start, self.steps), self.workers)


def ordered_map(function: Callable, items: Iterable, workers: int, ahead: int | None = None) -> Iterator:
    """`map(function, items)` on `workers` threads, in order, at most `ahead` results in memory.

    Unlike Executor.map, which submits everything at once, this never runs far ahead of the
    consumer: on a CPU-bound model, prepared batches would otherwise pile up in RAM. A SIGTERM
    whose exception was dropped (kit.cli.stop_if_terminated) stops it at the next item.
    """
    if workers <= 1:
        for item in items:
            stop_if_terminated()
            yield function(item)
        return
    ahead = ahead or 2 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= ahead:
                stop_if_terminated()
                yield pending.popleft().result()
        while pending:
            stop_if_terminated()
            yield pending.popleft().result()
