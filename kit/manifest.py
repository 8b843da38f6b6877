"""The run's manifest, weights/state.json: what each stage is, read once per command, written in one place.

A command reads it once (`Manifest.read`) and passes the object along; the loop and the commands
ask it, not the file. Each stage has a typed record (status, plan, position, runtime, results);
`Manifest.update` changes a record and writes the whole manifest atomically, so a kill leaves
either the old file or the new one. What a stage's status is also depends on the files beside
it (a done stage needs its best weights; a checkpoint means it was interrupted), so the status
is asked of the manifest, which knows where they are.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kit import checkpoint
from kit.cli import KitError
from kit.config import FINAL_FIT_STEP, STEPS, Profile, Stage, Workdir
from kit.files import atomic_path, write_text
from kit.records import Execution, Requested, RunConfig, StagePlan, StageRecord, final_fit_plan, stage_plan
from kit.tensorboard_log import forget_after

BEST = "best.weights.npz"


@dataclass(frozen=True)
class Beginning:
    """What a stage that starts needs to know of the stages before it, handed over when it is recorded."""

    images_seen: int  # training images of the stages before: where its curves start
    unfreezes: bool  # does it train more of the backbone than its starting weights were? (the warm-up's cue)


class Manifest:
    """weights/state.json as an object: the run's config, one StageRecord per stage, the costs measured so far."""

    def __init__(self, workdir: Workdir, config: dict | None = None, stages: dict[int, StageRecord] | None = None,
                 costs: dict | None = None, other: dict | None = None):
        self.workdir = workdir
        self.config = config  # RunConfig as a dict; None until stage 1 starts
        self.stages = stages or {}
        self.costs = costs or {}  # setup/step/validation/save seconds by image size (Timer), cache seconds per image
        self.other = other or {}  # what a newer kit wrote: kept as it is

    @classmethod
    def read(cls, workdir: Workdir) -> "Manifest":
        path = workdir.manifest
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or not isinstance(saved.get("stages", {}), dict):
                raise ValueError(f"it holds {type(saved).__name__} {str(saved)[:40]}, not the kit's record")
            stages = {int(step): StageRecord.from_dict(record) for step, record in saved.get("stages", {}).items()}
        except FileNotFoundError:
            saved, stages = {}, {}
        except (ValueError, UnicodeDecodeError, TypeError, AttributeError) as error:
            raise KitError(f"{path} is damaged ({error}). The weights and checkpoints next to it are intact: rebuild "
                           f"the record from them with '{workdir.command('kit.stage', '--rebuild-record')}' (the "
                           "damaged file is kept as state.json.damaged).") from None
        if not stages and (trained := trained_steps(workdir)):
            raise KitError(f"{path} {'holds no record of the stages' if path.is_file() else 'is missing'}, but "
                           f"{workdir.weights} holds trained weights of stage{'s' if len(trained) > 1 else ''} "
                           f"{', '.join(map(str, trained))}: the run's record is damaged, its weights are not. Rebuild "
                           "the record from the stage folders with "
                           f"'{workdir.command('kit.stage', '--rebuild-record')}' (or put back a copy of state.json), "
                           "then run your command again.")
        other = {k: v for k, v in saved.items() if k not in ("config", "stages", "costs")}
        return cls(workdir, saved.get("config"), stages, saved.get("costs") or {}, other)

    @classmethod
    def rebuilt(cls, workdir: Workdir) -> "Manifest":
        """The record of a run whose state.json was lost, from what its stage folders hold, saved.

        A stage's best weights carry its config, score and epoch (and, since 0.3, its plan); an interrupted
        stage's newest checkpoint carries its whole loop state. Costs are measured again as the run goes on.
        """
        manifest = cls(workdir)
        for step in trained_steps(workdir):
            folder = workdir.stage_dir(step)
            best = checkpoint.read_state(folder / BEST)
            newest = checkpoint.newest_readable(folder)
            if newest is not None:  # interrupted: the checkpoint is newer than any best file beside it
                state = newest[2]
                record = StageRecord("interrupted", state["plan"], {"epoch": state["epoch"], "step": state["step"]},
                                     state.get("runtime", {}), best_val_accuracy=state.get("best_val_accuracy"),
                                     best_epoch=state.get("best_epoch"), epochs=len(state.get("history", [])),
                                     wall_time_s=state.get("wall_time_s"), images_seen=state.get("images_seen"))
            elif best is not None:
                record = StageRecord("done", best.get("plan"), best_val_accuracy=best.get("val_accuracy"),
                                     best_epoch=best.get("epoch"), epochs=len(read_log(workdir, step)) or None)
                state = best
            else:
                continue
            manifest.stages[step] = record
            manifest.config = manifest.config or state.get("config")
        manifest.save()
        return manifest

    def save(self) -> None:
        """The whole manifest, written atomically (the one place that writes weights/state.json)."""
        stages = {str(step): record.to_dict() for step, record in sorted(self.stages.items())}
        saved = {**self.other, "config": self.config, "stages": stages, "costs": self.costs}
        write_text(self.workdir.manifest, json.dumps(saved, indent=2))

    def record(self, step: int) -> StageRecord:
        """Stage `step`'s record (an empty one, not stored, before it starts)."""
        return self.stages.get(step) or StageRecord()

    def update(self, step: int, costs: dict | None = None, **fields) -> None:
        record = self.stages.setdefault(step, StageRecord())
        for name, value in fields.items():
            setattr(record, name, value)
        if costs is not None:
            self.costs = costs
        self.save()

    def best_weights(self, step: int) -> Path:
        return best_weights(self.workdir, step)

    def status(self, step: int) -> str:
        """'done', 'interrupted' (also when killed before its first checkpoint) or 'not started'."""
        record = self.record(step)
        if record.status == "done" and self.best_weights(step).is_file():
            return "done"
        if record.status in ("running", "interrupted") or checkpoint.list_checkpoints(self.workdir.stage_dir(step)):
            return "interrupted"
        return "not started"

    def saved_plan(self, step: int) -> dict | None:
        """The plan an interrupted stage started with (None when it is done or not started)."""
        record = self.record(step)
        if self.status(step) != "interrupted":
            return None
        if record.plan:
            return record.plan
        if record.settings:  # a run started before plans were saved: its row is all there is
            return {"stage": record.settings, "class_weights": False}
        return None

    def begin(self, plan: StagePlan, config: RunConfig, resuming: bool, restart: bool) -> Beginning:
        """A stage runs: --restart's discard first, then the start recorded (a resume: marked as running again,
        so a kill now is no clean stop). Called once every check has passed and the data is ready."""
        step = plan.stage.step
        seen = self.images_seen_before(step)
        if restart:
            self._discard(step, seen)
        if resuming:
            self.update(step, stopped=None)
        else:
            if self.config is None:
                self.config = dataclasses.asdict(config)
            self.update(step, status="running", plan=plan.to_dict(), position=None,
                        started_at=time.strftime("%Y-%m-%d %H:%M:%S"), stopped=None)
        start = plan.final_fit.replays if plan.final_fit else step  # the stage whose starting weights it takes
        before = self.record(start - 1).stage_plan
        return Beginning(seen, plan.stage.trainable > (before.stage.trainable if before else 0.0))

    def stop(self, step: int, why: str, where: str = "") -> str:
        """A clean stop, recorded as one: the same command, run again, continues the stage (exit code 3's promise)."""
        self.update(step, stopped=why)
        print(f"Stage {step}: stopped for {why}{where}. Run the same command again to continue (or "
              f"'{self.workdir.command('kit.stage', *stage_args(step), '--resume')}'"
              f"{'' if step == FINAL_FIT_STEP else ', or --all'}).")
        return "stopped"

    def _discard(self, step: int, seen_before: int) -> None:
        """--restart: drop stage `step`'s run and every later stage's (done or interrupted), all trained from it."""
        later = self.later_steps(step)
        forget_after(self.workdir.tensorboard, seen_before)
        for s in [step, *later]:
            self.forget(s)
        if later:
            print(f"note: stages {', '.join(map(str, later))} were trained from the old stage {step}; discarded too")
        self.save()

    def plan_for(self, step: int, profile: Profile, requested: Requested, execution: Execution) -> StagePlan:
        """Stage `step`'s plan as the command asks (FINAL_FIT_STEP: the final fit's), and whether it resumes.

        The saved plan where the stage has begun, unless --restart; else the table's row with the
        overrides (the final fit: the last stage's plan, replayed). --resume of a stage never started
        starts it; a stage the kit itself stopped (exit 3) resumes unasked, so the same command continues it.
        """
        status = self.status(step)
        if execution.resume and status == "not started":
            if step != FINAL_FIT_STEP:
                print(f"Stage {step} has no interrupted run to resume; starting it.")
            execution.resume = False
        if status == "interrupted" and not execution.restart and self.stopped_cleanly(step):
            execution.resume = True
        saved = None if execution.restart else self.saved_plan(step)
        if step == FINAL_FIT_STEP:
            return final_fit_plan(saved, self.record(STEPS[-1]), read_log(self.workdir, STEPS[-1]), requested,
                                  self.workdir)
        return stage_plan(saved, profile, step, requested, self.workdir)

    def plans_for_all(self, profile: Profile, requested: Requested) -> list[StagePlan]:
        """Each stage's plan for --all: the saved one where the stage has started, else the table's row."""
        return [stage_plan(self.saved_plan(stage.step), profile, stage.step, requested, self.workdir)
                for stage in profile.stages]

    def stopped_cleanly(self, step: int) -> bool:
        """Was stage `step` last stopped by the kit itself (budget, signal), not killed or crashed?"""
        return bool(self.record(step).stopped)

    def images_seen_before(self, step: int) -> int:
        """Training images the run saw in the stages before `step`: where stage `step`'s curves start."""
        return max((r.images_seen or 0 for s, r in self.stages.items() if s < step), default=0)

    def named_files(self) -> list[Path]:
        """The files the record says the run holds: each done stage's best weights, an interrupted one's newest
        checkpoint. A copy that lacks one of them is not the whole run."""
        files = []
        for step, record in sorted(self.stages.items()):
            folder = self.workdir.stage_dir(step)
            if record.status == "done":
                files.append(folder / BEST)
            elif record.status == "interrupted" and record.position:
                files.append(folder / checkpoint.checkpoint_name(record.position["epoch"], record.position["step"]))
        return files

    def last_finished(self) -> int | None:
        """The latest stage that is done (the final fit counts as the last), or None."""
        return max((step for step in self.stages if self.status(step) == "done"), default=None)

    def later_steps(self, step: int) -> list[int]:
        """Stages after `step` that have a record or a folder: everything trained from it."""
        folders = {int(p.name.split("_")[1]) for p in self.workdir.weights.glob("stage_*")
                   if p.name.split("_")[1].isdigit()}
        return sorted(s for s in set(self.stages) | folders if s > step)

    def forget(self, step: int) -> None:
        """Drop stage `step`'s record and files (--restart), not yet saved: the caller saves once."""
        folder = self.workdir.stage_dir(step)
        for old in [*checkpoint.list_checkpoints(folder), folder / BEST, folder / "log.csv", folder / "curves.png"]:
            old.unlink(missing_ok=True)
        self.stages.pop(step, None)


def read_log(workdir: Workdir, step: int) -> list[dict]:
    """Stage `step`'s log.csv: one row per finished epoch (loss, accuracy, val_loss, val_accuracy, lr)."""
    path = workdir.stage_dir(step) / "log.csv"
    if not path.is_file():
        return []
    try:
        return pd.read_csv(path).to_dict("records")
    except (ValueError, UnicodeDecodeError) as error:
        raise KitError(f"{path} is damaged ({error}). It is stage {step}'s record of its epochs (the curves, and "
                       "the epochs a final fit replays); the weights are intact. A running stage writes it again "
                       "at its next epoch's end; otherwise delete it to go on without those curves.") from None


def best_weights(workdir: Workdir, step: int) -> Path:
    return workdir.stage_dir(step) / BEST


def trained_steps(workdir: Workdir) -> list[int]:
    """The stages whose folders hold best weights or checkpoints, in order."""
    return [step for step in range(1, FINAL_FIT_STEP + 1)
            if best_weights(workdir, step).is_file() or checkpoint.list_checkpoints(workdir.stage_dir(step))]


def stage_args(step: int) -> tuple[str, ...]:
    """The kit.stage flags that name stage `step` (the final fit has its own)."""
    return ("--final-fit",) if step == FINAL_FIT_STEP else ("--step", str(step))


def copy_run(source: Workdir, target: Workdir) -> None:
    """Continue a run saved elsewhere: copy its weights/ (manifest, split, every stage's files) into `target`.

    On Kaggle a new session sees the previous version's output read-only under /kaggle/input; the
    run must be copied into /kaggle/working to continue. Nothing is copied into a work directory
    that holds a run already (a notebook re-run), and the manifest is copied last, so a copy
    killed halfway is not taken for a run and is simply done again. JAX's compiled programs stay
    behind (is_compiled): a new session compiles its own.
    """
    if not source.manifest.is_file():
        raise KitError(f"{source.root} holds no run of the kit (no {source.manifest.relative_to(source.root)}). On "
                       "Kaggle, attach the previous version's output (Add Input > Your Work) and give its car-kit "
                       "folder, e.g. /kaggle/input/NOTEBOOK/car-kit.")
    if target.manifest.is_file():
        print(f"{target.weights} already holds a run; nothing copied. Delete that folder first to replace it "
              f"with the one in {source.weights}.")
        return
    files = sorted((p for p in source.weights.rglob("*") if p.is_file() and not p.name.startswith(".")
                    and not is_compiled(p.relative_to(source.weights.parent))), key=lambda p: p == source.manifest)
    for path in tqdm(files, desc="copying the run", unit="file", mininterval=1.0):
        with atomic_path(target.weights / path.relative_to(source.weights)) as tmp:
            shutil.copyfile(path, tmp)
    print(f"Copied the run of {source.root} ({len(files)} files) into {target.weights}.")


def is_compiled(relative: Path) -> bool:
    """A file of weights/compiled/ (JAX's programs, native code the next process loads): never copied from a run
    elsewhere (another session's output, a folder of someone else's), only ever made by this machine."""
    return relative.parts[:2] == ("weights", "compiled")


def status_table(manifest: Manifest, stages: tuple[Stage, ...]) -> str:
    """One line per stage, and one for the final fit once it has started (its val_acc is on images it trained on)."""
    lines = [f"{'step':>4}  {'size':>4}  {'trainable':<26} {'status':<34} {'best val_acc':>12} {'epochs':>6}"
             f" {'wall time':>9}"]
    final = manifest.record(FINAL_FIT_STEP).stage_plan
    for stage in (*stages, *([final.stage] if final else [])):
        record = manifest.record(stage.step)
        status = manifest.status(stage.step)
        if status == "interrupted":
            # The newest checkpoint's own name, not the record: a kill can land between the two writes.
            newest = checkpoint.list_checkpoints(manifest.workdir.stage_dir(stage.step))
            if newest:
                epoch, step = checkpoint.position_of(newest[0])
                status = f"interrupted at epoch {epoch + 1} step {step}"
            else:
                status = "interrupted (no checkpoint yet)"
        row = record.stage_plan.stage if record.plan else stage
        best = record.best_val_accuracy
        best = f"{best:.4f}" if best is not None and best >= 0 else "-"
        what = row.describe_trainable()
        if stage.step == FINAL_FIT_STEP:
            what, best = "final fit: train + val", f"({best} seen)" if best != "-" else best
        wall = record.wall_time_s
        epochs = "-" if record.epochs is None else record.epochs
        lines.append(f"{row.step:>4}  {row.image_size:>4}  {what:<26} {status:<34} "
                     f"{best:>12} {epochs:>6} {_hours(wall) if wall else '-':>9}")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"
