"""A Gradio page that names the car model in a photo.

    python -m kit.demo                 # http://127.0.0.1:7860, best weights of the last finished stage
    python -m kit.demo --share         # plus a public *.gradio.live link (Colab)
    python -m kit.demo --model weights/export/model.onnx   # an export, on ONNX Runtime (no TensorFlow)

The page and `python -m kit.predict` share one Predictor: same decoding, same TTA, same model.
A photo unlike every training photo, or with no likely class, is answered "Not one of the N car
models it knows", with the closest ones below (kit.novelty; the API's label says the same).
With the kit's own weights it also shows where the model looked (Grad-CAM, kit.cam) once the
answer is on the page; an ONNX model has no gradients, so that part is left off.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import gradio as gr
import numpy as np

from kit.cli import add_workdir, main_guard
from kit.config import COMPETITION_CLASSES, TTA_VIEWS, Workdir
from kit.dataset import UnreadableImage, is_verified, load_resized, read_index
from kit.predict import LoadedModel, Predictor, add_model_options, learn_known, model_from_args

MAX_UPLOAD = "20mb"
TOP_CLASSES = 5
EXAMPLES = 10  # one photo per class, as many classes as that
SHOWN_SIDE = 384  # the heat map is drawn over the photo at least this size (shorter side), whatever the model's


def photo_input() -> gr.Image:
    """An image input whose uploads reach the kit's decoder as they are.

    gr.Image opens every upload with PIL before the function runs, so a broken file would fail
    inside Gradio with a bare library error; the kit's decoder explains it instead. (Wrapping the
    instance rather than subclassing: Gradio writes a .pyi stub beside any component subclass.)
    """
    image = gr.Image(type="filepath", sources=["upload", "webcam", "clipboard"], label="Photo")
    default = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return default(payload)

    image.preprocess = preprocess
    return image


def label_output() -> gr.Label:
    """The answer: Gradio's Label, which also takes {"headline": ..., "confidences": {...}} for a car it does
    not know (the headline replaces the top class's name). Wrapped, not subclassed, as photo_input is."""
    label = gr.Label(num_top_classes=TOP_CLASSES, label="Car model")
    default = label.postprocess

    def postprocess(value):
        if isinstance(value, dict) and "headline" in value:
            answer = default(value["confidences"])
            answer.label = value["headline"]
            return answer
        return default(value)

    label.postprocess = postprocess
    return label


def unknown_headline(classes: Sequence[str]) -> str:
    return f"Not one of the {len(classes)} car models it knows (the closest below)"


def build_demo(loaded: LoadedModel, tta: int = TTA_VIEWS, examples: Sequence[Path] = ()) -> gr.Blocks:
    """The page; the model is loaded once by the caller and shared by every request."""
    # One photo a request, one photo a forward pass: padded to a batch of 32 inputs it would cost 32 (TTA 10: 3) times.
    single, augmented = Predictor(loaded, 1, batch_views=1), Predictor(loaded, tta, batch_views=tta)

    def classify(photo: str | None, use_tta: bool) -> dict:
        """Top car models for the photo; a headline instead of the first where it is none of them."""
        if photo is None:
            raise gr.Error("Upload a photo of a car first.", print_exception=False)
        predictor = augmented if use_tta else single
        try:
            image = load_resized(photo, single.short_side)  # decoded once, for the answer and the novelty check
        except UnreadableImage as error:
            raise gr.Error(f"This file could not be read as a photo ({error}). Upload a JPEG, PNG or WebP "
                           "picture of a car.", print_exception=False) from None
        if loaded.known is None:
            probs, known = predictor.predict_views(predictor.views_of(image, "upload")), True
        else:  # kit.novelty, on the plain view of the same batch
            probs, features, plain, _ = predictor.describe_many([image], ["upload"])
            known = bool(loaded.known.is_known(features, plain)[0])
        confidences = dict(predictor.ranking(probs[0])[:TOP_CLASSES])
        return confidences if known else {"headline": unknown_headline(loaded.classes), "confidences": confidences}

    def explain(photo: str | None, show: bool) -> np.ndarray | None:
        """Where the model looked for the class it named: the heat map over the photo, the hottest region boxed."""
        from kit import cam  # late: Grad-CAM needs Keras, which an ONNX-served demo never loads

        if photo is None or not show:
            return None
        try:
            image = load_resized(photo, single.short_side)  # the pixels the prediction started from
            shown = load_resized(photo, max(single.short_side, SHOWN_SIDE))
        except UnreadableImage:
            return None  # classify has already said why
        return cam.overlay(shown, cam.explain(loaded, [image])[0])

    with gr.Blocks(title="Which car is it?") as demo:
        gr.Markdown(f"# Which car is it?\nDrop a photo of a car: {what_it_knows(loaded.classes)}\n\n"
                    f"**Model:** {loaded.describe()}")
        with gr.Row():
            with gr.Column():
                photo = photo_input()
                use_tta = gr.Checkbox(value=False,
                                      label=f"Test-time augmentation ({tta} views, slower, a bit more accurate)")
                show_cam = gr.Checkbox(value=loaded.has_gradients, visible=loaded.has_gradients,
                                       label="Show where the model looked (Grad-CAM)")
                button = gr.Button("Name the car", variant="primary")
            with gr.Column():
                label = label_output()
                heat = gr.Image(type="numpy", format="jpeg", label="Where the model looked (Grad-CAM)",
                                interactive=False, visible=loaded.has_gradients)
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[photo], label="Examples: one photo per class")
        for event, visibility in ((button.click, "public"), (photo.upload, "private")):
            answered = event(classify, inputs=[photo, use_tta], outputs=label, api_visibility=visibility)
            if loaded.has_gradients:  # after the answer, which is not kept waiting for the heat map
                answered.success(explain, inputs=[photo, show_cam], outputs=heat, api_visibility=visibility)
    return demo


def what_it_knows(classes: Sequence[str], shown: int = 12) -> str:
    """The page's one line on what the model can name, from the classes it was trained on."""
    if tuple(classes) == COMPETITION_CLASSES:
        return "a sale ad's Lada models, Ford Focus or VW Passat."
    names = ", ".join(classes[:shown])
    return f"one of {len(classes)} models ({names}{', ...' if len(classes) > shown else ''})."


def example_photos(workdir: Workdir, shown: int = EXAMPLES) -> list[Path]:
    """Photos to click: one per class from the labelled photos (test photos first), else a few test photos."""
    if not is_verified(workdir):
        return []
    index = read_index(workdir)
    labelled = index[index.Category.notna()].sort_values("subset", key=lambda s: s != "test", kind="stable")
    picked = (labelled.groupby("Category", sort=True).head(1).path if len(labelled)
              else index[index.subset == "test"].path)
    return [Path(p) for p in list(picked)[:shown] if Path(p).is_file()]


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           examples: Sequence[Path] = (), block: bool = True):
    """Queue with bounded concurrency; serve no files but the example photos."""
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
                       allowed_paths=[str(p) for p in examples], show_error=True, prevent_thread_lock=not block,
                       quiet=not block)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    add_model_options(parser, serving=True, precision=False)
    parser.add_argument("--share", action="store_true", help="also print a public gradio.live link")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (Docker)")
    parser.add_argument("--port", type=int, default=7860)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir, loaded = model_from_args(args)
    print(f"Model: {loaded.describe()}")
    if learn_known(workdir, loaded) is None:
        print("note: without the run's training photos (or an export made with them) the page cannot tell a car "
              "the model never saw; every photo gets one of its classes.")
    examples = example_photos(workdir)
    launch(build_demo(loaded, args.tta or 1, examples), args.host, args.port, args.share, examples)
    return 0


main = main_guard(main, sigterm=False)

if __name__ == "__main__":
    raise SystemExit(main())
