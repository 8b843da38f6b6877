"""The notebooks' helper: run a kit command from a cell, and stop *Run all* unless it did everything it was asked.

    from kit.notebook import kit
    kit('kit.stage', '--all', '--time-budget', '690')

The command runs as a child process with its output streamed into the cell. Colab's and Kaggle's
stop button interrupts the kernel, not the child: without help the child would keep training and
its heartbeat would keep the work directory's lock fresh, so every later cell would be refused
until the runtime restarts. `kit` passes the interrupt on (SIGINT: the training loop saves a
checkpoint at the next batch and exits 3), waits for the child to finish, and never returns or
raises while it still runs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from kit.cli import EXIT_STOPPED

GRACE_S = 600  # how long an interrupted child may take to write its checkpoint before it is killed


def kit(*args: str, grace_s: float = GRACE_S) -> None:
    """python -m ARGS with its output shown as it comes; SystemExit (which stops Run all) unless it exited 0."""
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
    if code == EXIT_STOPPED:
        raise SystemExit("Stopped with a checkpoint before the time budget ran out. Run the notebook again (Run all) "
                         "in a new session: it continues at the next batch.")
    if code != 0:
        raise SystemExit(f"python -m {' '.join(args)} failed with exit code {code}; its message is above.")


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
