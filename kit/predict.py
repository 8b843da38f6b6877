"""Predict with test-time augmentation: the test set into a submission, or any folder of photos.

    python -m kit.predict                  # best weights of the last finished stage, TTA 10
    python -m kit.predict --tta 0          # one plain view per image
    python -m kit.predict --stage 4        # or --weights PATH
    python -m kit.predict --folder DIR     # every photo under DIR -> submissions/predictions.csv
    python -m kit.predict --views-per-batch 120   # a big GPU: more views per forward pass

For a competition: submissions/submission.csv in the sample submission's order and header, and
submissions/probabilities.csv (Id and one column per class, named after it) for ensembling.
For a class-folder dataset's test folder, or --folder: predictions.csv (Id, class, probability,
then every class's probability); --folder adds "known", False for a photo unlike every training
photo or with no likely class (kit.novelty: a car the model was never taught). An unreadable
image still gets a row (the class prior in a submission, no class in predictions.csv) and the
command exits non-zero with the list, so nothing is ever silently incomplete.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kit import checkpoint
from kit.cli import EXIT_STOPPED, KitError, add_cache_dir, add_workdir, main_guard
from kit.config import FINAL_FIT_STEP, PROFILES, SEED, STEPS, TTA_VIEWS, VAL_FRACTION, Workdir, stage_of
from kit.dataset import drop_unreadable, load_split, read_description, read_test, read_train
from kit.devices import cache_compilations, choose_precision
from kit.files import sha256, write_text
from kit.inference import VIEWS_PER_BATCH, Predictor, Subset, predict_labelled, score
from kit.layout import scan_folder
from kit.manifest import Manifest
from kit.novelty import FEATURES_LAYER, KNOWN, Known, bank_rows, learn
from kit.pipeline import DEFAULT_WORKERS, Uncached, open_cache, open_training_cache
from kit.records import Budget, RunConfig

METADATA = "model.json"  # beside an exported model (kit.export writes it): its classes, image size, stage
SUBMISSION, PREDICTIONS = "submission.csv", "predictions.csv"  # under <workdir>/submissions
VALIDATION_PROBABILITIES = "validation_probabilities.csv"  # under <workdir>/submissions/report


@dataclass
class LoadedModel:
    model: object  # keras.Model
    backbone: str
    stage: int | None
    image_size: int
    val_accuracy: float | None
    source: Path
    classes: tuple[str, ...]  # the model's outputs, in order, as the run was trained on them
    final_fit: bool = False  # trained on the validation images too: its validation score is not held out
    config: RunConfig | None = None  # the run it was trained in (seed, split), from the weights file; None for ONNX
    features: object | None = None  # predict_on_batch(views) -> the head's features (kit.novelty), where there are
    known: Known | None = None  # what the model was taught (kit.novelty), once computed for these weights

    def describe(self) -> str:
        stage = f"stage {self.stage}" if self.stage else "custom weights"
        stage += " (final fit on training + validation images)" if self.final_fit else ""
        accuracy = f", validation accuracy {self.val_accuracy:.4f}" if self.val_accuracy else ""
        return f"{self.backbone}, {stage}, {self.image_size} px{accuracy} ({self.source.name})"

    @property
    def has_gradients(self) -> bool:
        """A Keras model (Grad-CAM can run on it), not an exported one served by ONNX Runtime."""
        return not isinstance(self.model, OnnxModel)


def weights_path(workdir: Workdir, weights: Path | None = None, stage: int | None = None) -> Path:
    """The weights file to use; a message naming the command that makes them when there are none."""
    if weights is not None:
        if not Path(weights).is_file():
            raise KitError(f"--weights {weights} does not exist. Give a best.weights.npz written by "
                           "'python -m kit.stage' (under weights/stage_N/).")
        return Path(weights)
    manifest = Manifest.read(workdir)
    if stage is not None:
        if manifest.status(stage) != "done":
            raise KitError(f"Stage {stage} is not done in {workdir}, so it has no best weights yet. Run "
                           f"'{workdir.command('kit.stage', '--step', str(stage))}' (see "
                           f"'{workdir.command('kit.stage', '--status')}').")
        return manifest.best_weights(stage)
    stage = manifest.last_finished()
    if stage is None:
        raise KitError(f"No trained weights in {workdir.weights}. Train first with "
                       f"'{workdir.command('kit.stage', '--all')}' (or 'python -m kit --smoke' for a quick run), or "
                       "pass --weights PATH.")
    return manifest.best_weights(stage)


def load_model(path: Path, image_size: int | None = None, precision: str = "auto") -> LoadedModel:
    """Rebuild the model a weights file was trained as (its config travels inside it) and load it."""
    import keras

    from kit.backbones import build_model  # late, as Keras: ONNX serving and the CSV commands never load it

    try:
        arrays, state = checkpoint.read(path)
        config = RunConfig(**state["config"])
    except (checkpoint.CorruptCheckpoint, KeyError, TypeError) as error:
        raise KitError(f"{path} is not a usable weights file of this kit ({error}). Use a best.weights.npz "
                       "from weights/stage_N/.") from None
    step = state.get("stage")
    size = image_size or state.get("image_size") or stage_of(PROFILES[config.profile], step).image_size
    keras.mixed_precision.set_global_policy(choose_precision(precision))  # weights stay float32 either way
    model = build_model(config.backbone, size, len(config.classes), "none", config.head)
    try:
        checkpoint.assign_model(model, arrays, path)
    except checkpoint.IncompatibleCheckpoint as error:
        raise KitError(str(error)) from None
    features = keras.Model(model.input, model.get_layer(FEATURES_LAYER).output)
    known = Known.load(Path(path).parent / KNOWN)
    if known is not None and known.weights != weights_digest(Path(path)):
        known = None  # computed for other weights (the stage trained again): made again when asked for
    return LoadedModel(model, config.backbone, step, size, state.get("val_accuracy"), path, config.classes,
                       bool(state.get("final_fit")), config, features, known)


class OnnxModel:
    """An exported ONNX model on ONNX Runtime, with the one method Predictor calls: no TensorFlow, no Keras."""

    def __init__(self, path: Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def predict_on_batch(self, views: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(views, np.uint8)})[0]


FEATURES_ONNX = "features.onnx"  # beside model.onnx: the head's features, for telling an unknown car (kit.novelty)


def load_onnx(path: Path) -> LoadedModel:
    """An ONNX file written by kit.export, with the model.json beside it that names its classes and size."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".onnx":
        raise KitError(f"--model {path} is not an .onnx file. Write one with 'python -m kit.export' (it goes to "
                       "<workdir>/weights/export/model.onnx).")
    try:
        meta = json.loads((path.parent / METADATA).read_text())
        classes, size = tuple(meta["classes"]), int(meta["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KitError(f"{path.parent / METADATA} is missing or damaged ({error}): kit.export writes it beside the "
                       "model, with the class names and image size the model needs. Export again.") from None
    try:
        model = OnnxModel(path)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        raise KitError(f"{path} cannot be loaded by ONNX Runtime ({type(error).__name__}: "
                       f"{str(error).splitlines()[0][:200]}): it is damaged or not an ONNX model. Export it again "
                       "with 'python -m kit.export' (or copy it again, whole).") from None
    features = path.parent / FEATURES_ONNX
    known = Known.load(path.parent / KNOWN) if features.is_file() else None
    return LoadedModel(model, meta.get("backbone", "?"), meta.get("stage"), size, meta.get("val_accuracy"),
                       path, classes, bool(meta.get("final_fit")), None, OnnxModel(features) if known else None,
                       known)


def photo_features(loaded: LoadedModel, images, keys: Sequence[str], progress: str = "") -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """The head's features and the class probabilities of each readable image's plain view (what kit.novelty
    judges), in order; an image that cannot be read is left out."""
    _, features, plain, unreadable = Predictor(loaded, 1).describe_many(images, keys, progress)
    readable = [key not in unreadable for key in keys]
    return features[readable], plain[readable]


def learn_known(workdir: Workdir, loaded: LoadedModel) -> Known | None:
    """What the model was taught, for telling a car it never saw: computed once per weights file and kept beside it.

    Needs the run's split (the training photos make the bank, the validation photos set the thresholds), so a
    weights file from elsewhere, a final fit (no held-out photos) or an export without it gets None.
    """
    if loaded.known is not None or loaded.features is None or loaded.config is None or loaded.final_fit:
        return loaded.known
    if not workdir.split_csv.is_file():
        return None
    config = loaded.config
    split = load_split(workdir, config.val_fraction, config.seed, config.fold)
    train = split.train[split.train.subset != "pseudo"]  # the bank holds photos with their real labels
    train = train.iloc[bank_rows(train.Category.to_numpy())]
    print(f"Learning which cars the model knows: the features of {len(train)} training and {len(split.val)} "
          "validation photos (once per weights file)")
    bank, _ = photo_features(loaded, Uncached(list(train.path), loaded.image_size), list(train.Id), "training photos")
    val_features, val_probs = photo_features(loaded, Uncached(list(split.val.path), loaded.image_size),
                                             list(split.val.Id), "validation photos")
    loaded.known = learn(bank, val_features, val_probs, weights_digest(Path(loaded.source)))
    loaded.known.save(Path(loaded.source).parent / KNOWN)
    return loaded.known


def weights_digest(path: Path) -> str:
    stat = path.stat()
    return _digest(path, stat.st_mtime_ns, stat.st_size)


def class_prior(workdir: Workdir, num_classes: int) -> np.ndarray:
    counts = read_train(workdir).Category.value_counts().reindex(range(num_classes), fill_value=0).to_numpy()
    return counts / counts.sum()


def probability_table(keys: Sequence[str], probs: np.ndarray, classes: Sequence[str], key: str = "Id") -> pd.DataFrame:
    """One row per image: its key, then one column per class named after it (the order of the model's outputs)."""
    table = pd.DataFrame(probs, columns=list(classes)).round(6)
    table.insert(0, key, list(keys))
    return table


def predictions_table(keys: Sequence[str], probs: np.ndarray, classes: Sequence[str], key: str) -> pd.DataFrame:
    """Key, the predicted class and its probability, then every class's probability; no class where unreadable."""
    readable = ~np.isnan(probs).any(axis=1)
    best = np.where(readable, np.nan_to_num(probs).argmax(axis=1), 0)
    table = probability_table(keys, probs, classes, key)
    table.insert(1, "class", [classes[k] if ok else "" for k, ok in zip(best, readable)])
    table.insert(2, "probability", np.where(readable, np.nan_to_num(probs).max(axis=1), np.nan).round(6))
    return table


def labelled_probability_table(keys: Sequence[str], probs: np.ndarray, labels: np.ndarray,
                               classes: Sequence[str]) -> pd.DataFrame:
    """Key, the true class ('label'), then every class's probability: what kit.ensemble scores runs with."""
    table = probability_table(keys, probs, classes)
    table.insert(1, "label", [classes[k] for k in labels])
    return table


def validation_set(workdir: Workdir, loaded: LoadedModel, workers: int):
    """The run's validation images from the training cache, their Ids, labels and files."""
    config = loaded.config
    split = load_split(workdir, config.val_fraction if config else VAL_FRACTION, config.seed if config else SEED,
                       config.fold if config else "")
    cache, position = open_training_cache(workdir.cache, split, loaded.image_size, workers)
    val = drop_unreadable(split.val, cache.unreadable, "validation")
    return Subset(cache, [position[p] for p in val.path]), list(val.Id), val.Category.to_numpy(), list(val.path)


def validation_probabilities(workdir: Workdir, loaded: LoadedModel, validation, views: int, seed: int,
                             workers: int = DEFAULT_WORKERS, batch_views: int = VIEWS_PER_BATCH,
                             each_view: bool = False) -> tuple[np.ndarray, dict[str, str]]:
    """The probabilities of `validation` (what validation_set returns) with `views` views, and the photos that
    could not be read: computed once per model, view count and seed. With `each_view`, (photos, views,
    classes): view 0, the plain one, is the prediction without TTA, so the report needs one pass for both.

    kit.predict and kit.report both score the validation photos (a notebook runs one after the
    other): every view's probabilities are kept in report/validation_views<N>.npz with what they
    belong to (the weights file's sha256, the seed, the photos), and reused while all of it is unchanged.
    """
    images, keys, labels, _ = validation
    path = workdir.report / f"validation_views{max(views, 1)}.npz"
    weights = weights_digest(Path(loaded.source))
    made_of = {"weights": weights, "seed": seed, "image_size": loaded.image_size, "keys": keys}
    stored = checkpoint.read_state(path) or {}
    arrays = checkpoint.read(path)[0] if stored.get("made_of") == made_of else {}
    if "view_probs" in arrays:  # a file of an older kit kept only the mean: made again
        view_probs, unreadable = arrays["view_probs"], stored["unreadable"]
    else:
        view_probs, unreadable, _ = predict_labelled(loaded, images, keys, labels, views, seed, workers, batch_views,
                                                     each_view=True)
        checkpoint.write_arrays(path, {"view_probs": view_probs}, {"made_of": made_of, "unreadable": unreadable})
    return (view_probs if each_view else view_probs.mean(axis=1)), unreadable


@functools.lru_cache(maxsize=4)
def _digest(path: Path, mtime_ns: int, size: int) -> str:
    """A weights file's sha256, once per version of it (time and size are the key): the report asks at each
    view count, and B6's file is 170 MB."""
    return sha256(path)


def predict_validation(workdir: Workdir, loaded: LoadedModel, tta: int = TTA_VIEWS, seed: int = SEED,
                       workers: int = DEFAULT_WORKERS, batch_views: int = VIEWS_PER_BATCH) -> str:
    """The validation photos' probabilities with their true class, written for kit.ensemble; what was done.

    Skipped for a final-fit model, which trained on those photos (an older file is removed rather
    than left to describe another model), and where no run in the work directory owns a split.
    """
    path = workdir.report / VALIDATION_PROBABILITIES
    if loaded.final_fit:
        path.unlink(missing_ok=True)
        return "Validation not predicted: the final fit trained on those photos."
    if not workdir.split_csv.is_file():
        return f"Validation not predicted: no run in {workdir} holds a validation split."
    validation = validation_set(workdir, loaded, workers)
    probs, _ = validation_probabilities(workdir, loaded, validation, tta, seed, workers, batch_views)
    keys, labels = validation[1], validation[2]
    write_text(path, labelled_probability_table(keys, probs, labels, loaded.classes).to_csv(index=False))
    return (f"Validation accuracy (TTA {tta}): {score(probs, labels).accuracy:.4f}; probabilities in {path} (for "
            "kit.ensemble)")


def expected_seconds(workdir: Workdir, loaded: LoadedModel, tta: int, test: bool = True,
                     validation: bool = True) -> float:
    """What predicting the test photos and/or the validation ones with `tta` views takes, by the stages' timings.

    A stage times its validation (one view per photo) at each size; prediction is that per view.
    0 when nothing was measured at this size (a run trained elsewhere).
    """
    measured = Manifest.read(workdir).costs.get("by_size", {}).get(str(loaded.image_size), {}).get("validation")
    if not measured or not workdir.split_csv.is_file():
        return 0.0
    held_out = int((pd.read_csv(workdir.split_csv).fold == "val").sum())
    photos = (len(read_test(workdir)) if test else 0) + (held_out if validation else 0)
    return measured / max(held_out, 1) * max(tta, 1) * photos


def fits_budget(budget: Budget, seconds: float, what: str, again: str) -> bool:
    """Whether `what` fits in what is left of --time-budget; if not, says so and how to do it later."""
    if not budget.limited or seconds <= budget.left():
        return True
    print(f"{what} was not started: by the stages' timings it takes about {seconds / 60:.1f} min, and "
          f"{max(budget.left(), 0) / 60:.1f} min of the --time-budget are left. {again}")
    return False


def check_classes(workdir: Workdir, loaded: LoadedModel) -> None:
    """Refuse a model trained on other classes than the dataset's: its outputs would be misnamed."""
    classes = read_description(workdir).classes
    if tuple(classes) != tuple(loaded.classes):
        raise KitError(f"{loaded.source} was trained on {len(loaded.classes)} classes ({', '.join(loaded.classes[:3])}"
                       f", ...) and the dataset in {workdir.data} has {len(classes)} ({', '.join(classes[:3])}, ...). "
                       "Predict with that run's own work directory, or use --folder DIR to name photos with the "
                       "model's classes.")


def predict_test(workdir: Workdir, loaded: LoadedModel, tta: int = TTA_VIEWS, seed: int = SEED,
                 workers: int = DEFAULT_WORKERS,
                 batch_views: int = VIEWS_PER_BATCH) -> tuple[pd.DataFrame, dict[str, str], Path]:
    """The test set's predictions, written; returns the written table, the unreadable Ids and the file.

    A competition gets submission.csv (its sample submission's header, order and label values) and
    probabilities.csv; a class-folder dataset's test folder gets predictions.csv.
    """
    check_classes(workdir, loaded)
    description = read_description(workdir)
    test = read_test(workdir)
    if test.empty:
        raise KitError(f"The dataset in {workdir.data} has no test images. Name the photos of any folder with "
                       f"'{workdir.command('kit.predict', '--folder', 'DIR')}'.")
    cache = open_cache(workdir.cache, "test", list(test.path), loaded.image_size, workers)
    probs, unreadable = Predictor(loaded, tta, seed, workers, batch_views).predict_many(cache, list(test.Id))
    if description.sample_submission is None:
        table = predictions_table(test.Id, probs, loaded.classes, "Id")
        write_text(workdir.submissions / PREDICTIONS, table.to_csv(index=False))
        return table, unreadable, workdir.submissions / PREDICTIONS
    missing = np.isnan(probs).any(axis=1)
    if missing.any():
        probs[missing] = class_prior(workdir, len(loaded.classes))
    header = pd.read_csv(workdir.data / description.sample_submission, nrows=0).columns[:2]
    submission = pd.DataFrame({header[0]: test.Id,
                               header[1]: [description.labels[k] for k in probs.argmax(axis=1)]})
    write_text(workdir.submissions / SUBMISSION, submission.to_csv(index=False))
    write_text(workdir.submissions / "probabilities.csv",
               probability_table(test.Id, probs, loaded.classes).to_csv(index=False))
    return submission, unreadable, workdir.submissions / SUBMISSION


def predict_folder(folder: Path, loaded: LoadedModel, out: Path, tta: int = TTA_VIEWS, seed: int = SEED,
                   workers: int = DEFAULT_WORKERS,
                   batch_views: int = VIEWS_PER_BATCH) -> tuple[pd.DataFrame, dict[str, str]]:
    """predictions.csv for every photo under `folder` (paths relative to it); returns it and the unreadable."""
    if not Path(folder).is_dir():
        raise KitError(f"--folder {folder} is not a folder. Give a folder of photos (subfolders are searched too).")
    scan = scan_folder(Path(folder), check=False)  # a damaged photo gets its row and is listed, not skipped
    skipped = [path for paths in scan.skipped.values() for path in paths]
    if skipped:
        print(f"Skipped {len(skipped)} files that are not images: {', '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""))
    photos = scan.paths
    if not photos:
        raise KitError(f"No photos (.jpg, .png, .webp, ...) were found under {folder}.")
    keys = [p.relative_to(folder).as_posix() for p in photos]
    # Decoded once each, uncached: a folder is predicted once, so a cache would not pay off.
    predictor, images = Predictor(loaded, tta, seed, workers, batch_views), Uncached([str(p) for p in photos],
                                                                                     loaded.image_size)
    if loaded.known is None:
        probs, unreadable = predictor.predict_many(images, keys)
        table = predictions_table(keys, probs, loaded.classes, "path")
    else:  # kit.novelty too: is it one of the cars the model was taught? (from the same decode and views)
        probs, features, plain, unreadable = predictor.describe_many(images, keys,
                                                                     f"predicting (TTA {predictor.views})")
        table = predictions_table(keys, probs, loaded.classes, "path")
        readable = [i for i, key in enumerate(keys) if key not in unreadable]
        known = pd.Series(pd.NA, index=table.index, dtype="boolean")
        known.iloc[readable] = loaded.known.is_known(features[readable], plain[readable])
        table.insert(3, "known", known)
    write_text(out, table.to_csv(index=False))
    return table, unreadable


def add_model_options(parser: argparse.ArgumentParser, serving: bool = False, precision: bool = True) -> None:
    """Which model to load: shared by predict, report, export and demo (`serving`: an exported ONNX file too).

    Without `precision` the model is always built in float32 (export, the demo): its weights are
    float32 whatever the machine, and a mixed-precision graph is slower on a CPU and, in bfloat16,
    cannot run on ONNX Runtime's CPU provider at all.
    """
    which = parser.add_mutually_exclusive_group()
    if serving:
        which.add_argument("--model", type=Path, metavar="FILE.onnx",
                           help="an ONNX model written by kit.export, served by ONNX Runtime (no TensorFlow)")
    which.add_argument("--weights", type=Path, help="a best.weights.npz file (default: the last finished stage's)")
    which.add_argument("--stage", type=int, choices=(*STEPS, FINAL_FIT_STEP), metavar="N",
                       help=f"the best weights of stage N ({FINAL_FIT_STEP}: the final fit; default: the last done)")
    parser.add_argument("--image-size", type=int, help="default: the size that stage trained at")
    parser.add_argument("--tta", type=int, default=TTA_VIEWS, help=f"views per image, 0 for none (default {TTA_VIEWS})")
    parser.add_argument("--seed", type=int, help="seed of the TTA draws (default: the run's seed)")
    if precision:
        parser.add_argument("--precision", choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                            default="auto", help="auto: mixed precision on a GPU, float32 on a CPU")
    add_cache_dir(parser)


def add_time_budget(parser: argparse.ArgumentParser) -> None:
    """--time-budget for the commands after training: not started (exit 3) when it would not fit."""
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="do nothing (exit 3) unless the work fits before this many minutes have passed since "
                             "the session started ($KIT_SESSION_START) or this command did")


def model_from_args(args: argparse.Namespace) -> tuple[Workdir, LoadedModel]:
    workdir = Workdir.resolve(args.workdir, PROFILES[args.profile], args.cache_dir)
    if args.tta < 0:
        raise KitError("--tta is a number of views: 0 (none) or more.")
    if getattr(args, "model", None) is not None:
        if args.seed is None:
            args.seed = SEED
        return workdir, load_onnx(args.model)
    path = weights_path(workdir, args.weights, args.stage)  # no weights: said before a framework loads (10 s)
    cache_compilations(workdir.compiled)
    loaded = load_model(path, args.image_size, getattr(args, "precision", "float32"))
    if args.seed is None:  # the run's seed: TTA draws as its training did
        args.seed = loaded.config.seed
    return workdir, loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    add_model_options(parser)
    parser.add_argument("--folder", type=Path, help="predict every photo under this folder instead of the test set")
    parser.add_argument("--out", type=Path, help="with --folder: the CSV to write (default: "
                                                 "<workdir>/submissions/predictions.csv)")
    parser.add_argument("--validation", action=argparse.BooleanOptionalAction, default=True,
                        help="also predict the validation photos (with the test set) and write their probabilities "
                             "for kit.ensemble to compare runs on (default: on)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--views-per-batch", type=int, default=VIEWS_PER_BATCH, metavar="N",
                        help=f"model inputs per forward pass (default {VIEWS_PER_BATCH}); a GPU goes faster with more "
                             "(TTA 10 at 448 px on an H100: 120 is 1.16x 30, docs/performance.md)")
    add_time_budget(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out and not args.folder:
        raise KitError("--out goes with --folder; the test set's files are always written to <workdir>/submissions.")
    workdir, loaded = model_from_args(args)
    print(f"Model: {loaded.describe()}")
    needed = 0.0 if args.folder else expected_seconds(workdir, loaded, args.tta, validation=args.validation)
    if not fits_budget(Budget.minutes(args.time_budget), needed, "Prediction", "Run it again in a new session."):
        return EXIT_STOPPED
    workers, batch_views = max(1, args.workers), max(1, args.views_per_batch)
    if args.folder:
        learn_known(workdir, loaded)
        written = args.out or workdir.submissions / PREDICTIONS
        table, unreadable = predict_folder(args.folder, loaded, written, args.tta, args.seed, workers, batch_views)
    else:
        table, unreadable, written = predict_test(workdir, loaded, args.tta, args.seed, workers,
                                                  batch_views=batch_views)
        if args.validation:
            print(predict_validation(workdir, loaded, args.tta, args.seed, workers, batch_views))
    submitted = not args.folder and written.name == SUBMISSION  # a competition's test set
    print(f"Wrote {written}{' and probabilities.csv' if submitted else ''} ({len(table)} rows)")
    counts = (table.iloc[:, 1].map(dict(zip(read_description(workdir).labels, loaded.classes))) if submitted
              else table["class"]).value_counts()
    print("predicted per class: " + ", ".join(f"{name} {counts.get(name, 0)}" for name in loaded.classes))
    if unreadable:
        held = "the class prior" if submitted else "no class"
        print(f"error: {len(unreadable)} images could not be read; their rows hold {held}:")
        for key, why in unreadable.items():
            print(f"  {key}: {why}")
        return 1
    if submitted and read_description(workdir).source != "synthetic":  # kit.submit refuses synthetic pictures
        print(f"Next: {workdir.command('kit.submit', '--message', repr('your note'))}")
    return 0


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
