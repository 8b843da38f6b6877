"""Grad-CAM: where in the photo the model looked when it named a class (Selvaraju et al., 2017).

The class score's gradient with respect to the backbone's last feature map, averaged over the
map, weighs each of its channels; their weighted sum, rectified, is the heat map. It is computed
on the view prediction starts from (the whole photo squashed to a square) and stretched back to
the photo's own width and height, so it lies over the photo as it is. The box around its hottest
region is a localization without box labels. It needs the Keras model: an ONNX export has no gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import keras
import numpy as np
from keras import ops

from kit.augment import apply, plain_transform
from kit.cli import KitError
from kit.inference import VIEWS_PER_BATCH
from kit.predict import LoadedModel

BOX_LEVEL = 0.5  # the hottest region: the connected pixels above half the peak that hold the peak
OVERLAY_STRENGTH = 0.45  # how much of the heat map's colour covers the photo


@dataclass(frozen=True)
class Explanation:
    heat: np.ndarray  # (height, width) float32 in [0, 1], the photo's size: 1 where the model looked most
    class_index: int  # the class it was computed for
    probability: float  # the model's probability of that class on the plain view

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) around the hottest region, in the photo's pixels."""
        return hottest_box(self.heat)


def split_model(model: keras.Model) -> tuple[Callable, Callable]:
    """(features, scores): uint8 images -> the backbone's feature maps, and feature maps -> class scores.

    The scores are the output layer's before its softmax, as Grad-CAM prescribes: the softmax's
    gradient vanishes where the model is sure, which would blank the map of a confident prediction.
    """
    preprocess, backbone = model.get_layer("preprocess"), model.get_layer("backbone")
    *hidden, output = model.layers[model.layers.index(backbone) + 1:]

    def features(images):
        return backbone(preprocess(images), training=False)

    def scores(maps):
        x = maps
        for layer in hidden:
            x = layer(x, training=False)
        return ops.matmul(ops.cast(x, "float32"), output.kernel) + output.bias

    return features, scores


def score_gradient(scores: Callable, maps, classes: np.ndarray) -> np.ndarray:
    """d scores[i, classes[i]] / d maps, for every image i at once (they do not interact in inference).

    Keras 3 has no backend-neutral gradient outside training, so each backend's own autodiff is called.
    """
    def total(x):
        return ops.sum(ops.take_along_axis(scores(x), ops.convert_to_tensor(classes[:, None]), axis=1))

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        maps = tf.convert_to_tensor(maps)
        with tf.GradientTape() as tape:
            tape.watch(maps)
            score = total(maps)
        return np.asarray(tape.gradient(score, maps), np.float32)
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(total)(maps), np.float32)
    raise KitError(f"Grad-CAM runs on Keras' TensorFlow or JAX backend; KERAS_BACKEND is '{backend}'.")


def grad_cam(model: keras.Model, views: np.ndarray,
             classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps at the feature maps' resolution (N, h, w) in [0, 1], and the probabilities (N, classes).

    `classes`: the class to explain for each view; the predicted one where None.
    """
    features, scores = split_model(model)
    maps = features(ops.convert_to_tensor(views))
    logits = np.asarray(scores(maps), np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    chosen = probs.argmax(axis=1) if classes is None else np.asarray(classes, np.int64)
    grads = score_gradient(scores, maps, chosen)
    weights = grads.mean(axis=(1, 2), keepdims=True)  # one weight per channel: its gradient, averaged over the map
    heat = np.maximum((weights * np.asarray(maps, np.float32)).sum(axis=-1), 0)
    peak = heat.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, heat / np.where(peak > 0, peak, 1), 0).astype(np.float32), probs


def explain(loaded: LoadedModel, photos: Sequence[np.ndarray],
            classes: Sequence[int] | None = None) -> list[Explanation]:
    """Grad-CAM of each photo (uint8 RGB, any size), for its predicted class or the given one."""
    if not loaded.has_gradients:
        raise KitError(f"{loaded.source.name} is an exported model without gradients, so Grad-CAM cannot run on "
                       "it. Use the kit's weights (--stage N or --weights best.weights.npz).")
    plain = plain_transform(loaded.image_size)
    explanations = []
    for start in range(0, len(photos), VIEWS_PER_BATCH):
        chunk = photos[start:start + VIEWS_PER_BATCH]
        views = np.stack([apply(plain, photo, 0) for photo in chunk])
        wanted = None if classes is None else classes[start:start + len(chunk)]
        heats, probs = grad_cam(loaded.model, views, wanted)
        for photo, heat, prob, k in zip(chunk, heats, probs,
                                        probs.argmax(axis=1) if wanted is None else wanted):
            # The view is the photo squashed to a square, so stretching the map back undoes exactly that.
            full = np.maximum(cv2.resize(heat, (photo.shape[1], photo.shape[0]), interpolation=cv2.INTER_LINEAR), 0)
            full /= max(float(full.max()), 1e-12)  # the peak may fall between pixels: 1 where it is hottest
            explanations.append(Explanation(full, int(k), float(prob[k])))
    return explanations


def hottest_box(heat: np.ndarray, level: float = BOX_LEVEL) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the connected region above `level` of the peak that holds the peak."""
    mask = (heat >= level * heat.max()).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    left, top, width, height = stats[labels[y, x], :4]
    return int(left), int(top), int(width), int(height)


def overlay(photo: np.ndarray, explanation: Explanation, box: bool = True) -> np.ndarray:
    """The photo with the heat map blended over it (blue: ignored, red: looked at) and the box drawn.

    The photo may be another size than the one explained (a gallery thumbnail): the map is stretched to it.
    """
    height, width = photo.shape[:2]
    heat = explanation.heat
    if heat.shape != (height, width):
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.uint8(np.round(255 * heat)), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    blended = cv2.addWeighted(np.ascontiguousarray(photo[..., :3]), 1 - OVERLAY_STRENGTH, colours,
                              OVERLAY_STRENGTH, 0)
    if box:
        x, y, w, h = hottest_box(heat)
        thickness = max(2, round(min(height, width) / 150))
        cv2.rectangle(blended, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), thickness)
    return blended
