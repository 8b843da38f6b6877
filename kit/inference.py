"""Models to probabilities: TTA views in batches, and the one way validation photos are scored.

Everything that turns photos into class probabilities goes through `Predictor`: prediction, the
report, the demo, the export check, and the stages' own validation after every epoch, so a
validation accuracy means the same thing wherever it is printed. `score` turns probabilities and
true classes into the figures (loss, accuracy) with scikit-learn's metrics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from kit.augment import plain_transform, tta_transform, tta_views
from kit.config import SEED, TTA_VIEWS
from kit.dataset import UnreadableImage, load_resized
from kit.pipeline import DEFAULT_WORKERS, cache_short_side, ordered_map

VIEWS_PER_BATCH = 32  # model inputs per forward pass; the views of one image always travel together


class Servable(Protocol):
    """What a Predictor needs of a model: a loaded one (kit.predict.LoadedModel) or the one a stage trains."""

    model: object  # anything with predict_on_batch(uint8 views) -> probabilities
    image_size: int
    classes: tuple[str, ...]


class Predictor:
    """Class probabilities for photos, averaged over TTA views that are predicted in one batch."""

    def __init__(self, loaded: Servable, tta: int = TTA_VIEWS, seed: int = SEED, workers: int = DEFAULT_WORKERS,
                 batch_views: int = VIEWS_PER_BATCH):
        self.loaded, self.views, self.seed, self.workers = loaded, max(1, tta), seed, workers
        self.batch_views = batch_views  # model inputs per forward pass (whole images' views; at least one image)
        self.short_side = cache_short_side(loaded.image_size)

    def views_of(self, image: np.ndarray, key: str, transforms: tuple | None = None) -> np.ndarray:
        plain, extra = transforms or (plain_transform(self.loaded.image_size), tta_transform(self.loaded.image_size))
        return tta_views(image, self.loaded.image_size, self.views, key, self.seed, plain, extra)

    def predict_views(self, views: np.ndarray, pad_to: int = 0, each_view: bool = False) -> np.ndarray:
        """(images * views, size, size, 3) uint8 -> (images, classes), the views' mean; (images, views, classes)
        with `each_view`.

        `pad_to`: a shorter batch is padded to that many inputs and the padding's outputs dropped,
        so the last, short batch runs the program the full ones compiled (XLA compiles per shape).
        """
        rows = len(views)
        if rows < pad_to:
            views = np.concatenate([views, np.zeros((pad_to - rows, *views.shape[1:]), views.dtype)])
        probs = np.asarray(self.loaded.model.predict_on_batch(views), np.float64)[:rows]
        probs = probs.reshape(-1, self.views, len(self.loaded.classes))
        return probs if each_view else probs.mean(axis=1)

    def predict_image(self, source: str | Path | Image.Image, key: str = "upload") -> np.ndarray:
        """One photo (a path or a PIL image) -> probabilities; raises UnreadableImage."""
        return self.predict_views(self.views_of(load_resized(source, self.short_side), key))[0]

    def rank(self, source: str | Path | Image.Image, key: str = "upload") -> list[tuple[str, float]]:
        """Every car model with its probability, most likely first: the kit's answer for one photo."""
        return self.ranking(self.predict_image(source, key))

    def ranking(self, probs: np.ndarray) -> list[tuple[str, float]]:
        return [(self.loaded.classes[k], float(probs[k])) for k in np.argsort(-probs, kind="stable")]

    def predict_many(self, images, keys: Sequence[str], progress: bool = True,
                     each_view: bool = False) -> tuple[np.ndarray, dict[str, str]]:
        """Probabilities for images[i] (a cache or anything indexable), keyed by keys[i] for the TTA draws.

        Returns the probabilities (NaN rows for unreadable images) and {key: why} for those; with
        `each_view`, (images, views, classes): view 0, the plain one, is the prediction without TTA.
        """
        probs = np.full((len(keys), *([self.views] if each_view else []), len(self.loaded.classes)), np.nan)
        unreadable: dict[str, str] = {}
        bar = f"predicting (TTA {self.views})" if progress else ""
        for rows, views, pad_to in self._decoded(images, keys, bar, unreadable):
            probs[rows] = self.predict_views(views, pad_to=pad_to, each_view=each_view)
        return probs, unreadable

    def describe_many(self, images, keys: Sequence[str],
                      progress: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
        """The TTA probabilities, and each photo's plain view's head features and probabilities (what kit.novelty
        judges), from one decode and one pass per batch; NaN rows and {key: why} for unreadable photos.

        The features come from `loaded.features` (the head's layer as a model of its own) on view 0 of
        each photo, the view that predicts without TTA. `progress`: the progress bar's words ("": none).
        """
        probs = np.full((len(keys), len(self.loaded.classes)), np.nan)
        plain, features, unreadable = probs.copy(), None, {}
        for rows, views, pad_to in self._decoded(images, keys, progress, unreadable):
            each = self.predict_views(views, pad_to=pad_to, each_view=True)
            probs[rows], plain[rows] = each.mean(axis=1), each[:, 0]
            firsts = views[::self.views]
            padded = np.concatenate([firsts, np.zeros((pad_to // self.views - len(firsts), *firsts.shape[1:]),
                                                      firsts.dtype)])  # one shape: one compiled program
            out = np.asarray(self.loaded.features.predict_on_batch(padded), np.float32)[:len(firsts)]
            if features is None:
                features = np.full((len(keys), out[0].size), np.nan, np.float32)
            features[rows] = out.reshape(len(firsts), -1)
        return probs, np.zeros((len(keys), 0), np.float32) if features is None else features, plain, unreadable

    def _decoded(self, images, keys: Sequence[str], progress: str, unreadable: dict[str, str]):
        """(rows, their views, the batch's full size) per batch of whole photos, decoded and augmented by the
        workers in order; photos that cannot be read go into `unreadable`, with why."""
        per_batch = max(1, self.batch_views // self.views)
        chunks = [range(start, min(start + per_batch, len(keys))) for start in range(0, len(keys), per_batch)]
        local = threading.local()  # one pair of transforms per thread: reseeding a shared one would race

        def prepare(chunk: range) -> tuple[list[int], np.ndarray | None, int]:
            if not hasattr(local, "transforms"):
                local.transforms = (plain_transform(self.loaded.image_size), tta_transform(self.loaded.image_size))
            rows, stacks = [], []
            for i in chunk:
                try:
                    stacks.append(self.views_of(images[i], keys[i], local.transforms))
                    rows.append(i)
                except UnreadableImage as error:
                    unreadable[keys[i]] = str(error)
            return rows, np.concatenate(stacks) if stacks else None, len(chunk)

        with tqdm(total=len(keys), desc=progress, disable=not progress, mininterval=1.0) as bar:
            for rows, views, done in ordered_map(prepare, chunks, self.workers):
                if views is not None:
                    yield rows, views, per_batch * self.views
                bar.update(done)


class Subset:
    """Images of a cache at given positions, indexable from 0."""

    def __init__(self, images, positions: list[int]):
        self.images, self.positions = images, positions

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[self.positions[index]]

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class Scores:
    """How well probabilities match the true classes; unreadable photos (NaN rows) are listed, not scored."""

    loss: float  # mean cross-entropy
    accuracy: float
    images: int  # scored
    scored: np.ndarray  # which rows were scored
    predicted: np.ndarray  # the scored rows' predicted classes


def score(probs: np.ndarray, labels: np.ndarray) -> Scores:
    """Cross-entropy and accuracy (scikit-learn's) of the rows that have probabilities."""
    from sklearn.metrics import accuracy_score, log_loss  # late: the demo's image serves without scikit-learn

    scored = ~np.isnan(probs).any(axis=1)
    if not scored.any():
        return Scores(float("nan"), 0.0, 0, scored, np.zeros(0, int))
    kept, truth = probs[scored], np.asarray(labels)[scored]
    predicted = kept.argmax(axis=1)
    rows = kept / kept.sum(axis=1, keepdims=True)  # float16 outputs sum to 1 only roughly
    loss = log_loss(truth, rows, labels=np.arange(probs.shape[1]))
    return Scores(float(loss), float(accuracy_score(truth, predicted)), int(scored.sum()), scored, predicted)


def predict_labelled(loaded: Servable, images, keys: Sequence[str], labels: np.ndarray, tta: int = TTA_VIEWS,
                     seed: int = SEED, workers: int = DEFAULT_WORKERS, batch_views: int = VIEWS_PER_BATCH,
                     progress: bool = True, each_view: bool = False) -> tuple[np.ndarray, dict[str, str], Scores]:
    """The one validation path: labelled photos' probabilities with `tta` views (each view's, with `each_view`),
    what was unreadable, the scores (of the views' mean)."""
    probs, unreadable = Predictor(loaded, tta, seed, workers, batch_views).predict_many(images, keys, progress,
                                                                                      each_view)
    return probs, unreadable, score(probs.mean(axis=1) if each_view else probs, labels)
