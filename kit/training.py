"""Staged fine-tuning with exact resume: the training loop, readable top to bottom.

A stage trains for its epochs from the previous stage's best weights. Its loop is a plain loop
over batches rather than `model.fit`, because fit can only start an epoch at its first batch, and
resuming must start at the very next batch; each batch goes through kit.train_step, which runs
the step fit() compiles without train_on_batch's per-call wait. Everything the loop knows (position,
learning rate, plateau and early-stopping counters, best accuracy, history, running epoch
metrics) is a LoopState saved with the weights and the optimizer in one atomic checkpoint.

Reading order: the loop's state, then `run_stage`, which checks it may
start, prepares the data and the model, and then alternates training an epoch, validating it
(kit.inference, the path kit.predict scores with) and saving; `run_all` chains the stages under
one time budget (its clock is kit.timer). What is done lives in the manifest (kit.manifest), which the loop
updates.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kit import checkpoint, recipe
from kit.augment import train_transform
from kit.backbones import block_depths, build_model, set_trainable
from kit.cli import KitError
from kit.config import Stage, Workdir
from kit.dataset import Split, class_weights, drop_unreadable, load_split, read_test
from kit.devices import Parallel, cache_compilations, choose_precision, describe_device, jit_compile
from kit.files import write_text
from kit.inference import Subset, predict_labelled
from kit.manifest import BEST, Manifest, best_weights, stage_args, status_table
from kit.pipeline import Batches, CacheIncomplete, cache_is_complete, labelled_paths, open_training_cache
from kit.plots import plot_curves
from kit.records import Execution, RunConfig, StagePlan
from kit.tensorboard_log import LOG_EVERY, EventLog, TrainingWindow
from kit.timer import StopRequests, Timer, start_cost
from kit.train_step import TrainStep

# ---- the loop's state ---------------------------------------------------------------------------

@dataclass
class LoopState:
    """Everything the loop knows, saved in every checkpoint; `epoch` and `step` name the next batch."""

    plan: dict
    config: dict
    epoch: int = 0
    step: int = 0
    lr: float = 0.0
    plateau: dict = field(default_factory=lambda: {"best": -1.0, "wait": 0})
    early: dict = field(default_factory=lambda: {"best": -1.0, "wait": 0})
    best_val_accuracy: float = -1.0
    best_epoch: int | None = None
    sums: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "seen": 0})  # this epoch so far
    history: list = field(default_factory=list)
    wall_time_s: float = 0.0
    stopped_early: bool = False
    runtime: dict = field(default_factory=dict)  # the precision and device of the session that saved it
    images_seen: int = 0  # training images the run has seen, stages before included: the TensorBoard position

    @property
    def stage(self) -> Stage:
        return Stage(**self.plan["stage"])

    @property
    def stage_plan(self) -> StagePlan:
        return StagePlan.from_dict(self.plan)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def add_step(self, loss: float, accuracy: float, images: int) -> None:
        """One finished step's figures into the epoch's running sums (host floats, in step order)."""
        self.sums["loss"] += loss * images
        self.sums["correct"] += accuracy * images
        self.sums["seen"] += images
        self.images_seen += images

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        if "plan" not in saved:  # format 1 kept the stage row alone
            saved = {**saved, "plan": {"stage": saved["stage"], "class_weights": False}}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def after_epoch(state: LoopState, plan: StagePlan, val_accuracy: float) -> bool:
    """ReduceLROnPlateau and EarlyStopping on validation accuracy, as in the recipe; True: stop.

    A cosine schedule sets the rate itself (early stopping still applies). The final fit has no
    validation to judge by: it takes the rate the validated stage had in the next epoch.
    """
    stage, plateau, early = plan.stage, state.plateau, state.early
    if plan.final_fit:
        state.lr = plan.final_fit.lrs[min(state.epoch + 1, len(plan.final_fit.lrs) - 1)]
        return False
    if plan.options.schedule == "plateau":
        if val_accuracy > plateau["best"] + 1e-4:
            plateau.update(best=val_accuracy, wait=0)
        else:
            plateau["wait"] += 1
            if plateau["wait"] >= stage.plateau_patience:
                state.lr = max(state.lr * stage.plateau_factor, stage.min_lr)
                plateau["wait"] = 0
    if val_accuracy > early["best"]:
        early.update(best=val_accuracy, wait=0)
    else:
        early["wait"] += 1
    return early["wait"] >= stage.early_stop_patience


# ---- one stage ----------------------------------------------------------------------------------

@dataclass
class ValidationSet:
    """The validation photos from the stage's cache, keyed by Id, with their classes."""

    images: Subset
    keys: list[str]
    labels: np.ndarray
    batch_size: int  # images per forward pass: twice the training batch, as no gradients are kept
    workers: int


@dataclass
class StageData:
    train: Batches
    val: ValidationSet
    class_weight: np.ndarray | None  # one weight per class, or None
    mix: recipe.BatchMixer  # one-hot targets, MixUp/CutMix where the options ask
    train_images: int
    val_images: int


def run_stage(manifest: Manifest, plan: StagePlan, config: RunConfig, execution: Execution) -> str:
    """Train one stage to its end or until stopped; return 'done' or 'stopped' (progress saved)."""
    stage, workdir = plan.stage, manifest.workdir
    previous = check_can_start(manifest, plan, execution)
    costs = manifest.costs
    timer = Timer(costs, stage, execution.budget.deadline)
    with StopRequests() as stop_requests:
        try:
            data = prepare_data(workdir, plan, config, execution, costs)
        except CacheIncomplete as why:
            if previous is None and not execution.restart:  # begun: --all and a resume keep this plan
                manifest.begin(plan, config, resuming=False, restart=False)
            return manifest.stop(stage.step, str(why))
        # Only now, with every check passed and the data ready, is an old run of the stage given up.
        begun = manifest.begin(plan, config, resuming=previous is not None, restart=execution.restart)
        if stop_requests.requested or timer.would_pass("setup"):
            why = "a stop request" if stop_requests.requested else "the time budget (the model's set-up would not fit)"
            return manifest.stop(stage.step, why)
        setup_started = time.monotonic()
        model, state, parallel = prepare_model(workdir, plan, config, execution, previous, data, begun.unfreezes)
        if not previous:
            state.images_seen = begun.images_seen
        step, events = TrainStep(model, parallel), EventLog(workdir.tensorboard)
        print(f"Stage {stage.step}{_final_fit_note(plan)}: {config.backbone} at {stage.image_size} px, batch "
              f"{stage.batch_size}, lr {state.lr:.2g}, {stage.describe_trainable()}, {state.runtime['precision']}"
              f"{' with XLA' if state.runtime['jit'] else ''} on {state.runtime['device']}"
              f"{', ' + parallel.describe() if parallel.count > 1 else ''}, Keras on {state.runtime['backend']}"
              f"{', class-weighted loss' if plan.class_weights else ''}"
              f"{', ' + plan.options.describe() if plan.options.describe() else ''}, "
              f"{data.train_images} training / {data.val_images} validation images, {len(data.train)} steps per "
              "epoch", flush=True)

        try:
            while state.epoch < plan.epochs and not state.stopped_early:
                finished = train_epoch(model, step, data, state, timer, stop_requests, execution, manifest,
                                       setup_started, events)
                setup_started = None
                if not finished or timer.would_pass("validation"):
                    why = "a stop request" if stop_requests.requested else "the time budget"
                    save_checkpoint(manifest, model, state, timer, events)
                    return manifest.stop(stage.step, why, f" at epoch {state.epoch + 1}, step {state.step}, with a "
                                                          "checkpoint")
                validate_epoch(workdir, model, parallel, data, state, timer, events)
                save_checkpoint(manifest, model, state, timer, events)
        finally:
            events.close()
            parallel.close()
    return finish_stage(manifest, state, timer)


def _final_fit_note(plan: StagePlan) -> str:
    if not plan.final_fit:
        return ""
    return (f" (final fit: stage {plan.final_fit.replays} again on training + validation images, "
            f"{plan.final_fit.epochs} epoch{'s' if plan.final_fit.epochs > 1 else ''}, as validated)")


def check_can_start(manifest: Manifest, plan: StagePlan, execution: Execution):
    """Refuse what would lose or mix work; return the checkpoint to resume from (None: from the start).

    It changes nothing: --restart discards the old run only once every check has passed and the
    data is ready (run_stage), so a refused restart leaves the stage, and every later one, as it was.
    """
    workdir, step = manifest.workdir, plan.stage.step
    folder = workdir.stage_dir(step)
    for leftover in folder.glob(".*.tmp"):  # half-written files of a killed run; the renamed ones are intact
        leftover.unlink()
    check_batch_splits(plan.stage, execution.devices)
    status = "not started" if execution.restart else manifest.status(step)
    if status == "done":
        best = manifest.record(step).best_val_accuracy or 0
        raise KitError(f"Stage {step} is already done (best val_acc {best:.4f}). Run "
                       f"the next stage, or '{workdir.command('kit.stage', *stage_args(step), '--restart')}' to "
                       f"train it again from stage {step - 1}'s weights (later stages are then discarded).")
    previous = checkpoint.newest_readable(folder) if status == "interrupted" else None
    if status == "interrupted" and not execution.resume:
        where = (f"at epoch {previous[2]['epoch'] + 1}, step {previous[2]['step']}" if previous
                 else "before its first checkpoint")
        raise KitError(f"Stage {step} was interrupted {where}. Run "
                       f"'{workdir.command('kit.stage', *stage_args(step), '--resume')}' to continue, or --restart "
                       f"to discard that run and start stage {step} over.")
    if status == "interrupted" and previous is None and checkpoint.list_checkpoints(folder):
        raise KitError(f"Every checkpoint of stage {step} in {folder} is damaged, so it cannot continue where it "
                       f"stopped. Starting it over loses that stage's training so far (earlier stages are intact): "
                       f"'{workdir.command('kit.stage', *stage_args(step), '--restart')}'.")
    if status == "not started":
        check_starting_weights(manifest, plan)
    return previous


def check_batch_splits(stage: Stage, devices: int) -> None:
    if stage.batch_size % devices:
        raise KitError(f"Stage {stage.step}'s batch of {stage.batch_size} does not split evenly over {devices} "
                       f"devices. Use --devices with a divisor of {stage.batch_size}, or start the stage with a "
                       f"--batch-size that {devices} divides.")


def check_starting_weights(manifest: Manifest, plan: StagePlan) -> None:
    """A stage starts from the stage before's best weights (the final fit: from those its replayed stage did)."""
    step = plan.stage.step
    start = plan.final_fit.replays if plan.final_fit else step
    if start == 1:
        return
    before, workdir = step - 1, manifest.workdir
    if (status := manifest.status(before)) != "done":
        resume = ["--resume"] if status == "interrupted" else []
        raise KitError(f"Stage {step} starts from stage {before}'s best weights, but stage {before} is {status}. "
                       f"Run '{workdir.command('kit.stage', '--step', str(before), *resume)}' first (or --all).")
    source = best_weights(workdir, start - 1)
    try:
        checkpoint.read(source)
    except checkpoint.CorruptCheckpoint as error:
        again = workdir.command("kit.stage", "--step", str(start - 1), "--restart")
        raise KitError(f"Stage {step} starts from {source}, which is damaged ({error}). Nothing was changed. Train "
                       f"stage {start - 1} again ('{again}'), or copy that file back from a copy of the run.") from None


def run_split(workdir: Workdir, config: RunConfig) -> Split:
    """The run's saved split, its training side extended by the run's pseudo-labelled test photos, if any."""
    return load_split(workdir, config.val_fraction, config.seed, config.fold,
                      workdir.pseudo_labels if config.pseudo_labels else None)


def prepare_data(workdir: Workdir, plan: StagePlan, config: RunConfig, execution: Execution,
                 costs: dict) -> StageData:
    """The saved split, the image cache at this stage's size (built within the budget), seeded batches.

    The final fit trains on the validation images too, and still scores them each epoch (as a
    check that training went as before, not as a held-out figure).
    """
    stage = plan.stage
    split = run_split(workdir, config)
    images = len(split.train) + len(split.val)
    started = time.time()
    was_complete = cache_is_complete(workdir.cache, "train", labelled_paths(split), stage.image_size)
    test_paths = list(read_test(workdir).path) if config.pseudo_labels else []
    cache, positions = open_training_cache(workdir.cache, split, stage.image_size, execution.workers,
                                           deadline=execution.budget.deadline, test_paths=test_paths)
    if not was_complete:
        costs["cache_image_s"] = max(costs.get("cache_image_s", 0.0), (time.time() - started) / images)
    train = drop_unreadable(split.train, cache.unreadable, "training")
    val = drop_unreadable(split.val, cache.unreadable, "validation")
    if plan.final_fit:
        train = pd.concat([train, val], ignore_index=True)
    train_batches = Batches(cache, train.Category.to_numpy(), stage.batch_size,
                            lambda: train_transform(stage.image_size, stage.light_augment), config.seed, stage.step,
                            shuffle=True, workers=execution.workers, steps=stage.steps_per_epoch,
                            positions=train.path.map(positions).to_numpy())
    val_set = ValidationSet(Subset(cache, list(val.path.map(positions))), list(val.Id), val.Category.to_numpy(),
                            stage.batch_size * 2, execution.workers)
    if len(train_batches) == 0:
        raise KitError(f"Stage {stage.step} has {len(train)} training images, fewer than one batch of "
                       f"{stage.batch_size}: lower --batch-size (with --restart) or add data.")
    weights = class_weights(train.Category.to_numpy(), len(config.classes)) if plan.class_weights else None
    mix = recipe.BatchMixer(plan.options, len(config.classes), config.seed, stage.step)
    return StageData(train_batches, val_set, weights, mix, len(train), len(val))


def prepare_model(workdir: Workdir, plan: StagePlan, config: RunConfig, execution: Execution, previous,
                  data: StageData, unfreezes: bool) -> tuple[keras.Model, LoopState, Parallel]:
    """The model at this stage's size, unfrozen as its row says, with the checkpoint's or the last stage's weights.

    Built on the devices the run was given; the batch is split across them, so what the stage
    learns does not depend on how many there are.
    """
    stage = plan.stage
    keras.backend.clear_session()  # a fresh graph per stage when --all runs several in one process
    keras.utils.set_random_seed(config.seed + stage.step)
    if execution.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    cache_compilations(workdir.compiled)
    precision = choose_precision(execution.precision)
    keras.mixed_precision.set_global_policy(precision)
    parallel = Parallel.over(execution.devices)
    with parallel.scope():
        model = build_model(config.backbone, stage.image_size, len(config.classes),
                            config.weights if stage.step == 1 else "none", config.head)
        set_trainable(model, stage.trainable, plan.options.bn)
        parallel.prepare(model)
        model.compile(optimizer=recipe.optimizer(stage, plan.options, len(data.train)),
                      loss=recipe.loss(plan.options), metrics=["categorical_accuracy"],
                      jit_compile=jit_compile(execution.jit))
        model.optimizer.build(model.trainable_variables)
        recipe.scale_rates(model.optimizer, block_depths(model), plan.options,
                           recipe.unfreeze_warmup_steps(plan.options, unfreezes, len(data.train)))
        parallel.build_compiled(model, len(config.classes))
    runtime = {"precision": precision, "device": describe_device(), "jit": bool(model.jit_compile),
               "devices": parallel.count, "backend": keras.backend.backend()}

    try:
        if previous:
            path, arrays, saved = previous
            state = LoopState.from_dict(saved)
            checkpoint.assign_model(model, arrays, path)
            notes = checkpoint.assign_optimizer(model.optimizer, arrays, path)
            print(f"Stage {stage.step}: resuming from {path.name} at epoch {state.epoch + 1}, step {state.step}")
            # Records older than --devices ran on one device; older than the backend field, on this backend.
            before = {"devices": 1, "backend": runtime["backend"], **state.runtime}
            if state.runtime and any(before[k] != runtime[k] for k in RUNTIME_KEYS):
                print(f"note: this stage ran under {_on(before)} and continues under {_on(runtime)}; Adam's state "
                      "is kept"
                      + "".join(f", {n}" for n in notes) + ". The batches and learning rate are the same, so "
                      "training continues correctly, but not bit for bit.")
        else:
            state = LoopState(plan=plan.to_dict(), config=dataclasses.asdict(config),
                              lr=plan.final_fit.lrs[0] if plan.final_fit else stage.lr)
            start = plan.final_fit.replays if plan.final_fit else stage.step  # from the weights it started from
            if start > 1:
                checkpoint.load_weights(best_weights(workdir, start - 1), model)
    except (checkpoint.IncompatibleCheckpoint, checkpoint.CorruptCheckpoint) as error:
        raise KitError(str(error)) from None
    _take_best_on_disk(workdir, state)
    state.runtime = runtime
    if not previous:  # a resumed state already holds the rate its epoch started with
        _set_learning_rate(model, plan, state)
    elif plan.options.schedule != "cosine":
        model.optimizer.learning_rate.assign(state.lr)
    return model, state, parallel


RUNTIME_KEYS = ("precision", "device", "devices", "backend")  # a change of any makes a resume not bit for bit


def _on(runtime: dict) -> str:
    """A stage record's runtime in words: 'float32 on CPU x 2 (data parallel), Keras on jax'."""
    devices = runtime["devices"]
    return (f"{runtime['precision']} on {runtime['device']}" + (f" x {devices} (data parallel)" if devices > 1 else "")
            + f", Keras on {runtime['backend']}")


def _set_learning_rate(model: keras.Model, plan: StagePlan, state: LoopState) -> None:
    """At an epoch's start: the plateau rule's rate into the optimizer, or the cosine schedule's into the log."""
    if plan.options.schedule == "cosine":
        state.lr = recipe.current_learning_rate(model)
    else:
        model.optimizer.learning_rate.assign(state.lr)


def train_epoch(model: keras.Model, step: TrainStep, data: StageData, state: LoopState, timer: Timer,
                stop_requests: StopRequests, execution: Execution, manifest: Manifest,
                setup_started: float | None, events: EventLog) -> bool:
    """Train from the state's position to the epoch's end; False when stopped first (budget or signal).

    Steps are queued (kit.train_step) and their figures arrive one step later; the model's
    variables are brought up to date before every checkpoint and when the epoch ends or stops.
    Every LOG_EVERY steps, their loss, accuracy and speed become a point of the TensorBoard curves.
    """
    stage, plan = state.stage, state.stage_plan
    bar = tqdm(total=len(data.train), initial=state.step, desc=f"stage {stage.step} epoch {state.epoch + 1}/"
               f"{plan.epochs}", disable=not sys.stderr.isatty(), leave=False, mininterval=0.5)
    last_finished = None  # when the newest step's figures arrived: steps are timed finish to finish
    window = TrainingWindow()

    def rate() -> float:  # the step's own rate: a cosine schedule's changes within the epoch (its warm-up) too
        return recipe.learning_rate_at(model.optimizer, state.epoch * len(data.train) + state.step, state.lr)

    def take(figures: list) -> None:
        nonlocal setup_started, last_finished
        if not figures:
            return
        now, seconds = time.monotonic(), None
        if setup_started is not None:  # the first step of a session compiles: part of the set-up
            timer.note("setup", now - setup_started)
            setup_started = None
        elif last_finished is not None:
            seconds = (now - last_finished) / len(figures)
            timer.note("step", seconds)
        last_finished = now
        for loss, accuracy, images in figures:
            state.add_step(loss, accuracy, images)
            window.add(loss, accuracy, images, seconds)
            if window.steps == LOG_EVERY:
                window.emit(events, state.images_seen, rate())

    try:
        for x, y in data.train.epoch(state.epoch, start=state.step):
            if stop_requests.requested or timer.would_pass("step"):
                return False
            x, targets = data.mix(x, y, state.epoch, state.step)
            take(step.run(x, targets) if data.class_weight is None else step.run(x, targets, data.class_weight[y]))
            state.step += 1
            bar.update()
            if state.sums["seen"]:
                bar.set_postfix(loss=f"{state.sums['loss'] / state.sums['seen']:.3f}",
                                acc=f"{state.sums['correct'] / state.sums['seen']:.3f}", refresh=False)
            if timer.save_due(execution.save_every, state.step) and state.step < len(data.train):
                take(step.sync())
                window.emit(events, state.images_seen, rate())
                save_checkpoint(manifest, model, state, timer, events)
                last_finished = None  # the save is no step's time
    finally:
        take(step.sync())
        window.emit(events, state.images_seen, rate())
        bar.close()
    return True


def validate_epoch(workdir: Workdir, model: keras.Model, parallel: Parallel, data: StageData, state: LoopState,
                   timer: Timer, events: EventLog) -> None:
    """Score the epoch, keep the best weights, apply the plateau and early-stopping rules, move to the next epoch.

    With an EMA of the weights, the averaged weights are the ones scored and kept. The final fit
    keeps its last epoch's weights: its validation images are training images.
    """
    stage, plan, epoch = state.stage, state.stage_plan, state.epoch
    started = time.monotonic()
    sums = state.sums
    with recipe.averaged_weights(model):
        val_loss, val_accuracy = evaluate(model, parallel, data.val, stage, state)
        row = {"epoch": epoch + 1, "loss": sums["loss"] / max(sums["seen"], 1),
               "accuracy": sums["correct"] / max(sums["seen"], 1), "val_loss": val_loss,
               "val_accuracy": val_accuracy, "lr": state.lr}
        if plan.final_fit and epoch + 1 == plan.epochs:
            _save_final(workdir, model, state, val_accuracy)
        elif not plan.final_fit and val_accuracy > state.best_val_accuracy:
            _save_best(workdir, model, state, val_accuracy)
    timer.note("validation", time.monotonic() - started)
    state.history.append(row)
    for name in ("val_loss", "val_accuracy"):
        events.add(f"validation/{name[4:]}", row[name], state.images_seen)
    events.add("stage", stage.step, state.images_seen)
    state.stopped_early = after_epoch(state, plan, val_accuracy)
    state.epoch, state.step, state.sums = epoch + 1, 0, {"loss": 0.0, "correct": 0.0, "seen": 0}
    _set_learning_rate(model, plan, state)
    print(f"stage {stage.step} epoch {epoch + 1}/{plan.epochs}: loss {row['loss']:.4f}"
          f" acc {row['accuracy']:.4f} val_loss {val_loss:.4f} val_acc {val_accuracy:.4f} lr {row['lr']:.2g}"
          f"{' (best)' if state.best_epoch == epoch + 1 and not plan.final_fit else ''}", flush=True)
    _write_log(workdir.stage_dir(stage.step), stage.step, state.history)


@dataclass
class _Trained:
    """The model a stage trains, served to the Predictor as a loaded one is: its batches split over the devices."""

    parallel: Parallel
    network: keras.Model
    image_size: int
    classes: tuple[str, ...]

    @property
    def model(self) -> _Trained:
        return self

    def predict_on_batch(self, views: np.ndarray) -> np.ndarray:
        return self.parallel.predict(self.network, views)


def evaluate(model: keras.Model, parallel: Parallel, val: ValidationSet, stage: Stage,
             state: LoopState) -> tuple[float, float]:
    """Validation loss and accuracy over every validation image, unaugmented: the path kit.predict scores with."""
    served = _Trained(parallel, model, stage.image_size, tuple(state.config["classes"]))
    _, _, scores = predict_labelled(served, val.images, val.keys, val.labels, tta=1, seed=state.config["seed"],
                                    workers=val.workers, batch_views=val.batch_size, progress=False)
    return scores.loss, scores.accuracy


def _save_best(workdir: Workdir, model: keras.Model, state: LoopState, val_accuracy: float) -> None:
    """Replace the best file only with a strictly better epoch than the one it holds.

    The file is written before the checkpoint that records it, so a kill in between replays the
    epoch; on a GPU the replay can score lower, and then the file must keep the better weights.
    """
    state.best_val_accuracy, state.best_epoch = val_accuracy, state.epoch + 1
    path = best_weights(workdir, state.stage.step)
    on_disk = checkpoint.read_state(path) or {}
    if val_accuracy > on_disk.get("val_accuracy", -1.0):
        checkpoint.save(path, model, {"val_accuracy": val_accuracy, "epoch": state.epoch + 1,
                                      "stage": state.stage.step, "image_size": state.stage.image_size,
                                      "config": state.config, "plan": state.plan})
    else:
        state.best_val_accuracy, state.best_epoch = on_disk["val_accuracy"], on_disk["epoch"]


def _save_final(workdir: Workdir, model: keras.Model, state: LoopState, val_accuracy: float) -> None:
    """The final fit's weights: its last epoch's, marked as trained on the validation images."""
    state.best_val_accuracy, state.best_epoch = val_accuracy, state.epoch + 1
    checkpoint.save(best_weights(workdir, state.stage.step), model,
                    {"val_accuracy": val_accuracy, "epoch": state.epoch + 1, "stage": state.stage.step,
                     "image_size": state.stage.image_size, "config": state.config, "plan": state.plan,
                     "final_fit": True})


def _take_best_on_disk(workdir: Workdir, state: LoopState) -> None:
    """The state's best is the best file's when the file holds better (written, then the checkpoint lost)."""
    on_disk = checkpoint.read_state(best_weights(workdir, state.stage.step)) or {}
    if on_disk.get("val_accuracy", -1.0) > state.best_val_accuracy:
        state.best_val_accuracy, state.best_epoch = on_disk["val_accuracy"], on_disk["epoch"]


def save_checkpoint(manifest: Manifest, model: keras.Model, state: LoopState, timer: Timer,
                    events: EventLog) -> None:
    started = time.monotonic()
    state.wall_time_s += timer.lap()
    folder = manifest.workdir.stage_dir(state.stage.step)
    checkpoint.save(folder / checkpoint.checkpoint_name(state.epoch, state.step), model, state.to_dict(),
                    model.optimizer)
    events.commit()  # after the checkpoint: the log never runs ahead of what a resume starts from
    checkpoint.prune(folder)
    timer.last_save = time.monotonic()
    timer.note("save", timer.last_save - started)
    manifest.update(state.stage.step, costs=timer.costs, status="interrupted", runtime=state.runtime,
                    position={"epoch": state.epoch, "step": state.step}, best_val_accuracy=state.best_val_accuracy,
                    epochs=len(state.history), wall_time_s=state.wall_time_s, images_seen=state.images_seen)


def finish_stage(manifest: Manifest, state: LoopState, timer: Timer) -> str:
    stage, folder = state.stage, manifest.workdir.stage_dir(state.stage.step)
    if state.stopped_early:
        print(f"Stage {stage.step}: early stop, no improvement for {stage.early_stop_patience} epochs")
    state.wall_time_s += timer.lap()
    manifest.update(stage.step, costs=timer.costs, status="done", runtime=state.runtime,
                    best_val_accuracy=state.best_val_accuracy, best_epoch=state.best_epoch, epochs=len(state.history),
                    wall_time_s=state.wall_time_s, position=None, finished_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                    images_seen=state.images_seen)
    for old in checkpoint.list_checkpoints(folder):  # the stage is done: its best weights are what matters
        old.unlink()
    if state.stage_plan.final_fit:
        print(f"Final fit done: weights of its last epoch in {folder / BEST} (val_acc {state.best_val_accuracy:.4f} "
              "on validation images it trained on: not a held-out score)")
    else:
        print(f"Stage {stage.step} done: best val_acc {state.best_val_accuracy:.4f} (epoch {state.best_epoch}), "
              f"weights in {folder / BEST}")
    return "done"


def _write_log(folder: Path, step: int, history: list[dict]) -> None:
    columns = list(history[0])
    lines = [",".join(columns)] + [",".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c])
                                            for c in columns) for row in history]
    write_text(folder / "log.csv", "\n".join(lines) + "\n")
    plot_curves({f"stage {step}": history}, folder / "curves.png")


def run_all(manifest: Manifest, plans: list[StagePlan], config: RunConfig, execution: Execution) -> str:
    """Every stage not yet done, in order, resuming an interrupted one; stops at the first that stops.

    `plans` holds each stage's saved plan where it has one: an interrupted stage resumes as it
    started, overrides included. A stage is started only if, by the costs measured so far, its
    set-up and first checkpoint fit in what is left of the budget.
    """
    split, workdir = None, manifest.workdir
    for plan in plans:
        step = plan.stage.step
        status = manifest.status(step)
        if status == "done":
            continue
        if execution.budget.limited:
            if split is None:
                split = run_split(workdir, config)
            needed = start_cost(workdir, plan.stage, manifest.costs, split, execution)
            if needed > execution.budget.left():
                print(f"Stage {step} was not started: by the costs measured so far it needs about "
                      f"{needed / 60:.1f} min to set up and reach its first checkpoint, and "
                      f"{max(execution.budget.left(), 0) / 60:.1f} min of the budget are left.")
                return "stopped"
        result = run_stage(manifest, plan, config, dataclasses.replace(
            execution, resume=status == "interrupted", restart=False))
        if result != "done":
            return result
    print(status_table(manifest, tuple(p.stage for p in plans)))
    return "done"
