"""Test-set prediction throughput with TTA, through the kit's own Predictor, and its projection to the real test set.

    python bench/predict_speed.py                                       # this CPU: tiny sizes
    python bench/predict_speed.py --backbone keras-efficientnetb6 --size 448 --images 600 \\
        --precisions mixed_bfloat16 float32 --batch-views 32 128        # a GPU: stage 5's size

Each precision runs in its own process (the policy is fixed when the model is built). There, a
model with random weights predicts synthetic test photos from the kit's image cache exactly as
`python -m kit.predict` does (TTA views drawn on worker threads, whole images' views per forward
pass), once per --batch-views, after a warm-up that compiles; the ceiling beside it is the same
forward pass on views already prepared. The table gives images and views per second, the ratio
to the first row, and the projected time for the competition's 6,675 test images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEST_IMAGES = 6_675  # the competition's test set


def child(config: dict) -> list[dict]:
    """One precision: build once, then time the Predictor at each views-per-batch setting."""
    import keras
    import numpy as np

    from kit.backbones import build_model
    from kit.config import COMPETITION_CLASSES, PROFILES, Workdir
    from kit.dataset import read_test
    from kit.devices import describe_device
    from kit.pipeline import open_cache
    from kit.predict import LoadedModel, Predictor
    from kit.synthetic import write_synthetic

    keras.mixed_precision.set_global_policy(config["precision"])
    size, tta = config["size"], config["tta"]
    model = build_model(config["backbone"], size, len(COMPETITION_CLASSES), "none", PROFILES["colab"].head)
    loaded = LoadedModel(model, config["backbone"], None, size, None, Path("random"), COMPETITION_CLASSES)
    workdir = Workdir(Path(tempfile.mkdtemp()))
    write_synthetic(workdir, per_class=1, test=config["images"], size=(size * 4 // 3, size))
    test = read_test(workdir)
    cache = open_cache(workdir.cache, "test", list(test.path), size, config["workers"], progress=False)
    keys = list(test.Id)
    rows = []
    for batch_views in config["batch_views"]:
        predictor = Predictor(loaded, tta, workers=config["workers"], batch_views=batch_views)
        per_chunk = max(1, batch_views // predictor.views)  # whole images per forward pass
        per_forward = per_chunk * predictor.views
        warm = 2 * per_chunk + len(keys) % per_chunk  # the shapes the timed run meets, compiled before it
        started = time.perf_counter()
        predictor.predict_many(cache, keys[:warm], progress=False)
        setup = time.perf_counter() - started
        started = time.perf_counter()
        predictor.predict_many(cache, keys, progress=False)
        rate = len(keys) / (time.perf_counter() - started)
        views = np.concatenate([predictor.views_of(cache[i], keys[i]) for i in range(per_chunk)])
        predictor.predict_views(views)
        started, repeats = time.perf_counter(), max(3, len(keys) * predictor.views // per_forward // 2)
        for _ in range(repeats):
            predictor.predict_views(views)
        ceiling = repeats * per_chunk / (time.perf_counter() - started)
        rows.append({**config, "batch_views": per_forward, "images_s": rate, "ceiling_images_s": ceiling,
                     "setup_s": setup, "device_name": describe_device()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="keras-efficientnetb0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--tta", type=int, default=10)
    parser.add_argument("--images", type=int, default=60, help="synthetic test photos predicted per setting")
    parser.add_argument("--precisions", nargs="+", default=["float32"])
    parser.add_argument("--batch-views", type=int, nargs="+", default=[32], help="model inputs per forward pass")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--results", type=Path, help="append each row to this file as a line of JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    rows = []
    for precision in args.precisions:
        config = {"backbone": args.backbone, "size": args.size, "tta": args.tta, "images": args.images,
                  "precision": precision, "batch_views": args.batch_views, "workers": args.workers}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "NO_ALBUMENTATIONS_UPDATE": "1"}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], env=env,
                              capture_output=True, text=True)
        result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            print(f"{precision}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        rows += result
        if args.results:
            with args.results.open("a") as out:
                out.writelines(json.dumps(row) + "\n" for row in result)
    if not rows:
        raise SystemExit("no configuration ran")
    base = rows[0]
    print(f"\n{args.backbone} at {args.size} px, TTA {args.tta}, {args.images} synthetic test photos, "
          f"{args.workers} workers, on {base['device_name']} ({os.cpu_count()} cores, {platform.machine()}), "
          f"backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}, {time.strftime('%Y-%m-%d')}; "
          "baseline: the first row")
    print("| precision | views per forward | images/s | views/s | ceiling images/s | kit / ceiling | set-up s "
          f"| {TEST_IMAGES:,} test images | vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['batch_views']} | {r['images_s']:.1f} | {r['images_s'] * r['tta']:.0f} "
              f"| {r['ceiling_images_s']:.1f} | {r['images_s'] / r['ceiling_images_s']:.2f} | {r['setup_s']:.0f} "
              f"| {TEST_IMAGES / r['images_s'] / 60:.1f} min | {r['images_s'] / base['images_s']:.2f}x |")


if __name__ == "__main__":
    main()
