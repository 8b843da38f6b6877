"""What a folder of photos holds: the one folder walk with its skip rules, and the layouts the kit understands.

One walk (`scan_folder`) with one set of skip rules (hidden files, files that are not images, images
that are not whole photos) serves the download, `kit.predict --folder` and `kit.report --test-dir`.
The layouts: class folders (`<class>/*`, optionally below train/valid/test and any wrapper folders:
`folder_index`) and a competition's table of (image id, label) beside its images (`table_index`).
kit.dataset turns either into the dataset's index and description.
"""

from __future__ import annotations

import os
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import pandas as pd
from PIL import Image

from kit.cli import KitError
from kit.config import COMPETITION, COMPETITION_CLASSES

INDEX = "index.csv"  # the kit's own index of data/ (kit.dataset writes it): Id, Category, subset, path
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SUBSET_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
MAX_EXAMPLES = 10  # skipped files listed by name in the description, per reason


def image_files(root: Path) -> Iterator[Path]:
    """Every file under `root` (following a linked folder), in a stable order."""
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            yield Path(folder) / name


def is_hidden(relative: PurePosixPath) -> bool:
    """Dot files and folders, and the __MACOSX folder zips made on a Mac carry."""
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


def is_image(path: PurePosixPath) -> bool:
    """By extension, as a folder is listed; `image_problem` then looks inside, and decoding is checked later."""
    return path.suffix.lower() in IMAGE_SUFFIXES


# The first bytes of each format PIL decodes for the kit (whatever the file's extension says).
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# Where a whole file says it ends: JPEG's end-of-image marker, PNG's IEND chunk.
ENDS = {b"\xff\xd8\xff": b"\xff\xd9", b"\x89PNG\r\n\x1a\n": b"IEND"}
TAIL = 4096


def image_problem(path: Path) -> str | None:
    """Why a file named as an image is not a whole photo ('empty files', ...), from its first and last bytes; None
    when it looks whole.

    Cheap enough for every file at indexing (two small reads): a web page saved as .jpg or an empty file is
    caught by its first bytes, a cut JPEG or PNG by its missing end marker. Only a file without one (a cut upload,
    or a phone's motion photo with a video after the picture) is decoded to decide.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL))
            tail = f.read()
    except OSError:
        return "files that cannot be read"
    if not head:
        return "empty files"
    kind = next((magic for magic in MAGIC if head.startswith(magic)), None)
    if kind is None and not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "files named as images that are not (a web page or other file under an image's name)"
    if kind in ENDS and ENDS[kind] not in tail:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:  # noqa: BLE001 - PIL raises many types for a cut file
            return "damaged or truncated images"
    return None


@dataclass(frozen=True)
class FolderScan:
    """The images under a folder (paths relative to it) and what was skipped, by reason."""

    root: Path
    images: tuple[PurePosixPath, ...]
    skipped: dict[str, list[str]]

    @property
    def paths(self) -> list[Path]:
        return [self.root / p for p in self.images]


def scan_folder(root: Path, class_folders: bool = False, loose: bool = True, check: bool = True) -> FolderScan:
    """The one walk over a folder of photos, with the kit's skip rules: hidden files, files that are not images.

    With `class_folders`, an image counts only as <class>/<photo>: deeper ones are skipped, and loose
    photos at the top too unless `loose` (a test folder may hold either). With `check`, an image file that
    is not a whole photo (image_problem) is skipped too; without, it is kept for its reader to report.
    """
    images, skipped = [], defaultdict(list)
    for path in image_files(root):
        relative = PurePosixPath(path.relative_to(root).as_posix())
        depth = len(relative.parts)
        if is_hidden(relative):
            skipped["hidden files"].append(relative.as_posix())
        elif not is_image(relative):
            skipped["files that are not images"].append(relative.as_posix())
        elif class_folders and depth > 2:
            skipped["images in nested folders"].append(relative.as_posix())
        elif class_folders and depth == 1 and not loose:
            skipped["images outside a class folder"].append(relative.as_posix())
        elif check and (problem := image_problem(path)):
            skipped[problem].append(relative.as_posix())
        else:
            images.append(relative)
    return FolderScan(Path(root), tuple(images), dict(skipped))


def _child(folder: Path, names: Sequence[str]) -> Path | None:
    """The subfolder of `folder` called any of `names`, ignoring case."""
    for child in sorted(folder.iterdir()) if folder.is_dir() else ():
        if child.is_dir() and child.name.lower() in names:
            return child
    return None


def _has_class_folders(folder: Path) -> bool:
    """At least one subfolder holding images directly."""
    return any(child.is_dir() and not child.name.startswith(".") and any(
        f.is_file() and is_image(PurePosixPath(f.name)) for f in child.iterdir()) for child in folder.iterdir())


def find_split_root(root: Path, depth: int = 4) -> tuple[Path, dict[str, Path | None]]:
    """The folder holding train/ (and val/, test/) or the class folders themselves, below any wrapper folders.

    Archives often wrap the data (Stanford Cars' car_data/car_data/train/...), so the search goes
    breadth first through single folders before deciding.
    """
    level = [root]
    for _ in range(depth):
        for folder in level:
            train = _child(folder, SUBSET_NAMES["train"])
            if train is not None and _has_class_folders(train):
                return folder, {"train": train, "val": _child(folder, SUBSET_NAMES["val"]),
                                "test": _child(folder, SUBSET_NAMES["test"])}
        for folder in level:
            if _has_class_folders(folder) and _child(folder, SUBSET_NAMES["train"]) is None:
                return folder, {"train": folder, "val": None, "test": None}
        level = [child for folder in level for child in sorted(folder.iterdir())
                 if child.is_dir() and not is_hidden(PurePosixPath(child.name))]
    raise KitError(f"No class folders were found in {root}: expected train/<class>/<photos> (with optional "
                   "valid/<class>/ and test/<class>/ or test/<photos>), or <class>/<photos>. Point --from-dir "
                   "or --zip at such a folder or archive.")


def folder_index(root: Path, data: Path) -> tuple[pd.DataFrame, list[str], dict]:
    """Every image of a class-folder dataset with its class and subset; skipped files counted by reason."""
    split_root, subsets = find_split_root(root)
    skipped: dict[str, list[str]] = defaultdict(list)
    found: dict[str, dict[str, list[Path]]] = {}  # subset -> class ('' for unlabelled) -> files
    for subset, folder in subsets.items():
        if folder is None:
            continue
        # Loose validation photos are kept to be refused below with a message; loose training ones are skipped.
        scan = scan_folder(folder, class_folders=True, loose=subset != "train")
        prefix = PurePosixPath(folder.relative_to(split_root).as_posix())
        for reason, paths in scan.skipped.items():
            skipped[reason] += [(prefix / p).as_posix() for p in paths]
        found[subset] = defaultdict(list)
        for relative in scan.images:
            name = unicodedata.normalize("NFC", relative.parts[0]) if len(relative.parts) == 2 else ""
            found[subset][name].append(folder / relative)
    classes = sorted(name for name, files in found["train"].items() if files)
    if len(classes) < 2:
        passed = "; ".join(f"{len(paths)} {reason} (e.g. {paths[0]})" for reason, paths in skipped.items())
        raise KitError(f"{subsets['train']} has {len(classes)} class folder(s) with readable photos; a classifier "
                       "needs at least 2. Each class should be a folder of photos: train/<class>/<photo>."
                       + (f" Skipped: {passed}." if passed else ""))
    for subset in ("val", "test"):
        unknown = sorted(set(found.get(subset, {})) - set(classes) - {""})
        if unknown:
            raise KitError(f"{subsets[subset]} has class folders that the training folder lacks: "
                           f"{', '.join(unknown[:5])}. Every class of {subset} must also be a training class; "
                           "rename or remove those folders.")
    if "val" in found and found["val"].get(""):
        raise KitError(f"{subsets['val']} holds photos outside class folders; validation photos need their class: "
                       "put them in valid/<class>/.")
    if "test" in found and found["test"].get("") and len(found["test"]) > 1:
        raise KitError(f"{subsets['test']} mixes class folders and loose photos; use one or the other.")
    number = {name: k for k, name in enumerate(classes)}
    rows = [(path.relative_to(root).as_posix(), number.get(name), subset, path.relative_to(data).as_posix())
            for subset, by_class in found.items() for name, files in sorted(by_class.items()) for path in files]
    index = pd.DataFrame(rows, columns=["Id", "Category", "subset", "path"])
    index["Category"] = index.Category.astype("Int64")
    summary = {reason: {"count": len(paths), "examples": paths[:MAX_EXAMPLES]} for reason, paths in skipped.items()}
    return index, classes, summary


def find_tables(data: Path) -> tuple[Path, Path]:
    """The training table and the sample submission of a competition, the shallowest of each."""
    csvs = sorted(data.rglob("*.csv"), key=lambda p: (len(p.relative_to(data).parts), p.name))
    csvs = [p for p in csvs if p.name not in (INDEX,) and not is_hidden(PurePosixPath(p.relative_to(data).as_posix()))]
    samples = [p for p in csvs if "sample" in p.name.lower() or "submission" in p.name.lower()]
    trains = [p for p in csvs if p.stem.lower() in ("train", "labels", "train_labels", "trainlabels")]
    if not samples or not trains:
        raise KitError(f"{data} is not laid out as a competition: it needs a training table (train.csv or "
                       "labels.csv: image id, label) and a sample submission (sample_submission.csv). For a "
                       "folder of class folders, give the folder itself to --from-dir or --zip.")
    return trains[0], samples[0]


def read_table(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as error:
        raise KitError(f"{path} cannot be read as CSV ({error}). Delete it and run the download again.") from None
    if len(frame.columns) < 2:
        raise KitError(f"{path} should have an image id column and a label column but has {list(frame.columns)}. "
                       "Delete it and run the download again.")
    return frame


def ordered_labels(values) -> list[str]:
    """Label values in a stable order: numerically when they are all integers, else alphabetically."""
    values = sorted(set(values))
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return values


def table_index(data: Path, competition: str) -> tuple[pd.DataFrame, list[str], list[str], str]:
    """A competition's images: the training table's rows and the sample submission's, each with its file;
    the classes, their label values, and where the sample submission is (relative to `data`)."""
    train_csv, sample_csv = find_tables(data)
    train, sample = read_table(train_csv), read_table(sample_csv)
    id_column, label_column = train.columns[:2]
    if competition == COMPETITION:
        labels = [str(k) for k in range(len(COMPETITION_CLASSES))]
        classes = list(COMPETITION_CLASSES)
        outside = sorted(set(train[label_column]) - set(labels))
        if outside:
            raise KitError(f"The dataset in {data} is incomplete: {train_csv.name} has categories outside "
                           f"0..{len(labels) - 1}: {outside[:5]}. It is not {COMPETITION}'s table: delete it and "
                           f"run '{'python -m kit.download'}' again.")
    else:
        labels = ordered_labels(train[label_column])
        classes = labels
    files: dict[str, list[str]] = defaultdict(list)
    for relative in scan_folder(data).images:
        files[relative.name].append(relative.as_posix())
        files[relative.stem].append(relative.as_posix())  # tables often give ids without the extension
    number = {label: k for k, label in enumerate(labels)}
    rows, missing = [], defaultdict(list)
    for image_id, label in zip(train[id_column], train[label_column]):
        # The same name may sit in train/ and test/: prefer a folder named after the label, then not a test one.
        candidates = sorted(files.get(image_id, []),
                            key=lambda p: (label not in p.split("/")[:-1], "test" in p.lower()))
        if candidates:
            rows.append((image_id, number[label], "train", candidates[0]))
        else:
            missing["training"].append(f"{image_id} ({label})")
    for image_id in sample[sample.columns[0]]:
        candidates = sorted(files.get(image_id, []), key=lambda p: "test" not in p.lower())
        if candidates:
            rows.append((image_id, None, "test", candidates[0]))
        else:
            missing["test"].append(image_id)
    if missing:
        problems = [f"{len(ids)} {kind} images listed in the tables are missing (e.g. {ids[0]})"
                    for kind, ids in missing.items()]
        raise KitError(f"The dataset in {data} is incomplete: {'; '.join(problems)}. Run the download again to "
                       "finish it.")
    index = pd.DataFrame(rows, columns=["Id", "Category", "subset", "path"])
    index["Category"] = index.Category.astype("Int64")
    return index, classes, labels, sample_csv.relative_to(data).as_posix()
