"""Run the whole job, continuing where it stopped: data, every stage not yet done, prediction.

    python -m kit                     # the real competition (Kaggle credentials, a GPU)
    python -m kit --smoke             # synthetic data, tiny backbone: minutes on a CPU, no network
    python -m kit --time-budget 700   # stop with a checkpoint before a session limit; run again to continue

Exit codes: 0 everything done and predicted, 3 stopped with a checkpoint (run the same command
again), 2 a user error, 1 anything else (an unreadable test image among them).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from kit import predict
from kit.cli import EXIT_DONE, EXIT_FAILED, EXIT_STOPPED, add_workdir, main_guard
from kit.config import PROFILES, TTA_VIEWS, Workdir
from kit.dataset import is_verified, read_description, read_test
from kit.download import download
from kit.records import Budget
from kit.stage import add_training_options, prepare_devices, train
from kit.synthetic import write_synthetic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    parser.add_argument("--smoke", action="store_true", help="the same as --profile smoke: synthetic data, in "
                                                             "<workdir>/smoke")
    parser.add_argument("--tta", type=int, default=TTA_VIEWS, help=f"test-time views (default {TTA_VIEWS})")
    add_training_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else args.profile]
    workdir = Workdir.resolve(args.workdir, profile, args.cache_dir)
    prepare_devices(args, workdir)
    print(f"== data ({workdir.data})")
    if is_verified(workdir):
        print("verified; nothing to do")
    elif profile.synthetic:
        print(write_synthetic(workdir, **profile.synthetic))
    else:
        download(workdir)

    print(f"== training ({profile.name} profile, {len(profile.stages)} stages)")
    args.all = True
    if train(workdir, profile, args) != "done":
        return EXIT_STOPPED  # stopped cleanly with a checkpoint; the same command continues

    if read_test(workdir).empty:
        print(f"No test images in {workdir.data}: training is done. Name any photos with "
              f"'{workdir.command('kit.predict', '--folder', 'DIR')}'.")
        return EXIT_DONE
    print(f"== prediction (TTA {args.tta})")
    loaded = predict.load_model(predict.weights_path(workdir))
    print(f"Model: {loaded.describe()}")
    needed = predict.expected_seconds(workdir, loaded, args.tta, validation=False)
    if not predict.fits_budget(Budget.minutes(args.time_budget), needed, "Prediction", "Run the same command again "
                               "in a new session: training is done, so it goes straight to the prediction."):
        return EXIT_STOPPED
    table, unreadable, written = predict.predict_test(workdir, loaded, args.tta, loaded.config.seed, args.workers)
    print(f"Wrote {written} ({len(table)} rows)")
    if unreadable:
        print(f"error: {len(unreadable)} test images could not be read: {', '.join(unreadable)}")
        return EXIT_FAILED
    steps = [("kit.report",), ("kit.demo", "--share")]
    if written.name == predict.SUBMISSION and read_description(workdir).source != "synthetic":  # Kaggle would take it
        steps.insert(1, ("kit.submit", "--message", "'...'"))
    print("Next: " + ", ".join(workdir.command(m, *a) for m, *a in steps))
    return EXIT_DONE


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
