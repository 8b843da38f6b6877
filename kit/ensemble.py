"""Combine runs into one submission: the (weighted) mean of their test probabilities.

    python -m kit.ensemble RUN RUN [RUN ...] --out submissions/ensemble.csv
    python -m kit.ensemble seed1 seed2 seed3 --mean geometric --weights val --out ens.csv
    python -m kit.ensemble --oof b6-f1 ... b6-f5 --oof lite-f1 ... lite-f5 --weights oof --out ens.csv

RUN is a work directory (its submissions/probabilities.csv, written by kit.predict, or
predictions.csv for a class-folder dataset) or such a CSV file. Runs must predict the same Ids
with the same classes in the same order. The output follows the dataset's sample submission
(header, order, labels) of --workdir, or of the first RUN that is a work directory, and
<out>.probabilities.csv is written beside it. Where runs have a validation report
(submissions/report/validation_probabilities.csv from kit.report) on the same photos, the
ensemble's validation accuracy is printed next to each run's, so you see whether it helps.

--oof takes the N work directories of one `kit.stage --fold K/N` configuration: their validation
probabilities are out-of-fold predictions, one for every training photo. The folds are checked to
partition the training photos; each run's accuracy on its fold, each member's cross-validated
accuracy on all the photos and the ensemble's are printed. A member predicts the test photos with
the mean of its folds; members are combined with equal weights or, with --weights oof, with
non-negative weights fitted on the out-of-fold probabilities (scipy's NNLS), never on the
public leaderboard. Repeat --oof for each member (another backbone, seed or recipe).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from kit.cli import KitError, main_guard
from kit.config import Workdir
from kit.dataset import is_verified, parse_fold, read_description, read_train
from kit.files import write_text
from kit.manifest import Manifest
from kit.predict import predictions_table, probability_table

LEADING = ("Id", "path", "label", "class", "probability")  # columns that are not a class's probability


@dataclass
class Run:
    """One run's test probabilities (rows by Id) and, where it has a report, its validation probabilities."""

    name: str
    test: pd.DataFrame  # index Id, one column per class
    validation: pd.DataFrame | None  # index Id, a 'label' column, one column per class
    workdir: Workdir | None

    @property
    def classes(self) -> list[str]:
        return list(self.test.columns)

    def val_accuracy(self) -> float | None:
        if self.validation is None:
            return None
        return accuracy(self.validation[self.classes].to_numpy(), self.validation.label, self.classes)


def accuracy(probs: np.ndarray, labels: pd.Series, classes: Sequence[str]) -> float:
    return float((np.asarray(classes)[probs.argmax(axis=1)] == labels.to_numpy()).mean())


def read_probabilities(path: Path) -> pd.DataFrame:
    """A probabilities CSV of the kit: the key column first, then one column per class."""
    try:
        if not path.read_bytes().endswith(b"\n"):  # the kit writes whole lines: the last one was cut
            raise ValueError("its last line is cut short")
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise KitError(f"{path} cannot be read as a probabilities CSV ({error}). Give a file written by "
                       "kit.predict or kit.report (to write it again: 'python -m kit.predict' in that run's "
                       "--workdir), or a work directory.") from None
    key = table.columns[0]
    classes = [c for c in table.columns[1:] if c not in LEADING]
    try:
        values = table[classes].astype(float)
    except ValueError:
        raise KitError(f"{path} is not a probabilities CSV of the kit: columns {', '.join(classes[:5])} should hold "
                       "probabilities.") from None
    extra = table[["label"]] if "label" in table.columns else table[[]]
    return pd.concat([table[[key]], extra, values], axis=1).set_index(key)


def load_run(run: Path) -> Run:
    if run.is_file():
        return Run(str(run), read_probabilities(run), None, None)
    workdir = Workdir(run)
    for name in ("probabilities.csv", "predictions.csv"):
        if (workdir.submissions / name).is_file():
            validation = workdir.report / "validation_probabilities.csv"
            return Run(str(run), read_probabilities(workdir.submissions / name),
                       read_probabilities(validation) if validation.is_file() else None, workdir)
    raise KitError(f"{run} holds no test probabilities ({workdir.submissions / 'probabilities.csv'}). Run "
                   f"'python -m kit.predict --workdir {run}' first (for the smoke profile, give <workdir>/smoke).")


def check_alike(runs: list[Run]) -> None:
    """Refuse runs that do not predict the same photos with the same classes in the same order."""
    first = runs[0]
    for run in runs[1:]:
        if run.classes != first.classes:
            same = set(run.classes) == set(first.classes)
            raise KitError(f"{run.name} and {first.name} do not share their classes"
                           f"{' in the same order' if same else ''} ({', '.join(run.classes[:4])}, ... against "
                           f"{', '.join(first.classes[:4])}, ...): they were trained on different datasets, and "
                           "their probabilities cannot be averaged column by column.")
        missing, extra = first.test.index.difference(run.test.index), run.test.index.difference(first.test.index)
        if len(missing) or len(extra):
            raise KitError(f"{run.name} and {first.name} predict different photos ({len(missing)} of {first.name}'s "
                           f"Ids missing, {len(extra)} extra, e.g. {', '.join(list(missing[:2]) + list(extra[:2]))}). "
                           "Predict every run on the same test set.")


def combine(tables: Sequence[pd.DataFrame], weights: Sequence[float], mean: str) -> np.ndarray:
    """The weighted arithmetic mean, or the weighted geometric mean renormalised to sum to 1."""
    stack = np.stack([t.to_numpy(float) for t in tables])
    w = np.asarray(weights, float)[:, None, None] / np.sum(weights)
    if mean == "arithmetic":
        return (w * stack).sum(axis=0)
    logs = (w * np.log(np.clip(stack, 1e-12, 1))).sum(axis=0)
    probs = np.exp(logs - logs.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def run_weights(runs: list[Run], given: Sequence[str] | None) -> list[float]:
    if not given:
        return [1.0] * len(runs)
    if list(given) == ["val"]:
        scores = [run.val_accuracy() for run in runs]
        lacking = [run.name for run, score in zip(runs, scores) if score is None]
        if lacking:
            raise KitError(f"--weights val needs each run's validation report; {', '.join(lacking)} has none. Run "
                           "'python -m kit.report' in those work directories, or give numbers.")
        return scores
    return given_weights(given, len(runs), "run")


def given_weights(given: Sequence[str], count: int, each: str) -> list[float]:
    try:
        weights = [float(w) for w in given]
    except ValueError:
        raise KitError(f"--weights takes one number per {each}, or 'val' or 'oof'; not {' '.join(given)}.") from None
    if len(weights) != count or min(weights) < 0 or sum(weights) == 0:
        raise KitError(f"--weights needs {count} non-negative numbers (one per {each}), not all zero.")
    return weights


def validation_lines(runs: list[Run], weights: list[float], mean: str) -> list[str]:
    """Each run's validation accuracy and, where the runs share their validation photos, the ensemble's."""
    if any(run.validation is None for run in runs):
        return ["(no validation figures: not every run has a kit.report validation_probabilities.csv)"]
    width = max(len(run.name) for run in runs)
    lines = [f"{run.name:<{width}} validation accuracy {run.val_accuracy():.4f}" for run in runs]
    ids = runs[0].validation.index
    if any(set(run.validation.index) != set(ids) for run in runs[1:]):
        return lines + ["(the runs do not share their validation photos, as folds do: no ensemble figure)"]
    probs = combine([run.validation.loc[ids, run.classes] for run in runs], weights, mean)
    score = accuracy(probs, runs[0].validation.loc[ids, "label"], runs[0].classes)
    return lines + [f"{'ensemble':<{width}} validation accuracy {score:.4f}"]


def write_ensemble(runs: list[Run], probs: np.ndarray, ids: pd.Index, out: Path, workdir: Workdir | None) -> pd.DataFrame:
    """The submission in the sample submission's order and labels (or predictions.csv's form), and its probabilities."""
    classes = runs[0].classes
    table = pd.DataFrame(probs, index=ids, columns=classes)
    description = read_description(workdir) if workdir is not None and is_verified(workdir) else None
    if description is not None and description.sample_submission is not None:
        if list(description.classes) != classes:
            raise KitError(f"The runs' classes are not those of the dataset in {workdir.data}; give the --workdir "
                           "they were trained in.")
        sample = pd.read_csv(workdir.data / description.sample_submission, dtype=str, keep_default_na=False)
        order = sample[sample.columns[0]]
        if set(order) != set(ids):
            raise KitError(f"The runs predict other Ids than {description.sample_submission} lists; give the "
                           "--workdir they were trained in.")
        table = table.loc[order]
        written = pd.DataFrame({sample.columns[0]: order,
                                sample.columns[1]: [description.labels[k] for k in table.to_numpy().argmax(axis=1)]})
    else:
        written = predictions_table(list(ids), table.to_numpy(), classes, "Id")
    write_text(out, written.to_csv(index=False))
    write_text(out.with_name(out.stem + ".probabilities.csv"),
               probability_table(list(table.index), table.to_numpy(), classes).to_csv(index=False))
    return written


@dataclass
class Member:
    """The N fold runs of one configuration: together their validation probabilities predict each training photo."""

    runs: list[Run]
    folds: list[str]  # "K/N" of each run
    oof: pd.DataFrame  # index Id, a 'label' column, one column per class: every training photo once
    photos: int  # labelled training photos of the dataset

    @property
    def test(self) -> pd.DataFrame:
        ids = self.runs[0].test.index
        return pd.DataFrame(combine([r.test.loc[ids, r.classes] for r in self.runs], [1.0] * len(self.runs),
                                    "arithmetic"), index=ids, columns=self.runs[0].classes)


def fold_of(run: Run) -> str:
    config = Manifest.read(run.workdir).config if run.workdir is not None else None
    fold = (config or {}).get("fold") or ""
    if not fold:
        raise KitError(f"{run.name} is not a fold run (its run was not started with --fold K/N), so its validation "
                       "photos are not out-of-fold predictions. Give --oof the N work directories of one "
                       "'kit.stage --fold K/N' configuration.")
    return fold


def fold_member(runs: list[Run]) -> Member:
    """Check that the runs' folds partition the training photos; their validation probabilities, concatenated."""
    lacking = [run.name for run in runs if run.validation is None]
    if lacking:
        raise KitError(f"--oof needs each run's validation probabilities; {', '.join(lacking)} has none. Run "
                       "'python -m kit.predict' (or kit.report) in those work directories first.")
    folds = [fold_of(run) for run in runs]
    ks, ns = zip(*(parse_fold(fold) for fold in folds))
    n = ns[0]
    if set(ns) != {n} or sorted(ks) != list(range(1, n + 1)):
        raise KitError(f"The --oof runs are folds {', '.join(folds)}: one member needs each fold K/N of one N "
                       f"exactly once (here 1/{n} to {n}/{n}). Add the missing folds' runs, or drop the extra ones.")
    oof = pd.concat([run.validation for run in runs])
    twice = oof.index[oof.index.duplicated()]
    if len(twice):
        raise KitError(f"The folds' validation photos overlap ({len(twice)} photos, e.g. {twice[0]}): the runs were "
                       "split with different seeds. Fold runs of one member must share the seed (--seed) and the "
                       "data.")
    training = read_train(runs[0].workdir)
    outside = oof.index.difference(training.Id)
    if len(outside):
        raise KitError(f"{len(outside)} out-of-fold photos are not training photos of {runs[0].workdir.data} (e.g. "
                       f"{outside[0]}): the runs were trained on different datasets.")
    return Member(runs, folds, oof, len(training))


def shared_photos(members: list[Member]) -> pd.Index:
    """The training photos every member predicted out of fold (all of them, unless a photo was unreadable)."""
    ids = members[0].oof.index
    for member in members[1:]:
        ids = ids.intersection(member.oof.index)
    return ids


def oof_weights(members: list[Member]) -> list[float]:
    """Non-negative weights that bring the members' out-of-fold probabilities closest to the true classes.

    Breiman's stacked regression (1996): least squares under non-negativity (scipy's NNLS) against
    the one-hot labels, on the photos every member predicted; normalised to sum to one.
    """
    ids = shared_photos(members)
    classes = members[0].runs[0].classes
    target = (members[0].oof.loc[ids, "label"].to_numpy()[:, None] == np.asarray(classes)[None, :]).astype(float)
    design = np.stack([m.oof.loc[ids, classes].to_numpy(float).ravel() for m in members], axis=1)
    weights, _ = nnls(design, target.ravel())
    if weights.sum() == 0:
        return [1.0] * len(members)
    return list(weights / weights.sum())


def oof_lines(members: list[Member], weights: list[float], mean: str, fitted: bool) -> list[str]:
    """Each fold's accuracy, each member's cross-validated accuracy on all the photos, and the ensemble's."""
    classes = members[0].runs[0].classes
    lines = []
    for m, member in enumerate(members, 1):
        for run, fold in zip(member.runs, member.folds):
            lines.append(f"member {m} fold {fold:<5} {run.name}: accuracy on its fold {run.val_accuracy():.4f} "
                         f"({len(run.validation)} photos)")
        covered = f"{len(member.oof)} of {member.photos} training photos"
        lines.append(f"member {m} ({len(member.runs)} folds) cross-validated accuracy "
                     f"{accuracy(member.oof[classes].to_numpy(), member.oof.label, classes):.4f} on {covered}")
    if len(members) > 1:
        ids = shared_photos(members)
        probs = combine([m.oof.loc[ids, classes] for m in members], weights, mean)
        lines.append(f"ensemble of {len(members)} members, weights {', '.join(f'{w:.3f}' for w in weights)}: "
                     f"cross-validated accuracy {accuracy(probs, members[0].oof.loc[ids, 'label'], classes):.4f} "
                     f"on {len(ids)} photos" + (" (the weights were fitted on them: a little optimistic)" if fitted
                                                else ""))
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN", help="work directories or probabilities CSVs")
    parser.add_argument("--oof", nargs="+", type=Path, action="append", metavar="RUN",
                        help="the N work directories of one --fold K/N configuration: one member whose validation "
                             "probabilities are out-of-fold predictions (repeat for each member)")
    parser.add_argument("--out", type=Path, required=True, help="the submission (or predictions) CSV to write")
    parser.add_argument("--mean", choices=["arithmetic", "geometric"], default="arithmetic")
    parser.add_argument("--weights", nargs="+", metavar="W",
                        help="one number per run (per member with --oof), 'val': each run's validation accuracy, "
                             "or 'oof': fitted on the members' out-of-fold probabilities")
    parser.add_argument("--workdir", type=Path, help="whose sample submission orders the output (default: the first "
                                                     "RUN that is a work directory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.oof:
        return main_oof(args)
    if args.weights == ["oof"]:
        raise KitError("--weights oof fits weights on out-of-fold probabilities: give the fold runs with --oof "
                       "(--oof RUN... for each member).")
    if len(args.runs) < 2:
        raise KitError("An ensemble needs at least two runs.")
    runs = [load_run(run) for run in args.runs]
    check_alike(runs)
    weights = run_weights(runs, args.weights)
    ids = runs[0].test.index
    probs = combine([run.test.loc[ids, run.classes] for run in runs], weights, args.mean)
    workdir = Workdir(args.workdir) if args.workdir else next((r.workdir for r in runs if r.workdir), None)
    written = write_ensemble(runs, probs, ids, args.out, workdir)
    print(f"{args.mean} mean of {len(runs)} runs, weights {', '.join(f'{w:.4g}' for w in weights)}")
    print("\n".join(validation_lines(runs, weights, args.mean)))
    print(f"Wrote {args.out} ({len(written)} rows) and {args.out.stem}.probabilities.csv")
    return 0


def main_oof(args: argparse.Namespace) -> int:
    if args.runs:
        raise KitError(f"Give every run after an --oof (one --oof per member), not on its own: {args.runs[0]}.")
    members = [fold_member([load_run(run) for run in group]) for group in args.oof]
    check_alike([run for member in members for run in member.runs])
    if args.weights == ["oof"]:
        weights = oof_weights(members)
    elif args.weights == ["val"]:
        raise KitError("--weights val scores runs on shared validation photos; fold runs validate on different "
                       "ones: use --weights oof.")
    else:
        weights = given_weights(args.weights, len(members), "member") if args.weights else [1.0] * len(members)
    tests = [member.test for member in members]
    ids = tests[0].index
    probs = combine([test.loc[ids] for test in tests], weights, args.mean)
    runs = members[0].runs
    workdir = Workdir(args.workdir) if args.workdir else runs[0].workdir
    written = write_ensemble(runs, probs, ids, args.out, workdir)
    print(f"{args.mean} mean of {len(members)} members (each the mean of its folds), weights "
          f"{', '.join(f'{w:.4g}' for w in weights)}{' (fitted out of fold)' if args.weights == ['oof'] else ''}")
    print("\n".join(oof_lines(members, weights, args.mean, fitted=args.weights == ["oof"])))
    print(f"Wrote {args.out} ({len(written)} rows) and {args.out.stem}.probabilities.csv")
    return 0


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
