"""Files the kit writes: atomic, readable like any other file, and one writer per work directory.

Atomic: a kill at any moment leaves either the old file or the new one, never half of one.
Readable: the mode follows the umask, as `open()` would give, not mkstemp's private 0600, so a
Docker image's non-root user can read weights written by root (as they are on Colab).
Locked: two processes training in one work directory (two browser tabs, Drive mounted twice)
would overwrite each other's checkpoints; the lock file makes the second one refuse.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator


def _file_mode() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread starts.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success flush it to disk and rename it over `path`."""
    path = Path(path)
    if path.is_dir():  # else the rename fails naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        raise named(error, path) from error
    finally:
        tmp.unlink(missing_ok=True)


def named(error: OSError, path: str | os.PathLike) -> OSError:
    """The error with the file it was writing: a failed write() names none, and a full disk's message names its disk."""
    return error if error.filename is not None else OSError(error.errno, error.strerror, str(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, hex: how a run recognises the very file it started with."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk, or a power cut can undo it.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- the work-directory lock ---------------------------------------------------------------------

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: the holder's session is gone (Colab gives no goodbye)


class LockHeld(Exception):
    """Another live process holds the lock; the message names it."""


class WorkdirLock:
    """An exclusive lock on a folder, as a file holding the holder's host, PID, start and heartbeat.

    A file rather than flock: Google Drive's FUSE mount and two Colab runtimes on one Drive share
    no kernel to lock in. Creation is O_EXCL; a lock whose heartbeat is older than STALE_AFTER_S,
    or whose process is gone from this very host, is taken over with a note.
    """

    def __init__(self, path: Path, what: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.path, self.what = Path(path), what
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex(),
                       "started": time.time(), "command": what}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            holder = self._read()
            why = self._why_stale(holder)
            if why is None:
                raise LockHeld(_describe(holder, self.path))
            # Move the stale lock aside first: of two processes taking over at once, one rename wins.
            aside = self.path.with_name(f"{self.path.name}.stale-{self.record['token']}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, aside)
                print(f"note: took over the lock {self.path} from {_holder(holder)}: {why}")
                aside.unlink(missing_ok=True)
        else:
            raise LockHeld(_describe(self._read(), self.path))
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def wait(self, deadline: float = float("inf"), poll_s: float = 0.2) -> bool:
        """Acquire, waiting while another live process holds the lock; False if `deadline` (time.time()) came first.

        A holder that died on this host is taken over at once, one on another host after its heartbeat stops.
        """
        said = False
        while True:
            try:
                self.acquire()
                return True
            except LockHeld:
                if time.time() + poll_s > deadline:
                    return False
                if not said:
                    print(f"waiting for {_holder(self._read())}, which holds {self.path} ({self.what})", flush=True)
                    said = True
                time.sleep(poll_s)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._read().get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**self.record, "heartbeat": time.time()}, f)
        except OSError as error:  # a full disk: no empty lock left behind for the next run to take over
            self.path.unlink(missing_ok=True)
            raise named(error, self.path) from error
        return True

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # half-written by a holder killed mid-write: as good as stale

    def _why_stale(self, holder: dict) -> str | None:
        if not holder:
            return "its file was empty or damaged"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its last heartbeat was {age / 60:.0f} minutes ago"
        if holder.get("host") == self.record["host"] and not _alive(int(holder.get("pid", 0))):
            return "its process no longer exists"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._read().get("token") != self.record["token"]:
                return  # taken over (this process looked dead): never write over the new holder
            with contextlib.suppress(OSError):
                write_text(self.path, json.dumps({**self.record, "heartbeat": time.time()}))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (started {started})"


def _describe(holder: dict, path: Path) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"Another {holder.get('command', 'kit command')} is working in this folder: {_holder(holder)}, last "
            f"heartbeat {age:.0f} s ago. Two processes would overwrite each other's checkpoints. Wait for it to "
            f"finish or stop it (another Colab tab or runtime?); a lock whose heartbeat is older than "
            f"{STALE_AFTER_S / 60:.0f} minutes is taken over automatically. If you are sure no other process is "
            f"running, delete {path}.")
