"""The two notebooks, written from one source: the cells they share are defined once here.

    python notebooks/make.py            # rewrite colab.ipynb and kaggle.ipynb
    python notebooks/make.py --check    # exit 1 if either differs from what this file makes (a test runs it)

Edit the cells here, not in the .ipynb files. The shared cells: the repository and session start,
the pinned install (the kit's commit and the package versions the run started with), and the
helper `kit()`, which is imported from the installed kit (kit.notebook) rather than copied.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

REPO = r"""import os, sys, time
# The kit's git repository (your fork or the team's): set it once here; every later session runs unedited.
KIT_REPO = os.environ.get('KIT_REPO', 'https://github.com/YOUR-TEAM/car-kit.git')
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
    from kit.notebook import kit
except ImportError:  # the run's pinned kit predates kit.notebook
    raise SystemExit('This run is pinned (weights/kit-commit.txt) to a kit older than this notebook: run the notebook '
                     'of that commit (its notebooks/ folder), or delete kit-commit.txt to move the run to this kit.')"""

COLAB = [
    ('markdown', """# sf-dl-car-classification on Colab

Run all (*Runtime > Run all*). After a disconnect, Run all again in the new session: nothing needs editing, every step continues where it stopped. The archive, the weights and the submissions live on Google Drive; the photos and the image cache are unpacked on the runtime's local disk in each session (much faster than reading 22,000 small files from Drive).

Before the first run: set `KIT_REPO` below, choose *Runtime > Change runtime type > GPU*, and add `KAGGLE_USERNAME` and `KAGGLE_KEY` (or `KAGGLE_API_TOKEN`) in the Secrets panel (the key icon), with notebook access on."""),
    ('code', REPO),
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

KAGGLE = [
    ('markdown', """# sf-dl-car-classification on Kaggle

Add the competition as input data (*Add Input > Competitions > sf-dl-car-classification*), switch the accelerator to a GPU and Internet on (for pip and the ImageNet weights), set `KIT_REPO` below, and Run all. The run is kept in `/kaggle/working/car-kit` (saved with the version's output); the photos and the image cache go to `/kaggle/temp`, outside the 20 GB output limit (the 448 px caches alone exceed it).

To continue after the 12-hour limit: *Save Version*, then in the new session attach that version's output (*Add Input > Your Work*) and set `PREVIOUS_RUN` to its `car-kit` folder. The run is copied out of the read-only input and continues from its checkpoints."""),
    ('code', REPO),
    ('code', """os.environ['KIT_WORKDIR'] = '/kaggle/working/car-kit'        # the run: saved with the version's output
os.environ['KIT_DATA_DIR'] = '/kaggle/temp/car-kit/data'     # scratch: outside the 20 GB output limit
os.environ['KIT_CACHE_DIR'] = '/kaggle/temp/car-kit/cache'
PREVIOUS_RUN = ''  # e.g. '/kaggle/input/YOUR-NOTEBOOK/car-kit': the last version's output, to continue it
os.makedirs(os.environ['KIT_WORKDIR'], exist_ok=True)"""),
    ('code', INSTALL.format(src='/kaggle/temp/car-kit-src', previous_pins=PREVIOUS_PINS)),
    ('code', HELPER),
    ('markdown', """The data is already attached: copy the CSVs and unpack the photos (no download, no credentials)."""),
    ('code', """kit('kit.download', '--from-dir', '/kaggle/input/sf-dl-car-classification')"""),
    ('code', """if PREVIOUS_RUN:
    kit('kit.stage', '--copy-run-from', PREVIOUS_RUN)"""),
    ('markdown', """Train until every stage is done; a stop on the budget ends *Run all* here (save the version, continue in the next session)."""),
    ('code', """kit('kit.stage', '--all', '--time-budget', '690')"""),
    ('code', """kit('kit.stage', '--status')
kit('kit.report', '--tta', '10')"""),
    ('code', """kit('kit.predict', '--tta', '10')
kit('kit.submit', '--check')"""),
]

METADATA = {"accelerator": "GPU", "kernelspec": {"display_name": "Python 3", "name": "python3"},
            "language_info": {"name": "python"}}


def notebook(name: str, cells: list[tuple[str, str]]) -> str:
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
    return json.dumps({"cells": written, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}, indent=1,
                      ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, cells in (("colab.ipynb", COLAB), ("kaggle.ipynb", KAGGLE)):
        text, path = notebook(name, cells), HERE / name
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"{', '.join(stale)} differ from notebooks/make.py: edit the cells there and run it.")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
