"""What every `python -m kit.X` command shares: flags, user-facing errors, exit codes, the lock.

Exit codes a notebook can act on:
  0  all the work asked for is done
  3  stopped cleanly with a checkpoint (time budget, Ctrl-C, SIGTERM): run the same command again
  2  a user error, explained in one paragraph
  1  anything else (a bug, a crash: the traceback is printed)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
import time
from typing import Callable, Iterator, Sequence

# The budget counts from here: every command imports this module before TensorFlow, the data or the model.
PROCESS_START = time.time()

# Keep TensorFlow's C++ start-up chatter and albumentations' network check out of the kit's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

EXIT_DONE, EXIT_FAILED, EXIT_USER_ERROR, EXIT_STOPPED = 0, 1, 2, 3


class KitError(Exception):
    """A user error: printed as one paragraph that says what to do, never as a traceback."""


def session_start(default: float) -> float:
    """$KIT_SESSION_START (seconds since the epoch), which a notebook sets once per runtime, else `default`."""
    text = os.environ.get("KIT_SESSION_START", "")
    try:
        return float(text) if text else default
    except ValueError:
        raise KitError(f"KIT_SESSION_START={text!r} should be seconds since the epoch, as time.time() gives "
                       "(the notebooks set it in their first cell).") from None


def add_workdir(parser: argparse.ArgumentParser) -> None:
    """--workdir and --profile: together they name one folder, the same for every command."""
    from kit.config import PROFILES

    parser.add_argument(
        "--workdir",
        default=None,
        help="folder holding data/, weights/ and submissions/ (default: $KIT_WORKDIR or the current folder; "
        "on Colab, a folder on Google Drive)",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="colab",
                        help="colab: EfficientNetB6, the seven-stage recipe (default); smoke: tiny, synthetic, "
                             "minutes on a CPU, kept in <workdir>/smoke")


def main_guard(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """KitError -> its message on stderr and exit code 2; a second Ctrl-C (no checkpoint) -> 1."""

    def guarded(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except KitError as error:
            print(textwrap.fill(f"error: {error}", width=100), file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted without a checkpoint", file=sys.stderr)
            return EXIT_FAILED

    guarded.__doc__ = main.__doc__
    guarded.__wrapped__ = main
    return guarded


@contextlib.contextmanager
def workdir_lock(workdir, what: str) -> Iterator[None]:
    """Hold the work directory's lock while `what` writes to it; a second process refuses."""
    from kit.files import LockHeld, WorkdirLock

    try:
        lock = WorkdirLock(workdir.lock, what)
        lock.acquire()
    except LockHeld as error:
        raise KitError(str(error)) from None
    try:
        yield
    finally:
        lock.release()
