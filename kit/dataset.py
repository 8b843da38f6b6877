"""What a dataset is, for every command: its description, its index, decoding, the split.

kit.download gets the files into <workdir>/data; `describe` here indexes and verifies them (the
layouts it understands are kit.layout's) and writes data/index.csv (every image with its class and
subset) and, last, data/dataset.json (the classes in order, the counts and the source). Every later
command reads the classes from the description and the images from the index. Reading an image
lives here too, so training, prediction and the demo all see the same pixels.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from kit.cli import KitError
from kit.config import COMPETITION, COMPETITION_CLASSES, SEED, VAL_FRACTION, Workdir
from kit.files import sha256, write_bytes, write_text
from kit.layout import INDEX, folder_index, table_index

DESCRIPTION = "dataset.json"  # written last, once the layout is verified: the data is complete once it exists
OLD_MARKER = ".verified"  # what a work directory made before dataset.json holds instead
IMAGES = "images"  # where class-folder datasets live under data/ (unpacked, or a link to the folder)
SHOWN_CLASSES = 30  # classes printed in the summary; the description always holds all of them


@dataclass(frozen=True)
class Description:
    """What data/dataset.json says: where the data came from, its layout, classes in order, counts."""

    source: str  # kaggle, kaggle-dataset, zip, folder, synthetic (unknown: verified by an old kit)
    origin: str  # the competition, OWNER/SLUG, the archive or the folder
    layout: str  # "table" (a CSV of image id and label, plus image folders) or "class-folders"
    classes: tuple[str, ...]  # names, in the order of the model's outputs
    labels: tuple[str, ...]  # what a submission writes for each class (a table's label values)
    class_counts: tuple[int, ...]  # labelled training + validation images per class
    validation_images: int = 0  # from a labelled validation folder; 0: the kit draws a random split
    test_images: int = 0
    test_labelled: bool = False  # a class-folder test set the report can score
    competition: str | None = None  # the Kaggle competition a submission goes to, if any
    sample_submission: str | None = None  # its sample submission, relative to data/
    skipped: dict = field(default_factory=dict)  # reason -> {"count": n, "examples": [paths]}

    def __str__(self) -> str:
        width = max(22, min(40, max(len(c) for c in self.classes)))
        lines = [f"{self.origin} ({self.layout}): {len(self.classes)} classes", f"{'class':>5}  {'name':<{width}} "
                 f"{'images':>6}"]
        shown = list(enumerate(zip(self.classes, self.class_counts)))
        for k, (name, n) in shown[:SHOWN_CLASSES]:
            lines.append(f"{k:>5}  {name[:width]:<{width}} {n:>6}")
        if len(shown) > SHOWN_CLASSES:
            lines.append(f"{'':>5}  ... {len(shown) - SHOWN_CLASSES} more (all in {DESCRIPTION})")
        lines.append(f"{'':>5}  {'labelled total':<{width}} {sum(self.class_counts):>6}")
        if self.validation_images:
            lines.append(f"{'':>5}  {'of which validation':<{width}} {self.validation_images:>6}")
        kind = "test images (labelled)" if self.test_labelled else "test images"
        lines.append(f"{'':>5}  {kind:<{width}} {self.test_images:>6}")
        for reason, what in self.skipped.items():
            lines.append(f"skipped {what['count']} {reason}: {', '.join(what['examples'][:3])}"
                         + (" ..." if what["count"] > 3 else ""))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"format": 2, **dataclasses.asdict(self)}, indent=2, ensure_ascii=False)


def competition_description(source: str = "unknown") -> Description:
    """This competition as a work directory verified before descriptions existed knows it."""
    return Description(source, COMPETITION, "table", COMPETITION_CLASSES,
                       tuple(str(k) for k in range(len(COMPETITION_CLASSES))), (0,) * len(COMPETITION_CLASSES),
                       competition=COMPETITION, sample_submission="sample-submission.csv")


def read_description(workdir: Workdir) -> Description:
    """The verified dataset's description; a message naming the download command when there is none."""
    require_dataset(workdir)
    path = workdir.data / DESCRIPTION
    if not path.is_file():
        return competition_description()
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != 2:  # written by kit 0.2: this competition, with its classes
            return competition_description(saved.get("source", "unknown"))
        saved.pop("format")
        for key in ("classes", "labels", "class_counts"):
            saved[key] = tuple(saved[key])
        return Description(**saved)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise damaged_data(workdir, path, error) from None


def damaged_data(workdir: Workdir, path: Path, error: Exception) -> KitError:
    """The paragraph for a damaged dataset.json or index.csv: the photos and the run are intact, the file is redone."""
    return KitError(f"{path} is damaged ({type(error).__name__}: {error}). The photos beside it and the run's "
                    f"weights are intact: run the kit.download command you downloaded with again, adding --force "
                    f"(e.g. '{workdir.command('kit.download', '--force')}'); it verifies the data again and rewrites "
                    "the file.")


def is_verified(workdir: Workdir) -> bool:
    return (workdir.data / DESCRIPTION).is_file() or (workdir.data / OLD_MARKER).is_file()


def require_dataset(workdir: Workdir) -> None:
    """Refuse to train or predict on a dataset that was not fully unpacked and verified."""
    if not is_verified(workdir):
        raise KitError(f"No verified dataset in {workdir.data}. Run '{workdir.command('kit.download')}' first "
                       "(this competition, with Kaggle credentials; add --competition NAME or --dataset "
                       "OWNER/SLUG for other Kaggle data, --zip ARCHIVE for an archive downloaded by hand, "
                       "--from-dir DIR for a folder, or --synthetic for generated pictures).")


def mark_unverified(workdir: Workdir) -> None:
    """Remove the description first: data/ is unverified while it changes, so no command uses it half-done."""
    for marker in (DESCRIPTION, OLD_MARKER):
        (workdir.data / marker).unlink(missing_ok=True)


# ---- what is in data/ ----------------------------------------------------------------

def describe(workdir: Workdir, source: str, origin: str, competition: str | None = None) -> Description:
    """Index and verify the data, then write index.csv and, last, dataset.json."""
    data = workdir.data
    if (data / IMAGES).is_dir():
        layout, competition = "class-folders", None
        index, classes, skipped = folder_index(data / IMAGES, data)
        labels, sample = classes, None
    else:
        layout, competition, skipped = "table", competition or COMPETITION, {}
        index, classes, labels, sample = table_index(data, competition)
    labelled = index[index.Category.notna()]
    counts = labelled[labelled.subset != "test"].Category.astype(int).value_counts()
    test = index[index.subset == "test"]
    description = Description(
        source, origin, layout, tuple(classes), tuple(labels),
        tuple(int(counts.get(k, 0)) for k in range(len(classes))), int((index.subset == "val").sum()),
        len(test), bool(len(test)) and bool(test.Category.notna().all()), competition, sample, skipped)
    (data / OLD_MARKER).unlink(missing_ok=True)
    write_text(data / INDEX, index.to_csv(index=False))
    write_text(data / DESCRIPTION, description.to_json())
    return description


MAX_PIXELS = 40_000_000  # a 40-megapixel photo is already far more than any ad photo needs

cv2.setNumThreads(1)  # the loaders parallelise over images; nested OpenCV threads only fight them


class UnreadableImage(ValueError):
    """The file is not an image we can decode (corrupt, truncated, not an image, too large)."""


def open_image(source: str | Path | Image.Image) -> Image.Image:
    """An upright RGB PIL image from a path or an image, whatever its mode, EXIF rotation or alpha."""
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        if image.width * image.height > MAX_PIXELS:
            raise UnreadableImage(f"the image is {image.width}x{image.height} pixels; the limit is "
                                  f"{MAX_PIXELS // 1_000_000} megapixels")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert("RGB")
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("it is not an image format we can decode") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        reason = str(error).split(" /")[0] or type(error).__name__  # no temp paths in messages
        raise UnreadableImage(f"the image is damaged or truncated: {reason}") from None


def resized_short_side(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(W, H) with the shorter side `short_side`, never enlarging the original."""
    scale = min(1.0, short_side / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_resized(source: str | Path | Image.Image, short_side: int) -> np.ndarray:
    """Decode and shrink so the shorter side is `short_side`: the pixels the cache stores.

    The cached and uncached paths both go through this function, so they agree pixel for pixel.
    """
    image = open_image(source)
    if image.width < 2 or image.height < 2:
        image = image.resize((2, 2))
    w, h = resized_short_side(image.width, image.height, short_side)
    array = np.asarray(image)
    if (w, h) == (image.width, image.height):
        return np.ascontiguousarray(array)
    return cv2.resize(array, (w, h), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class Split:
    """Training and validation Ids, labels and file paths."""

    train: pd.DataFrame  # columns Id, Category, path
    val: pd.DataFrame


def read_index(workdir: Workdir) -> pd.DataFrame:
    """Every image of the dataset: Id, Category (NA for unlabelled test images), subset, absolute path."""
    description = read_description(workdir)
    path = workdir.data / INDEX
    if path.is_file():
        try:
            index = pd.read_csv(path, dtype={"Id": str, "subset": str, "path": str}, keep_default_na=False,
                                na_values={"Category": [""]})
            missing = {"Id", "Category", "subset", "path"} - set(index.columns)
            if missing:
                raise ValueError(f"no column {', '.join(sorted(missing))}")
            index["Category"] = index.Category.astype("Int64")
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            raise damaged_data(workdir, path, error) from None
        listed = (index.subset != "test").sum(), (index.subset == "test").sum()
        if sum(description.class_counts) and listed != (sum(description.class_counts), description.test_images):
            raise damaged_data(workdir, path, ValueError(
                f"it lists {listed[0]} labelled and {listed[1]} test images, dataset.json counts "
                f"{sum(description.class_counts)} and {description.test_images}"))
    else:  # verified by kit 0.2, before index.csv: this competition's tables say it all
        index = table_index(workdir.data, description.competition or COMPETITION)[0]
    index["path"] = [str(workdir.data / p) for p in index.path]
    return index


def read_train(workdir: Workdir) -> pd.DataFrame:
    """The labelled training images (a validation folder's too), each with its position in the image cache."""
    index = read_index(workdir)
    frame = index[index.subset != "test"].reset_index(drop=True)
    frame["Category"] = frame.Category.astype(int)
    frame["row"] = np.arange(len(frame))  # position in the image cache of all training images
    return frame


def read_test(workdir: Workdir) -> pd.DataFrame:
    """The test images in the sample submission's (or the folder's) order, with their labels where known."""
    index = read_index(workdir)
    return index[index.subset == "test"].reset_index(drop=True)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of validation rows holding `val_fraction` of every class."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = rows[rng.permutation(len(rows))]
        is_val[rows[: round(len(rows) * val_fraction)]] = True
    return is_val


def fold_split(labels: np.ndarray, fold: str, seed: int) -> np.ndarray:
    """A boolean mask of the validation rows of fold "K/N" of a stratified N-fold split (scikit-learn's).

    The same labels and seed give the same N folds in any process, so N work directories (one per
    fold) share one partition and together validate every image exactly once.
    """
    from sklearn.model_selection import StratifiedKFold

    k, n = parse_fold(fold)
    with warnings.catch_warnings():  # a class smaller than N simply misses some folds
        warnings.simplefilter("ignore", UserWarning)
        folds = list(StratifiedKFold(n_splits=n, shuffle=True, random_state=seed).split(labels, labels))
    is_val = np.zeros(len(labels), bool)
    is_val[folds[k - 1][1]] = True
    return is_val


def parse_fold(fold: str) -> tuple[int, int]:
    """ "2/5" -> (2, 5), refusing anything else with the form it takes."""
    try:
        k, n = (int(part) for part in fold.split("/"))
    except ValueError:
        raise KitError(f"--fold takes K/N (fold K of N, e.g. 1/5), not '{fold}'.") from None
    if not (n >= 2 and 1 <= k <= n):
        raise KitError(f"--fold {fold}: N must be at least 2 and K between 1 and N.")
    return k, n


def load_split(workdir: Workdir, val_fraction: float = VAL_FRACTION, seed: int = SEED, fold: str = "",
               pseudo_labels: Path | None = None) -> Split:
    """The split saved in the work directory, computed and saved on first use.

    Every stage and every resumed run must see the same validation images, or stage-to-stage
    accuracies would not compare and validation images would leak into training. A fold ("K/N")
    takes the Kth of N stratified folds; else a labelled validation folder is the split, if the
    dataset has one; else `val_fraction` of each class at random. Pseudo-labelled test photos
    join the training side only, after the split, so validation stays real labels.
    """
    frame = read_train(workdir)
    legacy = workdir.data / "split.csv"  # where runs started before 2026-11-22 kept it
    if legacy.is_file() and not workdir.split_csv.is_file():
        write_text(workdir.split_csv, legacy.read_text())
    if workdir.split_csv.is_file():
        is_val = saved_split(workdir, frame)
    else:
        if fold:
            is_val = fold_split(frame.Category.to_numpy(), fold, seed)
        elif (frame.subset == "val").any():
            is_val = (frame.subset == "val").to_numpy()
        else:
            is_val = stratified_split(frame.Category.to_numpy(), val_fraction, seed)
        fold = np.where(is_val, "val", "train")
        write_text(workdir.split_csv, frame[["Id", "Category"]].assign(fold=fold).to_csv(index=False))
    train = frame[~is_val]
    if pseudo_labels is not None:
        train = pd.concat([train, read_pseudo_labels(pseudo_labels, workdir)])
    return Split(train.reset_index(drop=True), frame[is_val].reset_index(drop=True))


def saved_split(workdir: Workdir, frame: pd.DataFrame) -> np.ndarray:
    """The saved split's validation mask over `frame`; a damaged file and changed data are told apart.

    The split is a function of the photos and the run's seed, so a damaged file is redone exactly
    by deleting it; only photos the run never saw mean the data changed.
    """
    path = workdir.split_csv
    redo = (f"The split is computed from the photos and the run's seed, so deleting {path} makes the kit write "
            "the same one again; the run's weights are intact.")
    try:
        if not path.read_bytes().endswith(b"\n"):  # the kit writes whole lines: the last one was cut
            raise ValueError("its last line is cut short")
        saved = pd.read_csv(path, dtype={"Id": str})
        if not {"Id", "fold"} <= set(saved.columns):
            raise ValueError(f"columns {', '.join(map(str, saved.columns))}, not Id, Category, fold")
    except (ValueError, UnicodeDecodeError) as error:
        raise KitError(f"{path} is damaged ({error}). {redo}") from None
    listed, images = set(saved.Id), set(frame.Id)
    if listed - images:
        raise KitError(f"The saved split {path} names {len(listed - images)} photos that {workdir.data} does not "
                       f"have (e.g. {sorted(listed - images)[0]}): the data changed since the run started. Download "
                       f"the dataset the run started with again, or train a new run in another --workdir.")
    if listed != images or saved.fold.isin(["train", "val"]).sum() != len(saved):
        raise KitError(f"{path} is damaged: it lists {len(listed & images)} of the run's {len(images)} training "
                       f"images (cut short?). {redo}")
    return frame.Id.map(dict(zip(saved.Id, saved.fold == "val"))).to_numpy(bool)


def read_pseudo_labels(path: Path, workdir: Workdir) -> pd.DataFrame:
    """A pseudo-label list (kit.pseudo) as training rows: test photos of this dataset, with the class it names.

    Classes are matched by name, so a list made by any run on this dataset fits; Ids must be the
    dataset's test photos (never a training or validation photo, which have real labels).
    """
    try:
        table = pd.read_csv(path, dtype={"Id": str, "class": str}, keep_default_na=False)
        table = table[["Id", "class"]]
    except (OSError, ValueError, KeyError) as error:
        raise KitError(f"{path} is not a pseudo-label list ({error}). Write one with 'python -m kit.pseudo --from "
                       "RUN --threshold P'.") from None
    classes = read_description(workdir).classes
    number = {name: k for k, name in enumerate(classes)}
    unknown = sorted(set(table["class"]) - set(number))
    test = read_test(workdir).set_index("Id")
    strangers = table.Id[~table.Id.isin(test.index)]
    if unknown or len(strangers):
        raise KitError(f"{path} does not fit the dataset in {workdir.data}: "
                       + "; ".join(part for part in (
                           unknown and f"classes it does not have ({', '.join(unknown[:3])})",
                           len(strangers) and f"{len(strangers)} Ids that are not its test photos (e.g. "
                                              f"{', '.join(strangers[:3])})") if part)
                       + ". Make the list from a run on this dataset.")
    rows = test.loc[table.Id]
    return pd.DataFrame({"Id": table.Id.to_numpy(), "Category": table["class"].map(number).to_numpy(int),
                         "subset": "pseudo", "path": rows.path.to_numpy()})


def keep_pseudo_labels(workdir: Workdir, source: Path) -> None:
    """Copy the list into the run (once, when it starts), after checking it fits this dataset."""
    if workdir.pseudo_labels.is_file() and sha256(workdir.pseudo_labels) == sha256(source):
        return  # the run's own copy (run_config has refused any other list once the run started)
    rows = read_pseudo_labels(source, workdir)
    write_bytes(workdir.pseudo_labels, source.read_bytes())
    print(f"Training on {len(rows)} pseudo-labelled test photos as well ({source}; kept as {workdir.pseudo_labels})")


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """'Balanced' weights n / (classes * count), one per class, so every class pulls equally on the loss."""
    counts = np.bincount(labels, minlength=num_classes)
    return np.array([len(labels) / (num_classes * n) if n else 0.0 for n in counts], np.float32)


def drop_unreadable(frame: pd.DataFrame, unreadable: dict[str, str], what: str) -> pd.DataFrame:
    """Exclude images that could not be decoded, saying which; nothing disappears silently."""
    if not unreadable:
        return frame
    bad = frame.path.isin(unreadable)
    if bad.any():
        print(f"{bad.sum()} {what} images could not be read and are excluded:")
        for path in frame.path[bad]:
            print(f"  {Path(path).name}: {unreadable[path]}")
    return frame[~bad].reset_index(drop=True)
