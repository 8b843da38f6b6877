"""Checkpoints: model weights, optimizer state and the training loop's state in one atomic file.

A checkpoint is one .npz: every model variable (trainable, BatchNorm statistics, the dropout
seed generator's state), every optimizer variable (Adam moments, step count, loss scale) and a
JSON document with the loop's position and counters. One file means the weights and the state
that describes them can never disagree. Variables are stored in the model's own order with
their shapes checked on load, so weights move between models built at different image sizes.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path

import keras
import numpy as np

from kit.files import atomic_path

KEEP = 2  # the newest checkpoint and the one before it, in case the newest is damaged


class CorruptCheckpoint(Exception):
    pass


def _variables_to_arrays(prefix: str, variables) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k:05d}": np.asarray(keras.ops.convert_to_numpy(v)) for k, v in enumerate(variables)}


def save(path: Path, model: keras.Model, state: dict, optimizer: keras.optimizers.Optimizer | None = None) -> None:
    """Write model (+ optimizer) variables and `state` to `path` atomically."""
    arrays = _variables_to_arrays("model", model.variables)
    if optimizer is not None:
        arrays.update(_variables_to_arrays("optimizer", optimizer.variables))
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        _write_slowly_if_asked(tmp, buffer.getvalue())


def _write_slowly_if_asked(path: Path, data: bytes) -> None:
    """Write `data`; KIT_FAULT_SLOW_WRITE=seconds stretches the write so tests can kill a process mid-write."""
    delay = float(os.environ.get("KIT_FAULT_SLOW_WRITE", "0") or 0)
    with open(path, "wb") as f:
        if not delay:
            f.write(data)
            return
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        time.sleep(delay)
        f.write(data[half:])


def read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the state of a checkpoint; CorruptCheckpoint when it is truncated or damaged."""
    try:
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}  # reads (and CRC-checks) every member
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as error:
        raise CorruptCheckpoint(f"{path}: {error}") from None
    if "state" not in arrays:
        raise CorruptCheckpoint(f"{path}: no state")
    return arrays, json.loads(arrays.pop("state").tobytes())


def assign(variables, arrays: dict[str, np.ndarray], prefix: str, source: Path) -> None:
    stored = sorted(k for k in arrays if k.startswith(prefix + "/"))
    if len(stored) != len(variables):
        raise CorruptCheckpoint(f"{source} holds {len(stored)} {prefix} variables, the model has {len(variables)}: "
                                "it was made for another backbone or head")
    for variable, key in zip(variables, stored):
        if tuple(variable.shape) != arrays[key].shape:
            raise CorruptCheckpoint(f"{source}: {variable.path} has shape {tuple(variable.shape)}, the file "
                                    f"{arrays[key].shape}: it was made for another backbone or head")
        variable.assign(arrays[key])


def load_weights(path: Path, model: keras.Model) -> dict:
    """Load a checkpoint's (or best weights file's) model variables; return its state."""
    arrays, state = read(path)
    assign(model.variables, arrays, "model", path)
    return state


def restore(path: Path, arrays: dict[str, np.ndarray], model: keras.Model,
            optimizer: keras.optimizers.Optimizer) -> None:
    """Load a read checkpoint's model and optimizer variables; the optimizer must be built already."""
    assign(model.variables, arrays, "model", path)
    assign(optimizer.variables, arrays, "optimizer", path)


def checkpoint_name(epoch: int, step: int) -> str:
    return f"checkpoint-e{epoch:03d}-s{step:06d}.npz"


def list_checkpoints(folder: Path) -> list[Path]:
    """Newest first (the names sort by position)."""
    return sorted(folder.glob("checkpoint-e*-s*.npz"), reverse=True)


def prune(folder: Path, keep: int = KEEP) -> None:
    for old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)


def newest_readable(folder: Path) -> tuple[Path, dict[str, np.ndarray], dict] | None:
    """The newest checkpoint that reads back whole; damaged ones are reported and skipped."""
    for path in list_checkpoints(folder):
        try:
            arrays, state = read(path)
            return path, arrays, state
        except CorruptCheckpoint as error:
            print(f"warning: skipping a damaged checkpoint ({error}); using the one before it")
    return None
