"""Training throughput and peak memory, configuration against configuration, in one run of this script.

    python bench/train_speed.py                                   # this CPU: jit, backend, devices
    python bench/train_speed.py --backbone keras-efficientnetb6 --size 448 --batch 16 \\
        --configs jax/auto/1/mixed_bfloat16 jax/auto/1/float32     # a GPU: precision at stage 5's size

Each configuration (backend/jit/devices/precision) runs in its own process, because the backend
and the device count are fixed when a process starts; each trains the kit's model (all layers
trainable, Adam) on one batch size and reports images per second fed two ways: (a) by the kit's
real pipeline (cache, seeded augmentation on worker threads, as `kit.stage` trains) and (b) by the
same batch already on the device, which is the ceiling the pipeline is measured against. The table
ends with each configuration's ratio to the first one (the baseline), measured in this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIGS = ("tensorflow/auto/1/float32", "tensorflow/off/1/float32", "jax/auto/1/float32",
               "tensorflow/auto/2/float32", "jax/auto/2/float32")


def child(config: dict) -> dict:
    """One configuration, in this process: build, warm up, then time both feeds."""
    sys.path.insert(0, str(ROOT))
    from kit.devices import Parallel, jit_compile, request_cpu_devices

    request_cpu_devices(config["devices"])
    import keras
    import numpy as np

    from kit.augment import train_transform
    from kit.backbones import build_model, set_trainable
    from kit.config import COMPETITION_CLASSES, PROFILES, Workdir
    from kit.dataset import load_split
    from kit.pipeline import Batches, open_training_cache
    from kit.synthetic import write_synthetic

    keras.mixed_precision.set_global_policy(config["precision"])
    classes, batch, size = len(COMPETITION_CLASSES), config["batch"], config["size"]
    parallel = Parallel.over(config["devices"])
    with parallel.scope():
        model = build_model(config["backbone"], size, classes, "none", PROFILES["colab"].head)
        set_trainable(model, 1.0)
        parallel.prepare(model)
        model.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy", jit_compile=jit_compile(config["jit"]))
        parallel.build_compiled(model, classes)

    workdir = Workdir(Path(tempfile.mkdtemp()))
    write_synthetic(workdir, per_class=max(4, batch * (config["steps"] + 2) // classes + 1), test=0,
                    size=(size * 4 // 3, size))
    split = load_split(workdir, 0.1, 42)
    cache, positions = open_training_cache(workdir.cache, split, size, config["workers"])
    batches = Batches(cache, split.train.Category.to_numpy(), batch, lambda: train_transform(size), 42, 1,
                      shuffle=True, workers=config["workers"], positions=split.train.path.map(positions).to_numpy())
    eye = np.eye(classes, dtype="float32")

    def step(x, y):
        model.train_on_batch(*parallel.split(x, eye[y]))

    x, y = batches.batch(0, 0)
    for _ in range(config["warmup"]):  # compilation, and the allocator settling
        step(x, y)
    # On one device the batch is a backend tensor already; several take numpy shares (the split slices them).
    on_device = (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(eye[y])) if parallel.count == 1 else None
    started = time.perf_counter()
    for _ in range(config["steps"]):
        if on_device is None:
            step(x, y)
        else:
            model.train_on_batch(*on_device)
    memory_rate = config["steps"] * batch / (time.perf_counter() - started)
    started, done = time.perf_counter(), 0
    for x, y in batches.epoch(1):
        step(x, y)
        done += 1
        if done == config["steps"]:
            break
    pipeline_rate = done * batch / (time.perf_counter() - started)
    return {**config, "memory_images_s": memory_rate, "pipeline_images_s": pipeline_rate, "steps_timed": done,
            "jit_used": bool(model.jit_compile), "peak_memory_mb": peak_memory_mb(), "device": parallel.describe()}


def peak_memory_mb() -> float:
    """The accelerator's peak where the backend reports one, else this process's peak resident memory."""
    import keras

    try:
        if keras.backend.backend() == "jax":
            import jax

            stats = jax.devices()[0].memory_stats()
            if stats and "peak_bytes_in_use" in stats:
                return stats["peak_bytes_in_use"] / 2**20
        elif keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    except (RuntimeError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse(spec: str, args: argparse.Namespace) -> dict:
    backend, jit, devices, precision = spec.split("/")
    return {"backend": backend, "jit": jit, "devices": int(devices), "precision": precision,
            "backbone": args.backbone, "size": args.size, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "workers": args.workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="keras-efficientnetb0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16, help="the global batch (split over the devices)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per feed")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CPU_CONFIGS), metavar="BACKEND/JIT/DEVICES/PRECISION")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    rows = []
    for spec in args.configs:
        config = parse(spec, args)
        env = {**os.environ, "KERAS_BACKEND": config["backend"], "TF_CPP_MIN_LOG_LEVEL": "3",
               "NO_ALBUMENTATIONS_UPDATE": "1"}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], env=env,
                              capture_output=True, text=True)
        result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            print(f"{spec}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(result)
        print(f"{spec}: {result['memory_images_s']:.1f} images/s in memory, {result['pipeline_images_s']:.1f} "
              "through the pipeline", flush=True)
    if not rows:
        raise SystemExit("no configuration ran")
    base = rows[0]
    print(f"\n{args.backbone} at {args.size} px, global batch {args.batch}, {args.steps} timed steps per feed, "
          f"{os.cpu_count()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}; baseline: the first row")
    print("| backend | jit | devices | precision | XLA used | in memory, images/s | pipeline, images/s "
          "| pipeline / memory | peak memory MB | in memory vs baseline | pipeline vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['jit']} | {r['devices']} | {r['precision']} | {'yes' if r['jit_used'] else 'no'} "
              f"| {r['memory_images_s']:.1f} | {r['pipeline_images_s']:.1f} "
              f"| {r['pipeline_images_s'] / r['memory_images_s']:.2f} | {r['peak_memory_mb']:.0f} "
              f"| {r['memory_images_s'] / base['memory_images_s']:.2f}x "
              f"| {r['pipeline_images_s'] / base['pipeline_images_s']:.2f}x |")


if __name__ == "__main__":
    main()
