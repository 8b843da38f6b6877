"""Faults and bad input: a refused command discards nothing, a damaged file or a full or read-only disk gets one
paragraph (exit 2), a stop gets exit 3 and the same command continues.

Each case starts from a copy of a run whose stage 1 is done, and checks that every file of the
run's weights/ is byte for byte what it was. Faults of a process (signals, disks) happen to a
real process; a full disk is a small tmpfs and a read-only one a read-only bind mount, which
need root (CI and this machine run as root), and are skipped where mounting is not allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, STAGE_ARGS, kit_process, run_command, run_kit
from kit.config import Workdir
from kit.manifest import Manifest

SMOKE = ["--profile", "smoke"]


@pytest.fixture
def run(stage_one, tmp_path) -> Path:
    """A private copy of a run whose stage 1 is done (its work directory root; the run is in <root>/smoke)."""
    root = tmp_path / "run"
    shutil.copytree(stage_one, root)
    return root


def weights_files(root: Path) -> dict[str, str]:
    """Every file of the run's weights/ and its hash: what no refused command may change."""
    weights = root / "smoke" / "weights"
    return {str(p.relative_to(weights)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(weights.rglob("*")) if p.is_file()}


def stage(root: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_kit("kit.stage", *args, "--workdir", str(root), *STAGE_ARGS, *kwargs.pop("extra", ()), **kwargs)


def one_paragraph(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    return " ".join(result.stderr.split())


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()}): the disk faults need root")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# ---- 1, 2: a refused start discards nothing and saves nothing ---------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size 0 is too small"),
    (["--image-size", "0"], "--image-size 0 is too small"),
    (["--steps-per-epoch", "-1"], "--steps-per-epoch -1 is too small"),
    (["--epochs", "0"], "--epochs 0 is too small"),
    (["--lr", "-1"], "--lr -1 is not a learning rate"),
])
def test_a_refused_restart_discards_nothing_and_a_bad_setting_is_never_saved(run, capsys, flags, message):
    """The command's own main, in this process (a refusal is not a process's fault): exit 2, one paragraph."""
    from kit.stage import main

    before = weights_files(run)
    for step in ("1", "2"):  # a done stage restarted; a stage not started yet
        code = main(["--step", step, "--restart", "--workdir", str(run), *STAGE_ARGS, *flags])
        error = " ".join(capsys.readouterr().err.split())
        assert code == 2 and message in error and "Traceback" not in error
        assert weights_files(run) == before


def test_a_restart_that_the_devices_refuse_discards_nothing(run):
    before = weights_files(run)
    refused = stage(run, "--step", "1", "--restart", "--devices", "3")  # a batch of 8 does not split over 3
    assert "does not split evenly over 3 devices" in one_paragraph(refused)
    assert weights_files(run) == before


def test_a_damaged_starting_point_is_refused_before_anything_is_discarded(run, capsys):
    from kit.stage import main

    best = run / "smoke" / "weights" / "stage_1" / "best.weights.npz"
    best.write_bytes(best.read_bytes()[:1000])  # cut short, as by a full disk on another machine
    before = weights_files(run)
    assert main(["--step", "2", "--restart", "--workdir", str(run), *STAGE_ARGS]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "starts from" in message and "is damaged" in message and "--step 1 --restart" in message
    assert weights_files(run) == before


def test_a_stage_whose_checkpoints_are_all_damaged_is_not_started_over_silently(run):
    from kit.cli import KitError
    from kit.config import PROFILES, stage_of
    from kit.records import Execution, StagePlan
    from kit.training import check_can_start

    workdir = Workdir.resolve(run, PROFILES["smoke"])
    folder = workdir.stage_dir(2)
    folder.mkdir(parents=True)
    (folder / "checkpoint-e000-s000004.npz").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(KitError, match="Every checkpoint of stage 2 .* is damaged.*--restart"):
        check_can_start(Manifest.read(workdir), StagePlan(stage_of(PROFILES["smoke"], 2)), Execution(resume=True))
    assert (folder / "checkpoint-e000-s000004.npz").is_file()


# ---- 7: exit 3 means "run the same command again" -------------------------------------------------

def test_after_a_clean_stop_the_same_command_continues(run):
    command = [sys.executable, "-m", "kit.stage", "--step", "2", "--workdir", str(run), *STAGE_ARGS,
               "--save-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KIT_FAULT_SLOW_WRITE": "0.3"}
    process = kit_process(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoints = run / "smoke" / "weights" / "stage_2"
    deadline = time.time() + 240
    while not list(checkpoints.glob("checkpoint-*.npz")) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3, out[-2000:] + err[-2000:]
    assert "Run the same command again to continue" in out and "Traceback" not in err
    again = run_command(command, env={**env, "KIT_FAULT_SLOW_WRITE": "0"}, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming from checkpoint-" in again.stdout and "Stage 2 done" in again.stdout


def test_sigterm_during_a_prediction_says_what_happened(run):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KIT_FAULT_SLOW_DECODE": "0.2"}
    process = subprocess.Popen([sys.executable, "-m", "kit.predict", "--tta", "0", "--workdir", str(run), *SMOKE],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(12)  # TensorFlow started, the model loaded, caching the test photos slowly
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 3, out[-1000:] + err[-2000:]
    assert "stopped by SIGTERM" in err and "run the same command again" in err and "Traceback" not in err
    assert not list((run / "smoke").rglob(".*.tmp"))  # nothing half-written left behind


# ---- 3, 4: full and read-only disks -----------------------------------------------------------------

def test_a_cache_on_a_full_disk_is_refused_before_it_is_mapped(run, tmp_path):
    before = weights_files(run)
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as small:
        refused = stage(run, "--step", "2", "--cache-dir", str(small))
        message = one_paragraph(refused)
    assert "image cache" in message and "MB free" in message and "--cache-dir" in message
    assert weights_files(run) == before


def test_a_full_work_directory_keeps_the_checkpoints_intact(run, tmp_path):
    with mounted(tmp_path / "full", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as full:
        shutil.copytree(run / "smoke" / "weights", full / "smoke" / "weights")
        shutil.copytree(run / "smoke" / "data", full / "smoke" / "data")
        before = weights_files(full)
        filler = full / "filler"
        with open(filler, "wb") as f:  # the rest of the disk, taken
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        refused = stage(full, "--step", "2", "--cache-dir", str(tmp_path / "cache"))
        message = one_paragraph(refused)
        # The full disk is named, with its own free space: not the current folder's (the repository's disk).
        assert f"The disk holding {full}/smoke" in message and "(0 MB free)" in message and "intact" in message
        assert weights_files(full) == before
        predicted = run_kit("kit.predict", "--tta", "1", "--workdir", str(full), *SMOKE, "--cache-dir",
                            str(tmp_path / "cache"))
        said = one_paragraph(predicted)
        assert f"The disk holding {full}/smoke" in said, said
        synthetic = run_kit("kit.download", "--synthetic", "--workdir", str(full / "other"))
        assert f"The disk holding {full}/other" in one_paragraph(synthetic)


def test_a_read_only_work_directory_is_explained(run, tmp_path, capsys):
    from kit.predict import main as predict_main
    from kit.report import main as report_main
    from kit.stage import main as stage_main

    view = tmp_path / "input"
    with mounted(view, "--bind", str(run)):
        remounted = subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount here: {remounted.stderr.strip()}")
        # The commands' own mains in this process (the process-level paragraph is checked by the tests above).
        commands = ((predict_main, ["--tta", "0"]), (report_main, ["--tta", "0"]), (stage_main, ["--step", "2"]))
        for main, args in commands:
            assert main([*args, "--workdir", str(view), *SMOKE]) == 2, args
            error = capsys.readouterr().err
            message = " ".join(error.split())
            assert "Traceback" not in error and "cannot be written to" in message and "--copy-run-from" in message


# ---- 5, 6: damaged files other than the checkpoints ---------------------------------------------------

@pytest.mark.parametrize("damage, command, expected", [
    (("data/dataset.json", "{ not json"), ("kit.predict",), "dataset.json is damaged"),
    (("data/index.csv", "Id;Category\n1;2\n"), ("kit.predict",), "index.csv is damaged"),
    (("weights/split.csv", "name,fold\nx,val\n"), ("kit.report",), "split.csv is damaged"),
    (("weights/stage_1/log.csv", b"\xff\xfe\x00garbled"), ("kit.report",), "log.csv is damaged"),
    (("weights/state.json", "[]"), ("kit.stage", "--status"), "state.json is damaged"),
    (("weights/state.json", "{}"), ("kit.predict",), "the run's record is damaged, its weights are not"),
    (("weights/split.csv", "Id,Category,fold\n100155.jpg,0,tr"), ("kit.report",), "its last line is cut short"),
])
def test_a_damaged_file_gets_one_paragraph_with_a_safe_way_out(run, capsys, damage, command, expected):
    """In this process, through each command's own main."""
    import importlib

    name, content = damage
    path = run / "smoke" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = weights_files(run)
    main = importlib.import_module(command[0]).main
    code = main([*command[1:], "--tta", "0", "--workdir", str(run), *SMOKE] if command[0] != "kit.stage"
                else [*command[1:], "--workdir", str(run), *SMOKE])
    error = " ".join(capsys.readouterr().err.split())
    assert code == 2 and expected in error and "Traceback" not in error
    assert f"delete {run / 'smoke' / 'weights'}" not in error  # never the advice to throw the run away
    assert weights_files(run) == before


def test_a_lost_record_is_rebuilt_from_the_stage_folders(run, capsys):
    """state.json emptied beside a finished stage: refused with the way out, which gives the stage back as it was."""
    from kit.predict import main as predict_main
    from kit.stage import main as stage_main

    weights = run / "smoke" / "weights"
    before = Manifest.read(Workdir(run / "smoke"))
    original = before.record(1)
    (weights / "state.json").write_text("{}")
    assert predict_main(["--tta", "0", "--workdir", str(run), *SMOKE]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "--rebuild-record --profile smoke" in error and "Train first" not in error
    assert stage_main(["--rebuild-record", "--workdir", str(run), *SMOKE]) == 0
    assert (weights / "state.json.damaged").read_text() == "{}"
    rebuilt = Manifest.read(Workdir(run / "smoke"))
    assert rebuilt.status(1) == "done" and rebuilt.status(2) == "not started"
    record = rebuilt.record(1)
    assert (record.plan, record.best_val_accuracy, record.best_epoch, record.epochs) == \
        (original.plan, original.best_val_accuracy, original.best_epoch, original.epochs)
    assert rebuilt.config == before.config and rebuilt.config is not None


def test_a_truncated_split_is_damaged_not_changed_data(run, capsys):
    from kit.report import main

    split = run / "smoke" / "weights" / "split.csv"
    split.write_text("".join(split.read_text().splitlines(keepends=True)[:10]))
    code = main(["--tta", "0", "--workdir", str(run), *SMOKE])
    error = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "is damaged: it lists 9 of the run's" in error and "write the same one again" in error
    assert "train again" not in error


def test_a_truncated_index_is_damaged_not_an_empty_test_set(run, capsys):
    from kit.predict import main

    index = run / "smoke" / "data" / "index.csv"
    index.write_text("".join(index.read_text().splitlines(keepends=True)[:20]))
    code = main(["--tta", "0", "--workdir", str(run), *SMOKE])
    error = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "index.csv is damaged" in error and "--force" in error and "no test images" not in error


def test_the_submit_hint_names_the_work_directory(run, capsys):
    from kit.submit import main

    assert main(["--check", "--workdir", str(run), *SMOKE]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert f"python -m kit.predict --profile smoke --workdir {run}" in error


def test_paths_that_name_the_wrong_kind_of_thing(run, tmp_path, capsys):
    from kit.ensemble import main as ensemble
    from kit.stage import main as stage_main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert stage_main(["--step", "1", "--workdir", str(a_file), *SMOKE]) == 2
    assert "part of that path is a file" in " ".join(capsys.readouterr().err.split())
    run_kit("kit.predict", "--tta", "0", "--workdir", str(run), *SMOKE)
    (tmp_path / "out").mkdir()
    assert ensemble([str(run / "smoke"), str(run / "smoke"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'out'} is a folder" in " ".join(capsys.readouterr().err.split())  # not a temporary file

    probabilities = run / "smoke" / "submissions" / "probabilities.csv"
    cut = tmp_path / "cut.csv"
    cut.write_bytes(probabilities.read_bytes()[:-7])  # a copy cut short
    assert ensemble([str(run / "smoke"), str(cut), "--out", str(tmp_path / "e.csv")]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "its last line is cut short" in error and "different datasets" not in error


def test_files_of_the_wrong_kind_given_as_a_model(run, tmp_path, capsys):
    from kit.demo import main as demo
    from kit.predict import main as predict

    assert predict(["--tta", "0", "--workdir", str(run), *SMOKE, "--weights",
                    str(run / "smoke" / "weights" / "state.json")]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "not a weights file of the kit" in error and "allow_pickle" not in error
    damaged = tmp_path / "export" / "model.onnx"
    damaged.parent.mkdir()
    damaged.write_bytes(b"\x08\x07\x12\x04kit" + bytes(range(200)))  # a cut, garbled export
    (damaged.parent / "model.json").write_text(json.dumps({"classes": ["a", "b"], "image_size": 64}))
    assert demo(["--model", str(damaged)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "cannot be loaded by ONNX Runtime" in error and "Traceback" not in error


def test_a_sigterm_dropped_inside_a_gc_callback_still_stops_the_command(capsys, monkeypatch):
    """Python prints and drops an exception raised in a gc callback (JAX registers one, and TensorFlow imports JAX):
    the command must still stop with exit 3 at its next loop, not run to its end as if no SIGTERM had come, and
    without the traceback Python prints for what it drops."""
    import gc

    from kit.cli import main_guard
    from kit.pipeline import ordered_map

    def terminate_inside_a_callback(phase, info):
        if phase == "start":
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the callback

    def command(argv):
        gc.callbacks.append(terminate_inside_a_callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(terminate_inside_a_callback)
        list(ordered_map(str, range(3), workers=2))
        return 0

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)  # where Python sends what a callback raised
    assert main_guard(command)([]) == 3
    assert not dropped  # the kit took its own Terminated: no "Exception ignored" traceback on stderr
    assert "stopped by SIGTERM" in capsys.readouterr().err
