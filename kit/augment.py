"""Augmentations (albumentations 2.x), each draw a pure function of a seed tuple.

Exact resume needs the n-th image of epoch e to get the same crop, flip and jitter whether or
not the run was interrupted, so every image is augmented with its own generator, seeded from
(seed, stage, epoch, position) for training and (seed, Id, view) for test-time augmentation.
Two transforms are the kit's own, for speed on two CPU cores: `CropFlipAffine` (three geometric
transforms in one pass) and `LumaNoise` (noise without drawing a normal per pixel).
"""

from __future__ import annotations

import math
import random
import zlib

import albumentations as A
import cv2
import numpy as np

REFLECT = cv2.BORDER_REFLECT_101


def sample_seed(*parts: int | str) -> int:
    """A 32-bit seed mixed from integers and strings (strings hashed stably, unlike hash())."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


class CropFlipAffine(A.ImageOnlyTransform):
    """RandomResizedCrop, HorizontalFlip and Affine in one pass: one interpolation, one call.

    The draws are those of the three albumentations transforms (crop area and log-ratio, flip
    with `flip_p`, rotation, zoom and shift with `affine_p`), but the pixels are read once from
    the source: a resize of the crop, or a single warp when a rotation is drawn. What a rotation
    brings into view is the photo around the crop (reflected only past the photo's edge), not a
    mirror of the crop. `scale=None` keeps the whole photo, for test-time views.
    """

    def __init__(self, size: int, scale: tuple[float, float] | None = (0.5, 1.0),
                 ratio: tuple[float, float] = (1.0, 1.8), flip_p: float = 0.5, rotate: float = 10,
                 zoom: tuple[float, float] = (0.95, 1.05), shift: float = 0.05, affine_p: float = 0.5,
                 p: float = 1.0):
        super().__init__(p=p)
        self.size, self.scale, self.ratio = size, scale, ratio
        self.flip_p, self.rotate, self.zoom, self.shift, self.affine_p = flip_p, rotate, zoom, shift, affine_p

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        crop = self._crop(width, height)
        flip = self.py_random.random() < self.flip_p
        if self.py_random.random() >= self.affine_p:
            return {"crop": crop, "flip": flip, "matrix": None}
        angle = math.radians(self.py_random.uniform(-self.rotate, self.rotate))
        zoom = self.py_random.uniform(*self.zoom)
        dx, dy = (self.py_random.uniform(-self.shift, self.shift) * self.size for _ in range(2))
        # Source pixel centres -> output pixel centres: crop and resize, flip, then turn about the centre.
        s, (x, y, w, h) = self.size, crop
        matrix = np.array([[s / w, 0, (0.5 - x) * s / w - 0.5], [0, s / h, (0.5 - y) * s / h - 0.5], [0, 0, 1]])
        if flip:
            matrix = np.array([[-1, 0, s - 1], [0, 1, 0], [0, 0, 1]]) @ matrix
        c, cos, sin = (s - 1) / 2, zoom * math.cos(angle), zoom * math.sin(angle)
        turn = np.array([[cos, -sin, c - cos * c + sin * c + dx], [sin, cos, c - sin * c - cos * c + dy], [0, 0, 1]])
        return {"crop": crop, "flip": flip, "matrix": (turn @ matrix)[:2]}

    def _crop(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the crop, drawn as RandomResizedCrop draws it (centre crop after 10 misses)."""
        if self.scale is None:
            return 0, 0, width, height
        area, log_ratio = width * height, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = self.py_random.uniform(self.scale[0] * area, self.scale[1] * area)
            aspect = math.exp(self.py_random.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(self.py_random.random() * (width - w)), int(self.py_random.random() * (height - h)), w, h
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        w, h = min(width, round(height * aspect)), min(height, round(width / aspect))
        return (width - w) // 2, (height - h) // 2, w, h

    def apply(self, img: np.ndarray, crop: tuple[int, int, int, int], flip: bool, matrix: np.ndarray | None,
              **params) -> np.ndarray:
        if matrix is not None:
            return cv2.warpAffine(img, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=REFLECT)
        x, y, w, h = crop  # a resize costs a third of a warp
        view = cv2.resize(img[y:y + h, x:x + w], (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return cv2.flip(view, 1) if flip else view

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "scale", "ratio", "flip_p", "rotate", "zoom", "shift", "affine_p")


class LumaNoise(A.ImageOnlyTransform):
    """Gaussian noise shared by the three channels (like sensor noise), std drawn from `std_range` of 255.

    Drawing 50,000 normals per 224 px image costs about as much as all the other augmentations,
    so the noise is a window, at a drawn offset, of one fixed bank of normals: as random to a
    network, for the price of a slice. Deterministic like every draw here (the bank is seeded).
    """

    BANK = 1024

    def __init__(self, std_range: tuple[float, float] = (0.02, 0.06), p: float = 0.5):
        super().__init__(p=p)
        self.std_range = std_range
        self._bank = np.empty((0, 0), np.float32)

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        # At least BANK // 2 offsets in each direction, whatever the image size.
        need = max(self.BANK, height + self.BANK // 2), max(self.BANK, width + self.BANK // 2)
        if self._bank.shape[0] < need[0] or self._bank.shape[1] < need[1]:
            self._bank = np.random.default_rng(0).standard_normal(need, np.float32)
        y = self.py_random.randrange(self._bank.shape[0] - height + 1)
        x = self.py_random.randrange(self._bank.shape[1] - width + 1)
        sigma = self.py_random.uniform(*self.std_range) * 255
        return {"noise": self._bank[y:y + height, x:x + width] * sigma}

    def apply(self, img: np.ndarray, noise: np.ndarray, **params) -> np.ndarray:
        return cv2.add(img, cv2.merge([noise] * img.shape[2]), dtype=cv2.CV_8U)  # saturating, no float copy of img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("std_range",)


def train_transform(size: int, light: bool = False) -> A.Compose:
    """Training augmentation; `light` (the 448 px stages) drops noise and colour shifts, as the recipe did.

    Crops keep the photo's wide aspect and squash it to a square, the same geometry as
    `plain_transform`, so training and validation see cars of the same shape.
    """
    transforms = [
        CropFlipAffine(size, scale=(0.5, 1.0), ratio=(1.0, 1.8), rotate=10, zoom=(0.95, 1.05), shift=0.05),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
    ]
    if not light:
        transforms += [
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=10, p=0.5),
            LumaNoise(std_range=(0.02, 0.06), p=0.3),
        ]
    return A.Compose(transforms)


def plain_transform(size: int) -> A.Compose:
    """Validation and the first test view: the whole photo, squashed to a square, no randomness."""
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_AREA)])


def tta_transform(size: int) -> A.Compose:
    """One extra test-time view: the whole photo, a flip, a small rotation and zoom-in, light contrast."""
    return A.Compose([
        CropFlipAffine(size, scale=None, rotate=8, zoom=(1.0, 1.08), shift=0.0, affine_p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ])


def apply(transform: A.Compose, image: np.ndarray, seed: int) -> np.ndarray:
    """`transform(image)` with its randomness fixed by `seed`; not thread-safe per transform object.

    The whole chain shares one pair of generators, so each transform draws the next numbers.
    Compose.set_random_seed instead seeds every transform alike: they all draw the same first
    number, and transforms of equal p are applied all together or not at all.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
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
