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
import errno
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from kit.config import DEFAULT_PROFILE, PROFILES
from kit.files import LockHeld, WorkdirLock

# The budget counts from here: every command imports this module before TensorFlow, the data or the model.
PROCESS_START = time.time()

# Keep TensorFlow's C++ start-up chatter and albumentations' network check out of the kit's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

EXIT_DONE, EXIT_FAILED, EXIT_USER_ERROR, EXIT_STOPPED = 0, 1, 2, 3


class KitError(Exception):
    """A user error: printed as one paragraph that says what to do, never as a traceback."""


def session_start() -> float:
    """$KIT_SESSION_START (seconds since the epoch), which a notebook sets once per runtime, else the process start."""
    text = os.environ.get("KIT_SESSION_START", "")
    try:
        return float(text) if text else PROCESS_START
    except ValueError:
        raise KitError(f"KIT_SESSION_START={text!r} should be seconds since the epoch, as time.time() gives "
                       "(the notebooks set it in their first cell).") from None


def add_workdir(parser: argparse.ArgumentParser) -> None:
    """--workdir and --profile: together they name one folder, the same for every command."""
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder holding data/, weights/ and submissions/ (default: $KIT_WORKDIR or the current folder; "
        "on Colab, a folder on Google Drive)",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE,
                        help="colab: EfficientNetB6, the seven-stage recipe, BatchNorm frozen (default); modern: the "
                             "recipe with the options measured to help (today colab's own); "
                             "cpu: EfficientNet-Lite0 (ImageNet weights from pip), the stages sized for a CPU; "
                             "smoke: tiny, synthetic, "
                             "minutes on a CPU, kept in <workdir>/smoke")


def add_cache_dir(parser) -> None:
    """--cache-dir, for every command that reads photos through the image cache (one rule: Workdir.cache)."""
    parser.add_argument("--cache-dir", type=Path,
                        help="image cache folder (default: $KIT_CACHE_DIR or <workdir>/cache); give every command "
                             "the same one")


class Terminated(Exception):
    """SIGTERM outside a training loop (which turns it into a checkpoint and a clean stop of its own)."""


_TERMINATION = threading.Event()


def _terminate(signum, frame):
    # Kept as well as raised: raised inside a gc callback (JAX registers one, and TensorFlow imports JAX where
    # it is installed) or a __del__, the exception is printed and dropped, and the command would run on.
    _TERMINATION.set()
    raise Terminated


def stop_if_terminated() -> None:
    """Raise Terminated if a SIGTERM came whose exception never reached the command; long loops call it."""
    if _TERMINATION.is_set():
        raise Terminated


def disk_message(error: OSError) -> str | None:
    """A full or read-only disk, a file where a folder should be, and the reverse, in one paragraph; else None."""
    where = Path(error.filename) if error.filename else None
    if error.errno == errno.ENOSPC:
        folder = where.parent if where else Path.cwd()
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        return (f"The disk holding {folder} is full ({free / 1e6:.0f} MB free). The kit writes every file whole, so "
                "the checkpoints and outputs already there are intact. Free space on that disk (or put the image "
                "cache on another one with --cache-dir or $KIT_CACHE_DIR), then run the same command again.")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{where or 'The work directory'} cannot be written to ({error.strerror}): the work directory (and "
                "the cache) must be writable. On Kaggle, /kaggle/input is read-only: copy the run out with 'python "
                "-m kit.stage --copy-run-from /kaggle/input/NOTEBOOK/car-kit --workdir /kaggle/working/car-kit' and "
                "continue there.")
    if error.errno == errno.ENOTDIR:
        return (f"{where} cannot be made: part of that path is a file, not a folder. Check --workdir (and "
                "--cache-dir): they name folders.")
    if error.errno == errno.EISDIR:
        return f"{where} is a folder, where the kit writes a file: name a file there (e.g. --out results.csv)."
    return None


def paragraph(text: str) -> str:
    """A message wrapped at 100 columns, never inside a path or a flag (car-kit, --cache-dir), so it pastes whole."""
    return textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False)


def main_guard(main: Callable[[Sequence[str] | None], int],
               sigterm: bool = True) -> Callable[[Sequence[str] | None], int]:
    """KitError and disk errors -> one paragraph on stderr and exit code 2; SIGTERM -> 3; a second Ctrl-C -> 1.

    `sigterm=False` for a server, which SIGTERM is the normal way to stop.
    """

    def guarded(argv: Sequence[str] | None = None) -> int:
        in_main_thread = sigterm and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
        _TERMINATION.clear()
        unraisable = sys.unraisablehook

        def quiet_terminated(dropped) -> None:  # a Terminated that Python drops: the flag stops the command, silently
            if not isinstance(dropped.exc_value, Terminated):
                unraisable(dropped)

        sys.unraisablehook = quiet_terminated
        try:
            return main(argv)
        except KitError as error:
            print(paragraph(f"error: {error}"), file=sys.stderr)
            return EXIT_USER_ERROR
        except OSError as error:
            message = disk_message(error)
            if message is None:
                raise
            print(paragraph(f"error: {message}"), file=sys.stderr)
            return EXIT_USER_ERROR
        except Terminated:
            print("stopped by SIGTERM before the command finished. The kit writes every file whole, so nothing it "
                  "wrote is damaged: run the same command again.", file=sys.stderr)
            return EXIT_STOPPED
        except KeyboardInterrupt:
            print("interrupted without a checkpoint", file=sys.stderr)
            return EXIT_FAILED
        finally:
            sys.unraisablehook = unraisable
            _TERMINATION.clear()  # the command is over: what it was asked to stop was stopped
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    guarded.__doc__ = main.__doc__
    guarded.__wrapped__ = main
    return guarded


@contextlib.contextmanager
def workdir_lock(workdir, what: str) -> Iterator[None]:
    """Hold the work directory's lock while `what` writes to it; a second process refuses."""
    try:
        lock = WorkdirLock(workdir.lock, what)
        lock.acquire()
    except LockHeld as error:
        raise KitError(str(error)) from None
    try:
        yield
    finally:
        lock.release()
