"""One training step that keeps the model on the device between batches, as `fit()` does.

The stages' loop cannot use `fit()` (it resumes mid-epoch) and `train_on_batch` pays, on every
call, for what `fit()` pays once (Keras 3.15, keras/src/backend/*/trainer.py): under JAX it writes
every variable back into its Keras variable, and on both backends it resets the metrics and waits
for the loss to reach the host before it returns, so the accelerator idles while the host
prepares the next batch. `TrainStep` runs the same `model.train_step` Keras compiles for `fit()`:

- JAX: one `jax.jit` program over the trainable, non-trainable and optimizer variables as arrays
  (their buffers donated), held here between batches and written back into the Keras variables
  only by `sync()`, which a checkpoint, validation and the epoch's end call first.
- TensorFlow: Keras' own compiled `model.train_function` (XLA per --jit); its variables live on
  the device already, so only the per-call overhead and the wait go.

Neither waits for the step it has just queued: `run` queues step t, then waits for step t-1,
so the device always holds the next step while the host waits, and reads only that step's loss
and accuracy (two scalars). The figures are per step, as `train_on_batch` gives them, so the
loop sums them on the host in the same order as ever: a resumed stage logs the same numbers as
an uninterrupted one, wherever its checkpoints fell. The batch goes to the device (sharded over
the devices under data parallelism) as soon as it is queued, while the step before still runs.
"""

from __future__ import annotations

import keras
import numpy as np

from kit.devices import Parallel

Figures = tuple[float, float, int]  # one finished step: mean loss, accuracy (NaN unless compiled with it), images


class TrainStep:
    """`run(x, y[, sample_weight])` queues a step; `sync()` finishes the queue and puts the state in the model."""

    def __init__(self, model: keras.Model, parallel: Parallel):
        self.model, self.parallel = model, parallel
        self.backend = keras.backend.backend()
        self._in_flight: list[tuple[dict, int]] = []  # (logs, images) of the steps queued and not yet read
        self._state = None  # JAX: the variables' arrays while they are newer than the Keras variables
        self._compiled = None
        self._zero_metrics = None

    def run(self, *batch: np.ndarray) -> list[Figures]:
        """Queue one step on the batch; return the figures of the steps that finished before it (at most one)."""
        images = len(batch[0])
        if self.backend == "jax":
            logs = self._run_jax(batch)
        else:
            self.model.reset_metrics()  # per-step figures, as train_on_batch reports them
            self.model.make_train_function()
            logs = self.model.train_function(iter([_as_data(self.parallel.split(*batch))]))
        self._in_flight.append((logs, images))
        return self._read(keep=1)

    def sync(self) -> list[Figures]:
        """Wait for every queued step, write the JAX state back into the model; return the steps' figures.

        After it the Keras variables hold the newest weights and optimizer state: call it before
        anything reads the model (a checkpoint, validation, the EMA's swap, a learning-rate change).
        """
        figures = self._read(keep=0)
        if self._state is not None:
            for refs, values in zip(self._variables(), self._state):
                for ref, value in zip(refs, values):
                    ref.assign(value)
            self._state = None  # the next step starts from the Keras variables, which a caller may have changed
        return figures

    def _read(self, keep: int) -> list[Figures]:
        split = len(self._in_flight) - keep
        done, self._in_flight = self._in_flight[:split], self._in_flight[split:]
        return [(float(logs["loss"]), float(logs.get("categorical_accuracy", np.nan)), images) for logs, images in done]

    def _variables(self) -> tuple[list, list, list]:
        """The variables the step updates, in the order of its state: trainable, non-trainable, optimizer."""
        return (self.model.trainable_variables, self.model.non_trainable_variables, self.model.optimizer.variables)

    # ---- JAX ------------------------------------------------------------------------------------

    def _run_jax(self, batch: tuple[np.ndarray, ...]) -> dict:
        import jax

        if self._compiled is None:
            self._compile(batch)
        if self._state is None:
            # Committed to their devices as the step's outputs are: a fresh variable's array is not, and a jit
            # that saw uncommitted inputs first compiles again for the committed ones it returns.
            self._state = tuple([jax.device_put(v.value, v.value.sharding) for v in group]
                                for group in self._variables())
        data = tuple(self._to_device(jax, a) for a in _as_data(batch))
        logs, self._state = self._compiled(*self._state, self._zero_metrics, data)
        return logs

    def _compile(self, batch: tuple[np.ndarray, ...]) -> None:
        """The jitted step, built once per model: what `fit()` compiles, its metrics started from zero each step."""
        import jax

        model = self.model
        # What fit() and train_on_batch do first: build the compiled loss and metrics from a batch's shapes.
        model._symbolic_build(data_batch=_as_data(batch))
        self._zero_metrics = [jax.device_put(np.zeros(v.shape, v.dtype), v.value.sharding)
                              for v in model.metrics_variables]

        def step(trainable, non_trainable, optimizer, metrics, data):
            logs, (trainable, non_trainable, optimizer, _) = model.train_step(
                (trainable, non_trainable, optimizer, metrics), data)
            return logs, (trainable, non_trainable, optimizer)

        # Under data parallelism the state keeps its layout (Keras' own train_function says the same).
        shardings = None
        if keras.distribution.distribution() is not None:
            shardings = (None, tuple([v.value.sharding for v in group] for group in self._variables()))
        self._compiled = (jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=shardings) if model.jit_compile
                          else step)  # --jit off: step by step, as Keras runs it then

    @staticmethod
    def _to_device(jax, array: np.ndarray | None):
        """The batch on the device now, split over the devices as the distribution lays a batch out."""
        if array is None:
            return None
        distribution = keras.distribution.distribution()
        if distribution is None:
            return jax.device_put(array)
        return keras.distribution.distribute_tensor(array, distribution.get_data_layout(array.shape))


def _as_data(batch: tuple) -> tuple:
    """(x, y) or (x, y, sample_weight) as Keras' train_step takes a batch: always three, the weight maybe None."""
    return (*batch, None)[:3]
