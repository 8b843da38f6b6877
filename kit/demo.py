"""A Gradio page that names the car model in a photo.

    python -m kit.demo                 # http://127.0.0.1:7860, best weights of the last finished stage
    python -m kit.demo --share         # plus a public *.gradio.live link (Colab)

The page and `python -m kit.predict` share one Predictor: same decoding, same TTA, same model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import gradio as gr

from kit.cli import add_workdir, main_guard
from kit.config import COMPETITION_CLASSES, TTA_VIEWS, Workdir
from kit.dataset import UnreadableImage
from kit.predict import LoadedModel, Predictor, add_model_options, model_from_args

MAX_UPLOAD = "20mb"
TOP_CLASSES = 5
EXAMPLES = 4


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


def build_demo(loaded: LoadedModel, tta: int = TTA_VIEWS, examples: Sequence[Path] = ()) -> gr.Blocks:
    """The page; the model is loaded once by the caller and shared by every request."""
    single, augmented = Predictor(loaded, 1), Predictor(loaded, tta)

    def classify(photo: str | None, use_tta: bool) -> dict[str, float]:
        """Top car models for the photo."""
        if photo is None:
            raise gr.Error("Upload a photo of a car first.", print_exception=False)
        try:
            ranked = (augmented if use_tta else single).rank(photo)
        except UnreadableImage as error:
            raise gr.Error(f"This file could not be read as a photo ({error}). Upload a JPEG, PNG or WebP "
                           "picture of a car.", print_exception=False) from None
        return dict(ranked[:TOP_CLASSES])

    with gr.Blocks(title="Which car is it?") as demo:
        gr.Markdown(f"# Which car is it?\nDrop a photo of a car: {what_it_knows(loaded.classes)}\n\n"
                    f"**Model:** {loaded.describe()}")
        with gr.Row():
            with gr.Column():
                photo = photo_input()
                use_tta = gr.Checkbox(value=False,
                                      label=f"Test-time augmentation ({tta} views, slower, a bit more accurate)")
                button = gr.Button("Name the car", variant="primary")
            label = gr.Label(num_top_classes=TOP_CLASSES, label="Car model")
        if examples:
            gr.Examples([[str(p), False] for p in examples], inputs=[photo, use_tta])
        button.click(classify, inputs=[photo, use_tta], outputs=label)
        photo.upload(classify, inputs=[photo, use_tta], outputs=label, api_visibility="private")
    return demo


def what_it_knows(classes: Sequence[str], shown: int = 12) -> str:
    """The page's one line on what the model can name, from the classes it was trained on."""
    if tuple(classes) == COMPETITION_CLASSES:
        return "a sale ad's Lada models, Ford Focus or VW Passat."
    names = ", ".join(classes[:shown])
    return f"one of {len(classes)} models ({names}{', ...' if len(classes) > shown else ''})."


def example_photos(workdir: Workdir) -> list[Path]:
    """A few of the dataset's test photos, when it has any (the page offers them to click)."""
    from kit.dataset import read_test
    from kit.download import is_verified

    if not is_verified(workdir):
        return []
    return [Path(p) for p in read_test(workdir).path[:EXAMPLES] if Path(p).is_file()]


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
    add_model_options(parser, serving=True)
    parser.add_argument("--share", action="store_true", help="also print a public gradio.live link")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (Docker)")
    parser.add_argument("--port", type=int, default=7860)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir, loaded = model_from_args(args)
    print(f"Model: {loaded.describe()}")
    examples = example_photos(workdir)
    launch(build_demo(loaded, args.tta or 1, examples), args.host, args.port, args.share, examples)
    return 0


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
