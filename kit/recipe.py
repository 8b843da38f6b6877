"""A stage's training options as Keras objects: optimizer, learning-rate schedule, loss, batch mixing, EMA weights.

Each option is Keras' own where Keras has it: AdamW's decoupled weight decay, the optimizers'
`use_ema`, `CosineDecay` with its linear warm-up, the loss's label smoothing, the `MixUp` and
`CutMix` layers. What this module adds is what exact resume needs: every random draw is a
function of (seed, stage, epoch, step), and every other piece of state (the EMA of the weights,
the schedule's position) is an optimizer variable, so it is in every checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras
import numpy as np

from kit.config import Stage, TrainingOptions

NO_DECAY = ["bias", "gamma", "beta"]  # biases and normalisation scales are not decayed (as timm and BiT do)


def learning_rate(stage: Stage, options: TrainingOptions, steps_per_epoch: int):
    """The optimizer's learning rate: a number the plateau rule lowers, or a cosine schedule over the stage's steps.

    The cosine schedule is read at the optimizer's step counter, which every checkpoint holds, so a
    resumed stage continues on the same curve. It ends at the row's minimum rate, like plateau decay.
    """
    if options.schedule != "cosine":
        return stage.lr
    total = max(1, stage.epochs * steps_per_epoch)
    warmup = min(total - 1, round(options.warmup_epochs * steps_per_epoch))
    return keras.optimizers.schedules.CosineDecay(
        stage.lr / 100 if warmup else stage.lr, decay_steps=total - warmup, alpha=stage.min_lr / stage.lr,
        warmup_target=stage.lr if warmup else None, warmup_steps=warmup)


class WarmEMA:
    """Keras' EMA of the weights with TensorFlow's `num_updates` warm-up: momentum min(m, (1 + n) / (10 + n)).

    Keras averages at a fixed momentum from the first step, so a stage shorter than 1 / (1 - m)
    steps keeps much of the weights it started from in its average (with m = 0.999, 38% after
    970 steps: in stage 1, a random head). With the warm-up, the average forgets its start within
    a few dozen steps and reaches the full momentum as the stage goes on. Keras has no option
    for this, so the one method that updates the average is replaced.
    """

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        step = keras.ops.cast(self.iterations, "float32")
        warm = keras.ops.minimum(self.ema_momentum, (1.0 + step) / (10.0 + step))
        momentum = keras.ops.where(keras.ops.equal(self.iterations, 0), 0.0, warm)  # the first step: the weights
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                m = keras.ops.cast(momentum, variable.dtype)
                average.assign(m * average + (1 - m) * variable)


class ScaledRates:
    """A learning rate per variable, inside the optimizer: layer-wise decay and the unfreeze warm-up.

    Adam divides each gradient by its own running RMS, so scaling gradients would change nothing:
    the rate itself is scaled, in `update_step`, which every backend calls once per variable (under
    tf.distribute and inside JAX's stateless apply too). AdamW's decoupled decay moves here as well,
    at the variable's own rate, as timm's parameter groups have it. The factors follow from the
    stage's plan and the warm-up from the optimizer's step counter, so there is no new state to save
    and a resume stays exact. Keras has per-variable rates for none of its optimizers, hence this.
    """

    _rate_factors: tuple[float, ...] = ()  # aligned with the variables the optimizer was built with; () for all 1
    _warmup_steps: int = 0

    def scale_rates(self, factors: list[float], warmup_steps: int) -> None:
        """Set each trainable variable's factor (in the order of `build`) and the warm-up's length in steps."""
        self._rate_factors, self._warmup_steps = tuple(factors), warmup_steps

    def update_step(self, gradient, variable, learning_rate):
        rate = keras.ops.cast(learning_rate, variable.dtype) * keras.ops.cast(self.rate_scale(variable),
                                                                              variable.dtype)
        if self.weight_decay is not None and self._use_weight_decay(variable):
            variable.assign(variable - variable * keras.ops.cast(self.weight_decay, variable.dtype) * rate)
        super().update_step(gradient, variable, rate)

    def _apply_weight_decay(self, variables):
        """Applied per variable in update_step instead, at its scaled rate."""

    def rate_scale(self, variable):
        """The variable's factor times the warm-up's min(1, (step + 1) / steps), as a scalar tensor."""
        factor = self._rate_factors[self._get_variable_index(variable)] if self._rate_factors else 1.0
        if not self._warmup_steps:
            return factor
        step = keras.ops.cast(self.iterations, "float32")
        return factor * keras.ops.minimum(1.0, (step + 1.0) / float(self._warmup_steps))


class Adam(WarmEMA, ScaledRates, keras.optimizers.Adam):
    pass


class AdamW(WarmEMA, ScaledRates, keras.optimizers.AdamW):
    pass


def optimizer(stage: Stage, options: TrainingOptions, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam as in the recipe, or AdamW with decoupled weight decay; either with a warmed-up EMA of the weights.

    Per-variable rates (`--layer-decay`, the unfreeze warm-up) are set by `scale_rates` once the
    optimizer is built on the model's trainable variables.
    """
    rate = learning_rate(stage, options, steps_per_epoch)
    ema = {"use_ema": True, "ema_momentum": options.ema} if options.ema else {}
    if not options.weight_decay:
        return Adam(rate, name="adam", **ema)
    adamw = AdamW(rate, weight_decay=options.weight_decay, name="adamw", **ema)
    adamw.exclude_from_weight_decay(var_names=NO_DECAY)
    return adamw


def scale_rates(optimizer: keras.optimizers.Optimizer, depths: list[int], options: TrainingOptions,
                warmup_steps: int) -> None:
    """Give the built optimizer its per-variable rates: D ** depth (`depths` from backbones.block_depths)."""
    factors = [options.layer_decay ** depth for depth in depths] if options.layer_decay else []
    getattr(optimizer, "inner_optimizer", optimizer).scale_rates(factors, warmup_steps)  # under a loss scale


def unfreeze_warmup_steps(options: TrainingOptions, unfreezes: bool, steps_per_epoch: int) -> int:
    """The warm-up's length in steps: `--unfreeze-warmup` epochs at a stage that unfreezes more, else none."""
    return round(options.unfreeze_warmup * steps_per_epoch) if unfreezes else 0


def loss(options: TrainingOptions) -> keras.losses.Loss:
    """Cross-entropy on one-hot (or mixed) targets, which is what label smoothing and MixUp need.

    Without smoothing or mixing it computes exactly what the recipe's sparse cross-entropy did.
    """
    return keras.losses.CategoricalCrossentropy(label_smoothing=options.label_smoothing)


def current_learning_rate(model: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def learning_rate_at(optimizer: keras.optimizers.Optimizer, step: int, plain: float) -> float:
    """The head's rate at the stage's step `step`: its schedule's value there, or `plain` (the plateau rule's
    rate), times the unfreeze warm-up's factor.

    Computed from the step, not read from the optimizer: under JAX its step counter is brought up to date
    only when kit.train_step syncs, at checkpoints and epoch ends.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under a float16 loss scale
    schedule = inner._learning_rate
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        plain = float(keras.ops.convert_to_numpy(schedule(step)))
    warmup = getattr(inner, "_warmup_steps", 0)
    return plain * min(1.0, (step + 1) / warmup) if warmup else plain


class BatchMixer:
    """One-hot targets, and MixUp or CutMix of the batch where the options ask (Keras' layers).

    The layers would draw from their own seed generator, whose state no checkpoint holds; here each
    batch's draw gets a fresh generator seeded from (seed, stage, epoch, step), so a resumed stage
    mixes exactly the batches the uninterrupted one did. With both on, each batch takes one of the
    two at random (timm's switch). Images stay uint8, rounded, as the model takes them.
    """

    def __init__(self, options: TrainingOptions, num_classes: int, seed: int, stage: int):
        self.num_classes, self.seed, self.stage = num_classes, seed, stage
        self.layers = [layer for layer in (
            keras.layers.MixUp(alpha=options.mixup, dtype="float32") if options.mixup else None,
            keras.layers.CutMix(factor=options.cutmix, dtype="float32") if options.cutmix else None) if layer]

    def __call__(self, images: np.ndarray, labels: np.ndarray, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        targets = np.eye(self.num_classes, dtype=np.float32)[labels]
        if not self.layers:
            return images, targets
        rng = np.random.default_rng([self.seed, self.stage, epoch, step, 7])  # 7: apart from augment's streams
        layer = self.layers[rng.integers(len(self.layers))]
        generator = keras.random.SeedGenerator(int(rng.integers(2 ** 31)))
        data = {"images": images, "labels": targets}
        transformation = layer.get_random_transformation(data, training=True, seed=generator)
        mixed = keras.ops.convert_to_numpy(layer.transform_images(images, transformation))
        mixed_targets = keras.ops.convert_to_numpy(layer.transform_labels(targets, transformation))
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8), mixed_targets.astype(np.float32)


@contextlib.contextmanager
def averaged_weights(model: keras.Model) -> Iterator[None]:
    """Inside: the model holds the EMA of its trainable weights (when the optimizer keeps one); after: its own.

    Validation scores, and the best-weights file stores, the averaged weights: they are the model
    the stage delivers. Checkpoints store the raw weights, from which training continues.
    """
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # under a float16 loss scale
    if not optimizer.use_ema:
        yield
        return
    raw = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    # Copies, not Keras' finalize_variable_values: that assigns each average's own array to its model variable,
    # and under JAX predict_on_batch donates the model's arrays, which would delete the averages with them.
    for variable, average in zip(model.trainable_variables, optimizer._model_variables_moving_average):
        if average is not None:
            variable.assign(keras.ops.convert_to_numpy(average))
    try:
        yield
    finally:
        for variable, value in zip(model.trainable_variables, raw):
            variable.assign(value)
