"""Pseudo-labels: a training list of the test photos a run (or an ensemble) is sure about.

    python -m kit.pseudo --from RUN --threshold 0.9            # RUN: a work directory or a probabilities CSV
    python -m kit.download --workdir NEW --from-dir RUN/data   # the same dataset for a new run
    python -m kit.stage --all --workdir NEW --pseudo-labels RUN/submissions/pseudo_labels.csv

The list holds every test photo whose most likely class has a probability of at least the
threshold: Id, class name and probability (the count per class is printed, so a threshold that
keeps only the easy classes shows). A run given --pseudo-labels copies it when it starts and
trains on those photos as well; they never enter its validation split, so its validation
accuracy stays a score on real labels. The strongest source is an ensemble's probabilities
(kit.ensemble writes <out>.probabilities.csv).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from kit.cli import EXIT_DONE, KitError, main_guard
from kit.ensemble import load_run
from kit.files import write_text

PSEUDO_LABELS = "pseudo_labels.csv"


def select(probabilities: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The rows (index: Id, one column per class) whose top probability is >= threshold: Id, class, probability."""
    values = probabilities.to_numpy(float)
    readable = ~np.isnan(values).any(axis=1)
    filled = np.nan_to_num(values, nan=-1.0)
    top, best = filled.max(axis=1), filled.argmax(axis=1)
    keep = readable & (top >= threshold)
    return pd.DataFrame({"Id": probabilities.index[keep], "class": np.asarray(probabilities.columns)[best[keep]],
                         "probability": top[keep].round(6)})


def count_table(chosen: pd.DataFrame, classes: Sequence[str], total: int, threshold: float) -> str:
    """How many photos each class gets: a threshold that keeps only easy classes shows here."""
    counts = chosen["class"].value_counts().reindex(list(classes), fill_value=0)
    width = max(12, min(40, max(len(c) for c in classes)))
    lines = [f"{'class':<{width}} {'photos':>7}"] + [f"{name[:width]:<{width}} {n:>7}" for name, n in counts.items()]
    lines.append(f"{'total':<{width}} {len(chosen):>7} of {total} test photos at probability >= {threshold:g}")
    return "\n".join(lines)


def write_pseudo_labels(source: Path, threshold: float, out: Path | None = None) -> tuple[pd.DataFrame, Path, str]:
    """Select from a run's test probabilities and write the list; returns it, its path and the count table."""
    if not 0 < threshold <= 1:
        raise KitError(f"--threshold {threshold:g} is a probability: give a number above 0 and at most 1 "
                       "(0.9 keeps the photos the model is at least 90% sure of).")
    run = load_run(Path(source))
    if out is None:
        if run.workdir is None:
            raise KitError(f"{source} is a file: say where the list goes with --out FILE.")
        out = run.workdir.submissions / PSEUDO_LABELS
    chosen = select(run.test[run.classes], threshold)
    if chosen.empty:
        best = np.nanmax(run.test[run.classes].to_numpy(float))
        raise KitError(f"No test photo of {source} reaches probability {threshold:g} (the highest is {best:.3f}). "
                       "Lower --threshold, or label from a stronger run or an ensemble.")
    write_text(out, chosen.to_csv(index=False))
    return chosen, out, count_table(chosen, run.classes, len(run.test), threshold)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.pseudo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, required=True, metavar="RUN",
                        help="a work directory (its test probabilities from kit.predict) or a probabilities CSV "
                             "(kit.predict's, or an ensemble's <out>.probabilities.csv)")
    parser.add_argument("--threshold", type=float, required=True, metavar="P",
                        help="keep the photos whose most likely class has at least this probability (e.g. 0.9)")
    parser.add_argument("--out", type=Path, help=f"where to write the list (default: RUN/submissions/{PSEUDO_LABELS})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, out, table = write_pseudo_labels(args.source, args.threshold, args.out)
    print(table)
    print(f"Wrote {out}. Train a new run on it as well: 'python -m kit.stage --all --workdir NEW --pseudo-labels "
          f"{out}' (NEW holds the same dataset: 'python -m kit.download --workdir NEW --from-dir RUN/data').")
    return EXIT_DONE


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
