"""The backbone registry: preprocessing per entry, whole-block unfreezing, frozen BatchNorm, offline weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kit.backbones import BACKBONES, backbone_blocks, build_model, pixel_affine, set_trainable
from kit.cli import KitError


def test_registry_has_the_families_the_kit_promises():
    for name in ("efficientnet-b0", "efficientnet-b6", "efficientnet-b7", "keras-efficientnetb6",
                 "keras-efficientnetv2s", "resnet50", "seresnext50", "efficientnet-lite0", "efficientnet-lite2",
                 "tiny-cnn"):
        assert name in BACKBONES


def test_each_backbone_gets_its_own_preprocessing():
    torch_style = pixel_affine(BACKBONES["efficientnet-b0"].preprocess)
    np.testing.assert_allclose(np.diag(torch_style[0]), 1 / (255 * np.array([0.229, 0.224, 0.225])), rtol=1e-5)
    np.testing.assert_allclose(torch_style[1], -np.array([0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-5)
    raw = pixel_affine(BACKBONES["keras-efficientnetb0"].preprocess)  # rescales inside the model itself
    np.testing.assert_allclose(raw[0], np.eye(3)) and np.testing.assert_allclose(raw[1], 0)


def test_efficientnet_unfreezes_whole_blocks_from_the_top_with_batchnorm_frozen():
    model = build_model("efficientnet-b0", 64, 10, "none")
    base = model.get_layer("backbone")
    blocks = backbone_blocks(base)
    names = [block[0].name.split("_")[0] for block in blocks]
    assert names[0] == "stem" and names[-1] == "top" and names[1:3] == ["block1a", "block2a"]
    count = set_trainable(model, 0.5)
    assert count == -(-len(blocks) // 2)
    for index, block in enumerate(blocks):
        for layer in block:
            unfrozen = index >= len(blocks) - count
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            assert layer.trainable == (unfrozen and not is_bn), layer.name
    trainable_blocks = {layer.name.split("_")[0] for layer in base.layers if layer.trainable and layer.weights}
    assert all(any(n == b for b in names[-count:]) for n in trainable_blocks)  # never half a block
    set_trainable(model, 1.0)
    assert all(layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))
    set_trainable(model, 0.0)
    assert model.get_layer("head_dense").trainable
    assert not any(layer.trainable for layer in base.layers if layer.weights)


def test_batchnorm_frozen_keeps_the_backbones_statistics_once_everything_is_unfrozen():
    model = build_model("efficientnet-lite0", 64, 3, "none")
    base = model.get_layer("backbone")
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    set_trainable(model, 1.0, "frozen")
    assert norms and not any(layer.trainable for layer in norms)
    assert all(layer.trainable for layer in base.layers if layer.weights and layer not in norms)
    assert model.get_layer("head_bn").trainable  # the new head learns its own statistics
    set_trainable(model, 1.0, "train")
    assert all(layer.trainable for layer in norms)


def test_residual_networks_split_at_adds():
    model = build_model("resnet18", 64, 10, "none")
    blocks = backbone_blocks(model.get_layer("backbone"))
    assert all(isinstance(block[-1], keras.layers.Add) for block in blocks[:-1]) and len(blocks) == 9


def test_offline_weights_name_the_file_and_where_to_put_it(monkeypatch):
    from keras.src.utils import file_utils

    def offline(fname, origin=None, **kwargs):  # what keras raises with no network
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    expected = r"efficientnetb0_notop\.h5.*~/.keras/models/efficientnetb0_notop\.h5.*--weights PATH"
    with pytest.raises(KitError, match=expected):
        build_model("keras-efficientnetb0", 64, 10, "imagenet")


def test_unknown_backbone_and_bad_weights_are_explained():
    with pytest.raises(KitError, match="Unknown backbone 'effnet'"):
        build_model("effnet", 64, 10)
    with pytest.raises(KitError, match="neither a file nor"):
        build_model("efficientnet-b0", 64, 10, "imagenet21k")
