"""Get the competition data into <workdir>/data, verified: from Kaggle, from a zip, or synthetic.

    python -m kit.download                      # Kaggle API (credentials needed)
    python -m kit.download --zip archive.zip    # an archive downloaded by hand
    python -m kit.download --from-dir DIR       # the competition attached to a Kaggle notebook
    python -m kit.download --synthetic          # generated pictures in the same layout

The archive holds train.zip and test.zip; both are unpacked too. Every file is written under a
temporary name and renamed when complete, so an interrupted unpack is finished by the next run and
never used half-done.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Protocol, Sequence

import pandas as pd
from tqdm.auto import tqdm

from kit.cli import KitError, add_workdir, main_guard
from kit.config import CLASS_NAMES, COMPETITION, COMPETITION_URL, NUM_CLASSES, PROFILES, SEED, Workdir
from kit.files import atomic_path, write_text

INNER_ARCHIVES = ("train.zip", "test.zip")
CSV_FILES = ("train.csv", "sample-submission.csv")
DESCRIPTION = "dataset.json"  # written last, once the layout is verified: where the data came from, its classes
OLD_MARKER = ".verified"  # what a work directory made before dataset.json holds instead

CREDENTIALS_HELP = (
    "Kaggle credentials were not found. Give them in any one of these ways, then run the command again: "
    "set KAGGLE_API_TOKEN to a token from https://www.kaggle.com/settings/api (or save it to "
    "~/.kaggle/access_token); or set KAGGLE_USERNAME and KAGGLE_KEY; or put kaggle.json (from 'Create Legacy "
    "API Key' on the same page) in ~/.kaggle/kaggle.json, or in the folder named by KAGGLE_CONFIG_DIR, with "
    "chmod 600; or run 'kaggle auth login'. On Colab, add KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN) "
    "in the Secrets panel (the key icon) and let the notebook copy them into the environment. On Kaggle no "
    "credentials are needed: attach the competition as input data and run 'python -m kit.download --from-dir "
    f"/kaggle/input/{COMPETITION}'."
)


class KaggleClient(Protocol):
    """The slice of kaggle's KaggleApi the kit uses; tests hand in an object of this shape."""

    def competition_download_files(self, competition: str, path: str | None = None, force: bool = False,
                                   quiet: bool = True) -> None: ...

    def competition_submit(self, file_name: str, message: str, competition: str, quiet: bool = False): ...


def kaggle_api() -> KaggleClient:
    """Import and authenticate the kaggle package lazily and quietly.

    `import kaggle` authenticates at import time and prints its help to stdout when that fails, so
    it is imported only here, with its output swallowed, and its exit turned into our own message.
    """
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
        except SystemExit:
            raise KitError(CREDENTIALS_HELP) from None
        except Exception as error:  # malformed kaggle.json and the like
            raise KitError(f"The kaggle package could not read your credentials ({error}). "
                           f"{CREDENTIALS_HELP}") from None
    return api


@contextlib.contextmanager
def kaggle_errors(action: str) -> Iterator[None]:
    """Translate what the kaggle package raises into one-paragraph messages."""
    try:
        yield
    except KitError:
        raise
    except Exception as error:  # requests' errors are OSErrors too: look at the HTTP status first
        status = _http_status(error)
        if status == 401:
            raise KitError(f"{action} failed: Kaggle rejected the credentials (401 Unauthorized). The token "
                           "may be expired or mistyped: create a new one at https://www.kaggle.com/settings/api "
                           "and set it again. " + CREDENTIALS_HELP.split(". ", 1)[1]) from None
        if status == 403:
            raise KitError(f"{action} failed: Kaggle refused access (403 Forbidden). Accept the competition's "
                           f"rules first, logged in as the same user: open {COMPETITION_URL}/rules and click "
                           "'I Understand and Accept', then run the command again.") from None
        if status == 404:
            raise KitError(f"{action} failed: Kaggle says the competition '{COMPETITION}' was not found (404). "
                           f"Check that {COMPETITION_URL} opens for your account.") from None
        if status is not None:
            raise KitError(f"{action} failed: Kaggle answered HTTP {status} ({error}). Try again later.") from None
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise KitError(f"{action} failed: the disk is full. Free some space (the archive is about "
                           f"1.6 GiB and unpacks to about 1.7 GiB more) or use another --workdir.") from None
        if _is_network_error(error):
            raise KitError(f"{action} failed: Kaggle could not be reached ({error}). Check the internet "
                           "connection (on Kaggle, switch Internet on in the notebook's settings).") from None
        raise


def _http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None) or getattr(error, "status", None)
    return int(status) if isinstance(status, int) else None


def _is_network_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectionError", "Timeout", "NewConnectionError", "MaxRetryError", "gaierror",
                         "ConnectTimeout", "ReadTimeout", "TimeoutError"})


@dataclass
class DatasetSummary:
    class_counts: list[int]
    test_count: int

    def __str__(self) -> str:
        lines = [f"{'class':>5}  {'model':<22} {'images':>6}"]
        lines += [f"{k:>5}  {CLASS_NAMES[k]:<22} {n:>6}" for k, n in enumerate(self.class_counts)]
        lines.append(f"{'':>5}  {'train total':<22} {sum(self.class_counts):>6}")
        lines.append(f"{'':>5}  {'test images':<22} {self.test_count:>6}")
        return "\n".join(lines)


def verify(data: Path) -> tuple[DatasetSummary | None, list[str]]:
    """Check the competition layout; return the summary, or None and what is missing."""
    problems = []
    for name in CSV_FILES:
        if not (data / name).is_file():
            problems.append(f"{name} is missing")
    if problems:
        return None, problems
    train = _read_index_csv(data / "train.csv")
    test = _read_index_csv(data / "sample-submission.csv")
    bad_labels = train[~train.Category.isin(range(NUM_CLASSES))]
    if len(bad_labels):
        problems.append(f"train.csv has categories outside 0..{NUM_CLASSES - 1}: {bad_labels.Category.unique()[:5]}")
    missing_train = [f"train/{c}/{i}" for i, c in zip(train.Id, train.Category)
                     if not (data / "train" / str(c) / i).is_file()]
    missing_test = [f"test_upload/{i}" for i in test.Id if not (data / "test_upload" / i).is_file()]
    for kind, missing in (("training", missing_train), ("test", missing_test)):
        if missing:
            problems.append(f"{len(missing)} {kind} images listed in the CSV are missing (e.g. {missing[0]})")
    if problems:
        return None, problems
    counts = train.Category.value_counts().reindex(range(NUM_CLASSES), fill_value=0).tolist()
    return DatasetSummary(counts, len(test)), []


def _read_index_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"Id": str})
    except Exception as error:
        raise KitError(f"{path} cannot be read as CSV ({error}). Delete it and run the download again.") from None
    if list(frame.columns[:2]) != ["Id", "Category"]:
        raise KitError(f"{path} should have the columns Id,Category but has {list(frame.columns)}. "
                       "It is not the competition's file: delete it and run the download again.")
    return frame


def is_verified(workdir: Workdir) -> bool:
    return (workdir.data / DESCRIPTION).is_file() or (workdir.data / OLD_MARKER).is_file()


def mark_verified(workdir: Workdir, source: str) -> DatasetSummary:
    """Verify the layout, then write the dataset description: the data is complete once it exists."""
    summary, problems = verify(workdir.data)
    if summary is None:
        raise KitError(f"The dataset in {workdir.data} is incomplete: {'; '.join(problems)}. Run "
                       f"'{workdir.command('kit.download')}' again to finish it.")
    (workdir.data / OLD_MARKER).unlink(missing_ok=True)
    write_text(workdir.data / DESCRIPTION, json.dumps(
        {"source": source, "classes": list(CLASS_NAMES), "class_counts": summary.class_counts,
         "test_images": summary.test_count}, indent=2))
    return summary


def dataset_source(workdir: Workdir) -> str:
    """'kaggle', 'zip', 'folder', 'synthetic', or 'unknown' (verified before the description existed)."""
    try:
        return json.loads((workdir.data / DESCRIPTION).read_text())["source"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def require_dataset(workdir: Workdir) -> None:
    """Refuse to train or predict on a dataset that was not fully unpacked and verified."""
    if not is_verified(workdir):
        raise KitError(f"No verified dataset in {workdir.data}. Run '{workdir.command('kit.download')}' (Kaggle; "
                       "add --zip ARCHIVE for an archive downloaded by hand, --from-dir DIR on Kaggle, or "
                       "--synthetic for generated pictures) first.")


def copy_from_folder(folder: Path, data: Path) -> None:
    """Kaggle notebooks attach the competition as a folder: copy its CSVs, unpack (or link) the images."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in CSV_FILES):
        raise KitError(f"{folder} should hold train.csv and sample-submission.csv (on Kaggle, add the competition "
                       f"as input data: /kaggle/input/{COMPETITION}).")
    data.mkdir(parents=True, exist_ok=True)
    for name in CSV_FILES:
        shutil.copyfile(folder / name, data / name)
    for inner, unpacked in zip(INNER_ARCHIVES, ("train", "test_upload")):
        if (folder / inner).is_file():
            with _open_zip(folder / inner) as z:
                _extract_all(z, data, f"unpacking {inner}")
        elif (folder / unpacked).is_dir() and not (data / unpacked).exists():
            (data / unpacked).symlink_to((folder / unpacked).resolve(), target_is_directory=True)


def download(workdir: Workdir, api: KaggleClient | None = None, zip_path: Path | None = None,
             force: bool = False, from_dir: Path | None = None) -> DatasetSummary:
    """Make <workdir>/data a verified copy of the competition data; do nothing when it already is."""
    if is_verified(workdir) and not force:
        summary, problems = verify(workdir.data)
        if summary is not None:
            print(f"The dataset in {workdir.data} is already verified; nothing to do.")
            return summary
    if from_dir is not None:
        copy_from_folder(from_dir, workdir.data)
    else:
        unpack(_archive(workdir, api, zip_path), workdir.data)
    summary = mark_verified(workdir, "folder" if from_dir else "zip" if zip_path else "kaggle")
    for inner in INNER_ARCHIVES:  # unpacked and verified: 1.6 GB of duplicates on a Drive quota
        (workdir.data / inner).unlink(missing_ok=True)
    print(summary)
    return summary


def _archive(workdir: Workdir, api: KaggleClient | None, zip_path: Path | None) -> Path:
    """The competition archive: the one given, the one already downloaded, or a fresh download."""
    if zip_path is None:
        zip_path = workdir.downloads / f"{COMPETITION}.zip"
        if not _is_complete_zip(zip_path):
            api = api or kaggle_api()
            print(f"Downloading {COMPETITION} from Kaggle into {zip_path.parent} ...")
            with kaggle_errors("Downloading the competition data"):
                zip_path.parent.mkdir(parents=True, exist_ok=True)
                api.competition_download_files(COMPETITION, path=str(zip_path.parent), force=False, quiet=False)
            if not zip_path.is_file():
                raise KitError(f"The Kaggle API finished but {zip_path} is not there. Download the archive from "
                               f"{COMPETITION_URL}/data by hand and run 'python -m kit.download --zip PATH'.")
    elif not Path(zip_path).is_file():
        raise KitError(f"{zip_path} does not exist. Give the path of the archive downloaded from "
                       f"{COMPETITION_URL}/data.")
    return Path(zip_path)


def _is_complete_zip(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def unpack(archive: Path, data: Path) -> None:
    """Unpack the competition archive and its inner train.zip / test.zip into `data`, safely."""
    data.mkdir(parents=True, exist_ok=True)
    with _open_zip(archive) as outer:
        names = set(outer.namelist())
        flat = {PurePosixPath(n).name: n for n in names}
        if not set(CSV_FILES) <= set(flat) or not (set(INNER_ARCHIVES) <= set(flat) or _has_folders(names)):
            raise KitError(f"{archive} is not the {COMPETITION} archive: it should hold train.csv, "
                           "sample-submission.csv, train.zip and test.zip. Download it from "
                           f"{COMPETITION_URL}/data.")
        _extract_all(outer, data, f"unpacking {archive.name}")
    for inner in INNER_ARCHIVES:
        inner_path = data / inner
        if inner_path.is_file():
            with _open_zip(inner_path) as z:
                _extract_all(z, data, f"unpacking {inner}")


def _has_folders(names: set[str]) -> bool:
    return any(n.startswith("train/") for n in names) and any(n.startswith("test_upload/") for n in names)


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
                       "and nothing of it is trusted. Download the archive from the competition page again.")
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
    source.add_argument("--zip", type=Path, help="unpack this archive instead of downloading it")
    source.add_argument("--from-dir", type=Path,
                        help="a folder holding the competition files (Kaggle's attached input)")
    source.add_argument("--synthetic", action="store_true", help="write a generated dataset in the same layout")
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
    if args.synthetic or (profile.synthetic and not (args.zip or args.from_dir)):
        from kit.synthetic import write_synthetic

        settings = {"per_class": 100, "test": 50, "size": (640, 480), **profile.synthetic}
        given = {"per_class": args.per_class, "test": args.test, "size": args.size and parse_size(args.size)}
        settings.update({k: v for k, v in given.items() if v is not None})
        summary = write_synthetic(workdir, seed=args.seed, ids_from=args.ids_from, **settings)
        print(summary)
        return 0
    download(workdir, zip_path=args.zip, force=args.force, from_dir=args.from_dir)
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
