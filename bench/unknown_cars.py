"""How often a model calls a car unknown: its own test photos against photos of cars it was never taught.

    python bench/unknown_cars.py --workdir RUN --profile cpu     # a stanford5 run of bench/real_cars.py
    python bench/unknown_cars.py --workdir RUN --profile cpu --outside ../shared/competition/test_upload_sample

The run's model learns what it knows as the demo does (kit.predict.learn_known: its training photos'
features, thresholds from its validation photos, about 95% of which pass). Then every photo of the
dataset's labelled test folder (cars it knows) and of --outside (cars it does not: by default the
competition's 30 real sample photos, Ladas, a Ford Focus and a VW Passat) is judged by each rule
alone and by both, in the same run: the probability threshold alone is the baseline.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
from linear_probe import ROOT  # puts the repository on the path

from kit.config import PROFILES, Workdir
from kit.dataset import read_index
from kit.layout import scan_folder
from kit.pipeline import Uncached
from kit.predict import learn_known, load_model, photo_features, weights_path

OUTSIDE = ROOT.parent / "shared" / "competition" / "test_upload_sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--outside", type=Path, default=OUTSIDE, help="photos of cars the model was not taught")
    args = parser.parse_args()
    workdir = Workdir.resolve(args.workdir, PROFILES[args.profile])
    loaded = load_model(weights_path(workdir))
    started = time.time()
    known = learn_known(workdir, loaded)
    if known is None:
        raise SystemExit("The run has no split to learn from: give the work directory of a trained run.")
    index = read_index(workdir)
    inside = list(index[(index.subset == "test") & index.Category.notna()].path)
    outside = [str(p) for p in scan_folder(args.outside).paths]
    print(f"{loaded.describe()}; bank of {len(known.bank)} training photos, k {known.k}, distance <= "
          f"{known.max_distance:.4f}, top probability >= {known.min_probability:.4f} ({time.time() - started:.0f} s)")
    print(f"machine: {platform.machine()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(f"{'rule':<34} {'own test photos flagged':>24} {'outside photos flagged':>24}")
    rows = {}
    for name, paths in (("inside", inside), ("outside", outside)):
        features, probs = photo_features(loaded, Uncached(paths, loaded.image_size), paths)
        rows[name] = {"probability alone (baseline)": probs.max(axis=1) < known.min_probability,
                      "nearest neighbours alone": known.distances(features) > known.max_distance,
                      "either (the kit's rule)": ~known.is_known(features, probs)}
    for rule in rows["inside"]:
        print(f"{rule:<34} {rows['inside'][rule].mean():>17.3f} ({rows['inside'][rule].sum()}/{len(inside)})"
              f" {rows['outside'][rule].mean():>17.3f} ({rows['outside'][rule].sum()}/{len(outside)})")
    base = np.mean(rows["outside"]["probability alone (baseline)"])
    both = np.mean(rows["outside"]["either (the kit's rule)"])
    print(f"outside photos flagged, the kit's rule / the probability alone: {both / max(base, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
