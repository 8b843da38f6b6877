"""Driving Kaggle from a laptop: `python -m kit.remote` with the real kaggle package against the local Kaggle.

What the server received is checked on the server's side (the pushed notebook parsed as a notebook,
its commands parsed by the kit's own parsers); the output a version leaves is a real trained run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import run_kit
from kaggle_server import KEY, USER, Kaggle, serve
from kit.config import COMPETITION, PROFILES, Workdir
from kit.notebook import hardware_mismatch, kaggle_input
from test_docs import assert_parses, helper_calls

KERNEL = f"{USER}/car-kit-b6"
REPO, COMMIT = "https://github.com/carfans/car-kit.git", "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


@pytest.fixture
def kaggle(tmp_path):
    server = Kaggle(competitions={COMPETITION: tmp_path / "unused.zip"})
    http = serve(server)
    yield server
    http.shutdown()
    http.server_close()


def remote(server: Kaggle, workdir: Path, action: str, *args: str):
    """kit.remote ACTION, its own flags first: anything after `--` in `args` goes to the notebook's kit.stage."""
    env = server.environment(workdir.parent / "no-config")
    return run_kit("kit.remote", action, "--workdir", str(workdir), "--interval", "0.01", *args, env=env,
                   timeout=120)


def push(server: Kaggle, workdir: Path, *args: str):
    return remote(server, workdir, "push", "--kernel", KERNEL, "--repo", REPO, "--commit", COMMIT, *args)


def pushed_notebook(server: Kaggle, version: int = 0) -> nbformat.NotebookNode:
    notebook = nbformat.reads(server.kernels[KERNEL][version]["text"], as_version=4)
    nbformat.validate(notebook)
    return notebook


def code_of(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_push_sends_the_kits_notebook_filled_in_and_watch_follows_it_to_the_end(kaggle, tmp_path):
    result = push(kaggle, tmp_path / "work", "--watch")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(": ")[-1].split(" ")[0] for line in result.stdout.splitlines() if "version 1:" in line] == [
        "queued", "running", "complete"]
    assert "kit.remote pull" in result.stdout

    sent = kaggle.kernels[KERNEL][0]
    assert sent["slug"] == KERNEL and sent["newTitle"] == "car-kit-b6" and sent["kernelType"] == "notebook"
    assert sent["enableGpu"] is True and sent["enableInternet"] is True and sent.get("enableTpu") is not True
    assert sent["competitionDataSources"] == [COMPETITION] and not sent.get("kernelDataSources")
    assert sent["isPrivate"] is True
    code = code_of(pushed_notebook(kaggle))
    assert f"'{REPO}'" in code[0] and f"KIT_COMMIT = '{COMMIT}'" in code[0]
    commands = helper_calls("\n".join(code))
    assert ("kit.stage", ["--all", "--time-budget", "690"]) in commands
    for module, args in commands:
        assert_parses(module, args)
    assert "stop_ok=True" in code[-1] and "kit.predict" in code[-1], "a budget stop ends the version cleanly"
    assert KEY not in sent["text"]

    again = push(kaggle, tmp_path / "work")
    assert again.returncode == 2 and "kit.remote continue" in " ".join(again.stderr.split())


def test_a_failed_version_exits_1_with_kaggles_message(kaggle, tmp_path):
    assert push(kaggle, tmp_path / "work").returncode == 0
    kaggle.statuses[KERNEL] = ["RUNNING", "ERROR"]
    running = remote(kaggle, tmp_path / "work", "status")
    assert running.returncode == 3 and "running" in running.stdout
    failed = remote(kaggle, tmp_path / "work", "status")
    assert failed.returncode == 1 and "more memory than is available" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize("args, unverified, words", [
    ((), True, "phone-verified account"),
    (("--", "--label-smoothing", KEY), False, "would carry a secret (KAGGLE_KEY"),
    (("--repo", "https://carfan:ghp_0123456789abcdef@github.com/carfans/car-kit.git"), False, "carries credentials"),
    (("--repo", "/home/carfan/car-kit"), False, "a local path, which Kaggle cannot clone"),
    (("--kernel", "car-kit"), False, "should be OWNER/SLUG"),
    (("--kernel", f"{USER}/car--kit"), False, "it would make 'car-kit' of 'car--kit'"),  # the package's slugify
    (("--kernel", f"{USER}/car-kit-"), False, "it would make 'car-kit' of 'car-kit-'"),
])
def test_pushes_that_cannot_work_are_refused_in_one_paragraph(kaggle, tmp_path, args, unverified, words):
    kaggle.unverified = unverified
    result = push(kaggle, tmp_path / "work", *args)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and words in message and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "work" / "remote" / "kernel.json").exists(), "nothing recorded as pushed"
    if not unverified:
        assert KERNEL not in kaggle.kernels, "nothing reached Kaggle"


def version_output(run: Path) -> dict[str, bytes]:
    """What a version leaves in /kaggle/working: the car-kit folder without the data and cache (in /kaggle/temp),
    the session's hardware record (a T4 asked for, a P100 given), and JAX's compiled programs as a version of an
    older kit left them in weights/compiled/ (entries named as JAX names them): more than one page of listing."""
    output = {f"car-kit/{path.relative_to(run)}": path.read_bytes() for path in sorted(run.rglob("*"))
              if path.is_file() and not {"data", "cache"} & set(path.relative_to(run).parts)}
    output["car-kit/hardware.json"] = json.dumps([{
        "asked": {"accelerator": "gpu", "machine": "NvidiaTeslaT4"}, "gpus": ["Tesla P100-PCIE-16GB"], "tpu": False,
        "mismatch": hardware_mismatch("gpu", "NvidiaTeslaT4", ["Tesla P100-PCIE-16GB"], False)}]).encode()
    for k in range(30):
        output[f"car-kit/smoke/weights/compiled/jit_step-{k:064x}-cache"] = bytes([k]) * 64
    return output


def test_pull_brings_the_run_back_and_continue_resumes_it_from_the_output(kaggle, stage_one, tmp_path):
    """A version trained stage 1 of the smoke profile and stopped on its budget: pull, continue, resume."""
    work = tmp_path / "laptop"
    assert push(kaggle, work, "--profile", "smoke").returncode == 0
    kaggle.outputs[KERNEL] = version_output(stage_one)
    kaggle.logs[KERNEL] = "Stopped with a checkpoint: the next version continues it"

    early = remote(kaggle, work, "pull")
    assert early.returncode == 3 and "Still queued" in early.stdout and not (work / "smoke").exists()
    kaggle.statuses[KERNEL] = ["COMPLETE"]
    pulled = remote(kaggle, work, "pull")
    assert pulled.returncode == 3, pulled.stdout + pulled.stderr  # stages 2-7 left: work remains
    assert "kit.remote continue" in pulled.stdout and "done" in pulled.stdout
    local = Workdir.resolve(work, PROFILES["smoke"])
    assert local.manifest.read_bytes() == (stage_one / "smoke" / "weights" / "state.json").read_bytes()
    assert kaggle.calls.count("ListKernelSessionOutput") >= 2, "the listing came in pages, and every page was read"
    assert not (local.weights / "compiled").exists(), "compiled programs are never carried in from an output"
    assert "ran on Tesla P100-PCIE-16GB: NvidiaTeslaT4 was asked for" in pulled.stdout
    status = remote(kaggle, work, "status")
    assert "ran on Tesla P100-PCIE-16GB" in status.stdout
    assert (work / "remote" / "output" / "car-kit-b6.log").read_text().startswith("Stopped with a checkpoint")
    status = run_kit("kit.stage", "--status", "--profile", "smoke", "--workdir", str(work))
    assert status.returncode == 0 and status.stdout.count(" done ") >= 1, status.stdout

    resumed = remote(kaggle, work, "continue")
    assert resumed.returncode == 0, resumed.stderr
    sent = kaggle.kernels[KERNEL][1]
    assert sent["kernelDataSources"] == [KERNEL], "the next version has this one's output attached"
    code = code_of(pushed_notebook(kaggle, 1))

    # On Kaggle the attached output is read-only under /kaggle/input: the pushed notebook finds the run there
    # by itself (its folder cell, run as it is with /kaggle moved here) and copies it out to continue.
    kaggle_root = tmp_path / "kaggle"
    for name, data in kaggle.outputs[KERNEL].items():
        (kaggle_root / "input" / "car-kit-b6" / name).parent.mkdir(parents=True, exist_ok=True)
        (kaggle_root / "input" / "car-kit-b6" / name).write_bytes(data)
    folders = next(c for c in code if "PREVIOUS_RUN =" in c).replace("/kaggle/", f"{kaggle_root}/")
    cell = "import os\n" + folders + "\nprint('FOUND', PREVIOUS_RUN)"
    found = subprocess.run([sys.executable, "-c", cell], capture_output=True, text=True, check=True).stdout
    previous = found.split("FOUND ")[1].strip()
    assert previous == str(kaggle_root / "input" / "car-kit-b6" / "car-kit")
    copy = next(c for c in code if "--copy-run-from" in c)
    assert helper_calls(copy) == [("kit.stage", ["--copy-run-from", "X", "--profile", "smoke"])]
    working = kaggle_root / "working" / "car-kit"
    copied = run_kit("kit.stage", "--copy-run-from", previous, "--profile", "smoke", "--workdir", str(working))
    assert copied.returncode == 0, copied.stderr
    assert "interrupted" not in copied.stdout and copied.stdout.count(" done ") >= 1
    assert not (working / "smoke" / "weights" / "compiled").exists(), "no compiled program copied from an input"


@pytest.mark.parametrize("damage, words", [
    ("a lost file", "lacks 1 of the files its record names (e.g. smoke/weights/stage_1/best.weights.npz)"),
    ("over 500 files", "listed 500 files of the output, its limit, and the run's record"),
])
def test_a_pull_that_lacks_the_runs_files_says_so(kaggle, stage_one, tmp_path, damage, words):
    """Kaggle lists at most 500 files of an output (a JAX run of an older kit kept hundreds of compiled programs),
    and a version's output may lack a file: a record without its weights is not taken for a run."""
    work = tmp_path / "laptop"
    assert push(kaggle, work, "--profile", "smoke").returncode == 0
    output = version_output(stage_one)
    if damage == "a lost file":
        del output["car-kit/smoke/weights/stage_1/best.weights.npz"]
    else:
        output.update({f"car-kit/smoke/weights/compiled/jit_init-{k:064x}-cache": b"\0" * 8 for k in range(500)})
    kaggle.outputs[KERNEL], kaggle.statuses[KERNEL] = output, ["COMPLETE"]
    pulled = remote(kaggle, work, "pull")
    message = " ".join(pulled.stderr.split())
    assert pulled.returncode == 2 and "Traceback" not in pulled.stderr, pulled.stderr
    assert words in message and "Download the output from the version's page" in message


def test_kaggle_input_finds_an_input_wherever_kaggle_mounted_it(tmp_path):
    (tmp_path / "competitions" / COMPETITION).mkdir(parents=True)
    (tmp_path / "datasets" / "someone" / "stanford-cars").mkdir(parents=True)
    assert kaggle_input(COMPETITION, str(tmp_path)) == str(tmp_path / "competitions" / COMPETITION)
    assert kaggle_input("stanford-cars", str(tmp_path)) == str(tmp_path / "datasets" / "someone" / "stanford-cars")
    with pytest.raises(SystemExit, match="No input named 'other'"):
        kaggle_input("other", str(tmp_path))


def test_the_record_of_what_was_pushed_is_read_back(kaggle, tmp_path):
    assert push(kaggle, tmp_path / "work", "--accelerator", "tpu", "--repo", "git@github.com:carfans/car-kit.git"
                ).returncode == 0
    record = json.loads((tmp_path / "work" / "remote" / "kernel.json").read_text())
    assert record["repo"] == REPO, "an SSH address is cloned over https: the notebook has no key"
    assert record["kernel"] == KERNEL and record["versions"] == [1] and record["accelerator"] == "tpu"
    assert record["stage_args"] == ["--backbone", "keras-efficientnetb6"]
    sent = kaggle.kernels[KERNEL][0]
    assert sent["enableTpu"] is True and sent.get("enableGpu") is not True
    assert "'jax[tpu]'" in sent["text"] and "KERAS_BACKEND" in sent["text"]
    # A TPU session ends at 9 hours: training stops at 510 minutes, the report and prediction must end by 530.
    commands = helper_calls("\n".join(code_of(pushed_notebook(kaggle))))
    assert ("kit.stage", ["--all", "--time-budget", "510", "--backbone", "keras-efficientnetb6"]) in commands
    assert ("kit.predict", ["--tta", "10", "--time-budget", "530"]) in commands
    assert ("kit.report", ["--tta", "10", "--time-budget", "530"]) in commands
    assert record["time_budget"] == "510"


def test_a_budget_past_the_sessions_limit_is_warned_of(kaggle, tmp_path):
    result = push(kaggle, tmp_path / "work", "--accelerator", "tpu", "--time-budget", "690")
    assert result.returncode == 0 and "runs into Kaggle's 540-minute limit for tpu sessions" in " ".join(
        result.stderr.split())



def test_the_notebook_records_the_hardware_it_was_given(tmp_path, monkeypatch, capsys):
    """nvidia-smi's answer against what was pushed: a T4 asked for and a P100 given is said, and kept with the run."""
    from kit.notebook import HARDWARE, record_hardware

    tools = tmp_path / "bin"
    tools.mkdir()
    smi = tools / "nvidia-smi"  # answers as the real one does: --query-gpu=name --format=csv,noheader
    smi.write_text("#!/bin/sh\necho 'Tesla P100-PCIE-16GB'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    for variable in ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(variable, raising=False)
    assert record_hardware(str(tmp_path), "gpu", "NvidiaTeslaT4")["mismatch"] == \
        "NvidiaTeslaT4 was asked for and the session has 1 x Tesla P100-PCIE-16GB"
    assert "warning: NvidiaTeslaT4 was asked for" in capsys.readouterr().out
    assert record_hardware(str(tmp_path), "gpu", "NvidiaTeslaP100")["mismatch"] == ""
    assert record_hardware(str(tmp_path), "tpu")["mismatch"].startswith("a TPU was asked for")
    sessions = json.loads((tmp_path / HARDWARE).read_text())
    assert [s["asked"]["machine"] for s in sessions] == ["NvidiaTeslaT4", "NvidiaTeslaP100", None]
