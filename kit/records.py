"""The two records of a training run: what a model learns, and how a run executes.

What is learned is fixed when it starts, saved in the manifest, and restored on every resume:
  RunConfig  what every stage shares (profile, backbone, weights, head, seed, validation split,
             the dataset's classes, pseudo-labels), fixed when stage 1 starts;
  StagePlan  one stage's row of the table with its overrides, its loss weighting and its training
             options (label smoothing, EMA, schedule, MixUp/CutMix, weight decay), fixed when that
             stage starts; for the final fit, also what it replays.
  StageRecord  one stage's entry in the manifest (kit.manifest): its status, plan, position, results.
A flag that contradicts a saved record is refused, naming the flag and the way out; a flag left
out means "as saved", so `--all`, `python -m kit` and the notebooks resume with no flags at all.

How a run executes may change from one session to the next without changing what is learned:
  Execution  resume or restart, the time budget, checkpoint interval, the devices (kit.devices),
             precision (it follows the machine), XLA, determinism, loader threads.
(Where files go, the image cache included, is the work directory's: kit.config.Workdir.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

from kit.cli import KitError, session_start
from kit.config import (
    COMPETITION_CLASSES,
    FINAL_FIT_STEP,
    SEED,
    VAL_FRACTION,
    Head,
    Profile,
    Stage,
    TrainingOptions,
    Workdir,
    override_stage,
    stage_of,
)


@dataclass(frozen=True)
class RunConfig:
    """What every stage of one training run shares; fixed when stage 1 starts."""

    profile: str
    backbone: str
    weights: str
    head_units: int
    head_dropout: float
    head_bn_momentum: float
    seed: int
    val_fraction: float
    classes: tuple[str, ...] = COMPETITION_CLASSES  # the model's outputs, in order (runs before 0.3: these)
    fold: str = ""  # "K/N": validate on fold K of a stratified N-fold split; "" for the usual split
    pseudo_labels: str = ""  # sha256 of the pseudo-label list (kept as weights/pseudo_labels.csv); "" for none

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))  # a list when read back from JSON

    @property
    def head(self) -> Head:
        return Head(self.head_units, self.head_dropout, self.head_bn_momentum)


@dataclass(frozen=True)
class FinalFit:
    """The final fit replays stage `replays` on training + validation images, from the weights it started from.

    There is no validation left to choose an epoch or lower the learning rate on, so it trains for
    the epochs the validated stage found best, at the learning rate that stage had in each of them.
    """

    replays: int
    epochs: int
    lrs: tuple[float, ...]  # the validated stage's learning rate in each epoch (plateau schedule)

    def __post_init__(self):
        object.__setattr__(self, "lrs", tuple(self.lrs))


@dataclass(frozen=True)
class StagePlan:
    """What one stage learns: its row of the table (overrides applied), loss weighting and training options."""

    stage: Stage
    class_weights: bool = False
    options: TrainingOptions = TrainingOptions()
    final_fit: FinalFit | None = None

    @property
    def epochs(self) -> int:
        """Epochs to train: the row's, or for the final fit the validated stage's best epoch."""
        return self.final_fit.epochs if self.final_fit else self.stage.epochs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "StagePlan":
        final = saved.get("final_fit")
        return cls(Stage(**saved["stage"]), bool(saved.get("class_weights", False)),
                   TrainingOptions(**saved.get("options", {})), FinalFit(**final) if final else None)


@dataclass
class StageRecord:
    """One stage's entry in the manifest."""

    status: str = ""  # as written: "running", "interrupted" or "done" ("" before it starts)
    plan: dict | None = None  # StagePlan.to_dict(), fixed when the stage starts
    position: dict | None = None  # {"epoch", "step"} of the newest checkpoint while interrupted
    runtime: dict = field(default_factory=dict)  # precision, device, devices, backend, jit of the last session
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    epochs: int | None = None  # epochs finished
    wall_time_s: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    stopped: str | None = None  # why the kit itself last stopped it (budget, signal); None once it runs again
    images_seen: int | None = None  # training images the run had seen at its newest save, stages before included
    settings: dict | None = None  # runs started before plans were saved kept their stage row here
    other: dict = field(default_factory=dict)  # keys a newer kit wrote: kept as they are

    @classmethod
    def from_dict(cls, saved: dict) -> "StageRecord":
        names = {f.name for f in dataclasses.fields(cls)} - {"other"}
        known = {k: v for k, v in saved.items() if k in names}
        return cls(**known, other={k: v for k, v in saved.items() if k not in names})

    def to_dict(self) -> dict:
        saved = {k: v for k, v in dataclasses.asdict(self).items() if k != "other" and v not in (None, {})}
        return {**self.other, **saved}

    @property
    def stage_plan(self) -> StagePlan | None:
        return StagePlan.from_dict(self.plan) if self.plan else None


@dataclass(frozen=True)
class Requested:
    """What the command line asked for; None means 'not given' (the saved value, or the profile's)."""

    backbone: str | None = None
    weights: str | None = None
    seed: int | None = None
    val_fraction: float | None = None
    fold: str | None = None
    class_weights: bool | None = None
    pseudo_labels: str | None = None  # the list's sha256
    stage_overrides: dict = field(default_factory=dict)  # image_size, batch_size, lr, epochs, steps_per_epoch
    options: dict = field(default_factory=dict)  # TrainingOptions fields given on the command line


@dataclass(frozen=True)
class Budget:
    """A wall-clock deadline, counted from the session's start (or this process's), not from now."""

    deadline: float = math.inf  # time.time() seconds

    @classmethod
    def minutes(cls, minutes: float | None) -> "Budget":
        if minutes is None:
            return cls()
        return cls(session_start() + minutes * 60)

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def limited(self) -> bool:
        return math.isfinite(self.deadline)


@dataclass
class Execution:
    """How to run (not what to learn): may change between sessions without changing the result."""

    resume: bool = False
    restart: bool = False
    budget: Budget = Budget()
    save_every: int | None = None  # steps; None: about every SAVE_INTERVAL_S seconds
    devices: int = 1  # data parallel over this many devices; each batch is split across them
    precision: str = "auto"
    jit: str = "auto"  # "auto" (Keras' rule), "on" or "off"
    deterministic: bool = False
    workers: int = 2


# ---- resolving a command line against the saved records ---------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_config(saved: dict | None, profile: Profile, requested: Requested, workdir: Workdir,
               classes: tuple[str, ...]) -> RunConfig:
    """The run's config: the saved one once stage 1 has started, refusing flags (or data) that contradict it."""
    if saved is None:
        return RunConfig(profile.name, requested.backbone or profile.backbone, requested.weights or profile.weights,
                         profile.head.units, profile.head.dropout, profile.head.bn_momentum,
                         SEED if requested.seed is None else requested.seed,
                         VAL_FRACTION if requested.val_fraction is None else requested.val_fraction, tuple(classes),
                         requested.fold or "", requested.pseudo_labels or "")
    config = RunConfig(**saved)
    if config.classes != tuple(classes):
        gone, new = sorted(set(config.classes) - set(classes)), sorted(set(classes) - set(config.classes))
        change = "; ".join(part for part in (gone and f"gone: {', '.join(gone[:5])}",
                                             new and f"new: {', '.join(new[:5])}") if part) or "their order changed"
        raise KitError(f"The run in {workdir.weights} was trained on {len(config.classes)} classes and the dataset in "
                       f"{workdir.data} now has {len(classes)} ({change}). A model cannot continue on other classes: "
                       "train in another --workdir, or download the dataset the run started with again.")
    wanted = {"profile": profile.name, "backbone": requested.backbone, "weights": requested.weights,
              "seed": requested.seed, "val_fraction": requested.val_fraction, "fold": requested.fold,
              "pseudo_labels": requested.pseudo_labels}
    clashes = [f"{_flag(k)} {v} (this run: {getattr(config, k)})" if k != "pseudo_labels" else
               f"--pseudo-labels with {'another list than' if config.pseudo_labels else 'a list; started without'} "
               "this run's" for k, v in wanted.items() if v is not None and v != getattr(config, k)]
    if clashes:
        raise KitError(f"The run in {workdir.weights} was started with other settings: {'; '.join(clashes)}. A run "
                       "keeps what it started with, or its stages would mix two models. Drop those flags to "
                       "continue it, or use another --workdir for a new run.")
    return config


def stage_plan(saved: dict | None, profile: Profile, step: int, requested: Requested, workdir: Workdir) -> StagePlan:
    """Stage `step`'s plan: the saved one once it has started, else the table with the requested overrides."""
    if saved is not None:
        return resumed_plan(saved, step, requested, workdir)
    return StagePlan(override_stage(stage_of(profile, step), **requested.stage_overrides),
                     bool(requested.class_weights), dataclasses.replace(profile.options, **requested.options))


def resumed_plan(saved: dict, step: int, requested: Requested, workdir: Workdir) -> StagePlan:
    """A started stage's saved plan, refusing flags that contradict it."""
    plan = StagePlan.from_dict(saved)
    clashes = [f"{_flag(k)} {v} (saved: {getattr(plan.stage, k)})" for k, v in requested.stage_overrides.items()
               if v is not None and v != getattr(plan.stage, k)]
    clashes += [f"{_flag(k)} {v} (saved: {getattr(plan.options, k)})" for k, v in requested.options.items()
                if v != getattr(plan.options, k)]
    if requested.class_weights is not None and requested.class_weights != plan.class_weights:
        clashes.append(f"{'--class-weights' if requested.class_weights else '--no-class-weights'} "
                       f"(saved: {'with' if plan.class_weights else 'without'} class weights)")
    if clashes:
        again = ("--final-fit",) if plan.final_fit else ("--step", str(step))
        raise KitError(f"Stage {step} was started with other settings: {'; '.join(clashes)}. A stage keeps what it "
                       f"started with, so a resume continues the same training. Drop those flags to resume "
                       f"('{workdir.command('kit.stage', *again, '--resume')}'), or start stage {step} "
                       f"over with them ('{workdir.command('kit.stage', *again, '--restart')}' and "
                       "the flags).")
    return plan


def final_fit_plan(saved: dict | None, last: StageRecord, history: list[dict], requested: Requested,
                   workdir: Workdir) -> StagePlan:
    """The final fit's plan: the saved one once it has started, else the last stage's plan, replayed.

    `last` is the last stage's manifest record (its plan, status, best epoch) and `history` its
    log, one row per epoch with its learning rate; the final fit trains for the best epoch's count.
    """
    if saved is not None:
        return resumed_plan(saved, FINAL_FIT_STEP, requested, workdir)
    if last.status != "done" or not last.plan or not last.best_epoch or not history:
        raise KitError(f"The final fit replays the last stage on training + validation images, for the epochs that "
                       f"stage found best, so stage {FINAL_FIT_STEP - 1} must be done first (see "
                       f"'{workdir.command('kit.stage', '--status')}').")
    if any(v is not None for v in requested.stage_overrides.values()) or requested.options \
            or requested.class_weights is not None:
        raise KitError("The final fit repeats the last stage exactly as it was validated, so it takes no stage "
                       "overrides or training options: drop them (they would make it a different, unvalidated "
                       "training).")
    replayed, best = StagePlan.from_dict(last.plan), int(last.best_epoch)
    return StagePlan(dataclasses.replace(replayed.stage, step=FINAL_FIT_STEP), replayed.class_weights,
                     replayed.options, FinalFit(replayed.stage.step, best,
                                                tuple(float(row["lr"]) for row in history[:best])))
