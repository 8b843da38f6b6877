"""Test accuracy on real photos, averaged over seeds: the baseline later training options are compared with.

    python bench/real_cars.py                         # stanford5, smoke profile, seeds 1 2 3
    python bench/real_cars.py --seeds 1 2 3 4 5
    python bench/real_cars.py --train-args "--class-weights"   # any kit.stage flags, for a comparison

Each seed is a full user run in its own work directory and processes: kit.download --from-dir,
kit.stage --all --seed S, kit.report (validation, and the dataset's labelled test folder). It
prints one row per seed, then the mean +- standard deviation and the ratio to chance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STANFORD5 = ROOT.parent / "shared" / "real-cars" / "stanford5"


def kit(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def one_seed(data: Path, seed: int, profile: str, train_args: list[str], tta: int) -> dict:
    """Download, train and report in a fresh work directory; the report's figures and the wall time."""
    with tempfile.TemporaryDirectory() as folder:
        where = ["--profile", profile, "--workdir", folder]
        started = time.time()
        kit("kit.download", "--from-dir", str(data), *where)
        kit("kit.stage", "--all", "--seed", str(seed), *train_args, *where)
        trained = time.time() - started
        kit("kit.report", "--tta", str(tta), *where)
        report = Path(folder, "smoke" if profile == "smoke" else "", "submissions", "report", "metrics.json")
        metrics = json.loads(report.read_text())
    test = metrics["test"]["accuracy"]
    return {"seed": seed, "val": metrics["validation"]["accuracy"]["no TTA"], "test": test["no TTA"],
            "test_tta": test[f"TTA {tta}"], "classes": len(metrics["classes"]), "train_s": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=STANFORD5, help="a class-folder dataset with a labelled test/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--tta", type=int, default=10)
    parser.add_argument("--train-args", default="", help="extra kit.stage flags, quoted")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not there; see ../shared/real-cars/README.md")
    print(f"{args.data.name}, {args.profile} profile, TTA {args.tta}, extra flags: {args.train_args or 'none'}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    print(f"{'seed':>4}  {'val acc':>7}  {'test acc':>8}  {'test TTA':>8}  {'train s':>7}")
    rows = []
    for seed in args.seeds:
        row = one_seed(args.data, seed, args.profile, shlex.split(args.train_args), args.tta)
        rows.append(row)
        print(f"{seed:>4}  {row['val']:>7.4f}  {row['test']:>8.4f}  {row['test_tta']:>8.4f}  {row['train_s']:>7.1f}",
              flush=True)
    chance = 1 / rows[0]["classes"]
    for key, name in (("val", "validation"), ("test", "test, no TTA"), ("test_tta", f"test, TTA {args.tta}")):
        values = [row[key] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<16} {statistics.mean(values):.4f} +- {spread:.4f}  ({statistics.mean(values) / chance:.2f}x "
              f"chance {chance:.2f})")
    gains = [row["test_tta"] - row["test"] for row in rows]
    print(f"TTA gain on test: {statistics.mean(gains):+.4f} (per seed: {', '.join(f'{g:+.4f}' for g in gains)})")


if __name__ == "__main__":
    main()
