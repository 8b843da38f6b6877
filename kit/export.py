"""Export a trained model for serving: ONNX (ONNX Runtime, no TensorFlow needed), TFLite, Keras' own formats.

    python -m kit.export                              # the last finished stage: model.onnx and model.keras
    python -m kit.export --stage 7 --format onnx savedmodel tflite   # tflite: LiteRT, for phones and edge boxes
    python -m kit.demo --model <workdir>/weights/export/model.onnx   # serve it without TensorFlow
    python -m kit.export --publish kaggle:YOU/car-classifier/onnx/b6   # and put it on Kaggle Models, with a card

Files go to <workdir>/weights/export/ (or --out DIR). Every export takes what the kit's model
takes, uint8 RGB pixels (N, size, size, 3), and gives the class probabilities; model.json beside
them names the classes in order, the image size, backbone, stage, validation accuracy and kit
version. Before an export is kept it must give the Keras model's probabilities on real photos
(the dataset's test photos, or --photos DIR) to within 1e-4; otherwise it is removed and the
command fails, saying by how much they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from kit import __version__
from kit.cli import EXIT_DONE, KitError, add_workdir, main_guard
from kit.dataset import UnreadableImage, load_resized, read_test
from kit.files import atomic_path, write_text
from kit.kaggle_api import kaggle_api
from kit.layout import scan_folder
from kit.novelty import KNOWN
from kit.predict import (
    FEATURES_ONNX,
    METADATA,
    LoadedModel,
    OnnxModel,
    Predictor,
    add_model_options,
    learn_known,
    model_from_args,
)
from kit.publish import format_for, publish

FORMATS = {"onnx": "model.onnx", "keras": "model.keras", "savedmodel": "savedmodel", "tflite": "model.tflite"}
DEFAULT_FORMATS = ("onnx", "keras")
TOLERANCE = 1e-4  # largest difference of any probability between the Keras model and an export
CHECK_PHOTOS = 16


def check_views(loaded: LoadedModel, photos: Sequence[Path]) -> np.ndarray:
    """The photos as the model sees them without TTA: uint8, (N, size, size, 3)."""
    predictor, views = Predictor(loaded, tta=1), []
    for path in photos:
        try:
            image = load_resized(path, predictor.short_side)
        except UnreadableImage:
            continue
        views.append(predictor.views_of(image, str(path)))
    if not views:
        raise KitError("No readable photo to check the export with: give a folder of photos with --photos DIR.")
    return np.concatenate(views)


def write_format(model, fmt: str, path: Path) -> None:
    """One format, written to a temporary name and renamed, so a failed export leaves nothing half-made."""
    if fmt == "savedmodel":
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return
    with atomic_path(path) as tmp:
        target = tmp.with_suffix(path.suffix)  # Keras picks the format by the name's suffix
        if fmt in ("onnx", "tflite"):
            model.export(str(target), format="litert" if fmt == "tflite" else "onnx", verbose=False)
        else:
            model.save(str(target))
        target.replace(tmp)


def exported_probabilities(fmt: str, path: Path, views: np.ndarray) -> np.ndarray:
    """Run the exported file itself, through the runtime that will serve it."""
    if fmt == "onnx":
        return OnnxModel(path).predict_on_batch(views)
    if fmt == "keras":
        import keras

        return np.asarray(keras.saving.load_model(path, compile=False).predict_on_batch(views))
    if fmt == "tflite":
        return litert_probabilities(path, views)
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # kept referenced while it runs: it owns the variables
    return np.asarray(loaded.serve(tf.constant(views)))


def litert_probabilities(path: Path, views: np.ndarray) -> np.ndarray:
    """A .tflite file on LiteRT's interpreter (ai-edge-litert, which replaces tf.lite's), batch resized to fit."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    source, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], views.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], np.ascontiguousarray(views, np.uint8))
    interpreter.invoke()
    return interpreter.get_tensor(output["index"])


def constant_normalization(model) -> None:
    """Keras' Normalization layers (keras-efficientnet*) with their mean and variance as constants of the graph.

    The layer computes them from its variables as tensors, which a traced graph captures; tf2onnx leaves such
    captures as inputs of the ONNX graph, which ONNX Runtime then demands. As numpy arrays they are folded in.
    """
    import keras

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Normalization) and layer.mean is not None:
            layer.mean, layer.variance = (keras.ops.convert_to_numpy(v) for v in (layer.mean, layer.variance))


def remove_leftovers(folder: Path) -> None:
    """A killed export's temporary files and folders (.model.onnx.*.tmp, .savedmodel.tmp): never read, only in the
    way."""
    for name in (*FORMATS.values(), FEATURES_ONNX):
        for leftover in folder.glob(f".{name}.*"):
            _remove(leftover)


def export(loaded: LoadedModel, folder: Path, formats: Sequence[str], photos: Sequence[Path]) -> dict[str, float]:
    """Write each format and check it against the Keras model; returns each format's largest difference."""
    views = check_views(loaded, photos)
    expected = np.asarray(loaded.model.predict_on_batch(views), np.float64)  # also builds what export traces
    constant_normalization(loaded.model)
    remove_leftovers(folder)
    differences = {}
    for fmt in formats:
        path = folder / FORMATS[fmt]
        write_format(loaded.model, fmt, path)
        try:
            difference = float(np.abs(exported_probabilities(fmt, path, views) - expected).max())
        except Exception as error:  # the runtime refuses the file: nothing usable was written
            _remove(path)
            raise KitError(f"The {fmt} export of {loaded.backbone} does not run in its own runtime ("
                           f"{str(error).splitlines()[0][:300]}), so it was removed. Export another format "
                           "(--format).") from None
        differences[fmt] = difference
        if not difference <= TOLERANCE:
            _remove(path)
            raise KitError(f"The {fmt} export differs from the Keras model by up to {difference:.2g} in a probability "
                           f"on {len(views)} photos (allowed: {TOLERANCE:g}), so it was removed. Export another format "
                           "(--format).")
    if "onnx" in formats and loaded.known is not None:
        export_features(loaded, folder, views)
    write_text(folder / METADATA, json.dumps(metadata(loaded, formats, differences, len(views)), indent=2,
                                             ensure_ascii=False))
    return differences


def export_features(loaded: LoadedModel, folder: Path, views: np.ndarray) -> None:
    """features.onnx and known.npz beside model.onnx, so the ONNX demo also tells a car the model never saw
    (kit.novelty); checked like the model, relative to the features' scale."""
    path = folder / FEATURES_ONNX
    expected = np.asarray(loaded.features.predict_on_batch(views), np.float64)
    write_format(loaded.features, "onnx", path)
    difference = float(np.abs(OnnxModel(path).predict_on_batch(views) - expected).max())
    if not difference <= TOLERANCE * max(1.0, float(np.abs(expected).max())):
        _remove(path)
        raise KitError(f"The ONNX export of the model's features differs from Keras' by up to {difference:.2g} on "
                       f"{len(views)} photos, so it was removed.")
    loaded.known.save(folder / KNOWN)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def metadata(loaded: LoadedModel, formats: Sequence[str], differences: dict[str, float], checked: int) -> dict:
    """What a server needs besides the file: the outputs' names and the input's size and form."""
    return {"classes": list(loaded.classes), "image_size": loaded.image_size,
            "input": "uint8 RGB pixels, shape (N, image_size, image_size, 3)", "output": "class probabilities",
            "backbone": loaded.backbone, "stage": loaded.stage, "final_fit": loaded.final_fit,
            "val_accuracy": loaded.val_accuracy, "weights": str(loaded.source), "kit_version": __version__,
            "files": {fmt: FORMATS[fmt] for fmt in formats},
            "unknown_cars": ({**loaded.known.describe(), "features": FEATURES_ONNX}
                             if "onnx" in formats and loaded.known is not None else None),
            "check": {"photos": checked, "max_abs_difference": differences, "tolerance": TOLERANCE}}


def photos_to_check(workdir, photos_dir: Path | None) -> list[Path]:
    if photos_dir is not None:
        if not Path(photos_dir).is_dir():
            raise KitError(f"--photos {photos_dir} is not a folder of photos.")
        return scan_folder(Path(photos_dir)).paths[:CHECK_PHOTOS]
    return [Path(p) for p in read_test(workdir).path[:CHECK_PHOTOS]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    add_model_options(parser, precision=False)  # float32 whatever the machine: the file is served on CPUs
    parser.add_argument("--format", nargs="+", choices=sorted(FORMATS), default=list(DEFAULT_FORMATS),
                        help=f"what to write (default: {' '.join(DEFAULT_FORMATS)})")
    parser.add_argument("--out", type=Path, help="folder to write to (default: <workdir>/weights/export)")
    parser.add_argument("--photos", type=Path, help="photos to check the export on (default: the dataset's test "
                                                    f"photos, the first {CHECK_PHOTOS})")
    parser.add_argument("--publish", metavar="kaggle:OWNER/MODEL/FRAMEWORK/VARIATION",
                        help="then upload it to Kaggle Models with a model card (FRAMEWORK: onnx, keras, tfLite, "
                             "tensorFlow2); a variation that exists gets a new version")
    parser.add_argument("--public", action="store_true", help="a new model is public (default private)")
    parser.add_argument("--notes", default="", help="the new version's notes (--publish)")
    return parser


def under_tensorflow(argv: Sequence[str] | None) -> None:
    """Become the same command under TensorFlow: the converters (tf2onnx, SavedModel, LiteRT) are TensorFlow's, and a
    checkpoint is the same model on every backend. The process is replaced, so its signals and exit code are the
    export's own."""
    print(f"kit.export converts under TensorFlow (Keras on {os.environ.get('KERAS_BACKEND', 'another backend')} "
          "here); the weights are the same on every backend.", flush=True)
    command = [sys.executable, "-m", "kit.export", *(sys.argv[1:] if argv is None else argv)]
    os.execve(sys.executable, command, {**os.environ, "KERAS_BACKEND": "tensorflow"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import keras  # late, as everywhere: the backend is known only once Keras is imported

    if keras.backend.backend() != "tensorflow":
        under_tensorflow(argv)
    formats = list(dict.fromkeys([*args.format, *([format_for(args.publish)] if args.publish else [])]))
    api = kaggle_api() if args.publish else None  # credentials checked before the export, not after
    workdir, loaded = model_from_args(args)
    folder = args.out or workdir.weights / "export"
    print(f"Model: {loaded.describe()}")
    learn_known(workdir, loaded)
    differences = export(loaded, folder, formats, photos_to_check(workdir, args.photos))
    for fmt, difference in differences.items():
        print(f"{fmt}: {folder / FORMATS[fmt]} (max difference from Keras {difference:.1e})")
    print(f"{folder / METADATA}: classes, image size, backbone, stage, the check.")
    if "onnx" in formats:
        print(f"Serve it without TensorFlow: 'python -m kit.demo --model {folder / FORMATS['onnx']}'")
    if args.publish:
        url = publish(api, args.publish, folder, FORMATS, loaded, workdir, args.public, args.notes)
        print(f"Published on Kaggle Models: {url} (its card: {folder / 'kaggle-model' / 'MODEL_CARD.md'})")
    return EXIT_DONE


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
