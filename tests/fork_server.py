"""Kit commands as real processes that start in a second instead of ten: forks of a process that imported once.

`import tensorflow` takes about 9 s of CPU on the 2-core CI machine (TensorFlow also imports JAX, which
its TFLite converter looks for, and Keras imports scikit-learn), and the suite runs about 80 kit
commands: four tenths of its CPU went into starting them. A server per pytest worker and Keras
backend imports the frameworks and the kit once, then forks one child per command. The child is a
real process (its own pid; SIGKILL, SIGINT and SIGTERM reach it; its exit code is its own) that
runs the command's module as `python -m` does (runpy, as `__main__`), with the command's own
environment, working folder, argv and output pipes. Nothing is initialised before the fork (no
TensorFlow op, no JAX backend), so what must be set before a backend starts (XLA_FLAGS, logical
devices, determinism) is still set by the command itself, as in a fresh process.

What is fixed at import (KERAS_BACKEND) picks the server; the tests' own scripts (`python tests/X.py`)
are forked too, run as `python SCRIPT` runs them; any other command runs as a plain subprocess.
test_session's pip-install run keeps the plain `python -m` entry point.

    server:  python tests/fork_server.py SOCKET   (its environment names the backend)
    client:  Forked(socket, module, args, env, cwd, stdout, stderr)  ~ subprocess.Popen
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOADED = ("tensorflow", "keras", "kit.training", "kit.stage", "kit.predict", "kit.report", "kit.export",
             "kit.download", "kit.ensemble", "kit.pseudo", "kit.submit", "kit.__main__")


# ---- the server -----------------------------------------------------------------------------------

def serve(path: str) -> None:
    sys.path.insert(0, str(ROOT))
    for module in PRELOADED:
        if module != "tensorflow" or os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
            __import__(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    connections: dict[int, socket.socket] = {}
    lock = threading.Lock()

    def reap() -> None:  # one thread reports every child's exit to the client that started it
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.05)
                continue
            with lock:
                connection = connections.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                connection.close()

    threading.Thread(target=reap, daemon=True).start()
    print("ready", flush=True)
    while True:
        connection, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        request = json.loads(message)
        with lock:  # registered before the child can exit, so the reaper always finds its connection
            pid = os.fork()
            if pid == 0:
                listener.close()
                connection.close()
                run_child(request, fds)
            connections[pid] = connection
        for fd in fds:
            os.close(fd)
        connection.sendall(f"{pid}\n".encode())


def run_child(request: dict, fds: list[int]) -> None:
    """In the fork: the command's pipes, folder, environment and argv, then its module as __main__."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group, as a process started by a test is
        stdin, stdout, stderr = fds
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        for fd in set(fds):
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["script"] or request["module"], *request["args"]]
        import kit.cli

        kit.cli.PROCESS_START = time.time()  # a fresh process's start: its time budget counts from here
        try:
            if request["script"]:
                sys.path.insert(0, str(Path(request["script"]).parent))  # as `python SCRIPT` puts its folder first
                runpy.run_path(request["script"], run_name="__main__")
            else:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
        except KeyboardInterrupt:
            code = 128 + signal.SIGINT
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


# ---- the client ------------------------------------------------------------------------------------

class Forked:
    """A command forked by the server (a kit module or a test script), used as a subprocess.Popen is (pid, poll,
    wait, kill, text pipes)."""

    def __init__(self, server: str, module: str | None, args: list[str], env: dict, cwd: Path | str,
                 stdout=None, stderr=None, script: str | None = None):
        self.args, self.returncode = [sys.executable, *([script] if script else ["-m", module]), *args], None
        self.stdout = self.stderr = None
        null = os.open(os.devnull, os.O_RDONLY)
        out_read = err_read = None
        if stdout == subprocess.PIPE:
            out_read, out_write = os.pipe()
        else:
            out_write = os.open(os.devnull, os.O_WRONLY)
        if stderr == subprocess.STDOUT:
            err_write = out_write
        elif stderr == subprocess.PIPE:
            err_read, err_write = os.pipe()
        else:
            err_write = os.open(os.devnull, os.O_WRONLY)
        ends = [null, out_write, err_write]
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connection.connect(server)
        request = {"module": module, "script": script, "args": list(args), "env": dict(env), "cwd": str(cwd)}
        socket.send_fds(self._connection, [json.dumps(request).encode()], ends)
        for fd in set(ends):
            os.close(fd)
        self._replies = self._connection.makefile("r")
        self.pid = int(self._replies.readline())
        if out_read is not None:
            self.stdout = open(out_read, closefd=True)
        if err_read is not None:
            self.stderr = open(err_read, closefd=True)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._connection.settimeout(timeout)
            try:
                line = self._replies.readline()
            except socket.timeout:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            finally:
                self._connection.settimeout(None)
            self.returncode = int(line) if line else -signal.SIGKILL
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Both pipes read to their end (on threads, so neither fills and blocks the command), then the exit."""
        results: dict[str, str] = {}
        readers = [threading.Thread(target=lambda name=name, pipe=pipe: results.__setitem__(name, pipe.read()))
                   for name, pipe in (("out", self.stdout), ("err", self.stderr)) if pipe is not None]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.1, deadline - time.monotonic()))
        return results.get("out"), results.get("err")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        self.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
