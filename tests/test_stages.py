"""kit.stage: exact resume after SIGKILL, chaining, refusals, status, atomic checkpoints, the smoke run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, STAGE_ARGS, kit_process, run_command, run_kit, small_synthetic, smoke_workdir
from kit import checkpoint
from kit.cli import KitError
from kit.config import PROFILES, Workdir, override_stage, stage_of
from kit.dataset import read_description
from kit.files import sha256
from kit.manifest import Manifest, status_table
from kit.pipeline import cache_short_side
from kit.records import Budget, Execution, Requested, StagePlan, run_config
from kit.stage import main as stage_main  # in-process, for refusals and --status: no new process to start
from kit.training import run_all, run_stage

SMOKE = PROFILES["smoke"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def config_of(workdir: Workdir):
    return run_config(Manifest.read(workdir).config, SMOKE, Requested(), workdir, read_description(workdir).classes)


def plan(step: int, class_weights: bool = False, **overrides) -> StagePlan:
    return StagePlan(override_stage(stage_of(SMOKE, step), **overrides), class_weights)


def stage_command(root: Path, *extra: str, args=STAGE_ARGS) -> list[str]:
    return [sys.executable, "-m", "kit.stage", "--workdir", str(root), *args, *extra]


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return kit_process(command, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def kill(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.stdout.read()


def best_arrays(workdir: Workdir, step: int) -> dict[str, np.ndarray]:
    arrays, _ = checkpoint.read(workdir.stage_dir(step) / "best.weights.npz")
    return arrays


def stop_during_first_checkpoint(workdir: Workdir, step: int, monkeypatch) -> None:
    """SIGTERM this process while stage `step` writes its first checkpoint (each write stretched to 0.5 s).

    The kit's own stop path then saves at the next batch: a mid-epoch stop, wherever the machine's speed.
    """
    monkeypatch.setenv("KIT_FAULT_SLOW_WRITE", "0.5")
    folder = workdir.stage_dir(step)

    def watch():
        while not any(folder.glob(".checkpoint-*.tmp")):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def log_rows(workdir: Workdir, step: int) -> list[str]:
    return (workdir.stage_dir(step) / "log.csv").read_text().splitlines()


def curve(workdir: Workdir, tag: str) -> list[tuple[int, float]]:
    """(position, value) of one TensorBoard tag, every event file of the run read in the order TensorBoard reads
    them, as written (TensorBoard's own reader would hide a position written twice by purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    points = []
    for path in sorted(workdir.tensorboard.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            points += [(event.step, float(tensor_util.make_ndarray(v.tensor))) for v in event.summary.value
                       if v.tag == tag]
    return points


# Every training option on at once: the EMA of the weights, AdamW's decay, the cosine schedule's position,
# each batch's MixUp/CutMix draw, the per-layer rates and the unfreeze warm-up (stage 2 unfreezes half the
# backbone) must all survive the kills for the weights to match.
EVERY_OPTION = ["--label-smoothing", "0.1", "--ema", "0.8", "--schedule", "cosine", "--warmup-epochs", "0.5",
                "--mixup", "0.4", "--cutmix", "1.0", "--weight-decay", "0.05", "--layer-decay", "0.7",
                "--unfreeze-warmup", "0.5"]


def files_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_lr_finder_changes_nothing_but_its_plot(stage_one, tmp_path, backend):
    """A sweep from stage 1's best weights, both backends: a PNG and a suggested rate; every other file as it was."""
    root = tmp_path / "run"
    shutil.copytree(stage_one, root)
    before = files_of(root)
    result = run_command(stage_command(root, "--step", "2", "--find-lr", "--layer-decay", "0.8"),
                         env={**ENV, "KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    plot = Workdir.resolve(root, SMOKE).submissions / "lr_find_stage_2.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    suggested = float(result.stdout.split("fell fastest around lr ")[1].split()[0])
    assert 1e-7 < suggested < 10 and "--lr" in result.stdout
    after = files_of(root)
    assert after.pop(str(plot.relative_to(root)))
    # The copy moved the photos, so the cache at stage 2's size is built for them (the stage needs it): nothing else.
    stage_cache = f"smoke/cache/train-{cache_short_side(stage_of(SMOKE, 2).image_size)}-"
    new = after.keys() - before.keys()
    assert all(name.startswith(stage_cache) for name in new)
    assert {k: v for k, v in after.items() if k not in new} == before  # no checkpoint, manifest, log or other cache


@pytest.mark.parametrize("options", [[], EVERY_OPTION], ids=["recipe", "every-option"])
def test_resume_after_sigkill_is_exact(stage_one, tmp_path, options):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    shutil.copytree(stage_one, reference)
    shutil.copytree(stage_one, interrupted)

    done = run_command(stage_command(reference, "--step", "2", *options), env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    folder = Workdir.resolve(interrupted, SMOKE).stage_dir(2)
    # Kill 1, mid-epoch: checkpoints every 4 batches; killed as soon as the one after batch 4 exists.
    first = start(stage_command(interrupted, "--step", "2", "--save-every", "4", *options))
    wait_for(lambda: (folder / checkpoint.checkpoint_name(0, 4)).exists(), first)
    kill(first)
    assert Manifest.read(Workdir.resolve(interrupted, SMOKE)).status(2) == "interrupted"

    if options:  # Kill 2, during a checkpoint write (once: where it lands does not depend on the options).
        # Each write is stretched to 5 s; killed while the temp file is there.
        second = start(stage_command(interrupted, "--step", "2", "--save-every", "4", "--resume"),
                       env={**ENV, "KIT_FAULT_SLOW_WRITE": "5"})
        wait_for(lambda: any(folder.glob(".checkpoint-e001*.tmp")), second)
        kill(second)
        assert list(folder.glob(".checkpoint-*.tmp")), "the kill was meant to land inside a write"

    # The stage's overrides (--epochs 2 --batch-size 8) were saved when it started: no flags needed to resume.
    no_overrides = ["--profile", "smoke", "--deterministic", "--workers", "2"]
    finish = run_command(stage_command(interrupted, "--step", "2", "--resume", args=no_overrides), env=ENV)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "Stage 2: resuming from checkpoint-" in finish.stdout
    if options:
        assert "EMA 0.8, cosine schedule" in finish.stdout and "AdamW 0.05" in finish.stdout

    a, b = Workdir.resolve(reference, SMOKE), Workdir.resolve(interrupted, SMOKE)
    ref, got = best_arrays(a, 2), best_arrays(b, 2)
    assert ref.keys() == got.keys()
    assert max(float(np.abs(ref[k].astype(np.float64) - got[k]).max()) for k in ref) <= 1e-6
    # Training loss and accuracy too, not only validation: the kit resets Keras' metrics itself, so a
    # resumed process's figures cannot depend on what its metric trackers saw before the kill.
    assert log_rows(a, 2) == log_rows(b, 2)
    assert not list(folder.glob(".*.tmp")) and not checkpoint.list_checkpoints(folder)

    # The TensorBoard curves continue across the kills: one log for both stages, positioned in images seen,
    # never written past a checkpoint, so the positions only increase and validation lands where it did.
    training = [position for position, _ in curve(b, "train/loss")]
    assert training == sorted(set(training)) and len(training) >= 4, training
    assert curve(a, "validation/accuracy") == curve(b, "validation/accuracy")
    seen = Manifest.read(b).record(2).images_seen
    assert [p for p, _ in curve(b, "validation/accuracy")] == [seen // 4, seen // 2, 3 * seen // 4, seen]
    if options:  # the rate logged is the step's own: in epoch 1 past the warm-up's start (lr / 100), as scheduled
        stage_two = Manifest.read(b).images_seen_before(2)
        rates = [rate for position, rate in curve(b, "train/learning_rate") if position > stage_two]
        assert rates[0] > 0.5 * stage_of(SMOKE, 2).lr and rates == sorted(rates, reverse=True), rates


def test_resume_under_another_precision_policy(stage_one, tmp_path):
    """A stage started on one GPU (a T4: float16) continues on a CPU (float32), then on an L4 (bfloat16)."""
    root = tmp_path / "run"
    shutil.copytree(stage_one, root)
    folder = Workdir.resolve(root, SMOKE).stage_dir(2)
    first = start(stage_command(root, "--step", "2", "--save-every", "3", "--precision", "mixed_float16"))
    wait_for(lambda: (folder / checkpoint.checkpoint_name(0, 3)).exists(), first)
    kill(first)
    second = start(stage_command(root, "--step", "2", "--resume", "--save-every", "3", "--precision", "float32"))
    wait_for(lambda: (folder / checkpoint.checkpoint_name(0, 6)).exists(), second)
    said = kill(second)
    assert "ran under mixed_float16" in said and "the float16 loss scale was dropped" in said, said[-2000:]
    finish = run_command(stage_command(root, "--step", "2", "--resume", "--precision", "mixed_bfloat16"), env=ENV)
    assert finish.returncode == 0, finish.stdout[-2000:] + finish.stderr[-2000:]
    assert "ran under float32" in finish.stdout and "continues under mixed_bfloat16" in finish.stdout
    assert Manifest.read(Workdir.resolve(root, SMOKE)).status(2) == "done"


@pytest.mark.slow
def test_all_resumes_an_overridden_stage_with_its_class_weights(tmp_path, capsys):
    """--batch-size after an out-of-memory error, --class-weights: --all resumes the stage as it started."""
    root = tmp_path / "run"
    workdir = Workdir.resolve(root, SMOKE)
    small_synthetic(workdir.root, per_class=5, test=2, size=(64, 48))  # seven stages of a few steps each
    stopped = run_kit("kit.stage", "--step", "1", "--workdir", str(root), "--profile", "smoke", "--batch-size", "8",
                      "--class-weights", "--time-budget", "0.001")
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    saved = json.loads(workdir.manifest.read_text())["stages"]["1"]["plan"]
    assert saved["stage"]["batch_size"] == 8 and saved["class_weights"] is True

    assert stage_main(["--step", "1", "--resume", "--workdir", str(root), "--profile", "smoke", "--batch-size",
                       "16"]) == 2
    refused = " ".join(capsys.readouterr().err.split())
    assert "--batch-size 16 (saved: 8)" in refused
    assert "--resume --profile smoke --workdir" in refused  # the pasted hint hits this run

    finished = run_kit("kit.stage", "--all", "--workdir", str(root), "--profile", "smoke", "--workers", "2")
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    lines = finished.stdout.splitlines()
    stage_one_line = next(line for line in lines if line.startswith("Stage 1: tiny-cnn"))
    stage_two_line = next(line for line in lines if line.startswith("Stage 2: tiny-cnn"))
    assert "batch 8" in stage_one_line and "class-weighted loss" in stage_one_line
    assert "batch 32" in stage_two_line and "class-weighted" not in stage_two_line
    assert [Manifest.read(workdir).status(s) for s in range(1, 8)] == ["done"] * 7


def test_run_settings_are_fixed_when_the_run_starts(stage_one, capsys):
    code = stage_main(["--step", "2", "--workdir", str(stage_one), "--profile", "smoke", "--seed", "7",
                       "--weights", "none"])
    error = capsys.readouterr().err
    message = " ".join(error.split())
    assert code == 2 and "Traceback" not in error
    assert "--seed 7 (this run: 42)" in message and "--weights" not in message.split("other settings")[1]


@pytest.mark.slow
def test_budget_counts_from_the_session_start_and_stops_a_long_cache_build(tmp_path):
    """--all under a budget mostly spent already: the cache build stops in time, exit 3, progress kept."""
    root = tmp_path / "run"
    workdir = smoke_workdir(root)
    session_start = time.time() - 40  # the notebook's session began 40 s ago; the budget is 1 minute
    env = {**ENV, "KIT_SESSION_START": str(session_start), "KIT_FAULT_SLOW_DECODE": "0.3"}
    result = run_command(stage_command(root, "--all", "--time-budget", "1", args=["--profile", "smoke",
                            "--workers", "2"]), env=env)
    ended = time.time()
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert ended < session_start + 60 + 3, f"ended {ended - session_start - 60:.1f} s after the budget"
    assert "stopped for the time budget, while caching images" in result.stdout
    cache = next((workdir.cache).glob("train-*"))
    meta = json.loads((cache / "meta.json").read_text())
    assert not meta["complete"] and np.load(cache / "done.npy").any(), "what was cached is kept for the next run"


def test_all_does_not_start_a_stage_whose_set_up_cannot_fit(tmp_path, capsys):
    workdir = smoke_workdir(tmp_path)
    costs = {"save": 1.0, "by_size": {"48": {"setup": 600.0, "step_per_image": 0.01, "validation": 1}}}
    workdir.manifest.parent.mkdir(parents=True)
    workdir.manifest.write_text(json.dumps({"config": None, "stages": {}, "costs": costs}))
    plans = [StagePlan(stage) for stage in SMOKE.stages]
    budget = Budget(time.time() + 60)
    assert run_all(Manifest.read(workdir), plans, config_of(workdir), Execution(budget=budget)) == "stopped"
    assert "Stage 1 was not started" in capsys.readouterr().out
    assert Manifest.read(workdir).status(1) == "not started"


def test_stage_needs_the_previous_one(tmp_path):
    workdir = smoke_workdir(tmp_path)
    with pytest.raises(KitError, match="stage 2 is not started.*--step 2"):
        run_stage(Manifest.read(workdir), plan(3), config_of(workdir), Execution())


@pytest.mark.slow
def test_interrupted_stage_is_never_overwritten(tmp_path):
    workdir = smoke_workdir(tmp_path)
    config = config_of(workdir)
    stage = plan(1, batch_size=8)
    # A budget already spent: stops before the first batch, with a checkpoint.
    spent = Execution(budget=Budget(time.time() + 0.5))
    assert run_stage(Manifest.read(workdir), stage, config, spent) == "stopped"
    assert Manifest.read(workdir).status(1) == "interrupted"
    with pytest.raises(KitError, match=r"interrupted .*--resume.*--restart"):
        run_stage(Manifest.read(workdir), stage, config, Execution())
    assert run_stage(Manifest.read(workdir), stage, config, Execution(resume=True)) == "done"
    table = status_table(Manifest.read(workdir), SMOKE.stages)
    assert table.splitlines()[1].split()[4] == "done" and "not started" in table.splitlines()[2]
    best = (workdir.stage_dir(1) / "best.weights.npz").read_bytes()
    with pytest.raises(KitError, match="already done.*--restart"):
        run_stage(Manifest.read(workdir), stage, config, Execution())
    assert (workdir.stage_dir(1) / "best.weights.npz").read_bytes() == best
    assert run_stage(Manifest.read(workdir), stage, config, Execution(restart=True)) == "done"


@pytest.mark.slow
def test_restart_discards_every_later_stage(tmp_path, monkeypatch):
    workdir = smoke_workdir(tmp_path)
    config = config_of(workdir)
    assert run_stage(Manifest.read(workdir), plan(1, batch_size=8), config, Execution()) == "done"
    assert run_stage(Manifest.read(workdir), plan(2, batch_size=8, epochs=1), config, Execution()) == "done"
    stop_during_first_checkpoint(workdir, 3, monkeypatch)
    assert run_stage(Manifest.read(workdir), plan(3, batch_size=8), config, Execution(save_every=2)) == "stopped"
    assert checkpoint.list_checkpoints(workdir.stage_dir(3)) and Manifest.read(workdir).status(3) == "interrupted"
    monkeypatch.delenv("KIT_FAULT_SLOW_WRITE")
    before = [position for position, _ in curve(workdir, "train/loss")]
    assert run_stage(Manifest.read(workdir), plan(1, batch_size=8), config, Execution(restart=True)) == "done"
    assert [Manifest.read(workdir).status(step) for step in (2, 3)] == ["not started"] * 2
    # The discarded stages' points are gone from the TensorBoard log: the stage trained again owns its positions.
    after = [position for position, _ in curve(workdir, "train/loss")]
    assert after == sorted(set(after)) and max(after) < max(before), (before, after)
    assert [value for _, value in curve(workdir, "stage")] == [1.0] * len(curve(workdir, "stage"))
    for step in (2, 3):
        folder = workdir.stage_dir(step)
        assert not checkpoint.list_checkpoints(folder) and not (folder / "best.weights.npz").exists()


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_shows_as_interrupted(tmp_path):
    root = tmp_path / "run"
    workdir = smoke_workdir(root)
    process = start(stage_command(root, "--step", "1", args=["--profile", "smoke", "--workers", "1"]))
    wait_for(lambda: workdir.manifest.is_file() and "1" in json.loads(workdir.manifest.read_text())["stages"], process)
    kill(process)
    status = run_kit("kit.stage", "--status", "--profile", "smoke", "--workdir", str(root))
    assert "interrupted (no checkpoint yet)" in status.stdout.splitlines()[2]
    with pytest.raises(KitError, match="interrupted before its first checkpoint.*--resume"):
        run_stage(Manifest.read(workdir), plan(1), config_of(workdir), Execution())


@pytest.mark.slow
def test_best_file_survives_a_kill_between_its_write_and_the_checkpoint(tmp_path, monkeypatch):
    """The replayed epoch scores lower (as it can on a GPU): the better file on disk stays."""
    workdir = smoke_workdir(tmp_path)
    config = config_of(workdir)
    stage = plan(1, batch_size=8, epochs=1)
    stop_during_first_checkpoint(workdir, 1, monkeypatch)
    assert run_stage(Manifest.read(workdir), stage, config, Execution(save_every=3)) == "stopped"
    monkeypatch.delenv("KIT_FAULT_SLOW_WRITE")
    mid_epoch = [shutil.copy(p, workdir.root / p.name) for p in checkpoint.list_checkpoints(workdir.stage_dir(1))]
    assert mid_epoch, "a mid-epoch checkpoint to go back to"
    assert run_stage(Manifest.read(workdir), stage, config, Execution(resume=True)) == "done"
    # As if killed after best.weights.npz was written and before the epoch's checkpoint: the stage is
    # still at its mid-epoch checkpoint, and the first try of the epoch scored better than the replay will.
    best = workdir.stage_dir(1) / "best.weights.npz"
    arrays, state = checkpoint.read(best)
    state["val_accuracy"] = 1.5  # higher than any replay can reach
    np.savez(best, **arrays, state=np.frombuffer(json.dumps(state).encode(), np.uint8))
    kept = best.read_bytes()
    manifest = json.loads(workdir.manifest.read_text())
    manifest["stages"]["1"]["status"] = "interrupted"
    workdir.manifest.write_text(json.dumps(manifest))
    for saved in mid_epoch:
        shutil.copy(saved, workdir.stage_dir(1))
    assert run_stage(Manifest.read(workdir), stage, config, Execution(resume=True)) == "done"
    assert best.read_bytes() == kept
    assert json.loads(workdir.manifest.read_text())["stages"]["1"]["best_val_accuracy"] == 1.5


@pytest.mark.slow
def test_best_weights_never_get_worse(tmp_path):
    workdir = smoke_workdir(tmp_path)
    run_stage(Manifest.read(workdir), plan(1, epochs=4, batch_size=8), config_of(workdir), Execution())
    _, state = checkpoint.read(workdir.stage_dir(1) / "best.weights.npz")
    history = log_rows(workdir, 1)
    accuracies = [float(line.split(",")[4]) for line in history[1:]]
    assert state["val_accuracy"] == pytest.approx(max(accuracies))
    assert state["epoch"] == accuracies.index(max(accuracies)) + 1
    manifest = json.loads(workdir.manifest.read_text())
    assert manifest["stages"]["1"]["status"] == "done"
    assert (workdir.stage_dir(1) / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_kaggle_style_resume_from_a_read_only_copy(stage_one, tmp_path):
    """A new Kaggle session: the previous version's output is attached read-only; the run continues from it."""
    source = tmp_path / "input"
    shutil.copytree(stage_one, source)
    folder = Workdir.resolve(source, SMOKE).stage_dir(2)
    first = start(stage_command(source, "--step", "2", "--save-every", "3"))
    wait_for(lambda: (folder / checkpoint.checkpoint_name(0, 3)).exists(), first)
    kill(first)
    (Workdir.resolve(source, SMOKE).root / ".kit.lock").unlink(missing_ok=True)  # Kaggle's output has no live lock
    for path in sorted(source.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    target = tmp_path / "working"
    smoke_workdir(target)  # the same data, attached again (kit.download --from-dir in the notebook)
    try:
        copied = run_kit("kit.stage", "--copy-run-from", str(source), "--profile", "smoke", "--workdir", str(target))
        assert copied.returncode == 0, copied.stderr[-2000:]
        assert "interrupted at epoch 1 step 3" in copied.stdout
        again = run_kit("kit.stage", "--copy-run-from", str(source), "--profile", "smoke", "--workdir", str(target))
        assert again.returncode == 0 and "nothing copied" in again.stdout  # a notebook re-run is harmless
        resumed = run_kit("kit.stage", "--step", "2", "--resume", "--profile", "smoke", "--workdir", str(target))
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert "resuming from checkpoint-e000-s000003" in resumed.stdout
        assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
    finally:
        for path in source.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    missing = run_kit("kit.stage", "--copy-run-from", str(tmp_path / "nothing"), "--profile", "smoke",
                      "--workdir", str(tmp_path / "w2"))
    assert missing.returncode == 2 and "holds no run of the kit" in " ".join(missing.stderr.split())


def test_status_command(stage_one, capsys):
    assert stage_main(["--status", "--profile", "smoke", "--workdir", str(stage_one)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"smoke profile in {Workdir.resolve(stage_one, SMOKE).root}"
    assert lines[2].split()[4] == "done" and "not started" in lines[3]


def test_refusal_is_one_paragraph_without_traceback(stage_one):
    result = run_kit("kit.stage", "--step", "4", "--profile", "smoke", "--workdir", str(stage_one))
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert f"Run 'python -m kit.stage --step 3 --profile smoke --workdir {stage_one}'" in message


def test_smoke_run_learns(smoke_run):
    manifest = json.loads((smoke_run / "weights" / "state.json").read_text())
    assert [manifest["stages"][str(s)]["status"] for s in range(1, 8)] == ["done"] * 7
    assert manifest["stages"]["7"]["best_val_accuracy"] >= 0.90


def test_final_fit_replays_the_last_stage_on_training_and_validation_images(smoke_run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(smoke_run.parent, root, symlinks=True)
    workdir = Workdir.resolve(root, SMOKE)
    last = json.loads(workdir.manifest.read_text())["stages"]["7"]
    result = run_kit("kit.stage", "--final-fit", "--profile", "smoke", "--workdir", str(root))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"stage 7 again on training + validation images, {last['best_epoch']} epoch" in result.stdout
    assert "800 training / 160 validation images" in result.stdout  # all 800 labelled smoke photos train
    history = log_rows(workdir, 8)
    assert len(history) == 1 + last["best_epoch"]
    assert [row.split(",")[-1] for row in history[1:]] == [row.split(",")[-1] for row in log_rows(workdir, 7)[
        1:1 + last["best_epoch"]]]  # the validated stage's learning rate, epoch by epoch
    assert "final fit: train + val" in status_table(Manifest.read(workdir), SMOKE.stages)
    assert checkpoint.read_state(workdir.stage_dir(8) / "best.weights.npz")["final_fit"] is True

    # The commands that read the final fit, in this process: what matters here is what they make of it.
    from kit.predict import main as predict_main
    from kit.report import main as report_main

    capsys.readouterr()
    assert report_main(["--tta", "0", "--profile", "smoke", "--workdir", str(root)]) == 0
    metrics = json.loads((workdir.report / "metrics.json").read_text())
    assert metrics["final_fit"] is True and metrics["validation"]["held_out"] is False
    assert "not a held-out score" in capsys.readouterr().out and "final fit" in metrics["model"]

    assert predict_main(["--tta", "0", "--profile", "smoke", "--workdir", str(root)]) == 0
    predicted = capsys.readouterr().out
    assert "stage 8 (final fit on training + validation images)" in predicted  # the newest model
    assert "Validation not predicted: the final fit trained on those photos" in predicted
    assert not (workdir.report / "validation_probabilities.csv").exists()

    assert stage_main(["--final-fit", "--profile", "smoke", "--workdir", str(root)]) == 2
    assert "--final-fit --restart" in " ".join(capsys.readouterr().err.split())


def test_final_fit_needs_the_last_stage_and_takes_no_new_settings(stage_one, capsys):
    code = stage_main(["--final-fit", "--workdir", str(stage_one), "--profile", "smoke"])
    assert code == 2 and "stage 7 must be done first" in " ".join(capsys.readouterr().err.split())


def test_the_stage_record_says_how_it_ran(stage_one):
    """Precision, device, device count and XLA as resolved here (Keras' auto rule: no XLA on a CPU with TensorFlow)."""
    record = json.loads(Workdir.resolve(stage_one, SMOKE).manifest.read_text())["stages"]["1"]
    assert record["runtime"] == {"precision": "float32", "device": "CPU", "jit": False, "devices": 1,
                                 "backend": "tensorflow"}


def test_the_whole_job_does_not_start_a_prediction_that_the_budget_cannot_fit(smoke_run, tmp_path, capsys):
    from kit.__main__ import main as run_everything

    root = tmp_path / "run"
    shutil.copytree(smoke_run.parent, root, symlinks=True)
    (root / "smoke" / "submissions" / "submission.csv").unlink()
    assert run_everything(["--smoke", "--workdir", str(root), "--time-budget", "0.01"]) == 3
    said = " ".join(capsys.readouterr().out.split())
    assert "Prediction was not started" in said and "Run the same command again" in said
    assert not (root / "smoke" / "submissions" / "submission.csv").exists()


def test_the_manifest_is_typed_and_keeps_what_it_does_not_know(tmp_path):
    """A record read, changed and written back: typed fields, and a newer kit's keys kept as they were."""
    workdir = Workdir(tmp_path)
    workdir.manifest.parent.mkdir(parents=True)
    workdir.manifest.write_text(json.dumps({"config": None, "costs": {"save": 2.0}, "future": [1],
                                            "stages": {"1": {"status": "interrupted", "epochs": 3, "later": "x"}}}))
    manifest = Manifest.read(workdir)
    assert manifest.record(1).epochs == 3 and manifest.status(1) == "interrupted" and manifest.status(2) == "not started"
    manifest.update(1, status="done", best_val_accuracy=0.9)
    saved = json.loads(workdir.manifest.read_text())
    assert saved["future"] == [1] and saved["costs"] == {"save": 2.0}
    assert saved["stages"]["1"] == {"later": "x", "status": "done", "epochs": 3, "best_val_accuracy": 0.9}
    workdir.manifest.write_text("[1, 2]")
    with pytest.raises(KitError, match="state.json is damaged.*checkpoints next to it are intact"):
        Manifest.read(workdir)
