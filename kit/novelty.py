"""Which photos show a car the model was never taught: far from every training photo, or no class likely.

A softmax always names one of its classes, often with confidence, for a car it has never seen (a
stanford5 model called a Toyota Land Cruiser "outlander, 98%"), so a probability threshold alone
cannot tell. The network's own features can: a photo of a known model lies near some training photo
of it in the head's feature space (the 256 activations before the classifier, L2-normalised), an
unknown car lies far from all of them. The score is the cosine distance to the k-th nearest training
photo (deep nearest neighbours, Sun et al., 2022, "Out-of-distribution detection with deep nearest
neighbors"), with k at 0.1% of the bank as the paper's k = 50 of 50,000; a low top probability flags a
photo too. Both thresholds are set on the validation photos, which the bank does not hold, so that
about PASSING of them pass, and are kept with the model (`known.npz`, arrays only: no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.files import atomic_path

FEATURES_LAYER = "head_bn"  # the head's features before dropout and the classifier (kit.backbones.build_model)
PASSING = 0.95  # share of the validation photos taken as known: each of the two rules lets 97.5% pass
MAX_BANK = 5000  # training photos kept, spread over the classes: the distance is one matrix product per photo
KNOWN = "known.npz"  # beside the weights or the exported model


@dataclass(frozen=True)
class Known:
    """The training photos' features and the two thresholds a photo must meet to be called a known car."""

    bank: np.ndarray  # (photos, features) float32, each row of unit length
    k: int
    max_distance: float  # cosine distance to the k-th nearest training photo
    min_probability: float  # the top class's probability
    weights: str = ""  # the sha256 of the weights the features came from ("" for an export's copy)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Each photo's cosine distance to its k-th nearest training photo."""
        similarity = normalised(features) @ self.bank.T
        k = min(self.k, len(self.bank))
        kth_nearest = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
        return 1.0 - kth_nearest

    def is_known(self, features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """True where a photo is near the training photos and its top class likely enough."""
        return (self.distances(features) <= self.max_distance) & (probabilities.max(axis=1) >= self.min_probability)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            np.savez(out, bank=self.bank.astype(np.float16), k=self.k, max_distance=self.max_distance,
                     min_probability=self.min_probability, weights=self.weights)

    @classmethod
    def load(cls, path: Path) -> "Known | None":
        """The saved bank and thresholds; None where there is no file or it is not one (it is then made again)."""
        try:
            with np.load(path) as saved:  # allow_pickle stays off: arrays and numbers only
                return cls(saved["bank"].astype(np.float32), int(saved["k"]), float(saved["max_distance"]),
                           float(saved["min_probability"]), str(saved["weights"]))
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def describe(self) -> dict:
        """The thresholds as model.json keeps them."""
        return {"file": KNOWN, "bank": len(self.bank), "k": self.k, "max_distance": round(self.max_distance, 6),
                "min_probability": round(self.min_probability, 6), "passing": PASSING}


def normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32).reshape(len(features), -1)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def learn(train_features: np.ndarray, val_features: np.ndarray, val_probabilities: np.ndarray,
        weights: str = "") -> Known:
    """The bank from the training photos' features; thresholds from the validation photos', which it lacks."""
    bank = normalised(train_features)
    k = max(1, round(0.001 * len(bank)))
    share = 1 - (1 - PASSING) / 2  # two rules, each letting this share pass: about PASSING pass both
    partial = Known(bank, k, np.inf, 0.0, weights)
    return Known(bank, k, float(np.quantile(partial.distances(val_features), share)),
                 float(np.quantile(val_probabilities.max(axis=1), 1 - share)), weights)


def bank_rows(labels: np.ndarray, limit: int = MAX_BANK) -> np.ndarray:
    """Which training photos the bank keeps: all up to `limit`, else an equal share of each class, evenly spaced."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    per_class = limit // len(np.unique(labels))
    rows = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return np.sort(np.concatenate([r[np.linspace(0, len(r) - 1, min(per_class, len(r))).astype(int)] for r in rows]))
