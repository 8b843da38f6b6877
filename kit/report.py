"""The validation report: accuracy with and without TTA, per-class metrics, confusion matrix, curves.

    python -m kit.report            # best weights of the last finished stage

Writes submissions/report/: summary.txt, metrics.json, confusion_matrix.png (with TTA) and
curves.png (every stage's accuracy and loss side by side).
"""

from __future__ import annotations

import argparse
import csv
import json
from typing import Sequence

import numpy as np

from kit.cli import add_workdir, main_guard
from kit.config import CLASS_NAMES, NUM_CLASSES, SEED, STEPS, VAL_FRACTION, Workdir
from kit.dataset import drop_unreadable, load_split
from kit.files import write_text
from kit.pipeline import DEFAULT_WORKERS, default_cache_root, open_training_cache
from kit.plots import plot_confusion, plot_curves
from kit.predict import LoadedModel, Predictor, add_model_options, model_from_args


def confusion(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class(matrix: np.ndarray) -> list[dict]:
    """Precision, recall, F1 and support per class, from the confusion matrix (rows: true)."""
    rows = []
    for k in range(NUM_CLASSES):
        tp, predicted, support = matrix[k, k], matrix[:, k].sum(), matrix[k].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": k, "model": CLASS_NAMES[k], "precision": precision, "recall": recall, "f1": f1,
                     "support": int(support)})
    return rows


def classification_report(rows: list[dict], accuracy: float) -> str:
    lines = [f"{'class':>5}  {'model':<22} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    lines += [f"{r['class']:>5}  {r['model']:<22} {r['precision']:>9.4f} {r['recall']:>7.4f} {r['f1']:>7.4f} "
              f"{r['support']:>8}" for r in rows]
    macro = np.mean([r["f1"] for r in rows])
    lines.append(f"{'':>5}  {'accuracy':<22} {accuracy:>25.4f} {sum(r['support'] for r in rows):>8}")
    lines.append(f"{'':>5}  {'macro F1':<22} {macro:>25.4f}")
    return "\n".join(lines)


def stage_histories(workdir: Workdir) -> dict[str, list[dict]]:
    histories = {}
    for step in STEPS:
        log = workdir.stage_dir(step) / "log.csv"
        if log.is_file():
            with open(log, newline="") as f:
                histories[f"stage {step}"] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return histories


def write_report(workdir: Workdir, loaded: LoadedModel, tta: int, seed: int, workers: int = DEFAULT_WORKERS) -> dict:
    """Evaluate on the saved validation split with one view and with `tta` views; write the report."""
    from kit.stages import read_manifest

    config = read_manifest(workdir)["config"] or {}
    split = load_split(workdir, config.get("val_fraction", VAL_FRACTION), config.get("seed", SEED))
    cache, position = open_training_cache(default_cache_root(workdir.cache), split, loaded.image_size, workers)
    val = drop_unreadable(split.val, cache.unreadable, "validation")
    images = [position[p] for p in val.path]
    labels = val.Category.to_numpy()
    view = _Subset(cache, images)
    results = {}
    for name, views in (("no TTA", 1), (f"TTA {max(tta, 1)}", max(tta, 1))):
        probs, _ = Predictor(loaded, views, seed, workers).predict_many(view, list(val.Id))
        predicted = probs.argmax(axis=1)
        results[name] = {"accuracy": float((predicted == labels).mean()), "matrix": confusion(labels, predicted)}
        if views == 1 and tta <= 1:
            break
    folder = workdir.report
    best_name = list(results)[-1]
    matrix = results[best_name]["matrix"]
    rows = per_class(matrix)
    plot_confusion(matrix, CLASS_NAMES, folder / "confusion_matrix.png",
                   f"validation, {best_name}: accuracy {results[best_name]['accuracy']:.4f}")
    plot_curves(stage_histories(workdir), folder / "curves.png")
    summary = [f"Model: {loaded.describe()}", f"Validation images: {len(val)}"]
    summary += [f"accuracy ({name}): {r['accuracy']:.4f}" for name, r in results.items()]
    summary += ["", f"Per class ({best_name}):", classification_report(rows, results[best_name]["accuracy"])]
    text = "\n".join(summary)
    write_text(folder / "summary.txt", text + "\n")
    metrics = {"model": loaded.describe(), "validation_images": len(val),
               "accuracy": {name: r["accuracy"] for name, r in results.items()}, "per_class": rows,
               "confusion_matrix": matrix.tolist()}
    write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
    print(text)
    print(f"Report written to {folder} (summary.txt, metrics.json, confusion_matrix.png, curves.png)")
    return metrics


class _Subset:
    """Images of a cache at given positions, indexable from 0."""

    def __init__(self, images, positions: list[int]):
        self.images, self.positions = images, positions

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[self.positions[index]]

    def __len__(self) -> int:
        return len(self.positions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    add_model_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir, loaded = model_from_args(args)
    write_report(workdir, loaded, args.tta, args.seed)
    return 0


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
