"""Test accuracy on real photos, averaged over seeds: the recipe against training options, in one process run.

    python bench/real_cars.py                         # stanford5, cpu profile (Lite0, ImageNet), seeds 1 2 3
    python bench/real_cars.py --seeds 1 2 3 4 5
    python bench/real_cars.py --train-args "--class-weights"   # any kit.stage flags, for a comparison
    python bench/real_cars.py --folds 5               # the 5 folds of one seed instead of several seeds
    python bench/real_cars.py --variants recipe "ls=--label-smoothing 0.1" "ema=--ema 0.9" "final=+final-fit"
    python bench/real_cars.py --profile smoke         # the tiny CNN from scratch, for comparison
    python bench/real_cars.py --folds 5 --variants recipe "bn-train=--bn train"   # out-of-fold weights

Each run is a full user run in its own work directory and processes: kit.download --from-dir,
kit.stage --all --seed S (--fold K/N), kit.report (validation, and the dataset's labelled test
folder), kit.predict. It prints the baseline first (bench/linear_probe.py: logistic regression on
the pretrained backbone's features, in the same process run), one row per run, the mean +-
standard deviation and the ratio to chance, then the test accuracy of kit.ensemble over the runs.

With --variants, every variant (NAME=kit.stage flags; "recipe" alone means no flags) trains on
the same seeds (with --folds, the same N folds of the first seed), and a last table compares each
with the first: mean test accuracy, the difference and its standard error over the seeds, and
the ensemble of each variant's seeds. Extra steps
are variants too: "+final-fit" adds kit.stage --final-fit after the stages, "+N:--flag=value" overrides
one stage's row (e.g. "+7:--image-size=320"; the stages then run one by one), "+pseudo=P" trains
the recipe, labels the test photos predicted with probability >= P (kit.pseudo), and trains a
second run with them; "+pseudo-folds=P" takes the labels from the 5-fold ensemble of the first
seed instead (trained once, shared by every seed's run, its own test accuracy printed).
With --folds and --variants, each variant's folds are one member of an out-of-fold ensemble:
kit.ensemble --oof reports each member's cross-validated accuracy, and the test accuracy of the
plain mean of every run is set against the members weighted by their out-of-fold probabilities
(--weights oof).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from linear_probe import linear_probe  # puts the repository on the path, for kit.config

from kit.config import STEPS

ROOT = Path(__file__).resolve().parents[1]
STANFORD5 = ROOT.parent / "shared" / "real-cars" / "stanford5"


def kit(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n"
                         f"{result.stdout[-2000:]}{result.stderr[-2000:]}")


def one_run(data: Path, folder: Path, seed: int, fold: str, profile: str, train_args: list[str], tta: int) -> dict:
    """Download, train, report and predict in a fresh work directory; the report's figures and the wall time."""
    where = ["--profile", profile, "--workdir", str(folder)]
    extra = [a for a in train_args if a.startswith("+")]
    flags = [a for a in train_args if not a.startswith("+")]
    started = time.time()
    kit("kit.download", "--from-dir", str(data), *where)
    pseudo = [a.split("=", 1) for a in extra if a.startswith(("+pseudo=", "+pseudo-folds="))]
    if pseudo:  # a teacher labels the test photos; the measured run trains on them too
        kind, threshold = pseudo[0]
        if kind == "+pseudo":
            teacher = one_run(data, folder.with_name(folder.name + "-teacher"), seed, fold, profile, flags, tta)
            source = teacher["workdir"]
        else:
            source = fold_teacher(data, folder.parent / "teacher-folds", seed, profile, flags, tta)
        labels = folder / "pseudo_labels.csv"
        kit("kit.pseudo", "--from", str(source), "--threshold", threshold, "--out", str(labels))
        flags += ["--pseudo-labels", str(labels)]
    run_flags = ["--seed", str(seed), *(["--fold", fold] if fold else []), *flags, *where]
    per_stage = stage_flags(extra)
    if per_stage:  # stage overrides go with --step N, so the stages run one by one
        for step in STEPS:
            kit("kit.stage", "--step", str(step), *run_flags, *per_stage.get(step, []))
    else:
        kit("kit.stage", "--all", *run_flags)
    if "+final-fit" in extra:
        kit("kit.stage", "--final-fit", *where)
    trained = time.time() - started
    kit("kit.report", "--tta", str(tta), *where)
    kit("kit.predict", "--tta", str(tta), *where)
    workdir = folder / ("smoke" if profile == "smoke" else "")
    metrics = json.loads((workdir / "submissions" / "report" / "metrics.json").read_text())
    test = metrics["test"]["accuracy"]
    return {"run": fold or str(seed), "val": metrics["validation"]["accuracy"]["no TTA"], "test": test["no TTA"],
            "test_tta": test[f"TTA {tta}"], "classes": len(metrics["classes"]), "train_s": trained,
            "workdir": workdir}


TEACHER_FOLDS = 5
_teachers: dict[Path, Path] = {}


def fold_teacher(data: Path, folder: Path, seed: int, profile: str, flags: list[str], tta: int) -> Path:
    """The probabilities of the 5-fold ensemble of one seed (kit.ensemble), trained once per bench run and shared
    by every seed's student, so the students differ only in their own seed."""
    if folder not in _teachers:
        runs = [one_run(data, folder / f"fold{k}", seed, f"{k}/{TEACHER_FOLDS}", profile, flags, tta)
                for k in range(1, TEACHER_FOLDS + 1)]
        out = folder / "ensemble.csv"
        accuracy = ensemble_accuracy([r["workdir"] for r in runs], out)
        each = ", ".join(f"{r['test_tta']:.4f}" for r in runs)
        print(f"teacher: the {TEACHER_FOLDS} folds of seed {seed}, test TTA {each}; their ensemble {accuracy:.4f}",
              flush=True)
        _teachers[folder] = out.with_name(out.stem + ".probabilities.csv")
    return _teachers[folder]


def stage_flags(extra: list[str]) -> dict[int, list[str]]:
    """'+N:--flag=value' words as {N: ['--flag=value']}: one stage's override (e.g. +7:--image-size=320)."""
    flags: dict[int, list[str]] = {}
    for word in extra:
        if match := re.fullmatch(r"\+(\d+):(--[\w-]+=\S+)", word):
            flags.setdefault(int(match.group(1)), []).append(match.group(2))
    return flags


def ensemble_accuracy(workdirs: list[Path], out: Path) -> float:
    """kit.ensemble over the runs' test predictions, scored against the class folder in each Id."""
    kit("kit.ensemble", *map(str, workdirs), "--out", str(out))
    table = pd.read_csv(out, keep_default_na=False)
    truth = table.Id.str.split("/").str[1]  # test/<class>/<photo>
    return float((table["class"] == truth).mean())


def ensemble_run(args: list[str], out: Path) -> tuple[float, str]:
    """kit.ensemble with these arguments: its test accuracy (the class folder in each Id) and what it printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "kit.ensemble", *args, "--out", str(out)], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"kit.ensemble {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    table = pd.read_csv(out, keep_default_na=False)
    return float((table["class"] == table.Id.str.split("/").str[1]).mean()), result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=STANFORD5, help="a class-folder dataset with a labelled test/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--tta", type=int, default=10)
    parser.add_argument("--train-args", default="", help="extra kit.stage flags, quoted")
    parser.add_argument("--folds", type=int, help="train the N folds of the first seed instead of the seeds")
    parser.add_argument("--variants", nargs="+", metavar="NAME=FLAGS",
                        help="compare these kit.stage flag sets on the same seeds (the first is the baseline)")
    args = parser.parse_args()
    if args.variants:
        compare(args)
        return
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not there; see ../shared/real-cars/README.md")
    print(f"{args.data.name}, {args.profile} profile, TTA {args.tta}, extra flags: {args.train_args or 'none'}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    print_probe(args.data)
    runs = ([(args.seeds[0], f"{k}/{args.folds}") for k in range(1, args.folds + 1)] if args.folds
            else [(seed, "") for seed in args.seeds])
    print(f"{'run':>4}  {'val acc':>7}  {'test acc':>8}  {'test TTA':>8}  {'train s':>7}")
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="real-cars-"))
    for k, (seed, fold) in enumerate(runs):
        row = one_run(args.data, scratch / f"run{k}", seed, fold, args.profile, shlex.split(args.train_args), args.tta)
        rows.append(row)
        print(f"{row['run']:>4}  {row['val']:>7.4f}  {row['test']:>8.4f}  {row['test_tta']:>8.4f}  "
              f"{row['train_s']:>7.1f}", flush=True)
    chance = 1 / rows[0]["classes"]
    for key, name in (("val", "validation"), ("test", "test, no TTA"), ("test_tta", f"test, TTA {args.tta}")):
        values = [row[key] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<16} {statistics.mean(values):.4f} +- {spread:.4f}  ({statistics.mean(values) / chance:.2f}x "
              f"chance {chance:.2f})")
    gains = [row["test_tta"] - row["test"] for row in rows]
    print(f"TTA gain on test: {statistics.mean(gains):+.4f} (per run: {', '.join(f'{g:+.4f}' for g in gains)})")
    if len(rows) > 1:
        combined = ensemble_accuracy([row["workdir"] for row in rows], scratch / "ensemble.csv")
        print(f"ensemble of the {len(rows)} runs, test, TTA {args.tta}: {combined:.4f} "
              f"({combined / chance:.2f}x chance; best single run {max(r['test_tta'] for r in rows):.4f})")
    shutil.rmtree(scratch)


def compare(args: argparse.Namespace) -> None:
    """Each variant on every seed, then one table: test accuracy (TTA) and its difference to the first variant."""
    seeds = f"seeds {' '.join(map(str, args.seeds))}"
    print(f"{args.data.name}, {args.profile} profile, TTA {args.tta}, "
          f"{f'the {args.folds} folds of seed {args.seeds[0]}' if args.folds else seeds}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    probe = print_probe(args.data)
    scratch = Path(tempfile.mkdtemp(prefix="real-cars-"))
    results: dict[str, list[dict]] = {}
    for k, variant in enumerate(args.variants):
        name, _, flags = variant.partition("=")
        results[name] = []
        runs = ([(args.seeds[0], f"{f}/{args.folds}") for f in range(1, args.folds + 1)] if args.folds
                else [(seed, "") for seed in args.seeds])
        for seed, fold in runs:
            row = one_run(args.data, scratch / f"v{k}-s{seed}-f{fold.replace('/', 'of')}", seed, fold, args.profile,
                          shlex.split(flags), args.tta)
            results[name].append(row)
            where = f"seed {seed}{' fold ' + fold if fold else ''}"
            print(f"{name:<12} {where}: val {row['val']:.4f} test {row['test']:.4f} "
                  f"test TTA {row['test_tta']:.4f} ({row['train_s']:.0f} s)", flush=True)
    base = results[next(iter(results))]
    print(f"\n{'variant':<12} {'flags':<44} {'val acc':>15} {'test acc (TTA)':>15} {'vs first':>16} {'train s':>7}")
    for variant, (name, rows) in zip(args.variants, results.items()):
        val, test = [r["val"] for r in rows], [r["test_tta"] for r in rows]
        diffs = [r["test_tta"] - b["test_tta"] for r, b in zip(rows, base)]  # paired by seed
        error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        print(f"{name:<12} {variant.partition('=')[2] or '-':<44} {statistics.mean(val):.4f}+-{_sd(val):.4f} "
              f"{statistics.mean(test):.4f}+-{_sd(test):.4f} {statistics.mean(diffs):+.4f}+-{error:.4f} "
              f"{statistics.mean(r['train_s'] for r in rows):>7.0f}")
    print("(mean +- standard deviation over the seeds; 'vs first': mean paired difference +- its standard error)")
    print(f"linear probe (baseline): {probe:.4f}")
    print(f"(work directories kept until the end in {scratch})")
    if args.folds:
        out_of_fold(results, scratch)
    elif len(args.seeds) > 1:
        for name, rows in results.items():
            combined = ensemble_accuracy([r["workdir"] for r in rows], scratch / f"{name}-ensemble.csv")
            print(f"ensemble of {name}'s {len(rows)} seeds, test, TTA {args.tta}: {combined:.4f} "
                  f"(best single run {max(r['test_tta'] for r in rows):.4f})")
    shutil.rmtree(scratch)


def out_of_fold(results: dict[str, list[dict]], scratch: Path) -> None:
    """Each variant's folds as one member: their cross-validated accuracy, and the ensemble's test accuracy with
    equal weights on every run against weights fitted on the out-of-fold probabilities."""
    groups = [["--oof", *map(str, (r["workdir"] for r in rows))] for rows in results.values()]
    every = [str(r["workdir"]) for rows in results.values() for r in rows]
    plain, _ = ensemble_run(every, scratch / "plain.csv")
    members, said = ensemble_run([a for g in groups for a in g], scratch / "members.csv")
    weighted, said_weighted = ensemble_run([a for g in groups for a in g] + ["--weights", "oof"],
                                           scratch / "weighted.csv")
    print(said.strip())
    print(said_weighted.strip().splitlines()[0])
    print(f"test accuracy, TTA: plain mean of all {len(every)} runs {plain:.4f}; members' mean (equal weights) "
          f"{members:.4f}; members weighted by their out-of-fold probabilities {weighted:.4f}")


def print_probe(data: Path) -> float:
    """The baseline row: a linear probe on Lite0's ImageNet features at 224 px, measured now."""
    probe = linear_probe(data)
    print(f"baseline: linear probe on efficientnet-lite0's ImageNet features, 224 px, {probe['train']} training "
          f"photos: test {probe['test']:.4f} ({probe['seconds']:.0f} s)", flush=True)
    return probe["test"]


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
