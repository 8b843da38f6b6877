"""Check a submission file, then send it to Kaggle.

    python -m kit.submit --check                      # validate submissions/submission.csv only
    python -m kit.submit --message "B6 7 stages TTA10"
    python -m kit.submit --message "again" --again    # send a file that was sent before

The file is checked against the competition's sample submission first (its header, every Id
exactly once, a known label on every row, nothing extra), so a daily submission is never spent on
a broken file. The competition is the one the data came from (kit.download --competition NAME).
Every submission is recorded in submissions/submitted.json (the file's sha256, competition,
message, time); the same file is not sent to the same competition twice without --again, so a
notebook's *Run all* after the stages are done does not spend a daily submission on a repeat.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from kit.cli import KitError, add_workdir, main_guard
from kit.config import PROFILES, Workdir
from kit.dataset import read_description
from kit.files import sha256, write_text
from kit.kaggle_api import KaggleClient, kaggle_api, kaggle_errors

MAX_LISTED = 5


PREDICT = "python -m kit.predict"


def validate(submission: Path, sample: Path, labels: Sequence[str], predict: str = PREDICT) -> list[str]:
    """Every problem of `submission` against the sample submission and the labels; empty when it is right.

    `predict` is the command that writes the file, with the flags that name the work directory.
    """
    if not submission.is_file():
        return [f"{submission} does not exist (run '{predict}' first)"]
    with open(sample, newline="") as f:
        sample_rows = list(csv.reader(f))
    header, expected = sample_rows[0][:2], [row[0] for row in sample_rows[1:]]
    try:
        with open(submission, newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        return [f"{submission} is not a readable CSV file ({error})"]
    if not rows:
        return [f"{submission} is empty; it needs the header {','.join(header)} and {len(expected)} rows"]
    problems = []
    if rows[0] != header:
        problems.append(f"the header is {','.join(rows[0])!r}, it must be exactly {','.join(header)!r}")
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
    known = set(labels)
    bad = [f"{row[0]}={row[1]!r}" for row in body if len(row) == 2 and row[1] not in known]
    if bad:
        problems.append(f"{len(bad)} labels are not among the dataset's {len(known)} ({_few(sorted(known))}): "
                        f"{_few(bad)}")
    return problems


def _few(items: list) -> str:
    shown = ", ".join(map(str, items[:MAX_LISTED]))
    return shown + (f", ... {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def check(submission: Path, sample: Path, labels: Sequence[str], predict: str = PREDICT) -> None:
    problems = validate(submission, sample, labels, predict)
    if problems:
        raise KitError(f"{submission} would be rejected or mis-scored, so it was not submitted: "
                       + "; ".join(problems) + f". Run '{predict}' to write a fresh one.")


def submit(submission: Path, sample: Path, labels: Sequence[str], message: str, competition: str,
           api: KaggleClient | None = None, predict: str = PREDICT) -> object:
    """Validate, then submit with the kaggle package's API; returns what the API answers."""
    check(submission, sample, labels, predict)
    if not message.strip():
        raise KitError("--message must say something: it is how you will tell your submissions apart.")
    api = api or kaggle_api()
    with kaggle_errors("Submitting", competition=competition):
        return api.competition_submit(str(submission), message, competition, quiet=False)


@dataclass(frozen=True)
class Sent:
    """One submission as submissions/submitted.json records it."""

    sha256: str
    competition: str
    message: str
    time: str
    file: str


def read_sent(path: Path) -> list[Sent]:
    """What was submitted from this work directory; a damaged record is refused rather than ignored."""
    if not path.is_file():
        return []
    try:
        return [Sent(**entry) for entry in json.loads(path.read_text())]
    except (ValueError, TypeError) as error:
        raise KitError(f"{path} is damaged ({error}). It is the record of what was submitted from here, which keeps "
                       "a file from being sent twice; Kaggle's own list is 'kaggle competitions submissions "
                       "COMPETITION'. Delete the record to start a new one.") from None


def write_sent(path: Path, sent: list[Sent]) -> None:
    write_text(path, json.dumps([asdict(entry) for entry in sent], indent=2, ensure_ascii=False))


def sent_before(sent: list[Sent], digest: str, competition: str) -> Sent | None:
    return next((entry for entry in reversed(sent) if (entry.sha256, entry.competition) == (digest, competition)),
                None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    parser.add_argument("--file", type=Path, help="default: <workdir>/submissions/submission.csv")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", "-m", help="the submission's description on Kaggle")
    what.add_argument("--check", action="store_true", help="only validate the file")
    parser.add_argument("--again", action="store_true", help="send the file even if this exact file was sent to "
                                                             "the competition before (see submissions/submitted.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Workdir.resolve(args.workdir, PROFILES[args.profile])
    submission = args.file or workdir.submissions / "submission.csv"
    description = read_description(workdir)
    if description.sample_submission is None:
        raise KitError(f"The dataset in {workdir.data} ({description.origin}) is a set of class folders, not a "
                       "Kaggle competition: there is nothing to submit to. Its predictions are in "
                       f"{workdir.submissions / 'predictions.csv'} and its test accuracy in "
                       f"'{workdir.command('kit.report')}'.")
    sample = workdir.data / description.sample_submission
    predict = workdir.command("kit.predict")
    if args.check:
        check(submission, sample, description.labels, predict)
        print(f"{submission} is valid: every Id of the sample submission once, with one of the "
              f"{len(description.labels)} labels.")
        return 0
    if description.source == "synthetic":
        raise KitError(f"{submission} was predicted from the synthetic pictures in {workdir.data} (the smoke "
                       "profile's, or 'kit.download --synthetic'): Kaggle would score it at chance and it would "
                       "spend one of your daily submissions. Train on the competition's data, in a work directory "
                       "of its own, and submit from there.")
    record = workdir.submissions / "submitted.json"
    digest = sha256(submission) if submission.is_file() else ""
    sent = read_sent(record)
    earlier = sent_before(sent, digest, description.competition)
    if earlier and not args.again:
        print(f"{submission} was already submitted to {description.competition} on {earlier.time} as "
              f"{earlier.message!r}; nothing was sent, so no daily submission is spent on a repeat. Add --again to "
              "send it anyway.")
        return 0
    answer = submit(submission, sample, description.labels, args.message, description.competition, predict=predict)
    write_sent(record, [*sent, Sent(digest, description.competition, args.message,
                                    time.strftime("%Y-%m-%d %H:%M:%S"), str(submission))])
    print(f"Submitted {submission} to {description.competition}. Kaggle answered: "
          f"{getattr(answer, 'message', None) or answer}")
    print(f"See the score with: kaggle competitions submissions {description.competition}")
    return 0


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
