"""Check a submission file, then send it to Kaggle.

    python -m kit.submit --check                      # validate submissions/submission.csv only
    python -m kit.submit --message "B6 7 stages TTA10"

The file is checked against sample-submission.csv first (header, every Id exactly once, integer
categories 0..9, nothing extra), so a daily submission is never spent on a broken file.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

from kit.cli import KitError, add_workdir, main_guard
from kit.config import COMPETITION, NUM_CLASSES, PROFILES, Workdir
from kit.download import KaggleClient, dataset_source, kaggle_api, kaggle_errors

MAX_LISTED = 5


def validate(submission: Path, sample: Path) -> list[str]:
    """Every problem of `submission` against the sample submission; empty when it is right."""
    if not submission.is_file():
        return [f"{submission} does not exist (run 'python -m kit.predict' first)"]
    with open(sample, newline="") as f:
        expected = [row[0] for row in csv.reader(f)][1:]
    try:
        with open(submission, newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        return [f"{submission} is not a readable CSV file ({error})"]
    if not rows:
        return [f"{submission} is empty; it needs the header Id,Category and {len(expected)} rows"]
    problems = []
    if rows[0] != ["Id", "Category"]:
        problems.append(f"the header is {','.join(rows[0])!r}, it must be exactly 'Id,Category'")
    body = rows[1:]
    wrong_width = [k + 2 for k, row in enumerate(body) if len(row) != 2]
    if wrong_width:
        problems.append(f"{len(wrong_width)} rows do not have exactly two fields (lines {_few(wrong_width)})")
    ids = [row[0] for row in body if row]
    seen, duplicates = set(), []
    for i in ids:
        if i in seen:
            duplicates.append(i)
        seen.add(i)
    expected_set = set(expected)
    missing = [i for i in expected if i not in seen]
    extra = [i for i in seen if i not in expected_set]
    if missing:
        problems.append(f"{len(missing)} Ids of the sample submission are missing ({_few(missing)})")
    if extra:
        problems.append(f"{len(extra)} Ids are not in the sample submission ({_few(extra)})")
    if duplicates:
        problems.append(f"{len(duplicates)} Ids appear more than once ({_few(duplicates)})")
    bad = [f"{row[0]}={row[1]!r}" for row in body if len(row) == 2 and not _is_category(row[1])]
    if bad:
        problems.append(f"{len(bad)} categories are not integers 0..{NUM_CLASSES - 1} ({_few(bad)})")
    return problems


def _is_category(text: str) -> bool:
    return text.strip().isdigit() and int(text) < NUM_CLASSES and text.strip() == text


def _few(items: list) -> str:
    shown = ", ".join(map(str, items[:MAX_LISTED]))
    return shown + (f", ... {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def check(submission: Path, sample: Path) -> None:
    problems = validate(submission, sample)
    if problems:
        raise KitError(f"{submission} would be rejected or mis-scored, so it was not submitted: "
                       + "; ".join(problems) + ". Run 'python -m kit.predict' to write a fresh one.")


def submit(submission: Path, sample: Path, message: str, api: KaggleClient | None = None) -> object:
    """Validate, then submit with the kaggle package's API; returns what the API answers."""
    check(submission, sample)
    if not message.strip():
        raise KitError("--message must say something: it is how you will tell your submissions apart.")
    api = api or kaggle_api()
    with kaggle_errors("Submitting"):
        return api.competition_submit(str(submission), message, COMPETITION, quiet=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    parser.add_argument("--file", type=Path, help="default: <workdir>/submissions/submission.csv")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", "-m", help="the submission's description on Kaggle")
    what.add_argument("--check", action="store_true", help="only validate the file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Workdir.resolve(args.workdir, PROFILES[args.profile])
    submission = args.file or workdir.submissions / "submission.csv"
    if not workdir.sample_submission.is_file():
        raise KitError(f"{workdir.sample_submission} is missing; it is needed to check the file. Run "
                       f"'{workdir.command('kit.download')}' first.")
    if args.check:
        check(submission, workdir.sample_submission)
        print(f"{submission} is valid: every Id of the sample submission once, categories 0..{NUM_CLASSES - 1}.")
        return 0
    if dataset_source(workdir) == "synthetic":
        raise KitError(f"{submission} was predicted from the synthetic pictures in {workdir.data} (the smoke "
                       "profile's, or 'kit.download --synthetic'): Kaggle would score it at chance and it would "
                       "spend one of your daily submissions. Train on the competition's data, in a work directory "
                       "of its own, and submit from there.")
    answer = submit(submission, workdir.sample_submission, args.message)
    print(f"Submitted {submission} to {COMPETITION}. Kaggle answered: {getattr(answer, 'message', None) or answer}")
    print(f"See the score with: kaggle competitions submissions {COMPETITION}")
    return 0


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
