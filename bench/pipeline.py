"""Training input throughput: the kit's cached, parallel pipeline against the naive one, in one run.

    python bench/pipeline.py                       # 2,000 synthetic 640x480 photos in a temp folder
    python bench/pipeline.py --workdir DIR         # real data of a work directory, when present

Naive: decode the original JPEG, resize, the same albumentations transforms, normalise to float32
on the CPU, one worker, no cache: what the original recipe did every epoch. Kit: the resized
uint8 cache on disk, the same transforms on all cores, batches left as uint8 (the model
normalises on the accelerator). Peak memory is the process's anonymous memory (heap), not the
page cache that the memory-mapped cache file uses.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.augment import apply, sample_seed, train_transform  # noqa: E402
from kit.config import Workdir, stage_of, PROFILES  # noqa: E402
from kit.dataset import load_resized, read_train  # noqa: E402
from kit.pipeline import DEFAULT_WORKERS, Batches, cache_short_side, open_cache  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255


def anonymous_memory_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Samples the process's anonymous memory every 10 ms while the block runs."""

    def __enter__(self):
        self.peak, self.running = anonymous_memory_mb(), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, anonymous_memory_mb())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def naive(paths: list[str], size: int, batch: int, light: bool, images: int) -> float:
    """Images per second of decode + resize + augment + normalise, one worker, no cache."""
    transform = train_transform(size, light)
    order = np.random.default_rng(0).permutation(len(paths))
    started, done = time.perf_counter(), 0
    while done < images:
        rows = order[done % len(paths):][:batch]
        x = np.stack([apply(transform, load_resized(paths[r], cache_short_side(size)), sample_seed(0, done + k))
                      for k, r in enumerate(rows)]).astype(np.float32)
        x = (x - MEAN) / STD
        done += len(rows)
    return done / (time.perf_counter() - started)


def kit(cache, labels: np.ndarray, size: int, batch: int, light: bool, images: int, workers: int) -> float:
    batches = Batches(cache, labels, batch, lambda: train_transform(size, light), seed=0, stage=2, shuffle=True,
                      workers=workers, steps=max(1, images // batch))
    next(iter(Batches(cache, labels, batch, lambda: train_transform(size, light), 0, 2, True, workers=1).epoch(9)))
    started, done = time.perf_counter(), 0
    for x, _ in batches.epoch(0):
        done += len(x)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="use this work directory's real data instead of synthetic photos")
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each pipeline; the table shows medians")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.workdir:
            workdir = Workdir.resolve(args.workdir)
        else:
            from kit.synthetic import write_synthetic

            workdir = Workdir(Path(tmp))
            print(f"writing {args.photos} synthetic 640x480 photos ...", flush=True)
            write_synthetic(workdir, per_class=args.photos // 10, test=0, size=(640, 480))
        frame = read_train(workdir)
        paths, labels = list(frame.path), frame.Category.to_numpy()
        rows = []
        for name, step, images in (("224, stage 2", 2, 640), ("448, stage 5", 5, 256)):
            stage = stage_of(PROFILES["colab"], step)
            size, batch, light = stage.image_size, stage.batch_size, stage.light_augment
            started = time.perf_counter()
            with PeakMemory() as build_memory:
                cache = open_cache(Path(tmp) / "cache", "train", paths, size, args.workers, progress=False)
            build_s = time.perf_counter() - started
            naive_rates, kit_rates = [], []
            with PeakMemory() as memory:
                for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits both alike
                    naive_rates.append(naive(paths, size, batch, light, images))
                    kit_rates.append(kit(cache, labels, size, batch, light, images * 3, args.workers))
            naive_rate, kit_rate = float(np.median(naive_rates)), float(np.median(kit_rates))
            rows.append((name, batch, naive_rate, kit_rate, build_s, len(paths) / build_s, memory.peak,
                         build_memory.peak))
            print(f"{name}: naive {[round(r) for r in naive_rates]} img/s, kit {[round(r) for r in kit_rates]} img/s",
                  flush=True)

    cpu = platform.processor() or platform.machine()
    print(f"\nInput pipeline, {len(paths)} photos, {os.cpu_count()} cores ({cpu}), {args.workers} workers,"
          f" median of {args.repeats} interleaved runs, {time.strftime('%Y-%m-%d')}")
    print("| setting | batch | naive img/s | kit img/s | kit batches/s | kit/naive | cache build s (img/s) |"
          " peak heap MB loading | peak heap MB building |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, naive_rate, kit_rate, build_s, build_rate, peak, build_peak in rows:
        print(f"| {name} | {batch} | {naive_rate:.0f} | {kit_rate:.0f} | {kit_rate / batch:.1f} | "
              f"{kit_rate / naive_rate:.2f}x | {build_s:.1f} ({build_rate:.0f}) | {peak:.0f} | {build_peak:.0f} |")


if __name__ == "__main__":
    main()
