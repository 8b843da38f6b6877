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

Once the files are in place, kit.dataset indexes and verifies them and writes the description
(data/dataset.json, last) that every other command reads. Files are written under temporary names
and renamed when complete, so an interrupted unpack is finished by the next run and never used
half-done.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from kit.cli import KitError, add_workdir, main_guard
from kit.config import COMPETITION, PROFILES, SEED, Workdir
from kit.dataset import IMAGES, Description, describe, is_verified, mark_unverified, read_description
from kit.files import atomic_path
from kit.kaggle_api import KaggleClient, kaggle_api, kaggle_errors, page_of
from kit.layout import INDEX, find_split_root
from kit.synthetic import write_synthetic

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
    mark_unverified(workdir)
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
