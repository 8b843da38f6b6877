"""The notebooks: their cells, written from one source, and the helper their cells run commands with.

    from kit.notebook import kit
    kit('kit.stage', '--all', '--time-budget', '690')

`notebooks/make.py` writes colab.ipynb and kaggle.ipynb from the cells here, and `kit.remote`
writes the same Kaggle notebook with the repository, commit, input and accelerator filled in, so
the three never drift apart (the installed kit carries them; the notebooks/ folder is not installed).

`kit()` runs a command as a child process with its output streamed into the cell. Colab's and
Kaggle's stop button interrupts the kernel, not the child: without help the child would keep
training and its heartbeat would keep the work directory's lock fresh, so every later cell would be
refused until the runtime restarts. `kit` passes the interrupt on (SIGINT: the training loop saves
a checkpoint at the next batch and exits 3), waits for the child to finish, and never returns or
raises while it still runs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

from kit.cli import EXIT_STOPPED
from kit.config import COMPETITION, KAGGLE_SESSION_MINUTES, SAVE_MARGIN_MIN, TRAINING_MARGIN_MIN
from kit.devices import tpu_present
from kit.files import write_text

KAGGLE_INPUT = "/kaggle/input"

GRACE_S = 600  # how long an interrupted child may take to write its checkpoint before it is killed


def kit(*args: str, grace_s: float = GRACE_S, stop_ok: bool = False) -> bool:
    """python -m ARGS with its output shown as it comes; SystemExit (which stops Run all) unless it exited 0.

    True when it did everything; with `stop_ok`, a stop with a checkpoint (exit 3) returns False instead of
    stopping: a kernel that kit.remote pushes ends cleanly there and is continued in its next version.
    """
    process = subprocess.Popen([sys.executable, "-u", "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    # The output is shown by a thread, so this one only waits and is free to take the interrupt at any moment.
    shown = threading.Thread(target=_show, args=(process.stdout,), daemon=True)
    shown.start()
    try:
        code = process.wait()
    except KeyboardInterrupt:
        code = _interrupt(process, grace_s)
        shown.join(timeout=5)
        raise SystemExit(f"Interrupted: python -m {' '.join(args)} stopped (exit code {code})"
                         + (" with a checkpoint; run the cell again to continue." if code == EXIT_STOPPED else ".")
                         ) from None
    finally:
        if process.poll() is None:  # whatever happened above, no child is left running
            process.kill()
            process.wait()
    shown.join()
    if code == EXIT_STOPPED and stop_ok:
        print("Stopped with a checkpoint: the next version continues it (python -m kit.remote continue).")
        return False
    if code == EXIT_STOPPED:
        raise SystemExit("Stopped with a checkpoint before the time budget ran out. Run the notebook again (Run all) "
                         "in a new session: it continues at the next batch.")
    if code != 0:
        raise SystemExit(f"python -m {' '.join(args)} failed with exit code {code}; its message is above.")
    return True


def _show(stream) -> None:
    for line in stream:
        print(line, end="", flush=True)


def _interrupt(process: subprocess.Popen, grace_s: float) -> int:
    """SIGINT to the child and its exit code once it has saved; killed if it outlasts the grace period.

    A second interrupt while it saves kills it at once (the checkpoint before this one is intact).
    """
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=grace_s)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        process.kill()
        return process.wait()


HARDWARE = "hardware.json"  # in the work directory: what each session asked for and was given


def gpu_names() -> list[str]:
    """The GPUs of this machine by nvidia-smi, without starting a framework; [] where there are none."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def hardware_mismatch(accelerator: str, machine: str | None, gpus: list[str], tpu: bool) -> str:
    """'' when the session has what was asked; else what differs, in words."""
    got = "a TPU" if tpu else f"{len(gpus)} x {gpus[0]}" if gpus else "no accelerator"
    if accelerator == "tpu" and not tpu:
        return f"a TPU was asked for and the session has {got}"
    if accelerator == "gpu" and not gpus:
        return f"a GPU was asked for and the session has {got}"
    model = (machine or "").removeprefix("NvidiaTesla").removeprefix("Nvidia")  # NvidiaTeslaT4 -> T4
    if accelerator == "gpu" and model and not any(model.lower() in name.lower() for name in gpus):
        return f"{machine} was asked for and the session has {got}"
    return ""


def record_hardware(workdir: str, accelerator: str, machine: str | None = None) -> dict:
    """What this session runs on, appended to the run's hardware.json, and a warning when it is not what was asked.

    Kaggle has given P100s to sessions that asked for T4s, and run TPU pushes on the image without a TPU; the
    run's record and `kit.remote status` then say so instead of leaving it to a slow epoch to tell.
    """
    gpus, tpu = gpu_names(), tpu_present()
    session = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "asked": {"accelerator": accelerator, "machine": machine},
               "gpus": gpus, "tpu": tpu, "mismatch": hardware_mismatch(accelerator, machine, gpus, tpu)}
    path = os.path.join(workdir, HARDWARE)
    try:
        with open(path) as f:
            sessions = json.load(f)
    except (OSError, ValueError):
        sessions = []
    write_text(path, json.dumps([*sessions, session], indent=1) + "\n")
    print(f"warning: {session['mismatch']}; the kit trains on it as it is (the budget and batches stay the run's)."
          if session["mismatch"] else f"This session: {', '.join(gpus) or ('a TPU' if tpu else 'CPU only')}.")
    return session


def kaggle_budgets(accelerator: str) -> tuple[float, float]:
    """(training, after training) budgets in minutes of a Kaggle session on `accelerator` (config's table)."""
    limit = KAGGLE_SESSION_MINUTES[accelerator]
    return limit - TRAINING_MARGIN_MIN, limit - SAVE_MARGIN_MIN


def kaggle_input(name: str, root: str = KAGGLE_INPUT) -> str:
    """The folder Kaggle mounted an input under: /kaggle/input/NAME, or NAME a level or two deeper.

    Kaggle has mounted inputs both directly and under competitions/ or datasets/OWNER/; the notebook
    names the input once and finds it wherever this session put it.
    """
    for pattern in (name, f"*/{name}", f"*/*/{name}"):
        found = sorted(p for p in glob.glob(os.path.join(root, pattern)) if os.path.isdir(p))
        if found:
            return found[0]
    raise SystemExit(f"No input named {name!r} is attached under {root}: add it (Add Input), then Run all again.")


# ---- the cells ------------------------------------------------------------------------------------

PLACEHOLDER_REPO = "https://github.com/YOUR-TEAM/car-kit.git"

REPO = r"""import os, sys, time
# The kit's git repository (your fork or the team's): set it once here; every later session runs unedited.
KIT_REPO = os.environ.get('KIT_REPO', {repo!r})
KIT_COMMIT = {commit!r}  # the kit's commit a new run starts with ('': the repository's default branch)
if 'YOUR-TEAM' in KIT_REPO:
    raise SystemExit('Set KIT_REPO in this cell to the git URL of the kit (your fork or your team\'s), then Run all again.')
os.environ.setdefault('KIT_SESSION_START', str(time.time()))  # --time-budget counts from this session's start"""

INSTALL = r"""SRC = {src!r}
import subprocess
def sh(*command):
    subprocess.run(command, check=True)

# A run keeps the kit's version and the package versions of its first session: they live with its weights.
pins = os.path.join(os.environ['KIT_WORKDIR'], 'weights')
{previous_pins}os.makedirs(pins, exist_ok=True)
commit, constraints = os.path.join(pins, 'kit-commit.txt'), os.path.join(pins, 'constraints.txt')
if not os.path.isdir(SRC):
    sh('git', 'clone', '-q', KIT_REPO, SRC)
if os.path.exists(commit):
    sh('git', '-C', SRC, 'fetch', '-q', 'origin')
    sh('git', '-C', SRC, 'checkout', '-q', open(commit).read().strip())
else:
    if KIT_COMMIT:
        sh('git', '-C', SRC, 'checkout', '-q', KIT_COMMIT)
    open(commit, 'w').write(subprocess.run(['git', '-C', SRC, 'rev-parse', 'HEAD'], check=True,
                                           capture_output=True, text=True).stdout)
sh(sys.executable, '-m', 'pip', 'install', '-q', SRC, *(['-c', constraints] if os.path.exists(constraints) else []))
if not os.path.exists(constraints):
    freeze = subprocess.run([sys.executable, '-m', 'pip', 'freeze'], check=True, capture_output=True, text=True).stdout
    open(constraints, 'w').write(''.join(line + '\n' for line in freeze.splitlines() if '==' in line and '@' not in line))"""

PREVIOUS_PINS = """if PREVIOUS_RUN and not os.path.exists(os.path.join(pins, 'kit-commit.txt')):
    pins = os.path.join(PREVIOUS_RUN, 'weights')  # the versions the run started with
"""

HELPER = """# Streams a command's output; stops Run all unless it did all it was asked. The stop button is passed on to the
# command (it saves a checkpoint and exits), and no command is ever left running behind the notebook.
try:
    from kit.notebook import kaggle_input, kit
except ImportError:  # the run's pinned kit predates kit.notebook
    raise SystemExit('This run is pinned (weights/kit-commit.txt) to a kit older than this notebook: run the notebook '
                     'of that commit (its notebooks/ folder), or delete kit-commit.txt to move the run to this kit.')"""

COLAB = [
    ('markdown', """# sf-dl-car-classification on Colab

Run all (*Runtime > Run all*). After a disconnect, Run all again in the new session: nothing needs editing, every step continues where it stopped. The archive, the weights and the submissions live on Google Drive; the photos and the image cache are unpacked on the runtime's local disk in each session (much faster than reading 22,000 small files from Drive).

Before the first run: set `KIT_REPO` below, choose *Runtime > Change runtime type > GPU*, and add `KAGGLE_USERNAME` and `KAGGLE_KEY` (or `KAGGLE_API_TOKEN`) in the Secrets panel (the key icon), with notebook access on."""),
    ('code', REPO.format(repo=PLACEHOLDER_REPO, commit='')),
    ('markdown', """## 1. Folders: the run on Drive, the photos and the cache on local disk"""),
    ('code', """from google.colab import drive
drive.mount('/content/drive')

os.environ['KIT_WORKDIR'] = '/content/drive/MyDrive/car-kit'  # archive, weights, submissions: outlive the runtime
os.environ['KIT_DATA_DIR'] = '/content/data'                   # photos, unpacked from the archive each session
os.environ['KIT_CACHE_DIR'] = '/content/cache'                 # resized images, rebuilt each session
os.makedirs(os.environ['KIT_WORKDIR'], exist_ok=True)"""),
    ('markdown', """## 2. The kit, at the version this run started with"""),
    ('code', INSTALL.format(src='/content/car-kit', previous_pins='')),
    ('markdown', """## 3. Kaggle credentials from Colab's secrets (never printed, never saved in the notebook)"""),
    ('code', """from google.colab import userdata
for name in ('KAGGLE_USERNAME', 'KAGGLE_KEY', 'KAGGLE_API_TOKEN'):
    try:
        os.environ[name] = userdata.get(name)
    except Exception:
        pass  # only one way is needed: username and key, or a token"""),
    ('markdown', """## 4. A helper that stops *Run all* when a step fails or stops on the budget"""),
    ('code', HELPER),
    ('markdown', """## 5. Data

The first session downloads the archive to Drive (1.6 GiB); every session unpacks it onto the local disk."""),
    ('code', """kit('kit.download')"""),
    ('markdown', """## 6. Train: all seven stages, resumable

The budget (minutes, counted from this session's start) stops training with a checkpoint before the session limit: 690 fits Colab Pro's 12 hours; on the free tier, whose sessions end sooner and at unpredictable times, lower it, and the 10-minute checkpoints cover an early cut-off (a hard kill loses at most the batches since the last one). Until every stage is done this cell stops *Run all*, so nothing below runs on a partial model."""),
    ('code', """# The training curves, live: loss, accuracy, learning rate and speed, one curve across every stage and session.
LOGDIR = os.environ['KIT_WORKDIR'] + '/weights/tensorboard'
%load_ext tensorboard
%tensorboard --logdir $LOGDIR"""),
    ('code', """kit('kit.stage', '--all', '--time-budget', '690')"""),
    ('markdown', """## 7. Where it stands, curves and report"""),
    ('code', """kit('kit.stage', '--status')
kit('kit.report', '--tta', '10')
from IPython.display import Image, display
display(Image(os.environ['KIT_WORKDIR'] + '/submissions/report/curves.png'))
display(Image(os.environ['KIT_WORKDIR'] + '/submissions/report/confusion_matrix.png'))"""),
    ('markdown', """## 8. Predict and submit (only reached when every stage is done)"""),
    ('code', """kit('kit.predict', '--tta', '10')
kit('kit.submit', '--message', 'EfficientNetB6, seven stages, TTA 10')"""),
    ('markdown', """## 9. Demo with a shareable link"""),
    ('code', """kit('kit.demo', '--share')"""),
]


KAGGLE_INTRO = """# sf-dl-car-classification on Kaggle

Add the competition as input data (*Add Input > Competitions > sf-dl-car-classification*), switch the accelerator to a GPU and Internet on (for pip and the ImageNet weights), set `KIT_REPO` below, and Run all. The run is kept in `/kaggle/working/car-kit` (saved with the version's output); the photos and the image cache go to `/kaggle/temp`, outside the 20 GB output limit (the 448 px caches alone exceed it).

To continue after the 12-hour limit: *Save Version*, then in the new session attach that version's output (*Add Input > Your Work*) and Run all: the run is found under `/kaggle/input`, copied out of the read-only input and continues from its checkpoints. Or drive all of it from your own terminal with `python -m kit.remote` (push, status, pull, continue)."""

REMOTE_INTRO = """# car-kit on Kaggle, driven by `python -m kit.remote`

Written by `python -m kit.remote push` (or `continue`): the kit's Kaggle notebook with its repository, commit, input and accelerator filled in. Each version trains until the time budget, stops with a checkpoint and ends cleanly; `python -m kit.remote continue` pushes the next version with this one's output attached, and the run resumes at the next batch. Edit the kit, not this notebook: the next push rewrites it."""

FOLDERS = """os.environ['KIT_WORKDIR'] = '/kaggle/working/car-kit'        # the run: saved with the version's output
os.environ['KIT_DATA_DIR'] = '/kaggle/temp/car-kit/data'     # scratch: outside the 20 GB output limit
os.environ['KIT_CACHE_DIR'] = '/kaggle/temp/car-kit/cache'
# JAX's compiled programs stay out of the output too: hundreds of files (Kaggle lists at most 500 of a version's),
# and native code no later session should load from an output it did not write. A session compiles afresh.
os.environ['JAX_COMPILATION_CACHE_DIR'] = '/kaggle/temp/car-kit/compiled'
{backend}os.makedirs(os.environ['KIT_WORKDIR'], exist_ok=True)
# An earlier version's output attached as input (Add Input > Your Work) is the run to continue: found by itself.
import glob
runs = glob.glob('/kaggle/input/**/car-kit/**/weights/state.json', recursive=True)
newest = max(runs, key=os.path.getmtime) if runs else ''
PREVIOUS_RUN = newest[:newest.rindex('/car-kit/') + len('/car-kit')] if newest else ''
print(f'Continuing the run in {{PREVIOUS_RUN}}.' if PREVIOUS_RUN else 'A new run.')"""

HARDWARE_CELL = """try:  # what this session was given, kept with the run (kit.remote status shows it)
    from kit.notebook import record_hardware
    record_hardware(os.environ['KIT_WORKDIR'], {accelerator!r}, {machine!r})
except ImportError:
    pass  # a run pinned to a kit that kept no such record"""

TPU_INSTALL = """sh(sys.executable, '-m', 'pip', 'install', '-q', '-U', 'jax[tpu]')  # the TPU's cores, as JAX devices"""


def kaggle_cells(repo: str = PLACEHOLDER_REPO, commit: str = "", data: str = COMPETITION, accelerator: str = "gpu",
                 time_budget: str | None = None, stage_args: tuple[str, ...] = (), profile: str = "colab",
                 remote: bool = False, machine: str | None = None) -> list[tuple[str, str]]:
    """The Kaggle notebook's cells: the one users upload (the defaults) and the one kit.remote pushes (`remote`).

    Training stops by `time_budget` (default: the accelerator's session limit less a margin, config's
    table), and the report and prediction are not started unless they end before the limit does. A
    pushed version must end cleanly, so its cells take a stop (exit 3) and skip what follows; the
    uploaded notebook stops Run all instead.
    """
    tpu = accelerator == "tpu"
    chosen = ("--profile", profile) if profile != "colab" else ()
    training_budget, after = kaggle_budgets(accelerator)
    budget = ("--time-budget", f"{after:g}")

    def call(*args: str, **options: object) -> str:
        return "kit(" + ", ".join([*(repr(a) for a in (*args, *chosen)), *(f"{k}={v!r}" for k, v in options.items())]) + ")"

    train = ("kit.stage", "--all", "--time-budget", time_budget or f"{training_budget:g}", *stage_args)
    status = call("kit.stage", "--status")
    if remote:
        later = [call("kit.report", "--tta", "10", *budget, stop_ok=True),
                 call("kit.predict", "--tta", "10", *budget, stop_ok=True)]
        training = [('code', f"if {call(*train, stop_ok=True)}:\n    " + "\n    ".join([status, *later]))]
    else:
        training = [
            ('markdown', """Train until every stage is done; a stop on the budget ends *Run all* here (save the version, continue in the next session)."""),
            ('code', call(*train)),
            ('code', "\n".join([status, call("kit.report", "--tta", "10", *budget)])),
            ('code', call("kit.predict", "--tta", "10", *budget) + "\n" + call("kit.submit", "--check")),
        ]
    backend = "os.environ['KERAS_BACKEND'] = 'jax'  # a TPU trains under JAX\n" if tpu else ""
    return [
        ('markdown', REMOTE_INTRO if remote else KAGGLE_INTRO),
        ('code', REPO.format(repo=repo, commit=commit)),
        ('code', FOLDERS.format(backend=backend)),
        ('code', INSTALL.format(src='/kaggle/temp/car-kit-src', previous_pins=PREVIOUS_PINS)
         + ("\n" + TPU_INSTALL if tpu else "")),
        ('code', HELPER),
        ('code', HARDWARE_CELL.format(accelerator=accelerator, machine=machine)),
        ('markdown', """The data is already attached: copy the CSVs and unpack the photos (no download, no credentials)."""),
        ('code', f"""kit('kit.download', '--from-dir', kaggle_input({data!r}))"""),
        ('code', f"""if PREVIOUS_RUN:
    {call("kit.stage", "--copy-run-from", "PREVIOUS_RUN").replace("'PREVIOUS_RUN'", "PREVIOUS_RUN")}"""),
        *training,
    ]


def notebook(name: str, cells: list[tuple[str, str]], accelerator: str = "GPU") -> str:
    """The .ipynb text: nbformat 4.5, stable cell ids (from the notebook's name and the cell's place)."""
    written = []
    for k, (kind, source) in enumerate(cells):
        lines = source.splitlines(keepends=True)
        cell = {"cell_type": kind, "id": hashlib.sha1(f"{name} {k}".encode()).hexdigest()[:8], "metadata": {},
                "source": lines}
        if kind == "code":
            cell = {"cell_type": kind, "execution_count": None, **{k: v for k, v in cell.items() if k != "cell_type"},
                    "outputs": []}
        written.append(cell)
    metadata = {"accelerator": accelerator, "kernelspec": {"display_name": "Python 3", "name": "python3"},
                "language_info": {"name": "python"}}
    return json.dumps({"cells": written, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}, indent=1,
                      ensure_ascii=False) + "\n"
