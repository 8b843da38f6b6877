"""A few training steps of the kit's model on N devices, its weights saved: run as its own process.

    python tests/parallel_steps.py DEVICES OUT.npz

The device count is fixed when a backend starts, so each count needs a process of its own. The
model is the kit's (tiny CNN, all layers trainable, its BatchNorm layers training) built and fed
through kit.devices and kit.train_step exactly as kit.training does. Dropout is off and the
optimizer is SGD with momentum: dropout draws its masks per device under tf.distribute, and Adam
turns the float noise of near-zero gradients into whole steps, so either would hide what is
compared here (the split of the batch, the gradients' reduction, BatchNorm's statistics over the
whole batch).

On one device it also trains a second copy with `train_on_batch` (the Keras call the kit's step replaces), and
counts what XLA compiles (JAX) or traces (TensorFlow) once the first step and the first prediction
have run: later steps and a short last batch of predictions must reuse those programs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(devices: int, out: str) -> None:
    from kit.devices import Parallel, request_cpu_devices

    request_cpu_devices(devices)
    import keras
    import numpy as np

    from kit.backbones import build_model, set_trainable
    from kit.config import Head
    from kit.inference import Predictor, Subset
    from kit.train_step import TrainStep

    compiles = []
    if keras.backend.backend() == "jax":
        import jax

        jax.monitoring.register_event_duration_secs_listener(
            lambda event, *_, **__: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
            else None)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 32, 32, 3), dtype=np.uint8)  # three steps of a global batch of 8
    targets = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (3, 8))]

    def build(parallel: Parallel) -> keras.Model:
        keras.utils.set_random_seed(0)
        with parallel.scope():
            model = build_model("tiny-cnn", 32, 5, "none", Head(16, 0.0, 0.9))
            set_trainable(model, 1.0)
            parallel.prepare(model)
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy",
                          metrics=["categorical_accuracy"])
            model.optimizer.build(model.trainable_variables)
            parallel.build_compiled(model, 5)
        return model

    parallel = Parallel.over(devices)
    model = build(parallel)
    step = TrainStep(model, parallel)
    figures = step.run(images[0], targets[0])
    compiled = len(compiles)
    for x, y in zip(images[1:], targets[1:]):
        figures += step.run(x, y)
    figures += step.sync()
    step_compiles = len(compiles) - compiled

    class Served:  # the model as a Predictor takes it, its batches split over the devices
        image_size, classes = 32, tuple("abcde")

        @staticmethod
        def predict_on_batch(views):
            return parallel.predict(model, views)

    Served.model = Served
    # 7 images in batches of 4: the last batch is short, and must run the program the first compiled.
    predictor = Predictor(Served, tta=1, seed=0, workers=1, batch_views=4)
    before = len(compiles)
    probs, _ = predictor.predict_many(Subset(images[0], list(range(7))), [str(i) for i in range(7)], progress=False)
    predict_compiles = len(compiles) - before
    traced = (model.predict_function.experimental_get_tracing_count()
              if keras.backend.backend() == "tensorflow" else -1)
    arrays = {v.path: np.asarray(v) for v in model.weights}

    reference = {}
    if devices == 1:  # the same steps through train_on_batch, compared on one device
        keras_model = build(parallel)
        for x, y in zip(images, targets):
            keras_model.reset_metrics()
            keras_model.train_on_batch(*parallel.split(x, y))
        reference = {"train_on_batch/" + v.path: np.asarray(v) for v in keras_model.weights}
    np.savez(out, probs=probs, figures=np.array(figures), step_compiles=step_compiles,
             predict_compiles=predict_compiles, predict_traces=traced, **arrays, **reference)
    print(f"{parallel.describe()}: {len(model.weights)} arrays")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
