"""Training throughput and peak memory, configuration against configuration, in one run of this script.

    python bench/train_speed.py                                   # this CPU: jit, backend, devices
    python bench/train_speed.py --backbone tiny-cnn --size 64 --batch 4 --configs jax/auto/1/float32 \
        tensorflow/auto/1/float32                                 # where per-step overhead shows
    python bench/train_speed.py --backbone keras-efficientnetb6 --stages 4 5 \\
        --configs jax/auto/1/mixed_bfloat16 jax/auto/1/float32     # a GPU: the recipe's stage 4 and 5 settings
    python bench/train_speed.py --backbone keras-efficientnetb6 --stages 1 2 3 4 5 \\
        --configs jax/auto/1/mixed_bfloat16 --project             # + the seven stages' wall time, projected

Each configuration (backend/jit/devices/precision) runs in its own process, because the backend
and the device count are fixed when a process starts; each trains the kit's model with Adam and
reports images per second fed two ways: (a) by the kit's real pipeline (cache, seeded augmentation
on worker threads, as `kit.stage` trains) and (b) by the same batch already on the device, which is
the ceiling the pipeline is measured against. Both feed the kit's step (kit.train_step); in
memory, `train_on_batch` (the loop's step before it, its loss read each step) takes turns with it
on the same model and batch, and the table gives their ratio. It also times validation (the kit's predict over
batches of twice the stage's batch, as each epoch ends) and the set-up (the first training and
validation steps, which compile). `--stages` takes image size, batch, unfrozen share and
augmentation from the recipe's stage table; `--batch` overrides the batch (the largest that fits).
The table ends with each row's ratio to the first one (the baseline), measured in this same run.

`--project` turns the rows into the wall time of the whole recipe on the full competition data
(stages 6 and 7 have stage 5's settings): each stage's epochs x (training images / pipeline rate +
validation images / validation rate) + its set-up. It leaves out what the benchmark does not
run: building the image caches, checkpoints (a few seconds each) and an early stop.
"""

from __future__ import annotations

import argparse
import faulthandler
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
sys.path.insert(0, str(ROOT))

from kit.config import COLAB_STAGES, PROFILES, stage_of  # noqa: E402  (light: starts no backend)

CPU_CONFIGS = ("tensorflow/auto/1/float32", "tensorflow/off/1/float32", "jax/auto/1/float32",
               "tensorflow/auto/2/float32", "jax/auto/2/float32")
# The full competition data, as the recipe splits it (kit.dataset, 20% validation, a few unreadable photos dropped).
TRAIN_IMAGES, VAL_IMAGES = 12_452, 3_109
ROUNDS = 3  # in-memory rounds per step kind; the median round counts


def child(config: dict) -> dict:
    """One configuration, in this process: build, warm up, then time both feeds and validation."""
    from kit.devices import Parallel, describe_device, jit_compile, request_cpu_devices

    request_cpu_devices(config["devices"])
    import keras
    import numpy as np

    from kit.augment import plain_transform, train_transform
    from kit.backbones import build_model, set_trainable
    from kit.config import COMPETITION_CLASSES, PROFILES, Workdir
    from kit.dataset import load_split
    from kit.pipeline import Batches, open_training_cache
    from kit.synthetic import write_synthetic
    from kit.train_step import TrainStep

    keras.mixed_precision.set_global_policy(config["precision"])
    classes, batch, size, steps = len(COMPETITION_CLASSES), config["batch"], config["size"], config["steps"]
    parallel = Parallel.over(config["devices"])
    with parallel.scope():
        model = build_model(config["backbone"], size, classes, "none", PROFILES["colab"].head)
        set_trainable(model, config["trainable"])
        parallel.prepare(model)
        model.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy", metrics=["categorical_accuracy"],
                      jit_compile=jit_compile(config["jit"]))
        parallel.build_compiled(model, classes)

    workdir = Workdir(Path(tempfile.mkdtemp()))
    write_synthetic(workdir, per_class=max(4, batch * (steps + 2) // classes + 1), test=0,
                    size=(size * 4 // 3, size))
    split = load_split(workdir, 0.1, 42)
    cache, positions = open_training_cache(workdir.cache, split, size, config["workers"])
    batches = Batches(cache, split.train.Category.to_numpy(), batch,
                      lambda: train_transform(size, config["light_augment"]), 42, 1, shuffle=True,
                      workers=config["workers"], positions=split.train.path.map(positions).to_numpy())
    eye = np.eye(classes, dtype="float32")
    kit_step = TrainStep(model, parallel)

    x, y = batches.batch(0, 0)
    started = time.perf_counter()
    kit_step.run(x, eye[y])
    kit_step.sync()  # compiled, and finished
    train_setup = time.perf_counter() - started
    for _ in range(config["warmup"]):  # the allocator and autotuning settling
        kit_step.run(x, eye[y])
    kit_step.sync()
    model.train_on_batch(*parallel.split(x, eye[y]))  # train_on_batch compiles its own program (JAX)

    # In memory: the same batch, already a backend tensor on one device (several take numpy shares). The kit's
    # step and train_on_batch take turns in rounds, so a slow spell of the machine hits both alike.
    on_device = (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(eye[y])) if parallel.count == 1 else None
    batch_in_memory = on_device or (x, eye[y])
    kit_s, keras_s = [], []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(steps):
            kit_step.run(*batch_in_memory)
        kit_step.sync()
        kit_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(steps):
            model.reset_metrics()
            float(model.train_on_batch(*(on_device or parallel.split(x, eye[y])))[0])  # as the loop used it
        keras_s.append(time.perf_counter() - started)
    memory_rate, keras_rate = (steps * batch / float(np.median(t)) for t in (kit_s, keras_s))
    started, done = time.perf_counter(), 0
    for x, y in batches.epoch(1):
        kit_step.run(x, eye[y])
        done += 1
        if done == steps:
            break
    kit_step.sync()
    pipeline_rate = done * batch / (time.perf_counter() - started)

    # Validation as kit.training.evaluate runs it: unaugmented batches of twice the stage's batch, from numpy.
    plain = plain_transform(size)
    views = np.stack([plain(image=cache[i % len(cache)])["image"] for i in range(2 * batch)])
    started = time.perf_counter()
    parallel.predict(model, views)  # compiles
    val_setup = time.perf_counter() - started
    parallel.predict(model, views)
    started = time.perf_counter()
    for _ in range(steps):
        parallel.predict(model, views)
    val_rate = steps * 2 * batch / (time.perf_counter() - started)
    return {**config, "memory_images_s": memory_rate, "train_on_batch_images_s": keras_rate,
            "pipeline_images_s": pipeline_rate, "steps_timed": done,
            "val_images_s": val_rate, "setup_s": train_setup + val_setup, "jit_used": bool(model.jit_compile),
            "peak_memory_mb": peak_memory_mb(), "device": parallel.describe(), "device_name": describe_device()}


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


def parse(spec: str, args: argparse.Namespace, step: int | None) -> dict:
    """A configuration: the spec's backend/jit/devices/precision, the image settings of a stage or the flags."""
    backend, jit, devices, precision = spec.split("/")
    stage = stage_of(PROFILES["colab"], step) if step else None
    return {"backend": backend, "jit": jit, "devices": int(devices), "precision": precision, "stage": step,
            "backbone": args.backbone, "size": stage.image_size if stage else args.size,
            "batch": args.batch or (stage.batch_size if stage else 16),
            "trainable": stage.trainable if stage else 1.0, "light_augment": stage.light_augment if stage else False,
            "steps": args.steps, "warmup": args.warmup, "workers": args.workers}


def run_child(config: dict, timeout: float) -> dict | None:
    env = {**os.environ, "KERAS_BACKEND": config["backend"], "TF_CPP_MIN_LOG_LEVEL": "3",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    try:
        command = [sys.executable, __file__, "--child", json.dumps(config), "--timeout", str(timeout)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:  # the child's stack, dumped just before, says where it was
        print(f"{describe(config)}: gave up after {timeout:.0f} s\n{(stopped.stderr or '')[-3000:]}", file=sys.stderr)
        return None
    result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        print(f"{describe(config)}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
    return result


def describe(config: dict) -> str:
    stage = f"stage {config['stage']} " if config["stage"] else ""
    return (f"{stage}{config['backend']}/{config['jit']}/{config['devices']}/{config['precision']} "
            f"{config['size']} px batch {config['batch']}")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    base = rows[0]
    print(f"\n{args.backbone}, {args.steps} timed steps per feed, on {rows[0]['device_name']} "
          f"({os.cpu_count()} cores, {platform.machine()}), {time.strftime('%Y-%m-%d')}; baseline: the first row")
    print("| stage | px | batch | backend | jit | devices | precision | XLA | in memory img/s "
          "| train_on_batch img/s | kit step / train_on_batch | pipeline img/s "
          "| pipeline / memory | validation img/s | set-up s | peak memory MB | memory vs baseline "
          "| pipeline vs baseline |")
    print("|" + "---|" * 18)
    for r in rows:
        print(f"| {r['stage'] or '-'} | {r['size']} | {r['batch']} | {r['backend']} | {r['jit']} | {r['devices']} "
              f"| {r['precision']} | {'yes' if r['jit_used'] else 'no'} | {r['memory_images_s']:.1f} "
              f"| {r['train_on_batch_images_s']:.1f} | {r['memory_images_s'] / r['train_on_batch_images_s']:.2f}x "
              f"| {r['pipeline_images_s']:.1f} | {r['pipeline_images_s'] / r['memory_images_s']:.2f} "
              f"| {r['val_images_s']:.1f} | {r['setup_s']:.0f} | {r['peak_memory_mb']:.0f} "
              f"| {r['memory_images_s'] / base['memory_images_s']:.2f}x "
              f"| {r['pipeline_images_s'] / base['pipeline_images_s']:.2f}x |")


def projection(rows: list[dict], train_images: int = TRAIN_IMAGES, val_images: int = VAL_IMAGES) -> list[dict]:
    """The recipe's seven stages timed with the measured row of the same settings (a stage with none is left out)."""
    measured = {(r["size"], r["trainable"], r["light_augment"]): r for r in rows}
    stages = []
    for stage in COLAB_STAGES:
        r = measured.get((stage.image_size, stage.trainable, stage.light_augment))
        if r is None:
            continue
        epoch = train_images / r["pipeline_images_s"] + val_images / r["val_images_s"]
        stages.append({"step": stage.step, "size": stage.image_size, "batch": r["batch"], "epochs": stage.epochs,
                       "epoch_s": epoch, "total_s": stage.epochs * epoch + r["setup_s"]})
    return stages


def print_projection(stages: list[dict], train_images: int, val_images: int) -> None:
    print(f"\nProjected wall time of the recipe on {train_images:,} training and {val_images:,} validation images")
    print("| stage | px | batch | epochs | minutes per epoch | minutes |")
    print("|---|---|---|---|---|---|")
    for s in stages:
        print(f"| {s['step']} | {s['size']} | {s['batch']} | {s['epochs']} | {s['epoch_s'] / 60:.1f} "
              f"| {s['total_s'] / 60:.1f} |")
    print(f"| all {len(stages)} | | | {sum(s['epochs'] for s in stages)} | "
          f"| {sum(s['total_s'] for s in stages) / 60:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="keras-efficientnetb0")
    parser.add_argument("--stages", type=int, nargs="+", metavar="N",
                        help="take size, batch, unfrozen share and augmentation from these rows of the recipe")
    parser.add_argument("--size", type=int, default=96, help="without --stages")
    parser.add_argument("--batch", type=int, help="the global batch (split over the devices); default: the stage's, "
                        "or 16")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per feed")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CPU_CONFIGS), metavar="BACKEND/JIT/DEVICES/PRECISION")
    parser.add_argument("--project", action="store_true", help="the recipe's wall time on the competition data")
    parser.add_argument("--results", type=Path, help="append each row to this file as a line of JSON")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one configuration may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        faulthandler.dump_traceback_later(args.timeout - 10)
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    rows = []
    for step in args.stages or [None]:
        for spec in args.configs:
            config = parse(spec, args, step)
            result = run_child(config, args.timeout)
            if result is None:
                continue
            rows.append(result)
            if args.results:
                with args.results.open("a") as out:
                    out.write(json.dumps(result) + "\n")
            print(f"{describe(config)}: {result['memory_images_s']:.1f} images/s in memory, "
                  f"{result['pipeline_images_s']:.1f} through the pipeline, {result['val_images_s']:.1f} validating, "
                  f"set-up {result['setup_s']:.0f} s", flush=True)
    if not rows:
        raise SystemExit("no configuration ran")
    print_table(rows, args)
    if args.project:
        for spec in args.configs:  # one projection per configuration
            same = [r for r in rows if "/".join(str(r[k]) for k in ("backend", "jit", "devices", "precision")) == spec]
            if same:
                print(f"\n{spec}:", end="")
                print_projection(projection(same), TRAIN_IMAGES, VAL_IMAGES)


if __name__ == "__main__":
    main()
