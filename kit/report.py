"""The report: accuracy with and without TTA, per-class metrics, confusion matrices, curves.

    python -m kit.report                   # validation split (and a labelled test folder, if the data has one)
    python -m kit.report --test-dir DIR    # also score a labelled class-folder set: DIR/<class>/<photos>

Writes submissions/report/: summary.txt, metrics.json, confusion_matrix.png (validation, with TTA),
confusion_matrix_test.png (the test set, when there is one), top_losses.png (the validation photos
the model got most wrong, with Grad-CAM's heat map of where it looked), curves.png (every stage's
accuracy and loss side by side), and validation_probabilities.csv (test_probabilities.csv) for
kit.ensemble. Metrics come from scikit-learn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.cam import explain, overlay
from kit.cli import EXIT_DONE, EXIT_STOPPED, KitError, add_workdir, main_guard
from kit.config import FINAL_FIT_STEP, STEPS, Workdir
from kit.dataset import load_resized, read_description, read_test
from kit.layout import scan_folder
from kit.files import write_text
from kit.inference import Predictor, score
from kit.manifest import read_log
from kit.pipeline import DEFAULT_WORKERS, Uncached, cache_short_side, open_cache
from kit.plots import plot_confusion, plot_curves, plot_gallery
from kit.predict import (VALIDATION_PROBABILITIES, LoadedModel, add_model_options, add_time_budget, check_classes,
                         expected_seconds, fits_budget, labelled_probability_table, model_from_args,
                         validation_probabilities, validation_set)
from kit.records import Budget

TOP_LOSSES = 16  # photos in the gallery: a 4x4 grid
GALLERY_SIDE = 192  # the gallery shows the photo itself (shorter side in pixels), not the model's crop


def per_class(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
    """The confusion matrix (rows: true) and precision, recall, F1 and support of every class."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    every = list(range(len(classes)))
    matrix = confusion_matrix(labels, predicted, labels=every)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=every,
                                                                     zero_division=0)
    rows = [{"class": k, "name": classes[k], "precision": float(precision[k]), "recall": float(recall[k]),
             "f1": float(f1[k]), "support": int(support[k])} for k in every]
    return matrix, rows


def classification_report(rows: list[dict], accuracy: float) -> str:
    width = max(22, min(40, max(len(r["name"]) for r in rows)))
    lines = [f"{'class':>5}  {'name':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    lines += [f"{r['class']:>5}  {r['name'][:width]:<{width}} {r['precision']:>9.4f} {r['recall']:>7.4f} "
              f"{r['f1']:>7.4f} {r['support']:>8}" for r in rows]
    macro = np.mean([r["f1"] for r in rows])
    lines.append(f"{'':>5}  {'accuracy':<{width}} {accuracy:>25.4f} {sum(r['support'] for r in rows):>8}")
    lines.append(f"{'':>5}  {'macro F1':<{width}} {macro:>25.4f}")
    return "\n".join(lines)


def stage_histories(workdir: Workdir) -> dict[str, list[dict]]:
    histories = {}
    for step in (*STEPS, FINAL_FIT_STEP):
        history = read_log(workdir, step)
        if history:
            histories["final fit" if step == FINAL_FIT_STEP else f"stage {step}"] = history
    return histories


def evaluate(loaded: LoadedModel, view_probs: np.ndarray, unreadable: dict[str, str],
             labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """Accuracy with one view and with all of them; the last one's matrix, per-class figures and probabilities.

    `view_probs` (photos, views, classes) come from one pass: view 0 is the plain one, the
    prediction without TTA, so both figures cost one pass instead of two.
    """
    views = view_probs.shape[1]
    results = {"no TTA": view_probs[:, 0]}
    if views > 1:
        results[f"TTA {views}"] = view_probs.mean(axis=1)
    scores = {name: score(probs, labels) for name, probs in results.items()}
    best = list(results)[-1]
    matrix, rows = per_class(labels[scores[best].scored], scores[best].predicted, loaded.classes)
    return {"accuracy": {name: s.accuracy for name, s in scores.items()}, "images": scores[best].images,
            "best": best, "per_class": rows, "confusion_matrix": matrix.tolist(),
            "unreadable": unreadable}, results[best]


def top_losses(probs: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Rows of the `count` photos with the highest cross-entropy loss, worst first (fastai's plot_top_losses)."""
    scored = np.flatnonzero(~np.isnan(probs).any(axis=1))
    losses = -np.log(np.clip(probs[scored, labels[scored]], 1e-12, 1))
    return scored[np.argsort(-losses, kind="stable")[:count]]


def write_top_losses(loaded: LoadedModel, probs: np.ndarray, labels: np.ndarray, paths: Sequence[str], path: Path,
                     count: int = TOP_LOSSES) -> None:
    """The gallery of the photos the model got most wrong, with true and predicted names and probabilities.

    Over each photo, Grad-CAM of the predicted class (kit.cam): what the model took for evidence.
    """
    classes, rows = loaded.classes, top_losses(probs, labels, count)
    photos = [load_resized(paths[k], GALLERY_SIDE) for k in rows]
    if loaded.has_gradients:
        seen = [load_resized(paths[k], cache_short_side(loaded.image_size)) for k in rows]
        explanations = explain(loaded, seen, [int(probs[k].argmax()) for k in rows])
        photos = [overlay(photo, explanation) for photo, explanation in zip(photos, explanations)]
    captions = [f"true: {classes[labels[k]]} ({probs[k, labels[k]]:.2f})\n"
                f"predicted: {classes[probs[k].argmax()]} ({probs[k].max():.2f})" for k in rows]
    where = "\nheat: where it looked for the predicted class (Grad-CAM)" if loaded.has_gradients else ""
    plot_gallery(photos, captions, path,
                 f"validation photos with the highest loss ({len(rows)} of {len(labels)}){where}")


def labelled_folder(folder: Path, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Photos of DIR/<class>/* with their class numbers; refuses class folders the model does not know."""
    if not folder.is_dir():
        raise KitError(f"--test-dir {folder} is not a folder. Give a folder of class folders: DIR/<class>/<photos>.")
    number = {name: k for k, name in enumerate(classes)}
    paths, labels, unknown = [], [], set()
    for relative in scan_folder(folder, class_folders=True, loose=False).images:
        if relative.parts[0] not in number:
            unknown.add(relative.parts[0])
            continue
        paths.append(str(folder / relative))
        labels.append(number[relative.parts[0]])
    if unknown:
        raise KitError(f"{folder} has class folders the model was not trained on: {', '.join(sorted(unknown)[:5])}. "
                       f"Its classes are: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}.")
    if not paths:
        raise KitError(f"No photos in class folders were found under {folder}: expected {folder}/<class>/<photo>.")
    return paths, np.asarray(labels)


def test_set(workdir: Workdir, loaded: LoadedModel, workers: int, test_dir: Path | None):
    """A labelled test set, from --test-dir or the dataset's labelled test folder; None when there is none."""
    if test_dir is not None:
        paths, labels = labelled_folder(Path(test_dir), loaded.classes)
        keys = [str(Path(p).relative_to(test_dir)) for p in paths]
        return Uncached(paths, loaded.image_size), keys, labels, paths, str(test_dir)
    if not read_description(workdir).test_labelled:
        return None
    test = read_test(workdir)
    cache = open_cache(workdir.cache, "test", list(test.path), loaded.image_size, workers)
    return cache, list(test.Id), test.Category.to_numpy(int), list(test.path), "the dataset's test folder"


def write_report(workdir: Workdir, loaded: LoadedModel, tta: int, seed: int, workers: int = DEFAULT_WORKERS,
                 test_dir: Path | None = None) -> dict:
    """Evaluate on the saved validation split (and a labelled test set) with one view and `tta` views."""
    check_classes(workdir, loaded)
    folder = workdir.report
    sections = {"validation": validation_set(workdir, loaded, workers)}
    test = test_set(workdir, loaded, workers, test_dir)
    if test is not None:
        sections["test"] = test[:4]
    metrics = {"model": loaded.describe(), "classes": list(loaded.classes), "final_fit": loaded.final_fit}
    summary = [f"Model: {loaded.describe()}"]
    views = max(tta, 1)
    for name, (images, keys, labels, paths) in sections.items():
        if name == "validation":  # scored once per model and view count: kit.predict may have done it already
            view_probs, unreadable = validation_probabilities(workdir, loaded, sections["validation"], views, seed,
                                                              workers, each_view=True)
        else:
            view_probs, unreadable = Predictor(loaded, views, seed, workers).predict_many(images, list(keys),
                                                                                         each_view=True)
        result, probs = evaluate(loaded, view_probs, unreadable, labels)
        result["held_out"] = not (name == "validation" and loaded.final_fit)
        metrics[name] = result
        if result["held_out"]:  # with the true class, for kit.ensemble to score combinations on the same photos
            write_text(folder / (VALIDATION_PROBABILITIES if name == "validation" else "test_probabilities.csv"),
                       labelled_probability_table(keys, probs, labels, loaded.classes).to_csv(index=False))
        else:
            (folder / VALIDATION_PROBABILITIES).unlink(missing_ok=True)
        if name == "validation":
            write_top_losses(loaded, probs, labels, paths, folder / "top_losses.png")
        source = f" ({test[4]})" if name == "test" else ""
        if not result["held_out"]:
            source = (" (the final fit trained on them: not a held-out score; report --stage "
                      f"{FINAL_FIT_STEP - 1} for the validated model's)")
        summary += ["", f"{name.capitalize()} images{source}: {result['images']}"]
        summary += [f"accuracy ({view}): {accuracy:.4f}" for view, accuracy in result["accuracy"].items()]
        summary += [f"unreadable, not scored: {', '.join(result['unreadable'])}"] if result["unreadable"] else []
        summary += [f"Per class ({result['best']}):",
                    classification_report(result["per_class"], result["accuracy"][result["best"]])]
        picture = folder / ("confusion_matrix.png" if name == "validation" else f"confusion_matrix_{name}.png")
        plot_confusion(np.asarray(result["confusion_matrix"]), loaded.classes, picture,
                       f"{name}, {result['best']}: accuracy {result['accuracy'][result['best']]:.4f}")
    plot_curves(stage_histories(workdir), folder / "curves.png")
    text = "\n".join(summary)
    write_text(folder / "summary.txt", text + "\n")
    write_text(folder / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    print(text)
    print(f"Report written to {folder} (summary.txt, metrics.json, confusion matrices, top_losses.png, curves.png, "
          "probabilities)")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    add_model_options(parser)
    parser.add_argument("--test-dir", type=Path, help="also evaluate on this labelled folder: DIR/<class>/<photos>")
    add_time_budget(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir, loaded = model_from_args(args)
    needed = expected_seconds(workdir, loaded, args.tta, test=read_description(workdir).test_labelled)
    if not fits_budget(Budget.minutes(args.time_budget), needed, "The report", "Run it again in a new session."):
        return EXIT_STOPPED
    write_report(workdir, loaded, args.tta, args.seed, test_dir=args.test_dir)
    return EXIT_DONE


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
