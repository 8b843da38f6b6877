"""Training options beyond the recipe: MixUp/CutMix draws, the EMA weights, the cosine schedule, their records."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from kit import recipe
from kit.backbones import backbone_blocks, block_depths, build_model, set_trainable
from kit.cli import KitError
from kit.config import PROFILES, TrainingOptions, Workdir, stage_of
from kit.records import Requested, StagePlan, stage_plan

SMOKE = PROFILES["smoke"]


def photos(count: int = 8, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Each image one flat grey level, so where a mixed pixel came from can be read off its value."""
    levels = np.linspace(10, 250, count).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (count, size, size, 3)).copy(), np.arange(count) % 4


def test_without_mixing_targets_are_one_hot_and_images_untouched():
    images, labels = photos()
    x, y = recipe.BatchMixer(TrainingOptions(), 4, seed=1, stage=2)(images, labels, epoch=0, step=0)
    assert x is images and np.array_equal(y, np.eye(4, dtype=np.float32)[labels])


@pytest.mark.parametrize("options", [TrainingOptions(mixup=0.4), TrainingOptions(cutmix=1.0),
                                     TrainingOptions(mixup=0.4, cutmix=1.0)], ids=["mixup", "cutmix", "both"])
def test_mixing_is_a_function_of_the_batch_position(options):
    images, labels = photos()
    mixer = recipe.BatchMixer(options, 4, seed=1, stage=2)
    x, y = mixer(images, labels, epoch=3, step=5)
    again_x, again_y = recipe.BatchMixer(options, 4, seed=1, stage=2)(images, labels, epoch=3, step=5)
    assert x.dtype == np.uint8 and x.shape == images.shape
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)  # what a resumed process draws
    assert not np.array_equal(mixer(images, labels, epoch=3, step=6)[0], x)
    assert np.allclose(y.sum(axis=1), 1, atol=1e-6) and (y >= 0).all()
    assert not np.array_equal(y, np.eye(4, dtype=np.float32)[labels])


def test_cutmix_pastes_a_box_of_another_photo_and_weights_the_targets_by_its_area():
    images, labels = photos(size=64)
    x, y = recipe.BatchMixer(TrainingOptions(cutmix=1.0), 8, seed=3, stage=1)(images, np.arange(8), 0, 0)
    for k in range(8):
        own = (x[k, :, :, 0] == images[k, 0, 0, 0]).mean()
        # Keras weighs by the box's real-valued area; whole pixels differ by at most a pixel's width per side.
        assert y[k, k] == pytest.approx(own, abs=3 / 64) or own == 1.0  # pasted onto itself: unchanged
        assert set(np.unique(x[k])) <= set(images[:, 0, 0, 0])  # whole pixels from photos of the batch


def test_ema_weights_are_swapped_in_for_validation_and_back_out():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=recipe.optimizer(stage_of(SMOKE, 1), TrainingOptions(ema=0.5), 10),
                  loss=recipe.loss(TrainingOptions()))
    x, y = np.ones((4, 3), np.float32), np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    for _ in range(3):
        model.train_on_batch(x, y)
    raw = [v.numpy().copy() for v in model.trainable_variables]
    for average, value in zip(model.optimizer._model_variables_moving_average, raw):
        average.assign(value + 1.0)  # averages that surely differ from the weights, whatever EMA's history
    with recipe.averaged_weights(model):
        inside = [v.numpy().copy() for v in model.trainable_variables]
    assert all(np.allclose(a, r + 1.0) for a, r in zip(inside, raw))
    assert all(np.array_equal(v.numpy(), r) for v, r in zip(model.trainable_variables, raw))


def test_ema_warms_up_so_a_short_stage_forgets_the_weights_it_started_from():
    """A stage far shorter than 1 / (1 - m) steps: Keras' fixed momentum would keep 97% of the start."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    optimizer = recipe.optimizer(stage_of(SMOKE, 1), TrainingOptions(ema=0.999), 10)
    optimizer.build(model.trainable_variables)
    kernel, average = model.trainable_variables[0], None
    expected, trajectory = 0.0, []
    for step in range(30):
        optimizer.apply_gradients([(np.full((1, 1), -1.0, "float32"), kernel)])  # the weight climbs steadily
        value = float(kernel.numpy()[0, 0])
        trajectory.append(value)
        momentum = 0.0 if step == 0 else min(0.999, (1 + step) / (10 + step))  # TensorFlow's num_updates rule
        expected = momentum * expected + (1 - momentum) * value
    average = float(optimizer._model_variables_moving_average[0].numpy()[0, 0])
    assert average == pytest.approx(expected, rel=1e-5)
    fixed = 0.999 ** 29 * trajectory[0] + sum(0.001 * 0.999 ** (29 - k) * v for k, v in enumerate(trajectory) if k)
    assert trajectory[-1] - average < 0.5 * (trajectory[-1] - fixed)  # far nearer the stage's end than Keras' own
    assert average > trajectory[len(trajectory) // 2]  # the second half of the stage weighs most


def test_cosine_schedule_warms_up_then_decays_to_the_rows_minimum():
    stage = stage_of(SMOKE, 2)  # lr 2e-3, 3 epochs
    schedule = recipe.learning_rate(stage, TrainingOptions(schedule="cosine", warmup_epochs=1), steps_per_epoch=10)
    rates = [float(schedule(step)) for step in range(31)]
    assert rates[0] == pytest.approx(stage.lr / 100) and rates[10] == pytest.approx(stage.lr)
    assert all(a < b for a, b in zip(rates[:10], rates[1:11])) and all(a > b for a, b in zip(rates[10:30], rates[11:]))
    assert rates[30] == pytest.approx(stage.min_lr)
    assert recipe.learning_rate(stage, TrainingOptions(), 10) == stage.lr  # the recipe: a number plateau lowers


def test_weight_decay_means_adamw_sparing_biases_and_norms():
    plain = recipe.optimizer(stage_of(SMOKE, 1), TrainingOptions(), 10)
    decayed = recipe.optimizer(stage_of(SMOKE, 1), TrainingOptions(weight_decay=0.5), 10)
    assert isinstance(plain, keras.optimizers.Adam) and not isinstance(plain, keras.optimizers.AdamW)
    assert isinstance(decayed, keras.optimizers.AdamW)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, bias_initializer="ones"),
                              keras.layers.BatchNormalization()])
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    # Zero gradients: Adam moves nothing, so whatever changes is the decay alone.
    decayed.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in model.trainable_variables])
    after = {v.path: v.numpy() for v in model.trainable_variables}
    for path, value in before.items():
        if path.endswith("kernel"):
            assert np.allclose(after[path], value * (1 - 0.5 * stage_of(SMOKE, 1).lr))
        else:  # bias, gamma, beta
            assert np.array_equal(after[path], value), path


def tiny_model() -> keras.Model:
    model = build_model("tiny-cnn", 32, 4)
    set_trainable(model, 1.0)
    return model


def one_step(optimizer, model, gradients) -> dict[str, np.ndarray]:
    """Each trainable variable's change after one step on these gradients."""
    before = [v.numpy().copy() for v in model.trainable_variables]
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return {v.path: v.numpy() - b for v, b in zip(model.trainable_variables, before)}


def test_layer_decay_gives_each_block_its_own_rate_inside_adam():
    """Adam's first step moves every weight by lr (its gradient over its own RMS), so the step is the rate."""
    model, stage = tiny_model(), stage_of(SMOKE, 4)
    options = TrainingOptions(layer_decay=0.5)
    optimizer = recipe.optimizer(stage, options, 10)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    optimizer.build(model.trainable_variables)
    depths = block_depths(model)
    recipe.scale_rates(optimizer, depths, options, warmup_steps=0)
    assert depths[-1] == 0 and max(depths) == len(backbone_blocks(model.get_layer("backbone")))
    rng = np.random.default_rng(0)
    steps = one_step(optimizer, model, [np.where(rng.random(v.shape) < 0.5, -1.0, 1.0).astype("float32")
                                        for v in model.trainable_variables])
    for (path, step), depth in zip(steps.items(), depths):
        assert np.allclose(np.abs(step), stage.lr * 0.5 ** depth, rtol=1e-3), path
    assert {d for d in depths} >= {0, 1, 2}  # the head, the top block and one below it all trained


def test_adamws_decay_follows_the_scaled_rate_and_the_warmup_ramps_it():
    model, stage = tiny_model(), stage_of(SMOKE, 4)
    options = TrainingOptions(weight_decay=0.5, layer_decay=0.5, unfreeze_warmup=1.0)
    optimizer = recipe.optimizer(stage, options, 10)
    optimizer.build(model.trainable_variables)
    depths = block_depths(model)
    recipe.scale_rates(optimizer, depths, options, recipe.unfreeze_warmup_steps(options, True, steps_per_epoch=4))
    kernels = [i for i, v in enumerate(model.trainable_variables) if v.path.endswith("kernel")]
    for step in range(6):  # zero gradients: what changes is the decay alone, at lr * D ** depth * warm-up
        warm = min(1.0, (step + 1) / 4)
        before = [model.trainable_variables[i].numpy().copy() for i in kernels]
        one_step(optimizer, model, [np.zeros(v.shape, "float32") for v in model.trainable_variables])
        for i, old in zip(kernels, before):
            rate = stage.lr * 0.5 ** depths[i] * warm
            assert np.allclose(model.trainable_variables[i].numpy(), old * (1 - 0.5 * rate), rtol=1e-6)
        assert recipe.learning_rate_at(optimizer, step, stage.lr) == pytest.approx(stage.lr * warm)
    assert recipe.unfreeze_warmup_steps(options, False, 4) == 0  # a stage that unfreezes no more: none


def test_the_finders_suggestion_lies_where_the_loss_falls_fastest():
    from kit.lr_finder import smoothed, sweep_rates, valley

    rates = sweep_rates(100)
    # Flat, a fall between 1e-4 and 1e-2, then divergence; with noise a plain minimum would not survive.
    log_rate = np.log10(rates)
    loss = 2 - np.clip((log_rate + 4) / 2, 0, 1) + np.where(log_rate > -1, (log_rate + 1) * 5, 0)
    loss += np.random.default_rng(0).normal(0, 0.01, len(loss))
    suggestion = valley(list(rates), smoothed(list(loss)))
    assert 1e-4 < suggestion < 1e-2
    assert smoothed([3.0, 3.0])[0] == pytest.approx(3.0)  # debiased: the first point is the first loss


def test_a_started_stage_keeps_its_options(tmp_path):
    workdir = Workdir(tmp_path)
    started = stage_plan(None, SMOKE, 2, Requested(options={"ema": 0.9, "schedule": "cosine"}), workdir)
    assert started.options == dataclasses.replace(TrainingOptions(), ema=0.9, schedule="cosine")
    saved = started.to_dict()
    assert StagePlan.from_dict(saved) == started
    assert stage_plan(saved, SMOKE, 2, Requested(), workdir) == started  # a resume needs no flags
    with pytest.raises(KitError, match=r"--ema 0.99 \(saved: 0.9\).*--restart"):
        stage_plan(saved, SMOKE, 2, Requested(options={"ema": 0.99}), workdir)
    legacy = {"stage": saved["stage"], "class_weights": False}  # a plan saved before options existed
    assert StagePlan.from_dict(legacy).options == TrainingOptions()


@pytest.mark.parametrize("flags, message", [
    (["--ema", "1.5"], "--ema 1.5 is out of range"),
    (["--label-smoothing", "-0.1"], "--label-smoothing -0.1 is out of range"),
    (["--warmup-epochs", "1"], "add --schedule cosine"),
    (["--layer-decay", "1.5"], "--layer-decay 1.5 is out of range"),
])
def test_bad_option_values_are_refused_in_one_paragraph(tmp_path, capsys, flags, message):
    """The command's own main, in this process (a real process's refusal is test_stages'): exit 2, one paragraph."""
    from kit.stage import main

    code = main(["--step", "1", "--profile", "smoke", "--workdir", str(tmp_path), *flags])
    error = capsys.readouterr().err
    assert code == 2 and message in " ".join(error.split()) and "Traceback" not in error


def test_the_profiles_freeze_batchnorm_as_measured_and_the_2021_recipe_stays_reachable(tmp_path):
    from kit.config import RECIPE_OPTIONS

    for name in ("colab", "modern"):  # modern: the recipe with what was measured to help, today colab's own
        plan = stage_plan(None, PROFILES[name], 5, Requested(), Workdir(tmp_path))
        assert plan.options == RECIPE_OPTIONS and plan.options.bn == "frozen"
        assert plan.stage == stage_of(PROFILES["colab"], 5)
    as_in_2021 = stage_plan(None, PROFILES["colab"], 5, Requested(options={"bn": "train"}), Workdir(tmp_path))
    assert as_in_2021.options == TrainingOptions()  # every option off, BatchNorm trained: the 2021 recipe
    with_ema = stage_plan(None, PROFILES["modern"], 5, Requested(options={"ema": 0.999}), Workdir(tmp_path))
    assert with_ema.options.ema == 0.999 and with_ema.options.bn == "frozen"
    cpu = stage_plan(None, PROFILES["cpu"], 4, Requested(), Workdir(tmp_path))  # as measured on stanford5
    assert cpu.options.bn == "frozen" and PROFILES["cpu"].backbone == "efficientnet-lite0"
    trained = stage_plan(None, PROFILES["cpu"], 4, Requested(options={"bn": "train"}), Workdir(tmp_path))
    assert trained.options.bn == "train"
