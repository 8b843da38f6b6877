"""A generated dataset in exactly the competition's layout, for tests and the smoke run.

Each picture is a striped "car body" on a cluttered background. The class is carried by two cues
that the training augmentations keep: the body's hue family (five families 72 degrees apart, far
more than the colour jitter moves a hue) and the stripes' direction (horizontal or vertical, which
flips, crops and small rotations preserve). Everything else (size, position, clutter, noise) varies.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from kit.cli import KitError
from kit.config import COMPETITION, COMPETITION_CLASSES, Workdir
from kit.dataset import Description, describe, mark_unverified
from kit.files import named, write_text

TEST_LABELS = "test_labels.csv"  # the answers for a synthetic test set; the real one has none


def synthetic_image(label: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One picture of class `label`, roughly `size` (W, H) with +-15% variation."""
    w = int(size[0] * rng.uniform(0.85, 1.15))
    h = int(size[1] * rng.uniform(0.85, 1.15))
    # Background: a gray gradient plus low-saturation clutter, so no hue cue leaks from it.
    gradient = np.linspace(rng.uniform(40, 120), rng.uniform(120, 220), h)[:, None, None]
    canvas = np.repeat(np.repeat(gradient, w, axis=1), 3, axis=2)
    canvas += rng.normal(0, 12, canvas.shape)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        gray = int(rng.integers(30, 230))
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(min(w, h) // 20, min(w, h) // 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(gray, gray, int(gray * rng.uniform(0.9, 1.1)) % 256))
    # The body: hue family label // 2, stripes horizontal for even labels and vertical for odd ones.
    bw, bh = int(w * rng.uniform(0.45, 0.75)), int(h * rng.uniform(0.45, 0.75))
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    hue = ((label // 2) * 72 + rng.uniform(-8, 8)) % 360 / 360
    light = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)))
    dark = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.3, 0.45)))
    period = max(4, int(min(bw, bh) / rng.uniform(5, 7)))
    body = np.empty((bh, bw, 3), np.uint8)
    coord = np.arange(bh)[:, None] if label % 2 == 0 else np.arange(bw)[None, :]
    stripes = (coord // (period // 2)) % 2 == 0
    body[:] = np.where(stripes[..., None], np.array(light, np.uint8), np.array(dark, np.uint8))
    image.paste(Image.fromarray(body), (x0, y0))
    # Wheels, to look a little like a car and to add shape clutter.
    for cx in (x0 + bw // 4, x0 + 3 * bw // 4):
        r = max(2, bh // 6)
        draw.ellipse((cx - r, y0 + bh - r, cx + r, y0 + bh + r), fill=(20, 20, 20))
    return image


def write_synthetic(workdir: Workdir, per_class: int = 100, test: int = 50, seed: int = 42,
                    size: tuple[int, int] = (640, 480), ids_from: Path | None = None) -> Description:
    """Write train.csv, sample-submission.csv, train/<c>/<Id>, test_upload/<Id>; deterministic for a seed."""
    if per_class < 1 or test < 0:
        raise KitError("--per-class must be at least 1 and --test at least 0.")
    rng = np.random.default_rng(seed)
    train, test_ids = _choose_ids(rng, per_class, test, ids_from)
    test_labels = rng.integers(0, len(COMPETITION_CLASSES), len(test_ids))
    data = workdir.data
    mark_unverified(workdir)
    jobs = [(data / "train" / str(c) / i, c) for i, c in zip(train.Id, train.Category)]
    jobs += [(data / "test_upload" / i, int(c)) for i, c in zip(test_ids, test_labels)]
    for k, (path, label) in enumerate(tqdm(jobs, desc="synthetic images", mininterval=1.0)):
        # One generator per file, so any subset of files can be regenerated identically.
        image = synthetic_image(label, np.random.default_rng([seed, k]), size)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written in place, not through atomic_path (two fsyncs a file, half the time of 6,700 small ones): data/
        # is unverified until describe() writes its description last, so a kill mid-file leaves nothing a command
        # would read, and the next download writes every file again.
        try:
            image.save(path, format="JPEG", quality=90)
        except OSError as error:
            raise named(error, path) from error
    write_text(data / "train.csv", train.to_csv(index=False))
    write_text(data / "sample-submission.csv", pd.DataFrame({"Id": test_ids, "Category": 0}).to_csv(index=False))
    write_text(data / TEST_LABELS, pd.DataFrame({"Id": test_ids, "Category": test_labels}).to_csv(index=False))
    return describe(workdir, "synthetic", "synthetic pictures", COMPETITION)


def _choose_ids(rng: np.random.Generator, per_class: int, test: int,
                ids_from: Path | None) -> tuple[pd.DataFrame, list[str]]:
    if ids_from is None:
        numbers = rng.choice(np.arange(1, 400_000), per_class * len(COMPETITION_CLASSES) + test, replace=False)
        ids = [f"{n}.jpg" for n in numbers]
        labels = np.repeat(np.arange(len(COMPETITION_CLASSES)), per_class)
        return pd.DataFrame({"Id": ids[: len(labels)], "Category": labels}), ids[len(labels):]
    train_csv, sample_csv = Path(ids_from) / "train.csv", Path(ids_from) / "sample-submission.csv"
    if not (train_csv.is_file() and sample_csv.is_file()):
        raise KitError(f"--ids-from {ids_from} should hold the competition's train.csv and sample-submission.csv.")
    real = pd.read_csv(train_csv, dtype={"Id": str})
    # Keep the real class proportions: per_class * 10 images in all, each class its share.
    share = per_class * len(COMPETITION_CLASSES) / len(real)
    parts = [group.sample(max(1, round(len(group) * share)), random_state=int(rng.integers(2**31)))
             for _, group in real.groupby("Category")]
    train = pd.concat(parts).sort_index()  # the real file's order
    sample_ids = pd.read_csv(sample_csv, dtype={"Id": str}).Id.tolist()
    if test > len(sample_ids):
        raise KitError(f"--test {test} is more than the {len(sample_ids)} Ids of {sample_csv}.")
    keep = sorted(rng.choice(len(sample_ids), test, replace=False))
    return train.reset_index(drop=True)[["Id", "Category"]], [sample_ids[i] for i in keep]
