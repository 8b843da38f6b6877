"""Publish an exported model on Kaggle Models, with a model card: `python -m kit.export --publish kaggle:...`.

    python -m kit.export --publish kaggle:YOU/car-classifier/onnx/b6-seven-stages

The target names OWNER/MODEL/FRAMEWORK/VARIATION as Kaggle does (FRAMEWORK: onnx, keras, tfLite or
tensorFlow2, which picks the exported file). The model is created if it does not exist (private
unless --public), the variation likewise; an existing variation gets a new version. The upload
holds the exported file, model.json (classes in order, image size, the export's check) and
MODEL_CARD.md, which is also the variation's overview: the classes, validation and test metrics,
the backbone and its stages, the data it was trained on, and how to run it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from kit import __version__
from kit.cli import KitError
from kit.config import CACHE_SCALE, Workdir
from kit.dataset import is_verified, read_description
from kit.files import write_text
from kit.kaggle_api import KaggleClient, http_status, kaggle_errors
from kit.manifest import Manifest, status_table
from kit.predict import METADATA, LoadedModel

# Kaggle's framework names (as its CLI takes them) and the kit's export format each one holds.
FRAMEWORKS = {"onnx": "onnx", "keras": "keras", "tflite": "tflite", "tensorflow2": "savedmodel"}
CARD = "MODEL_CARD.md"
LICENSE = "Apache 2.0"  # EfficientNet's and Lite0's published weights are Apache-2.0


def parse_target(target: str) -> tuple[str, str, str, str]:
    """kaggle:OWNER/MODEL/FRAMEWORK/VARIATION -> its four parts, refusing anything else with the form it takes."""
    match = re.fullmatch(r"kaggle:([\w-]+)/([a-z0-9][a-z0-9-]*)/(\w+)/([a-z0-9][a-z0-9-]*)", target)
    if not match or match.group(3).lower() not in FRAMEWORKS:
        raise KitError(f"--publish {target!r} should be kaggle:OWNER/MODEL/FRAMEWORK/VARIATION, with FRAMEWORK one of "
                       f"{', '.join(FRAMEWORKS)} and lower-case slugs (e.g. kaggle:carfan/car-classifier/onnx/b6).")
    return match.group(1), match.group(2), match.group(3), match.group(4)


def format_for(target: str) -> str:
    """The export format the target's framework publishes."""
    return FRAMEWORKS[parse_target(target)[2].lower()]


def model_card(loaded: LoadedModel, workdir: Workdir, title: str) -> str:
    """What a stranger needs to trust and use the model, from the run's own records."""
    lines = [f"# {title}", "", f"An image classifier of {len(loaded.classes)} car models, {loaded.backbone} "
             f"trained in stages by car-kit {__version__} at {loaded.image_size} px "
             f"({'the final fit' if loaded.final_fit else f'stage {loaded.stage}'}).", "",
             "## Classes (the outputs, in order)", "",
             ", ".join(f"{k}: {name}" for k, name in enumerate(loaded.classes)),
             "", "## Metrics", "", "| set | images | accuracy, no TTA | accuracy, TTA |", "| --- | --- | --- | --- |"]
    metrics_file = workdir.report / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    for name in ("validation", "test"):
        scores = metrics.get(name, {})
        if scores:
            tta = [v for k, v in scores["accuracy"].items() if k != "no TTA"]
            plain = scores["accuracy"].get("no TTA", float("nan"))
            lines.append(f"| {name} | {scores.get('images', '')} | {plain:.4f} | {f'{tta[0]:.4f}' if tta else ''} |")
    if not metrics and loaded.val_accuracy is not None:
        lines.append(f"| validation | | {loaded.val_accuracy:.4f} | |")
    if loaded.final_fit:
        lines.append("\nThe final fit trained on the validation images too: its validation figure is not held out.")
    lines += ["", "## Training", ""]
    manifest = Manifest.read(workdir)
    if manifest.config:
        config = manifest.config
        lines.append(f"Backbone {config.get('backbone')}, starting weights {config.get('weights')}, seed "
                     f"{config.get('seed')}{', fold ' + config['fold'] if config.get('fold') else ''}.")
        stages = tuple(r.stage_plan.stage for _, r in sorted(manifest.stages.items()) if r.plan)
        lines += ["", "```", status_table(manifest, stages), "```"]
    lines += ["", "## Data", ""]
    if is_verified(workdir):
        description = read_description(workdir)
        lines.append(f"{sum(description.class_counts)} labelled photos from {description.origin} "
                     f"({description.source}, {description.layout}); per class: "
                     + ", ".join(f"{c} {n}" for c, n in zip(description.classes, description.class_counts)) + ".")
    lines += ["", "## How to run", "", usage(loaded)]
    return "\n".join(lines) + "\n"


def usage(loaded: LoadedModel) -> str:
    size, short = loaded.image_size, round(loaded.image_size * CACHE_SCALE)
    return f"""The files take uint8 RGB pixels, shape (N, {size}, {size}, 3), and give class probabilities; `{METADATA}`
names the classes in order. The kit's own view of a photo, which this reproduces exactly: the shorter side
shrunk to {short} (area interpolation), then the whole photo squashed to {size} x {size}.

```python
import json, cv2, numpy as np, onnxruntime as ort
meta = json.load(open("{METADATA}"))
session = ort.InferenceSession("model.onnx")
rgb = cv2.cvtColor(cv2.imread("car.jpg"), cv2.COLOR_BGR2RGB)
scale = min(1, {short} / min(rgb.shape[:2]))
rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
view = cv2.resize(rgb, ({size}, {size}), interpolation=cv2.INTER_AREA)
probs = session.run(None, {{session.get_inputs()[0].name: view[None]}})[0][0]
print(meta["classes"][int(probs.argmax())], float(probs.max()))
```

Or serve it with its page: `python -m kit.demo --model model.onnx` (the kit, no TensorFlow needed)."""


def upload_folder(export: Path, fmt: str, files: dict[str, str], card: str, folder: Path) -> Path:
    """The files Kaggle receives, in their own folder: the kaggle package uploads everything a folder holds."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    source = export / files[fmt]
    (shutil.copytree if source.is_dir() else shutil.copyfile)(source, folder / source.name)
    shutil.copyfile(export / METADATA, folder / METADATA)
    write_text(folder / CARD, card)
    return folder


def publish(api: KaggleClient, target: str, export: Path, files: dict[str, str], loaded: LoadedModel,
            workdir: Workdir, public: bool, notes: str) -> str:
    """Create the model and the variation where they do not exist, else a new version; the variation's URL."""
    owner, model, framework, variation = parse_target(target)
    title = model.replace("-", " ").capitalize()
    card = model_card(loaded, workdir, title)
    folder = upload_folder(export, format_for(target), files, card, export / "kaggle-model")
    slug = f"{owner}/{model}"
    with kaggle_errors("Publishing the model", model=slug):
        if not _exists(lambda: api.model_get(slug)):
            write_text(folder / "model-metadata.json", json.dumps({
                "ownerSlug": owner, "slug": model, "title": title, "isPrivate": not public,
                "subtitle": f"{len(loaded.classes)} car models, {loaded.backbone}", "description": card}, indent=1))
            _check(api.model_create_new(str(folder)), "creating the model")
        instance = f"{slug}/{framework}/{variation}"
        if _exists(lambda: api.model_instance_get(instance)):
            _check(api.model_instance_version_create(instance, str(folder), version_notes=notes, quiet=True,
                                                     dir_mode="zip"), "adding a version")
        else:
            write_text(folder / "model-instance-metadata.json", json.dumps({
                "ownerSlug": owner, "modelSlug": model, "instanceSlug": variation, "framework": framework,
                "overview": card, "usage": usage(loaded), "licenseName": LICENSE, "fineTunable": False,
                "trainingData": [_training_data(workdir)]}, indent=1))
            _check(api.model_instance_create(str(folder), quiet=True, dir_mode="zip"), "creating the variation")
    return f"https://www.kaggle.com/models/{slug}/{framework}/{variation}"


def _exists(get) -> bool:
    try:
        get()
    except Exception as error:  # the kaggle package raises requests' HTTPError
        if http_status(error) == 404:
            return False
        raise
    return True


def _check(response, what: str) -> None:
    if getattr(response, "error", None):
        raise KitError(f"Kaggle refused {what}: {response.error}.")


def _training_data(workdir: Workdir) -> str:
    if not is_verified(workdir):
        return ""
    description = read_description(workdir)
    if description.competition:
        return f"https://www.kaggle.com/competitions/{description.competition}"
    return description.origin
