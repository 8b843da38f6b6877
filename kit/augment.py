"""Augmentations (albumentations 2.x), each draw a pure function of a seed tuple.

Exact resume needs the n-th image of epoch e to get the same crop, flip and jitter whether or
not the run was interrupted, so every image is augmented with its own generator, seeded from
(seed, stage, epoch, position) for training and (seed, Id, view) for test-time augmentation.
"""

from __future__ import annotations

import zlib

import albumentations as A
import cv2
import numpy as np

REFLECT = cv2.BORDER_REFLECT_101


def sample_seed(*parts: int | str) -> int:
    """A 32-bit seed mixed from integers and strings (strings hashed stably, unlike hash())."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def train_transform(size: int, light: bool = False) -> A.Compose:
    """Training augmentation; `light` (the 448 px stages) drops noise and colour shifts, as the recipe did.

    Crops keep the photo's wide aspect and squash it to a square, the same geometry as
    `plain_transform`, so training and validation see cars of the same shape.
    """
    transforms = [
        A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0), ratio=(1.0, 1.8), interpolation=cv2.INTER_LINEAR),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-10, 10), translate_percent=(-0.05, 0.05), scale=(0.95, 1.05), border_mode=REFLECT, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
    ]
    if not light:
        transforms += [
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=10, p=0.5),
            # Luminance noise, the same on every channel: like sensor noise, and a third of the cost.
            A.GaussNoise(std_range=(0.02, 0.06), per_channel=False, p=0.3),
        ]
    return A.Compose(transforms)


def plain_transform(size: int) -> A.Compose:
    """Validation and the first test view: the whole photo, squashed to a square, no randomness."""
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_AREA)])


def tta_transform(size: int) -> A.Compose:
    """One extra test-time view: a flip, a small rotation and a light contrast change."""
    return A.Compose([
        A.Resize(size, size, interpolation=cv2.INTER_AREA),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-8, 8), scale=(1.0, 1.08), border_mode=REFLECT, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ])


def apply(transform: A.Compose, image: np.ndarray, seed: int) -> np.ndarray:
    """`transform(image)` with its randomness fixed by `seed`; not thread-safe per transform object."""
    transform.set_random_seed(seed)
    return transform(image=image)["image"]


def tta_views(image: np.ndarray, size: int, views: int, key: str, seed: int,
              plain: A.Compose | None = None, extra: A.Compose | None = None) -> np.ndarray:
    """`views` images of one photo (view 0 is the plain one): uint8 (views, size, size, 3).

    The draws depend on the photo's own key (its Id), never on its position in a batch, so
    reordering the test set cannot change any prediction.
    """
    plain = plain or plain_transform(size)
    extra = extra or tta_transform(size)
    out = np.empty((max(1, views), size, size, 3), np.uint8)
    out[0] = apply(plain, image, 0)
    for view in range(1, views):
        out[view] = apply(extra, image, sample_seed(seed, key, view))
    return out
