"""A few training steps of the kit's model on N devices, its weights saved: run as its own process.

    python tests/parallel_steps.py DEVICES OUT.npz

The device count is fixed when a backend starts, so each count needs a process of its own. The
model is the kit's (tiny CNN, all layers trainable, its BatchNorm layers training) built and fed
through kit.devices exactly as kit.training does. Dropout is off and the optimizer is SGD with
momentum: dropout draws its masks per device under tf.distribute, and Adam turns the float noise of
near-zero gradients into whole steps, so either would hide what is compared here (the split of
the batch, the gradients' reduction, BatchNorm's statistics over the whole batch).
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

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 32, 32, 3), dtype=np.uint8)  # three steps of a global batch of 8
    targets = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (3, 8))]
    keras.utils.set_random_seed(0)
    parallel = Parallel.over(devices)
    with parallel.scope():
        model = build_model("tiny-cnn", 32, 5, "none", Head(16, 0.0, 0.9))
        set_trainable(model, 1.0)
        parallel.prepare(model)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy",
                      metrics=["categorical_accuracy"])
        model.optimizer.build(model.trainable_variables)
        parallel.build_compiled(model, 5)
    for x, y in zip(images, targets):
        model.reset_metrics()
        model.train_on_batch(*parallel.split(x, y))
    probs = parallel.predict(model, images[0][:7])  # 7: a batch the devices do not split evenly
    np.savez(out, probs=probs, **{v.path: np.asarray(v) for v in model.weights})
    print(f"{parallel.describe()}: {len(model.weights)} arrays")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
