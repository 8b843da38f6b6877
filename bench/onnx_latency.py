"""ONNX Runtime against the Keras model, the same photos, one process: latency per photo and the largest difference.

    python bench/onnx_latency.py                           # EfficientNetB6 at 448 px, random weights
    python bench/onnx_latency.py --backbone keras-efficientnetb0 --size 224 --requests 20

The model is exported by kit.export (and checked there to 1e-4), then each runtime answers the
same real photos through kit's Predictor: one view and TTA 10. Prints p50/p95 per photo and the
ratio Keras / ONNX Runtime, and what Grad-CAM (kit.cam, the demo's heat map) adds on the Keras
model. The installed size of each serving environment is measured apart (docs/export-and-demo.md):
it needs clean virtual environments, not this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit import checkpoint  # noqa: E402
from kit.backbones import build_model  # noqa: E402
from kit.cam import explain  # noqa: E402
from kit.config import PROFILES, SEED, STEPS, TTA_VIEWS, VAL_FRACTION  # noqa: E402
from kit.dataset import load_resized  # noqa: E402
from kit.export import export  # noqa: E402
from kit.predict import Predictor, load_model, load_onnx  # noqa: E402
from kit.records import RunConfig  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "competition" / "test_upload_sample"


def random_model(backbone: str, size: int) -> Path:
    """The colab profile's head on `backbone` with random weights, saved as a real weights file."""
    profile = PROFILES["colab"]
    config = RunConfig("colab", backbone, "none", profile.head.units, profile.head.dropout,
                       profile.head.bn_momentum, SEED, VAL_FRACTION)
    path = Path(tempfile.mkdtemp()) / "random.weights.npz"
    checkpoint.save(path, build_model(backbone, size, len(config.classes), "none", profile.head),
                    {"stage": STEPS[-1], "image_size": size, "config": dataclasses.asdict(config)})
    return path


def timed(answer, photos: list[Path], count: int) -> tuple[list[float], np.ndarray]:
    """Seconds per call of answer(photo, key) over `count` photos, after one warm-up call, and the answers."""
    answer(photos[0], "warm-up")  # the first call traces or initialises
    seconds, answers = [], []
    for k in range(count):
        started = time.perf_counter()
        answers.append(answer(photos[k % len(photos)], photos[k % len(photos)].name))
        seconds.append(time.perf_counter() - started)
    return seconds, np.array(answers)


def grad_cam_of(loaded):
    """The demo's Grad-CAM for one photo: decode at the model's size, explain the predicted class."""
    short_side = Predictor(loaded, 1).short_side
    return lambda photo, key: explain(loaded, [load_resized(photo, short_side)])[0].probability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=PROFILES["colab"].backbone)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--weights", type=Path, help="a trained best.weights.npz instead of random weights")
    parser.add_argument("--requests", type=int, default=10, help="photos per runtime and mode")
    args = parser.parse_args()
    photos = sorted(PHOTOS.glob("*.jpg"))
    weights = args.weights or random_model(args.backbone, args.size)
    import keras

    # keras.applications name their Normalization layer by a global counter: a second build in one process
    # would be named normalization_1 and not match the file's names (see the closing note of issue 16).
    keras.backend.clear_session()
    keras_model = load_model(weights)
    folder = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    difference = export(keras_model, folder, ["onnx"], photos[:16])["onnx"]
    print(f"model: {keras_model.describe()}; exported to ONNX in {time.perf_counter() - started:.0f} s, "
          f"max difference on 16 photos {difference:.1e}", flush=True)
    onnx_model = load_onnx(folder / "model.onnx")
    rows = []
    for views in (1, TTA_VIEWS):
        keras_s, keras_p = timed(Predictor(keras_model, views).predict_image, photos, args.requests)
        onnx_s, onnx_p = timed(Predictor(onnx_model, views).predict_image, photos, args.requests)
        rows.append((views, keras_s, onnx_s, float(np.abs(keras_p - onnx_p).max())))
    cam_s, _ = timed(grad_cam_of(keras_model), photos, args.requests)
    print(f"\n{keras_model.backbone} at {keras_model.image_size} px, {args.requests} photos per row, "
          f"{os.cpu_count()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}")
    print("| views | Keras p50 s | Keras p95 s | ONNX Runtime p50 s | ONNX Runtime p95 s | Keras / ONNX (p50) "
          "| max prob. difference |")
    print("|---|---|---|---|---|---|---|")
    for views, keras_s, onnx_s, diff in rows:
        k50, k95, o50, o95 = (float(np.percentile(s, q)) for s in (keras_s, onnx_s) for q in (50, 95))
        print(f"| {views} | {k50:.3f} | {k95:.3f} | {o50:.3f} | {o95:.3f} | {k50 / o50:.2f}x | {diff:.1e} |")
    single = float(np.percentile(rows[0][1], 50))
    cam50, cam95 = (float(np.percentile(cam_s, q)) for q in (50, 95))
    print(f"\nGrad-CAM of one photo (Keras): p50 {cam50:.3f} s, p95 {cam95:.3f} s = {cam50 / single:.2f}x the Keras "
          "single-view prediction")


if __name__ == "__main__":
    main()
