"""kit.cam: Grad-CAM looks where a trained model's evidence is, on pictures where we know where that is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kit.cam import explain, hottest_box, overlay
from kit.cli import KitError
from kit.predict import LoadedModel, OnnxModel

SIZE = 128  # the model's input: an 8 x 8 feature map for the tiny CNN
PHOTO = (120, 160)  # (height, width) of the pictures: not square, so the map must be stretched back
SIDE = 36  # the object's side in the picture


def picture(label: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Gray clutter with one coloured square whose colour is the class: red (0) or blue (1); and its box."""
    height, width = PHOTO
    image = np.clip(rng.normal(128, 30, (height, width, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
    for _ in range(4):  # gray blobs, so "anything that is not flat" is not the answer
        y, x, r = rng.integers(0, height), rng.integers(0, width), rng.integers(6, 16)
        image[max(0, y - r):y + r, max(0, x - r):x + r] = rng.integers(20, 235)
    x, y = int(rng.integers(0, width - SIDE)), int(rng.integers(0, height - SIDE))
    image[y:y + SIDE, x:x + SIDE] = (220, 30, 30) if label == 0 else (30, 30, 220)
    return image, (x, y, SIDE, SIDE)


@pytest.fixture(scope="module")
def trained() -> LoadedModel:
    """The tiny CNN of the smoke profile, trained until it tells the two squares apart."""
    import keras

    from kit.augment import apply, plain_transform
    from kit.backbones import build_model

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(240) % 2
    plain = plain_transform(SIZE)
    views = np.stack([apply(plain, picture(k, rng)[0], 0) for k in labels])
    model = build_model("tiny-cnn", SIZE, 2)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(views, labels, batch_size=32, epochs=10, verbose=0)
    return LoadedModel(model, "tiny-cnn", None, SIZE, None, Path("trained-in-test"), ("red", "blue"))


def test_the_hottest_region_lies_on_the_object(trained):
    rng = np.random.default_rng(1)
    pictures = [picture(k % 2, rng) for k in range(8)]
    explanations = explain(trained, [image for image, _ in pictures])
    on_object = 0
    for (image, (x, y, w, h)), k, explanation in zip(pictures, range(8), explanations):
        assert explanation.heat.shape == PHOTO and explanation.heat.dtype == np.float32
        assert explanation.heat.min() >= 0 and explanation.heat.max() == pytest.approx(1)
        assert explanation.class_index == k % 2 and explanation.probability > 0.5  # it learned the task
        row, column = np.unravel_index(explanation.heat.argmax(), PHOTO)
        cell = SIZE // 8 * max(PHOTO) / SIZE  # one feature-map cell, in the picture's pixels
        on_object += (x - cell <= column < x + w + cell) and (y - cell <= row < y + h + cell)
        bx, by, bw, bh = explanation.box
        assert bx <= x + w and x <= bx + bw and by <= y + h and y <= by + bh  # the box touches the object
    assert on_object == len(pictures)


def test_a_chosen_class_and_the_overlay(trained):
    image, _ = picture(0, np.random.default_rng(2))
    red, blue = explain(trained, [image, image], classes=[0, 1])
    assert (red.class_index, blue.class_index) == (0, 1)
    assert red.probability + blue.probability == pytest.approx(1, abs=1e-5)
    shown = overlay(image, red)
    assert shown.shape == image.shape and shown.dtype == np.uint8
    thumbnail = overlay(image[::2, ::2], red)  # a smaller copy of the photo gets the map stretched to it
    assert thumbnail.shape == image[::2, ::2].shape


def test_hottest_box_is_the_connected_region_holding_the_peak():
    heat = np.zeros((50, 80), np.float32)
    heat[10:20, 30:45] = 0.8
    heat[14, 40] = 1.0
    heat[40:45, 5:10] = 0.9  # hot, but not connected to the peak
    assert hottest_box(heat) == (30, 10, 15, 10)


def test_an_onnx_model_is_refused_in_one_paragraph():
    onnx = LoadedModel(OnnxModel.__new__(OnnxModel), "tiny-cnn", 7, 64, None, Path("model.onnx"), ("a", "b"))
    with pytest.raises(KitError, match="without gradients"):
        explain(onnx, [np.zeros((10, 10, 3), np.uint8)])
