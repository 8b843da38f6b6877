"""Checkpoints: model weights, optimizer state and the training loop's state in one atomic file.

A checkpoint is one .npz: every model variable (trainable, BatchNorm statistics, the dropout
seed generator's state), every optimizer variable (Adam moments, step count, loss scale) and a
JSON document with the loop's position and counters. One file means the weights and the state
that describes them can never disagree.

Variables are stored under names, not positions: `model/<layer>/<variable>` and
`optimizer/<variable>`, so a Keras or kit update that reorders same-shape variables (BatchNorm's
gamma, beta, mean, variance) can never load one into another. Loading maps by name and refuses
any missing, extra or reshaped model variable with one paragraph. The optimizer's loss scale
(mixed_float16 only) lives apart under `loss_scale/`: a run moves between precision policies,
and so between GPUs, keeping Adam's state and creating or dropping the loss scale.

Written by hand rather than with Keras' `.weights.h5`: that format holds no optimizer state,
and `.keras` archives hold it only positionally and not with our loop state in the same file.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kit import __version__
from kit.files import atomic_path

if TYPE_CHECKING:
    import keras

KEEP = 2  # the newest checkpoint and the one before it, in case the newest is damaged
FORMAT = 2  # 1: variables by position (kit before 2026-11-22); 2: by name, with versions


class CorruptCheckpoint(Exception):
    pass


class IncompatibleCheckpoint(Exception):
    """Readable, but made for another model: the message says what differs."""


# ---- names ----------------------------------------------------------------------------------------

def model_variables(model: keras.Model) -> dict[str, keras.Variable]:
    """Every model variable under `<layer name>/<variable name>`.

    Keras' own `variable.path` would do for most variables, but a dropout's seed generator is
    named by a global counter (`seed_generator_9/...`) that depends on what else was built
    first. Layer names are the kit's and the backbone's, fixed by the architecture, except the
    ones Keras names itself (keras.applications' `normalization`, `normalization_1` in a second
    build): those are renamed by their order within this model, as a first build names them.
    """
    key_of: dict[int, str] = {}
    used: set[str] = set()
    for layer, name in _stable_layer_names(model):
        for variable in layer.variables:
            if id(variable) in key_of:  # shared by two layers: named by the first
                continue
            key = f"{name}/{variable.name}"
            if key in used:
                key = f"{name}/{variable.path}"  # two same-named variables in one composite layer
            key_of[id(variable)] = key
            used.add(key)
    unnamed = [v.path for v in model.variables if id(v) not in key_of]
    if unnamed:
        raise RuntimeError(f"variables of {model.name} that belong to no layer cannot be named: {unnamed[:3]}")
    return {key_of[id(v)]: v for v in model.variables}  # in the model's order, which format 1 relied on


def _stable_layer_names(model: keras.Model) -> list[tuple[keras.layers.Layer, str]]:
    """(layer, name) for every leaf layer; a name Keras generated from a global counter is numbered afresh."""
    from keras.src.utils.naming import to_snake_case  # Keras' own rule for the names it generates

    counts: dict[str, int] = {}
    named = []
    for layer in _leaf_layers(model):
        base = to_snake_case(type(layer).__name__)
        name = layer.name
        if re.fullmatch(rf"{re.escape(base)}(_\d+)?", name):
            number = counts[base] = counts.get(base, -1) + 1
            name = base if number == 0 else f"{base}_{number}"
        named.append((layer, name))
    return named


def _leaf_layers(model: keras.Model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def optimizer_variables(optimizer: keras.optimizers.Optimizer) -> dict[str, keras.Variable]:
    """Adam's variables by name without the optimizer's own prefix; a loss scale's under `loss_scale/`."""
    named = {}
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:  # LossScaleOptimizer: its own step counter and scale, then the real optimizer
        inner_ids = {id(v) for v in inner.variables}
        named.update({f"loss_scale/{_short(v.path)}": v for v in optimizer.variables if id(v) not in inner_ids})
        optimizer = inner
    named.update({_short(v.path): v for v in optimizer.variables})
    return named


def _short(path: str) -> str:
    return path.split("/", 1)[-1]  # 'adam/iteration' -> 'iteration': the optimizer's name is not the point


def versions() -> dict[str, str]:
    """What made a file, stored with it so a mismatch can be explained."""
    import keras  # late, as in every function here that needs it: the file names and states need no framework

    return {"format": str(FORMAT), "kit": __version__, "keras": keras.__version__, "backend": keras.backend.backend()}


# ---- writing and reading ---------------------------------------------------------------------------

def save(path: Path, model: keras.Model, state: dict, optimizer: keras.optimizers.Optimizer | None = None) -> None:
    """Write model (+ optimizer) variables and `state` to `path` atomically."""
    arrays = {f"model/{k}": _numpy(v) for k, v in model_variables(model).items()}
    if optimizer is not None:
        arrays.update({f"optimizer/{k}": _numpy(v) for k, v in optimizer_variables(optimizer).items()})
    write_arrays(path, arrays, state, versions())


def write_arrays(path: Path, arrays: dict[str, np.ndarray], state: dict, made_by: dict | None = None) -> None:
    """Arrays and a JSON state in one .npz, atomically: the kit's one file format (read back by `read`)."""
    arrays = {**arrays, "state": _json_bytes(state)}
    if made_by:
        arrays["versions"] = _json_bytes(made_by)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        _write_slowly_if_asked(tmp, buffer.getvalue())


def _numpy(variable) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable))


def _json_bytes(document: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(document).encode(), np.uint8)


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
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # not numpy's advice on pickles: the kit never loads one
                raise CorruptCheckpoint(f"{path}: not a weights file of the kit (an .npz archive)")
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}  # reads (and CRC-checks) every member
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as error:
        raise CorruptCheckpoint(f"{path}: {error}") from None
    if "state" not in arrays:
        raise CorruptCheckpoint(f"{path}: no state")
    arrays.pop("versions", None)
    return arrays, json.loads(arrays.pop("state").tobytes())


def read_state(path: Path) -> dict | None:
    """Only the state of a file (cheap: one small member); None when there is no readable file."""
    try:
        with np.load(path) as archive:
            return json.loads(archive["state"].tobytes())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        return None


def read_versions(path: Path) -> dict:
    try:
        with np.load(path) as archive:
            return json.loads(archive["versions"].tobytes())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        return {"format": "1"}


# ---- loading ---------------------------------------------------------------------------------------

def assign_model(model: keras.Model, arrays: dict[str, np.ndarray], source: Path) -> None:
    """Load the model variables by name; refuse anything missing, extra or of another shape."""
    variables = model_variables(model)
    stored = {k[len("model/"):]: a for k, a in arrays.items() if k.startswith("model/")}
    if stored and all(k.isdigit() for k in stored):
        stored = _by_position(variables, stored)
    missing, extra = sorted(set(variables) - set(stored)), sorted(set(stored) - set(variables))
    reshaped = [f"{k} {tuple(variables[k].shape)} here, {stored[k].shape} in the file"
                for k in sorted(set(variables) & set(stored)) if tuple(variables[k].shape) != stored[k].shape]
    if missing or extra or reshaped:
        raise IncompatibleCheckpoint(_mismatch(source, model, missing, extra, reshaped))
    for key, variable in variables.items():
        variable.assign(stored[key])
    refresh_constants(model)


def refresh_constants(model: keras.Model) -> None:
    """Recompute what layers derive from their variables once (Normalization's mean and variance).

    Keras' own loaders call `finalize_state` after loading; a plain `assign` does not, and a
    Normalization layer would go on normalising with the values it was built with.
    """
    for layer in _leaf_layers(model):
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()


def _by_position(variables: dict[str, keras.Variable], stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A format-1 file (variables numbered in the model's order): name them by the model being loaded.

    Shapes are still checked after this; it is how runs started before format 2 continue.
    """
    if len(stored) != len(variables):
        return {f"#{k}": a for k, a in stored.items()}  # reported as a mismatch by the caller
    return dict(zip(variables, (stored[k] for k in sorted(stored))))


def _mismatch(source: Path, model: keras.Model, missing: list, extra: list, reshaped: list) -> str:
    made_by = read_versions(source)
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's variables are not in the file (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} of the file's variables are not in the model (e.g. {', '.join(extra[:3])})")
    if reshaped:
        parts.append(f"{len(reshaped)} have another shape (e.g. {'; '.join(reshaped[:2])})")
    return (f"{source} does not fit the model being built ({model.name}): {'; '.join(parts)}. It was made for "
            f"another backbone or head (or by kit {made_by.get('kit', '?')}, Keras {made_by.get('keras', '?')}). "
            "Use the work directory it belongs to, or start this stage over with --restart.")


def assign_optimizer(optimizer: keras.optimizers.Optimizer, arrays: dict[str, np.ndarray],
                     source: Path) -> list[str]:
    """Load the optimizer variables by name; return notes on what a change of precision policy changed.

    Adam's moments and step must all be there (or the model changed); the loss scale is created
    (mixed_float16 now, not then) or dropped (not now) as the current policy needs.
    """
    variables = optimizer_variables(optimizer)
    stored = {k[len("optimizer/"):]: a for k, a in arrays.items() if k.startswith("optimizer/")}
    if stored and all(k.isdigit() for k in stored):
        stored = _by_position(variables, stored)
    core = {k for k in variables if not k.startswith("loss_scale/")}
    missing = sorted(core - set(stored))
    extra = sorted(k for k in set(stored) - set(variables) if not k.startswith("loss_scale/"))
    if missing or extra:
        raise IncompatibleCheckpoint(f"{source} holds optimizer state for other variables (missing: "
                                     f"{', '.join(missing[:3]) or 'none'}; extra: {', '.join(extra[:3]) or 'none'}). "
                                     "The stage's trainable layers or its model changed since it was saved; start "
                                     "the stage over with --restart.")
    notes = []
    for key, variable in variables.items():
        if key in stored:
            variable.assign(stored[key])
    had_scale = any(k.startswith("loss_scale/") for k in stored)
    has_scale = any(k.startswith("loss_scale/") for k in variables)
    if has_scale and not had_scale:
        notes.append("a new loss scale was created for float16")
    if had_scale and not has_scale:
        notes.append("the float16 loss scale was dropped")
    return notes


def load_weights(path: Path, model: keras.Model) -> dict:
    """Load a checkpoint's (or best weights file's) model variables; return its state."""
    arrays, state = read(path)
    assign_model(model, arrays, path)
    return state


# ---- the files of a stage --------------------------------------------------------------------------

def checkpoint_name(epoch: int, step: int) -> str:
    return f"checkpoint-e{epoch:03d}-s{step:06d}.npz"


def position_of(path: Path) -> tuple[int, int]:
    """(epoch, step) from a checkpoint's name: the next batch it resumes at."""
    _, epoch, step = path.stem.split("-")
    return int(epoch[1:]), int(step[1:])


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
            print(f"warning: skipping a damaged checkpoint ({error})")
    return None
