"""Staged fine-tuning with exact resume: the training loop, readable top to bottom.

A stage trains for its epochs from the previous stage's best weights. Its loop is a plain
`train_on_batch` loop rather than `model.fit`, because fit can only start an epoch at its first
batch, and resuming must start at the very next batch. Everything the loop knows (position,
learning rate, plateau and early-stopping counters, best accuracy, history, running epoch
metrics) is a JSON document saved with the weights and the optimizer in one atomic checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from tqdm.auto import tqdm

from kit import checkpoint
from kit.augment import plain_transform, train_transform
from kit.backbones import build_model, choose_precision, set_trainable
from kit.cli import KitError
from kit.config import Head, Profile, Stage, Workdir
from kit.dataset import class_weights, drop_unreadable, load_split
from kit.files import write_text
from kit.pipeline import DEFAULT_WORKERS, Batches, default_cache_root, open_training_cache
from kit.plots import plot_curves

BEST = "best.weights.npz"
SAVE_INTERVAL_S = 600  # a checkpoint about every 10 minutes of training unless --save-every says otherwise


@dataclass(frozen=True)
class RunConfig:
    """What every stage of one training run must share; fixed when stage 1 starts."""

    profile: str
    backbone: str
    weights: str
    head_units: int
    head_dropout: float
    head_bn_momentum: float
    seed: int
    val_fraction: float

    @property
    def head(self) -> Head:
        return Head(self.head_units, self.head_dropout, self.head_bn_momentum)


@dataclass
class Options:
    """How to run (not what to learn): may change between sessions without changing the result."""

    resume: bool = False
    restart: bool = False
    time_budget_s: float | None = None
    save_every: int | None = None  # steps; None: about every SAVE_INTERVAL_S seconds
    precision: str = "auto"
    jit: bool = False
    deterministic: bool = False
    class_weights: bool = False
    workers: int = DEFAULT_WORKERS
    cache_dir: Path | None = None


# ---- the manifest: weights/state.json ---------------------------------------------------------

def read_manifest(workdir: Workdir) -> dict:
    try:
        return json.loads(workdir.manifest.read_text())
    except FileNotFoundError:
        return {"config": None, "stages": {}}
    except ValueError as error:
        raise KitError(f"{workdir.manifest} is damaged ({error}). The checkpoints next to it are intact: delete "
                       "the file only if you also mean to start the stages over.") from None


def write_manifest(workdir: Workdir, manifest: dict) -> None:
    write_text(workdir.manifest, json.dumps(manifest, indent=2))


def update_stage_record(workdir: Workdir, step: int, **fields) -> None:
    manifest = read_manifest(workdir)
    manifest["stages"].setdefault(str(step), {}).update(fields)
    write_manifest(workdir, manifest)


def run_config(workdir: Workdir, profile: Profile, backbone: str | None, weights: str | None, seed: int,
               val_fraction: float) -> RunConfig:
    """The run's config: the manifest's once stage 1 has started, refusing contradicting flags."""
    wanted = RunConfig(profile.name, backbone or profile.backbone, weights or profile.weights,
                       profile.head.units, profile.head.dropout, profile.head.bn_momentum, seed, val_fraction)
    saved = read_manifest(workdir)["config"]
    if saved is None:
        return wanted
    config = RunConfig(**saved)
    clashes = [f"--{name} {value}" for name, value in (("backbone", backbone), ("profile", profile.name))
               if value is not None and value != getattr(config, name)]
    if clashes:
        raise KitError(f"The stages in {workdir.weights} were trained with profile {config.profile} and backbone "
                       f"{config.backbone}; {', '.join(clashes)} would mix two models. Use another --workdir for a "
                       "new run, or drop the flag.")
    return config


def best_weights(workdir: Workdir, step: int) -> Path:
    return workdir.stage_dir(step) / BEST


def stage_status(workdir: Workdir, step: int) -> str:
    """'done', 'interrupted' or 'not started'."""
    record = read_manifest(workdir)["stages"].get(str(step), {})
    if record.get("status") == "done" and best_weights(workdir, step).is_file():
        return "done"
    if checkpoint.list_checkpoints(workdir.stage_dir(step)):
        return "interrupted"
    return "not started"


# ---- the loop's state ---------------------------------------------------------------------------

def fresh_state(stage: Stage, config: RunConfig) -> dict:
    return {
        "stage": dataclasses.asdict(stage),
        "config": dataclasses.asdict(config),
        "epoch": 0, "step": 0,  # the next batch to train: the data order is a function of (seed, stage, epoch)
        "lr": stage.lr,
        "plateau": {"best": -1.0, "wait": 0},
        "early": {"best": -1.0, "wait": 0},
        "best_val_accuracy": -1.0, "best_epoch": None,
        "sums": {"loss": 0.0, "correct": 0.0, "seen": 0},  # this epoch's running training metrics
        "history": [],
        "wall_time_s": 0.0,
        "stopped_early": False,
    }


def after_epoch(state: dict, stage: Stage, val_accuracy: float) -> bool:
    """ReduceLROnPlateau and EarlyStopping on validation accuracy, as in the recipe; True: stop."""
    plateau, early = state["plateau"], state["early"]
    if val_accuracy > plateau["best"] + 1e-4:
        plateau.update(best=val_accuracy, wait=0)
    else:
        plateau["wait"] += 1
        if plateau["wait"] >= stage.plateau_patience:
            state["lr"] = max(state["lr"] * stage.plateau_factor, stage.min_lr)
            plateau["wait"] = 0
    if val_accuracy > early["best"]:
        early.update(best=val_accuracy, wait=0)
    else:
        early["wait"] += 1
    return early["wait"] >= stage.early_stop_patience


# ---- one stage ----------------------------------------------------------------------------------

class _StopRequests:
    """SIGINT/SIGTERM ask for a checkpoint at the next batch boundary instead of dying mid-step."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping at the next batch with a checkpoint (press Ctrl-C again to abort without one)",
              file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run_stage(workdir: Workdir, stage: Stage, config: RunConfig, options: Options) -> str:
    """Train one stage to its end or until stopped; return 'done' or 'stopped' (checkpoint saved)."""
    started = time.monotonic()
    deadline = started + options.time_budget_s if options.time_budget_s else math.inf
    folder = workdir.stage_dir(stage.step)
    for leftover in folder.glob(".*.tmp"):  # half-written files of a killed run; the renamed ones are intact
        leftover.unlink()
    previous = checkpoint.newest_readable(folder)
    if previous and not (options.resume or options.restart):
        _, _, state = previous
        raise KitError(f"Stage {stage.step} was interrupted at epoch {state['epoch'] + 1}, step {state['step']}. "
                       f"Run 'python -m kit.stage --step {stage.step} --resume' to continue from there, or "
                       f"--restart to discard that run and start stage {stage.step} over.")
    if options.restart:
        _discard(workdir, stage.step)
        previous = None
    elif stage_status(workdir, stage.step) == "done":
        record = read_manifest(workdir)["stages"][str(stage.step)]
        raise KitError(f"Stage {stage.step} is already done (best val_acc {record.get('best_val_accuracy', 0):.4f}). "
                       f"Run the next stage, or --restart to train stage {stage.step} again from stage "
                       f"{stage.step - 1}'s weights (later stages would then be marked not done).")
    if previous:
        saved_stage = Stage(**previous[2]["stage"])
        if saved_stage != stage:
            changed = [f.name for f in dataclasses.fields(Stage)
                       if getattr(saved_stage, f.name) != getattr(stage, f.name)]
            raise KitError(f"Stage {stage.step} was started with other settings ({', '.join(changed)}); a resumed run "
                           f"must keep them. Drop those flags to resume, or use --restart to start over with them.")
    elif stage.step > 1 and (before := stage_status(workdir, stage.step - 1)) != "done":
        raise KitError(f"Stage {stage.step} starts from stage {stage.step - 1}'s best weights, but stage "
                       f"{stage.step - 1} is {before}. Run 'python -m kit.stage --step "
                       f"{stage.step - 1}{' --resume' if before == 'interrupted' else ''}' first (or --all).")

    # Data: the saved split, the image cache at this stage's size, seeded batches.
    split = load_split(workdir, config.val_fraction, config.seed)
    cache, positions = open_training_cache(options.cache_dir or default_cache_root(workdir.cache), split,
                                           stage.image_size, options.workers)
    train = drop_unreadable(split.train, cache.unreadable, "training")
    val = drop_unreadable(split.val, cache.unreadable, "validation")
    train_batches = Batches(cache, train.Category.to_numpy(), stage.batch_size,
                            lambda: train_transform(stage.image_size, stage.light_augment), config.seed, stage.step,
                            shuffle=True, workers=options.workers, steps=stage.steps_per_epoch,
                            positions=train.path.map(positions).to_numpy())
    val_batches = Batches(cache, val.Category.to_numpy(), stage.batch_size * 2,
                          lambda: plain_transform(stage.image_size), config.seed, stage.step, shuffle=False,
                          workers=options.workers, positions=val.path.map(positions).to_numpy())
    if len(train_batches) == 0:
        raise KitError(f"Stage {stage.step} has {len(train)} training images, fewer than one batch of "
                       f"{stage.batch_size}: lower --batch-size or add data.")
    weights_by_class = class_weights(train.Category.to_numpy()) if options.class_weights else None

    # Model: built at this stage's size, unfrozen as the table says.
    keras.backend.clear_session()  # a fresh graph per stage when --all runs several in one process
    keras.utils.set_random_seed(config.seed + stage.step)
    if options.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    precision = choose_precision(options.precision)
    keras.mixed_precision.set_global_policy(precision)
    model = build_model(config.backbone, stage.image_size, config.weights if stage.step == 1 else "none", config.head)
    unfrozen = set_trainable(model, stage.trainable)
    model.compile(optimizer=keras.optimizers.Adam(stage.lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=options.jit)
    model.optimizer.build(model.trainable_variables)

    if previous:
        path, arrays, state = previous
        checkpoint.restore(path, arrays, model, model.optimizer)
        print(f"Stage {stage.step}: resuming from {path.name} at epoch {state['epoch'] + 1}, step {state['step']}")
    else:
        state = fresh_state(stage, config)
        if stage.step > 1:
            checkpoint.load_weights(best_weights(workdir, stage.step - 1), model)
        _write_config_once(workdir, config)
    model.optimizer.learning_rate.assign(state["lr"])
    print(f"Stage {stage.step}: {config.backbone} at {stage.image_size} px, batch {stage.batch_size}, "
          f"lr {state['lr']:.2g}, {stage.describe_trainable()} ({unfrozen} backbone blocks unfrozen), {precision}, "
          f"{len(train)} training / {len(val)} validation images, {len(train_batches)} steps per epoch")
    update_stage_record(workdir, stage.step, status="running", settings=dataclasses.asdict(stage))

    timer = _Timer(state)
    with _StopRequests() as stop_requests:
        while state["epoch"] < stage.epochs and not state["stopped_early"]:
            epoch = state["epoch"]
            bar = tqdm(total=len(train_batches), initial=state["step"], desc=f"stage {stage.step} epoch {epoch + 1}/"
                       f"{stage.epochs}", disable=not sys.stderr.isatty(), leave=False, mininterval=0.5)
            for x, y in train_batches.epoch(epoch, start=state["step"]):
                if stop_requests.requested or timer.would_pass(deadline, "step"):
                    bar.close()
                    return _stop(workdir, folder, model, state, timer, "the time budget" if not stop_requests.requested
                                 else "a stop request")
                step_started = time.monotonic()
                loss, accuracy = model.train_on_batch(x, y, class_weight=weights_by_class)
                timer.note("step", time.monotonic() - step_started)
                state["sums"]["loss"] += float(loss) * len(y)
                state["sums"]["correct"] += float(accuracy) * len(y)
                state["sums"]["seen"] += len(y)
                state["step"] += 1
                bar.update()
                bar.set_postfix(loss=f"{state['sums']['loss'] / state['sums']['seen']:.3f}",
                                acc=f"{state['sums']['correct'] / state['sums']['seen']:.3f}", refresh=False)
                if timer.save_due(options.save_every, state["step"]) and state["step"] < len(train_batches):
                    _save_checkpoint(workdir, folder, model, state, timer)
            bar.close()

            if timer.would_pass(deadline, "validation"):
                return _stop(workdir, folder, model, state, timer, "the time budget")
            val_started = time.monotonic()
            val_loss, val_accuracy = evaluate(model, val_batches)
            timer.note("validation", time.monotonic() - val_started)
            sums = state["sums"]
            row = {"epoch": epoch + 1, "loss": sums["loss"] / max(sums["seen"], 1),
                   "accuracy": sums["correct"] / max(sums["seen"], 1), "val_loss": val_loss,
                   "val_accuracy": val_accuracy, "lr": state["lr"]}
            state["history"].append(row)
            if val_accuracy > state["best_val_accuracy"]:
                # Best weights are written before the checkpoint that records them, never replaced by worse ones.
                checkpoint.save(folder / BEST, model, {"val_accuracy": val_accuracy, "epoch": epoch + 1,
                                                       "stage": stage.step, "image_size": stage.image_size,
                                                       "config": state["config"]})
                state["best_val_accuracy"], state["best_epoch"] = val_accuracy, epoch + 1
            state["stopped_early"] = after_epoch(state, stage, val_accuracy)
            model.optimizer.learning_rate.assign(state["lr"])
            state.update(epoch=epoch + 1, step=0, sums={"loss": 0.0, "correct": 0.0, "seen": 0})
            print(f"stage {stage.step} epoch {epoch + 1}/{stage.epochs}: loss {row['loss']:.4f}"
                  f" acc {row['accuracy']:.4f} val_loss {val_loss:.4f} val_acc {val_accuracy:.4f} lr {row['lr']:.2g}"
                  f"{' (best)' if state['best_epoch'] == epoch + 1 else ''}", flush=True)
            _write_log(folder, stage.step, state["history"])
            _save_checkpoint(workdir, folder, model, state, timer)
    if state["stopped_early"]:
        print(f"Stage {stage.step}: early stop, no improvement for {stage.early_stop_patience} epochs")
    timer.commit()
    update_stage_record(workdir, stage.step, status="done", best_val_accuracy=state["best_val_accuracy"],
                        best_epoch=state["best_epoch"], epochs=len(state["history"]), wall_time_s=state["wall_time_s"],
                        position=None, finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    for old in checkpoint.list_checkpoints(folder):  # the stage is done: its best weights are what matters
        old.unlink()
    print(f"Stage {stage.step} done: best val_acc {state['best_val_accuracy']:.4f} (epoch {state['best_epoch']}), "
          f"weights in {folder / BEST}")
    return "done"


def evaluate(model: keras.Model, batches: Batches) -> tuple[float, float]:
    """Validation loss and accuracy over every validation image, unaugmented."""
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in batches.epoch(0):
        probs = np.asarray(model.predict_on_batch(x), np.float64)
        total_loss += float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)).sum())
        correct += int((probs.argmax(axis=1) == y).sum())
        seen += len(y)
    return total_loss / max(seen, 1), correct / max(seen, 1)


class _Timer:
    """Wall time across sessions and running estimates of what the next step, validation and save cost."""

    def __init__(self, state: dict):
        self.state = state
        self.mark = self.last_save = time.monotonic()
        self.cost = {"step": 0.0, "validation": 0.0, "save": 5.0}

    def note(self, what: str, seconds: float) -> None:
        # Steps are many and alike: a running mean. Validation and saving are rare: keep the recent worst,
        # so the budget check errs on the side of stopping in time.
        if what == "step":
            self.cost[what] = 0.9 * self.cost[what] + 0.1 * seconds
        else:
            self.cost[what] = max(seconds, 0.8 * self.cost[what])

    def would_pass(self, deadline: float, what: str) -> bool:
        """Would doing `what` and then saving overrun the deadline?"""
        return time.monotonic() + self.cost[what] + 2 * self.cost["save"] > deadline

    def save_due(self, every: int | None, step: int) -> bool:
        return step % every == 0 if every else time.monotonic() - self.last_save > SAVE_INTERVAL_S

    def commit(self) -> None:
        now = time.monotonic()
        self.state["wall_time_s"] += now - self.mark
        self.mark = now


def _save_checkpoint(workdir: Workdir, folder: Path, model: keras.Model, state: dict, timer: _Timer) -> None:
    started = time.monotonic()
    timer.commit()
    checkpoint.save(folder / checkpoint.checkpoint_name(state["epoch"], state["step"]), model, state, model.optimizer)
    checkpoint.prune(folder)
    step = state["stage"]["step"]
    update_stage_record(workdir, step, status="interrupted", position={"epoch": state["epoch"], "step": state["step"]},
                        best_val_accuracy=state["best_val_accuracy"], epochs=len(state["history"]),
                        wall_time_s=state["wall_time_s"])
    timer.last_save = time.monotonic()
    timer.note("save", timer.last_save - started)


def _stop(workdir: Workdir, folder: Path, model: keras.Model, state: dict, timer: _Timer, why: str) -> str:
    _save_checkpoint(workdir, folder, model, state, timer)
    step = state["stage"]["step"]
    print(f"Stage {step}: stopped for {why} at epoch {state['epoch'] + 1}, step {state['step']}, with a checkpoint. "
          f"Continue with 'python -m kit.stage --step {step} --resume' (or --all).")
    return "stopped"


def _write_log(folder: Path, step: int, history: list[dict]) -> None:
    columns = list(history[0])
    lines = [",".join(columns)] + [",".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c])
                                            for c in columns) for row in history]
    write_text(folder / "log.csv", "\n".join(lines) + "\n")
    plot_curves({f"stage {step}": history}, folder / "curves.png")


def _write_config_once(workdir: Workdir, config: RunConfig) -> None:
    manifest = read_manifest(workdir)
    if manifest["config"] is None:
        manifest["config"] = dataclasses.asdict(config)
        write_manifest(workdir, manifest)


def _discard(workdir: Workdir, step: int) -> None:
    """--restart: drop stage `step`'s run; later stages, trained from it, are marked not done."""
    folder = workdir.stage_dir(step)
    for old in checkpoint.list_checkpoints(folder):
        old.unlink()
    (folder / BEST).unlink(missing_ok=True)
    manifest = read_manifest(workdir)
    later = [s for s, r in manifest["stages"].items() if int(s) > step and r.get("status") == "done"]
    if later:
        print(f"note: stages {', '.join(later)} were trained from the old stage {step} and are marked not done")
    for s in [str(step), *later]:
        manifest["stages"].pop(s, None)
    write_manifest(workdir, manifest)


def status_table(workdir: Workdir, stages: tuple[Stage, ...]) -> str:
    manifest = read_manifest(workdir)
    lines = [f"{'step':>4}  {'size':>4}  {'trainable':<26} {'status':<28} {'best val_acc':>12} {'epochs':>6}"
             f" {'wall time':>9}"]
    for stage in stages:
        record = manifest["stages"].get(str(stage.step), {})
        status = stage_status(workdir, stage.step)
        if status == "interrupted" and record.get("position"):
            position = record["position"]
            status = f"interrupted at epoch {position['epoch'] + 1} step {position['step']}"
        best = record.get("best_val_accuracy")
        best = f"{best:.4f}" if best is not None and best >= 0 else "-"
        wall = record.get("wall_time_s")
        lines.append(f"{stage.step:>4}  {stage.image_size:>4}  {stage.describe_trainable():<26} {status:<28} "
                     f"{best:>12} {record.get('epochs', '-'):>6} "
                     f"{_hours(wall) if wall else '-':>9}")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def run_all(workdir: Workdir, stages: tuple[Stage, ...], config: RunConfig, options: Options) -> str:
    """Every stage not yet done, in order, resuming an interrupted one; stops at the first that stops."""
    budget_end = time.monotonic() + options.time_budget_s if options.time_budget_s else None
    for stage in stages:
        status = stage_status(workdir, stage.step)
        if status == "done":
            continue
        left = None if budget_end is None else budget_end - time.monotonic()
        result = run_stage(workdir, stage, config, dataclasses.replace(
            options, resume=status == "interrupted", restart=False, time_budget_s=left))
        if result != "done":
            return result
    print(status_table(workdir, stages))
    return "done"
