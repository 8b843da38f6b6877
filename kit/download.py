"""Get a dataset into <workdir>/data, verified and described: from Kaggle, an archive, a folder, or synthetic.

    python -m kit.download                             # this competition, with the Kaggle API
    python -m kit.download --competition NAME          # another Kaggle image competition (CSV + images)
    python -m kit.download --dataset OWNER/SLUG        # a Kaggle dataset of class folders
    python -m kit.download --zip archive.zip           # an archive downloaded by hand (either layout)
    python -m kit.download --from-dir DIR              # a folder: Kaggle's attached input, or class folders
    python -m kit.download --synthetic                 # generated pictures in this competition's layout

Two layouts are understood. A competition's: a CSV of (image id, label), a sample submission, and
image folders (inner train.zip/test.zip are unpacked too). Class folders: `train/<class>/*` with
optional `valid|validation|val/<class>/*` (used as the validation split) and `test/<class>/*`
(labelled: the report evaluates on it) or `test/*` (unlabelled), or just `<class>/*`.

The description written last, data/dataset.json, holds the classes in order, the counts and the
source; every other command reads the classes from it. data/index.csv lists every image with its
class and subset. Files are written under temporary names and renamed when complete, so an
interrupted unpack is finished by the next run and never used half-done.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import unicodedata
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import pandas as pd
from tqdm.auto import tqdm

from kit.cli import KitError, add_workdir, main_guard
from kit.config import COMPETITION, COMPETITION_CLASSES, PROFILES, SEED, Workdir
from kit.files import atomic_path, write_text
from kit.kaggle_api import KaggleClient, kaggle_api, kaggle_errors, page_of

DESCRIPTION = "dataset.json"  # written last, once the layout is verified: the data is complete once it exists
OLD_MARKER = ".verified"  # what a work directory made before dataset.json holds instead
INDEX = "index.csv"  # Id, Category (class index; empty for unlabelled test images), subset, path
IMAGES = "images"  # where class-folder datasets live under data/ (unpacked, or a link to the folder)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SUBSET_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
MAX_EXAMPLES = 10  # skipped files listed by name in the description, per reason
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


# ---- describing what is in data/ ----------------------------------------------------------------

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
    """By extension, as a folder is listed; decoding is checked later, and unreadable photos are listed then."""
    return path.suffix.lower() in IMAGE_SUFFIXES


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
        found[subset] = defaultdict(list)
        for path in image_files(folder):
            relative = PurePosixPath(path.relative_to(folder).as_posix())
            shown = (PurePosixPath(path.relative_to(split_root).as_posix()).as_posix()
                     if folder != split_root else relative.as_posix())
            if is_hidden(relative):
                skipped["hidden files"].append(shown)
            elif not is_image(relative):
                skipped["files that are not images"].append(shown)
            elif len(relative.parts) == 1:
                if subset == "test":
                    found[subset][""].append(path)
                else:
                    skipped["images outside a class folder"].append(shown)
            elif len(relative.parts) == 2:
                found[subset][unicodedata.normalize("NFC", relative.parts[0])].append(path)
            else:
                skipped["images in nested folders"].append(shown)
    classes = sorted(name for name, files in found["train"].items() if files)
    if len(classes) < 2:
        raise KitError(f"{subsets['train']} has {len(classes)} class folder(s) with images; a classifier needs at "
                       "least 2. Each class should be a folder of photos: train/<class>/<photo>.")
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
    for path in image_files(data):
        relative = PurePosixPath(path.relative_to(data).as_posix())
        if is_image(relative) and not is_hidden(relative):
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


# ---- getting the files ---------------------------------------------------------------------------

def download(workdir: Workdir, api: KaggleClient | None = None, zip_path: Path | None = None,
             force: bool = False, from_dir: Path | None = None, competition: str | None = None,
             dataset: str | None = None) -> Description:
    """Make <workdir>/data a verified, described copy of the dataset; do nothing when it already is."""
    wanted = requested_origin(zip_path, from_dir, dataset, competition)
    if is_verified(workdir):
        held = read_description(workdir)
        if held.origin != wanted and (workdir.data / INDEX).is_file():  # kit 0.2 recorded no origin
            raise KitError(f"{workdir.data} already holds {held.origin} ({len(held.classes)} classes), not {wanted}. "
                           "A work directory holds one dataset and the runs trained on it: use another --workdir "
                           f"for {wanted} (or delete {workdir.data} to replace it).")
        if not force:
            print(f"The dataset in {workdir.data} is already verified; nothing to do.")
            return held
    for marker in (DESCRIPTION, OLD_MARKER):  # unverified while it changes
        (workdir.data / marker).unlink(missing_ok=True)
    if from_dir is not None:
        source = "folder"
        place_folder(Path(from_dir), workdir.data)
    elif zip_path is not None:
        source = "zip"
        unpack_archive(_given_archive(zip_path), workdir.data)
    elif dataset is not None:
        source = "kaggle-dataset"
        unpack_archive(fetch_dataset(workdir, dataset, api), workdir.data, class_folders=True)
    else:
        source = "kaggle"
        unpack_archive(fetch_competition(workdir, wanted, api), workdir.data, table=True)
    if (workdir.data / IMAGES).is_dir() and competition:
        raise KitError(f"--competition {competition} was given, but the data is a set of class folders, not a "
                       "competition's tables. Drop --competition for a class-folder dataset.")
    description = describe(workdir, source, wanted, competition)
    for inner in workdir.data.glob("*.zip"):  # unpacked and verified: gigabytes of duplicates on a Drive quota
        inner.unlink()
    print(description)
    return description


def requested_origin(zip_path: Path | None, from_dir: Path | None, dataset: str | None,
                     competition: str | None) -> str:
    """What the flags name: a competition however its files arrive, else the Kaggle dataset, archive or folder."""
    if dataset:
        return dataset
    if from_dir is not None and Path(from_dir).is_dir() and not is_table_folder(Path(from_dir)):
        return str(Path(from_dir).resolve())
    if zip_path is not None and _is_complete_zip(Path(zip_path)):
        with zipfile.ZipFile(zip_path) as z:
            if not is_table_archive(z.namelist()):
                return str(Path(zip_path).resolve())
    return competition or COMPETITION


def is_table_folder(folder: Path) -> bool:
    """A competition's files as Kaggle attaches them: CSVs at the top (class folders have none there)."""
    return any(folder.glob("*.csv"))


def place_folder(folder: Path, data: Path) -> None:
    """A competition's folder is copied (CSVs) and unpacked or linked; a class-folder tree is linked as is."""
    if not folder.is_dir():
        raise KitError(f"--from-dir {folder} is not a folder. Give the folder holding the data (on Kaggle, "
                       "/kaggle/input/<name>).")
    data.mkdir(parents=True, exist_ok=True)
    if is_table_folder(folder):
        for csv in folder.glob("*.csv"):
            shutil.copyfile(csv, data / csv.name)
        for inner in folder.glob("*.zip"):
            with _open_zip(inner) as z:
                _extract_all(z, data, f"unpacking {inner.name}")
        for sub in folder.iterdir():
            if sub.is_dir() and not (data / sub.name).exists():
                (data / sub.name).symlink_to(sub.resolve(), target_is_directory=True)
        return
    find_split_root(folder)  # refuse a folder with no class folders before linking it
    link = data / IMAGES
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(folder.resolve(), target_is_directory=True)


def _given_archive(zip_path: Path) -> Path:
    if not Path(zip_path).is_file():
        raise KitError(f"--zip {zip_path} does not exist. Give the path of an archive downloaded from Kaggle (or "
                       "any zip of class folders).")
    return Path(zip_path)


def fetch_competition(workdir: Workdir, competition: str, api: KaggleClient | None) -> Path:
    """The competition's archive: the one already downloaded, or a fresh download."""
    return _fetch(workdir.downloads / f"{competition}.zip", competition, f"{page_of(competition)}/data", api,
                  lambda client, folder: client.competition_download_files(competition, path=folder, force=False,
                                                                           quiet=False),
                  competition=competition)


def fetch_dataset(workdir: Workdir, dataset: str, api: KaggleClient | None) -> Path:
    """A Kaggle dataset's archive (OWNER/SLUG), downloaded once."""
    if dataset.count("/") != 1 or not all(dataset.split("/")):
        raise KitError(f"--dataset {dataset} should be OWNER/SLUG, as in the dataset's address: "
                       "https://www.kaggle.com/datasets/OWNER/SLUG (for example "
                       "jutrera/stanford-car-dataset-by-classes-folder).")
    return _fetch(workdir.downloads / f"{dataset.split('/')[1]}.zip", dataset, page_of(dataset=dataset), api,
                  lambda client, folder: client.dataset_download_files(dataset, path=folder, force=False,
                                                                       quiet=False, unzip=False),
                  dataset=dataset)


def _fetch(archive: Path, name: str, page: str, api: KaggleClient | None, call, **which: str) -> Path:
    """Download `archive` with `call(api, folder)` unless a complete copy is already there (a new session)."""
    if not _is_complete_zip(archive):
        api = api or kaggle_api()
        print(f"Downloading {name} from Kaggle into {archive.parent} ...")
        with kaggle_errors(f"Downloading {name}", **which):
            archive.parent.mkdir(parents=True, exist_ok=True)
            call(api, str(archive.parent))
        if not archive.is_file():
            raise KitError(f"The Kaggle API finished but {archive} is not there. Download the archive from {page} "
                           "by hand and run 'python -m kit.download --zip PATH'.")
    return archive


def _is_complete_zip(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def is_table_archive(names: Sequence[str]) -> bool:
    """A competition's archive: a training table and a sample submission among its CSVs."""
    files = [PurePosixPath(n).name.lower() for n in names]
    return (any(n.endswith(".csv") and ("sample" in n or "submission" in n) for n in files)
            and any(n in ("train.csv", "labels.csv", "train_labels.csv") for n in files))


def unpack_archive(archive: Path, data: Path, table: bool = False, class_folders: bool = False) -> None:
    """Unpack safely: a competition's archive (and its inner zips) into data/, class folders into data/images/."""
    data.mkdir(parents=True, exist_ok=True)
    with _open_zip(archive) as outer:
        names = outer.namelist()
        as_table = table or (not class_folders and is_table_archive(names))
        if table and not is_table_archive(names):
            raise KitError(f"{archive} is not a competition's archive: it should hold a training table "
                           "(train.csv) and a sample submission, with the images or their zips. Download it "
                           "again from the competition's data page.")
        target = data if as_table else data / IMAGES
        if not as_table and target.is_symlink():
            target.unlink()  # a folder linked by an earlier --from-dir
        target.mkdir(parents=True, exist_ok=True)
        _extract_all(outer, target, f"unpacking {archive.name}")
    if as_table:
        for inner in sorted(data.glob("*.zip")):
            with _open_zip(inner) as z:
                _extract_all(z, data, f"unpacking {inner.name}")


@contextlib.contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise KitError(f"{path} is not a readable zip archive ({error}); it is probably truncated or corrupt. "
                       "Delete it and download it again.") from None
    with z:
        yield z


def safe_member_path(root: Path, name: str) -> Path:
    """Where a member may be written; refuses anything that would land outside `root` (zip-slip)."""
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or ".." in member.parts or (member.parts and ":" in member.parts[0]):
        raise KitError(f"The archive member '{name}' would be written outside {root}; the archive was refused "
                       "and nothing of it is trusted. Download the archive from its page again.")
    target = (root / Path(*member.parts)).resolve()
    if root.resolve() not in target.parents and target != root.resolve():
        raise KitError(f"The archive member '{name}' would be written outside {root}; refused.")
    return target


def _extract_all(archive: zipfile.ZipFile, root: Path, label: str) -> None:
    members = [m for m in archive.infolist() if not m.is_dir()]
    targets = [safe_member_path(root, m.filename) for m in members]  # refuse before writing anything
    todo = [(m, t) for m, t in zip(members, targets) if not (t.is_file() and t.stat().st_size == m.file_size)]
    if not todo:
        return
    needed = sum(m.file_size for m, _ in todo)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise KitError(f"Not enough disk space to unpack: {needed / 2**30:.1f} GiB needed in {root}, "
                       f"{free / 2**30:.1f} GiB free. Free some space or use another --workdir.")
    with tqdm(total=needed, unit="B", unit_scale=True, desc=label, mininterval=1.0) as bar:
        for member, target in todo:
            try:
                with archive.open(member) as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except zipfile.BadZipFile as error:
                raise KitError(f"The archive is corrupt at '{member.filename}' ({error}). Delete it and download "
                               "it again.") from None
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise KitError(f"The disk filled up while unpacking {member.filename}. Free some space and "
                                   "run the command again: what was unpacked is kept.") from None
                raise
            bar.update(member.file_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--zip", type=Path, help="unpack this archive instead of downloading one")
    source.add_argument("--from-dir", type=Path,
                        help="a folder: a competition's files (Kaggle's attached input) or class folders")
    source.add_argument("--dataset", metavar="OWNER/SLUG", help="download a Kaggle dataset of class folders")
    source.add_argument("--synthetic", action="store_true", help="write a generated dataset in this competition's "
                                                                 "layout")
    parser.add_argument("--competition", metavar="NAME",
                        help=f"another Kaggle competition laid out as a CSV plus images (default {COMPETITION}); "
                             "with --zip or --from-dir, the competition those files are from")
    parser.add_argument("--force", action="store_true", help="unpack and verify again even if already verified")
    synthetic = parser.add_argument_group("--synthetic options (the smoke profile has its own defaults)")
    synthetic.add_argument("--per-class", type=int, help="training images per class (default 100)")
    synthetic.add_argument("--test", type=int, help="test images (default 50)")
    synthetic.add_argument("--seed", type=int, default=SEED)
    synthetic.add_argument("--size", help="typical image size WxH (default 640x480)")
    synthetic.add_argument("--ids-from", type=Path,
                           help="take Ids and class proportions from real competition CSVs in this folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES[args.profile]
    workdir = Workdir.resolve(args.workdir, profile)
    chosen = args.zip or args.from_dir or args.dataset or args.competition
    if args.synthetic or (profile.synthetic and not chosen):
        from kit.synthetic import write_synthetic

        settings = {"per_class": 100, "test": 50, "size": (640, 480), **profile.synthetic}
        given = {"per_class": args.per_class, "test": args.test, "size": args.size and parse_size(args.size)}
        settings.update({k: v for k, v in given.items() if v is not None})
        print(write_synthetic(workdir, seed=args.seed, ids_from=args.ids_from, **settings))
        return 0
    download(workdir, zip_path=args.zip, force=args.force, from_dir=args.from_dir, competition=args.competition,
             dataset=args.dataset)
    return 0


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise KitError(f"--size should look like 640x480, not '{text}'.") from None
    if w < 16 or h < 16:
        raise KitError(f"--size {text} is too small: use at least 16x16.")
    return w, h


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
