"""Run the fine-tuning stages.

    python -m kit.stage --step 1             # stage 1 (head only); stage N starts from N-1's best weights
    python -m kit.stage --step 5 --resume    # continue an interrupted stage 5 at its next batch
    python -m kit.stage --all                # every stage not yet done, resuming an interrupted one
    python -m kit.stage --status             # what is done, interrupted, or not started

Checkpoints go to <workdir>/weights/stage_N/ every --save-every steps (default: about every ten
minutes) and at every epoch end. --time-budget stops cleanly with a checkpoint before a Colab or
Kaggle session limit.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from kit.cli import KitError, add_workdir, main_guard
from kit.config import PROFILES, SEED, STEPS, VAL_FRACTION, Workdir, override_stage, stage_of
from kit.pipeline import DEFAULT_WORKERS


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `kit.stage` and `kit` (the run-everything command)."""
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="stage table and model: colab (EfficientNetB6, the recipe; default) "
                             "or smoke (tiny, minutes on a CPU)")
    parser.add_argument("--backbone", help="backbone registry name (default: the profile's, efficientnet-b6)")
    parser.add_argument("--weights", help="stage 1 backbone weights: imagenet, noisy-student, none, or a file")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="stop cleanly with a checkpoint before this many minutes have passed")
    parser.add_argument("--save-every", type=int, metavar="STEPS",
                        help="checkpoint every STEPS batches (default: ~10 min)")
    parser.add_argument("--precision", choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"], default="auto",
                        help="auto: mixed precision on a GPU, float32 on a CPU")
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic ops (bit-exact resume; slower on GPU)")
    parser.add_argument("--class-weights", action="store_true", help="weight the loss against class imbalance")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="CPU threads for loading and augmenting")
    parser.add_argument("--cache-dir", type=Path,
                        help="image cache folder (default: $KIT_CACHE_DIR or <workdir>/cache)")
    parser.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--step", type=int, choices=STEPS, metavar="N", help=f"run stage N ({STEPS[0]}-{STEPS[-1]})")
    what.add_argument("--all", action="store_true", help="run every stage not yet done")
    what.add_argument("--status", action="store_true", help="show the stages' state")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the stage's interrupted run at its next batch")
    again.add_argument("--restart", action="store_true", help="discard the stage's run and start it over")
    add_training_options(parser)
    table = parser.add_argument_group("stage overrides (default: the profile's stage table)")
    table.add_argument("--image-size", type=int)
    table.add_argument("--batch-size", type=int)
    table.add_argument("--lr", type=float)
    table.add_argument("--epochs", type=int)
    table.add_argument("--steps-per-epoch", type=int)
    return parser


def options_from(args: argparse.Namespace):
    from kit.stages import Options

    if args.time_budget is not None and args.time_budget <= 0:
        raise KitError("--time-budget is in minutes and must be positive.")
    return Options(resume=getattr(args, "resume", False), restart=getattr(args, "restart", False),
                   time_budget_s=args.time_budget * 60 if args.time_budget else None, save_every=args.save_every,
                   precision=args.precision, jit=args.jit, deterministic=args.deterministic,
                   class_weights=args.class_weights, workers=max(1, args.workers), cache_dir=args.cache_dir)


def profile_and_workdir(args: argparse.Namespace):
    """The profile (the one already trained in this work directory unless --profile says otherwise)."""
    from kit.stages import read_manifest

    profile = PROFILES[args.profile or "colab"]
    workdir = Workdir.resolve(args.workdir, profile)
    if args.profile is None:
        saved = read_manifest(workdir)["config"]
        if saved and saved["profile"] != profile.name:
            profile = PROFILES[saved["profile"]]
    return profile, workdir


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kit import stages

    profile, workdir = profile_and_workdir(args)
    if args.status:
        print(f"{profile.name} profile in {workdir}")
        print(stages.status_table(workdir, profile.stages))
        return 0
    config = stages.run_config(workdir, profile, args.backbone, args.weights, args.seed, args.val_fraction)
    options = options_from(args)
    if args.all:
        return 0 if stages.run_all(workdir, profile.stages, config, options) in ("done", "stopped") else 1
    stage = override_stage(stage_of(profile, args.step), image_size=args.image_size, batch_size=args.batch_size,
                           lr=args.lr, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    if options.resume and stages.stage_status(workdir, stage.step) == "not started":
        print(f"Stage {stage.step} has no interrupted run to resume; starting it.")
        options.resume = False
    stages.run_stage(workdir, stage, config, options)
    return 0


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
