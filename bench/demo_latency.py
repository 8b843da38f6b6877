"""Demo page latency against a bare model call, in one run, with the default model (EfficientNetB6, 448 px).

    python bench/demo_latency.py                 # random weights when none are trained
    python bench/demo_latency.py --weights weights/stage_7/best.weights.npz

p50 and p95 over --requests calls of the page through gradio_client, with and without TTA, and
the same statistics for Predictor.rank on the same photo in the same process; prints the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit import checkpoint, demo  # noqa: E402
from kit.backbones import build_model  # noqa: E402
from kit.config import PROFILES, SEED, STEPS, TTA_VIEWS, VAL_FRACTION  # noqa: E402
from kit.predict import LoadedModel, Predictor, load_model  # noqa: E402
from kit.records import RunConfig  # noqa: E402

SHARED_PHOTO = Path(__file__).resolve().parents[2] / "shared" / "competition" / "test_upload_sample" / "4052.jpg"


def default_model(size: int) -> LoadedModel:
    """The colab profile's model with random weights, saved and loaded as a real weights file."""
    profile = PROFILES["colab"]
    config = RunConfig("colab", profile.backbone, "none", profile.head.units, profile.head.dropout,
                       profile.head.bn_momentum, SEED, VAL_FRACTION)
    path = Path(tempfile.mkdtemp()) / "random.weights.npz"
    checkpoint.save(path, build_model(profile.backbone, size, len(config.classes), "none", profile.head),
                    {"stage": STEPS[-1], "image_size": size, "config": dataclasses.asdict(config)})
    return load_model(path)


def stats(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50)), float(np.percentile(seconds, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--tta-requests", type=int, default=None, help="default: --requests")
    parser.add_argument("--photo", type=Path, default=SHARED_PHOTO)
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    loaded = load_model(args.weights) if args.weights else default_model(448)
    print(f"model: {loaded.describe()}", flush=True)
    page = demo.build_demo(loaded, TTA_VIEWS)
    _, url, _ = demo.launch(page, port=None, block=False)
    client = Client(url, verbose=False)
    rows = []
    for tta, count in ((False, args.requests), (True, args.tta_requests or args.requests)):
        predictor = Predictor(loaded, TTA_VIEWS if tta else 1)
        predictor.rank(args.photo)  # warm-up: the first call traces the model
        client.predict(handle_file(str(args.photo)), tta, api_name="/classify")
        bare, served = [], []
        print(f"{'TTA' if tta else 'single view'}: {count} bare calls and {count} page requests ...", flush=True)
        for _ in range(count):
            started = time.perf_counter()
            predictor.rank(args.photo)
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.predict(handle_file(str(args.photo)), tta, api_name="/classify")
            served.append(time.perf_counter() - started)
        rows.append((f"TTA {TTA_VIEWS}" if tta else "single view", count, stats(bare), stats(served)))
    page.close()
    print(f"\nDemo latency, {loaded.describe()}, {os.cpu_count()} cores ({platform.machine()}), "
          f"{time.strftime('%Y-%m-%d')}")
    print("| mode | requests | bare p50 s | bare p95 s | page p50 s | page p95 s | page/bare (p50) |")
    print("|---|---|---|---|---|---|---|")
    for name, count, (b50, b95), (s50, s95) in rows:
        print(f"| {name} | {count} | {b50:.3f} | {b95:.3f} | {s50:.3f} | {s95:.3f} | {s50 / b50:.2f}x |")
    single, tta = rows[0], rows[1]
    print(f"TTA {TTA_VIEWS} / single view (page p50): {tta[3][0] / single[3][0]:.2f}x; "
          f"page overhead without TTA: {single[3][0] - single[2][0]:+.3f} s "
          f"({(single[3][0] / single[2][0] - 1) * 100:+.0f}%)")


if __name__ == "__main__":
    main()
