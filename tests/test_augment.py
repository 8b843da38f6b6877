"""Augmentations: independent draws, the fused crop/flip/affine warp, the noise, on real photos where present."""

from __future__ import annotations

import math
import random

import albumentations as A
import cv2
import numpy as np
import pytest

from conftest import SHARED
from kit.augment import CropFlipAffine, LumaNoise, apply, sample_seed, train_transform, tta_views
from kit.dataset import load_resized


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real car photo at the 224 px stages' cache size, or a synthetic one where ../shared is absent."""
    photos = sorted((SHARED / "test_upload_sample").glob("*.jpg"))
    if photos:
        return load_resized(str(photos[0]), 258)
    y, x = np.mgrid[0:258, 0:344]
    return np.dstack([x * 255 // 343, y * 255 // 257, (x + y) % 256]).astype(np.uint8)


class Probe(A.ImageOnlyTransform):
    """Records, for each image, whether albumentations applied it (its own p draw)."""

    def __init__(self, log: list, p: float):
        super().__init__(p=p)
        self.log = log

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        self.log.append(self)
        return img


def test_each_transform_draws_its_own_numbers(photo):
    """Seeding every transform alike would apply equal-p transforms all together or not at all."""
    log: list = []
    first, second = Probe(log, p=0.5), Probe(log, p=0.5)
    transform = A.Compose([first, second])
    applied = []
    for k in range(400):
        log.clear()
        apply(transform, photo, sample_seed(3, k))
        applied.append((first in log, second in log))
    one, other = np.array(applied).T
    assert 0.4 < one.mean() < 0.6 and 0.4 < other.mean() < 0.6
    assert 0.17 < (one & other).mean() < 0.33  # independent: about 0.25, not 0.5


def test_the_same_seed_gives_the_same_view_in_a_fresh_transform(photo):
    first = apply(train_transform(224), photo, sample_seed(1, 2, 3))
    again = apply(train_transform(224), photo, sample_seed(1, 2, 3))
    other = apply(train_transform(224), photo, sample_seed(1, 2, 4))
    np.testing.assert_array_equal(first, again)
    assert first.shape == (224, 224, 3) and first.dtype == np.uint8 and not np.array_equal(first, other)


def warp(transform: A.BasicTransform, image: np.ndarray, seed: int = 0) -> np.ndarray:
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform(image=image)["image"]


def test_whole_photo_without_flip_or_affine_is_a_plain_resize(photo):
    still = warp(CropFlipAffine(224, scale=None, flip_p=0, affine_p=0), photo)
    np.testing.assert_array_equal(still, cv2.resize(photo, (224, 224), interpolation=cv2.INTER_LINEAR))


def test_the_warp_maps_pixels_as_the_resize_does(photo):
    """A rotation of 0 degrees through the warp path gives the resize path's view (flipped or not)."""
    for flip_p in (0, 1):
        resized = warp(CropFlipAffine(224, scale=None, flip_p=flip_p, affine_p=0), photo)
        warped = warp(CropFlipAffine(224, scale=None, flip_p=flip_p, rotate=0, zoom=(1, 1), shift=0, affine_p=1),
                      photo)
        assert np.abs(warped.astype(int) - resized).max() <= 2  # fixed-point weights round differently
        assert np.abs(warped.astype(int) - resized).mean() < 0.5  # half a pixel off would give several levels


def test_flip_mirrors_the_view(photo):
    still = warp(CropFlipAffine(224, scale=None, flip_p=0, affine_p=0), photo)
    flipped = warp(CropFlipAffine(224, scale=None, flip_p=1, affine_p=0), photo)
    np.testing.assert_array_equal(flipped, still[:, ::-1])


def test_rotation_turns_the_view_about_its_centre(photo):
    still = warp(CropFlipAffine(224, scale=None, flip_p=0, affine_p=0), photo)
    turned = warp(CropFlipAffine(224, scale=None, flip_p=0, rotate=10, zoom=(1, 1), shift=0, affine_p=1), photo)
    angle = next(a for a in np.linspace(-10, 10, 201)
                 if np.abs(cv2.warpAffine(still, cv2.getRotationMatrix2D((111.5, 111.5), -a, 1), (224, 224),
                                          borderMode=cv2.BORDER_REFLECT_101).astype(int)[40:-40, 40:-40]
                           - turned[40:-40, 40:-40]).mean() < 1.5)
    assert abs(angle) > 0.5  # the centre region is the still view turned by one drawn angle


def test_crops_follow_random_resized_crop_bounds():
    crop = CropFlipAffine(224, scale=(0.5, 1.0), ratio=(1.0, 1.8))
    crop.set_random_state(np.random.default_rng(0), random.Random(0))
    for _ in range(300):
        x, y, w, h = crop._crop(344, 258)
        assert 0 <= x <= 344 - w and 0 <= y <= 258 - h
        assert 0.5 * 344 * 258 * 0.98 <= w * h <= 344 * 258
        assert 0.97 <= w / h <= 1.8 * 1.03 or (w, h) == (344, 258)


def test_noise_is_shared_by_the_channels_and_within_its_range():
    gray = np.full((224, 224, 3), 128, np.uint8)
    noisy = warp(LumaNoise(std_range=(0.02, 0.06), p=1), gray, seed=7)
    assert (noisy[..., 0] == noisy[..., 1]).all() and (noisy[..., 1] == noisy[..., 2]).all()
    assert 0.02 * 255 * 0.9 < noisy[..., 0].std() < 0.06 * 255 * 1.1
    windows = {warp(LumaNoise(p=1), gray, seed=s)[:8, :8, 0].tobytes() for s in range(20)}
    assert len(windows) == 20  # a different window of the bank for each draw


def test_tta_views_start_with_the_plain_view_and_vary(photo):
    views = tta_views(photo, 224, 5, key="abc.jpg", seed=0)
    again = tta_views(photo, 224, 5, key="abc.jpg", seed=0)
    np.testing.assert_array_equal(views, again)
    np.testing.assert_array_equal(views[0], cv2.resize(photo, (224, 224), interpolation=cv2.INTER_AREA))
    assert len({v.tobytes() for v in views}) == 5 and not math.isnan(views.mean())
