"""The whole smoke run (`python -m kit --smoke`: synthetic data, seven stages, TTA prediction) on each Keras backend.

    python bench/smoke_backends.py                        # TensorFlow, then JAX
    python bench/smoke_backends.py --backends jax tensorflow --repeats 2

Each run is a fresh process in a fresh work directory, as a new user starts it, so every figure
includes importing the backend, building the cache, compiling and training. Runs alternate
between backends; the table gives each backend's median wall time and its ratio to the first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smoke_seconds(backend: str) -> float:
    """One `python -m kit --smoke` under `backend`, in a new work directory; its wall time."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "NO_ALBUMENTATIONS_UPDATE": "1"}
    with tempfile.TemporaryDirectory() as workdir:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "kit", "--smoke", "--workdir", workdir], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0 or not (Path(workdir) / "smoke" / "submissions" / "submission.csv").is_file():
            raise SystemExit(f"the smoke run failed on {backend} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    times: dict[str, list[float]] = {backend: [] for backend in args.backends}
    for repeat in range(args.repeats):
        for backend in args.backends:
            times[backend].append(smoke_seconds(backend))
            print(f"run {repeat + 1}, {backend}: {times[backend][-1]:.1f} s", flush=True)
    base = statistics.median(times[args.backends[0]])
    print(f"\n`python -m kit --smoke`, {os.cpu_count()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}, "
          f"{args.repeats} run(s) each; baseline: {args.backends[0]}")
    print("| backend | median s | runs s | vs baseline |")
    print("|---|---|---|---|")
    for backend, seconds in times.items():
        print(f"| {backend} | {statistics.median(seconds):.1f} | {', '.join(f'{s:.1f}' for s in seconds)} "
              f"| {statistics.median(seconds) / base:.2f}x |")


if __name__ == "__main__":
    main()
