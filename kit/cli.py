"""What every `python -m kit.X` command shares: the work directory flag and user-facing errors."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Callable, Sequence

# Keep TensorFlow's C++ start-up chatter and albumentations' network check out of the kit's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class KitError(Exception):
    """A user error: printed as one paragraph that says what to do, never as a traceback."""


def add_workdir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder holding data/, weights/ and submissions/ (default: $KIT_WORKDIR or the current folder; "
        "on Colab, a folder on Google Drive)",
    )


def main_guard(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Turn KitError into a wrapped message on stderr and exit code 2; Ctrl-C into exit code 130."""

    def guarded(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except KitError as error:
            print(textwrap.fill(f"error: {error}", width=100), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    guarded.__doc__ = main.__doc__
    guarded.__wrapped__ = main
    return guarded
