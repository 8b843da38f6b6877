"""Checkpoints by name: reordered variables, old positional files, another head, precision policies, file modes."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import ROOT
from kit import checkpoint
from kit.backbones import build_model
from kit.config import Head


def tiny(units: int = 64, policy: str = "float32", seed: int = 0) -> keras.Model:
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(seed)
    model = build_model("tiny-cnn", 32, 10, "none", Head(units, 0.1, 0.9))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    return model


def rewrite(path, arrays: dict[str, np.ndarray], state: dict) -> None:
    import json

    buffer = io.BytesIO()
    np.savez(buffer, **arrays, state=np.frombuffer(json.dumps(state).encode(), np.uint8))
    path.write_bytes(buffer.getvalue())


@pytest.fixture(autouse=True)
def float32_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


def test_variables_load_by_name_whatever_their_order(tmp_path):
    source = tiny(seed=1)
    path = tmp_path / "a.npz"
    checkpoint.save(path, source, {"step": 1})
    arrays, state = checkpoint.read(path)
    # BatchNorm's four same-shape vectors, stored in reverse: by position they would swap gamma and variance.
    rewrite(path, dict(reversed(list(arrays.items()))), state)
    target = tiny(seed=2)
    checkpoint.load_weights(path, target)
    expected = checkpoint.model_variables(source)
    for name, variable in checkpoint.model_variables(target).items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable),
                                      keras.ops.convert_to_numpy(expected[name]), err_msg=name)
    assert "head_bn/moving_variance" in expected and "head_dropout/seed_generator_state" in expected


def test_a_format_1_file_still_loads(tmp_path):
    """Runs started before names were stored: variables numbered in the model's order."""
    source = tiny(seed=3)
    path = tmp_path / "old.npz"
    arrays = {f"model/{k:05d}": keras.ops.convert_to_numpy(v) for k, v in enumerate(source.variables)}
    rewrite(path, arrays, {"step": 1})
    target = tiny(seed=4)
    checkpoint.load_weights(path, target)
    for a, b in zip(source.variables, target.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_a_file_of_another_head_is_refused_with_a_message(tmp_path):
    path = tmp_path / "wide.npz"
    checkpoint.save(path, tiny(units=64), {"step": 1})
    shapes = r"have another shape \(e.g. head_bn/beta \(32,\) here, \(64,\) in the file.*another backbone or head"
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=shapes):
        checkpoint.load_weights(path, tiny(units=32))


def test_predict_refuses_weights_of_another_model_without_a_traceback(tmp_path, capsys):
    from kit.predict import main as predict_main  # the command's own main, in this process

    path = tmp_path / "best.weights.npz"
    model = tiny(units=64)
    state = {"val_accuracy": 0.5, "stage": 1, "image_size": 32, "config": {
        "profile": "smoke", "backbone": "tiny-cnn", "weights": "none", "head_units": 32, "head_dropout": 0.1,
        "head_bn_momentum": 0.9, "seed": 42, "val_fraction": 0.2}}
    checkpoint.save(path, model, state)
    assert predict_main(["--weights", str(path), "--workdir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "does not fit the model being built" in " ".join(error.split())


def test_the_loss_scale_is_created_or_dropped_with_the_precision_policy(tmp_path):
    fp16 = tiny(policy="mixed_float16")
    assert any(k.startswith("loss_scale/") for k in checkpoint.optimizer_variables(fp16.optimizer))
    fp16.optimizer.iterations.assign(7)
    path = tmp_path / "fp16.npz"
    checkpoint.save(path, fp16, {"step": 7}, fp16.optimizer)
    moments = {k: keras.ops.convert_to_numpy(v) for k, v in checkpoint.optimizer_variables(fp16.optimizer).items()
               if not k.startswith("loss_scale/")}
    arrays, _ = checkpoint.read(path)

    fp32 = tiny(policy="float32")
    notes = checkpoint.assign_optimizer(fp32.optimizer, arrays, path)
    assert notes == ["the float16 loss scale was dropped"]
    restored = checkpoint.optimizer_variables(fp32.optimizer)
    assert set(restored) == set(moments) and int(keras.ops.convert_to_numpy(restored["iteration"])) == 7

    path32 = tmp_path / "fp32.npz"
    checkpoint.save(path32, fp32, {"step": 7}, fp32.optimizer)
    back = tiny(policy="mixed_float16")
    notes = checkpoint.assign_optimizer(back.optimizer, checkpoint.read(path32)[0], path32)
    assert notes == ["a new loss scale was created for float16"]


def test_truncated_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    model = tiny()
    for step in (1, 2):
        checkpoint.save(tmp_path / checkpoint.checkpoint_name(0, step), model, {"step": step})
    newest = tmp_path / checkpoint.checkpoint_name(0, 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    path, arrays, state = checkpoint.newest_readable(tmp_path)
    assert path.name == checkpoint.checkpoint_name(0, 1) and state == {"step": 1}
    assert "damaged checkpoint" in capsys.readouterr().out
    checkpoint.assign_model(model, arrays, path)


@pytest.mark.parametrize("umask, mode", [("022", 0o644), ("077", 0o600)])
def test_files_are_as_readable_as_the_umask_says(tmp_path, umask, mode):
    """Not mkstemp's private 0600: a Docker image's user must read weights written by root."""
    target = tmp_path / "weights" / "best.weights.npz"
    code = f"from kit.files import write_text; write_text({str(target)!r}, 'x')"
    subprocess.run(["sh", "-c", f"umask {umask} && exec {sys.executable} -c \"{code}\""], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert stat.S_IMODE(target.stat().st_mode) == mode
