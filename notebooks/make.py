"""The two notebooks, written from one source: the cells they share are defined once here.

    python notebooks/make.py            # rewrite colab.ipynb and kaggle.ipynb
    python notebooks/make.py --check    # exit 1 if either differs from what this file makes (a test runs it)

The cells live in the kit (kit/notebook.py), which `python -m kit.remote` also pushes as a Kaggle
kernel: edit them there, not in the .ipynb files. The shared cells: the repository and session
start, the pinned install (the kit's commit and the package versions the run started with), and
the helper `kit()`, which is imported from the installed kit (kit.notebook) rather than copied.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the kit of this checkout, installed or not

from kit.notebook import COLAB, kaggle_cells, notebook  # noqa: E402


def main(argv: list[str]) -> int:
    stale = []
    for name, cells in (("colab.ipynb", COLAB), ("kaggle.ipynb", kaggle_cells())):
        text, path = notebook(name, cells), HERE / name
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"{', '.join(stale)} differ from what kit/notebook.py makes: edit the cells there and run notebooks/make.py.")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
