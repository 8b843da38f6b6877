"""The learning-rate finder: a short exponential sweep of the rate from a stage's starting weights (fastai's lr_find).

    python -m kit.stage --step 2 --find-lr     # plots submissions/lr_find_stage_2.png, prints a suggestion

The stage's model is built as the stage would start (its row, its options, the previous stage's
best weights) and trained one batch per rate while the rate grows from 1e-7 to 10 over about 100
batches; the sweep stops once the smoothed loss passes four times its lowest. Nothing of the run
changes: no checkpoint, no manifest entry, no training log (the swept weights go with the process).
Only the image cache at the stage's size is built if it is missing: the stage itself needs it.
The suggestion is fastai's "valley", the middle of the longest stretch over which the loss falls.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from kit.cli import KitError
from kit.config import Workdir
from kit.manifest import Manifest
from kit.plots import plot_lr_sweep
from kit.records import Execution, RunConfig, StagePlan
from kit.train_step import TrainStep
from kit.training import StageData, check_starting_weights, prepare_data, prepare_model

START_LR, END_LR, SWEEP_STEPS = 1e-7, 10.0, 100  # fastai's lr_find defaults
SMOOTHING = 0.98  # fastai's Recorder: an exponential average of the loss, debiased
DIVERGED = 4.0  # stop once the smoothed loss passes this many times its lowest


@dataclass(frozen=True)
class Sweep:
    rates: list[float]
    losses: list[float]  # smoothed, one per rate
    suggestion: float


def find_lr(manifest: Manifest, plan: StagePlan, config: RunConfig, execution: Execution) -> Sweep:
    """Sweep the stage's rate from its starting weights; draw the curve; return it with its suggestion."""
    check_starting_weights(manifest, plan)
    # The sweep sets the rate itself: no schedule, no warm-up (layer-wise decay stays: the head's rate is swept).
    plan = dataclasses.replace(plan, options=dataclasses.replace(plan.options, schedule="plateau", warmup_epochs=0.0,
                                                                 unfreeze_warmup=0.0))
    workdir = manifest.workdir
    data = prepare_data(workdir, plan, config, execution, costs={})
    model, _, parallel = prepare_model(workdir, plan, config, execution, None, data, unfreezes=False)
    step = TrainStep(model, parallel)
    rates = sweep_rates(SWEEP_STEPS)
    raw: list[float] = []
    bar = tqdm(total=len(rates), desc=f"stage {plan.stage.step} LR sweep", disable=not sys.stderr.isatty(),
               leave=False)
    try:
        for index, (x, y, epoch, position) in enumerate(_batches(data, len(rates))):
            step.sync()  # the rate is a variable of the optimizer: set it on the model, not inside a queued step
            model.optimizer.learning_rate.assign(rates[index])
            x, targets = data.mix(x, y, epoch, position)
            step.run(x, targets, *(() if data.class_weight is None else (data.class_weight[y],)))
            raw += [loss for loss, _, _ in step.sync()]
            losses = smoothed(raw)
            if not math.isfinite(losses[-1]) or (len(losses) > 1 and losses[-1] > DIVERGED * min(losses)):
                break
            bar.update()
            bar.set_postfix(lr=f"{rates[index]:.1e}", loss=f"{losses[-1]:.3f}", refresh=False)
    finally:
        bar.close()
        parallel.close()
    losses = smoothed(raw)
    if len(losses) < 10:
        raise KitError(f"The sweep took only {len(losses)} batches before the loss diverged, too few to suggest a "
                       "rate: the stage has too few training images for a sweep of this length.")
    sweep = Sweep(list(rates[:len(losses)]), losses, valley(list(rates[:len(losses)]), losses))
    plot_lr_sweep(sweep.rates, sweep.losses, sweep.suggestion, plot_path(workdir, plan.stage.step),
                  f"stage {plan.stage.step}: {plan.stage.describe_trainable()}, batch {plan.stage.batch_size}")
    return sweep


def plot_path(workdir: Workdir, step: int) -> Path:
    return workdir.submissions / f"lr_find_stage_{step}.png"


def _batches(data: StageData, count: int) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """`count` training batches with their (epoch, step), as many epochs over as it takes."""
    epoch = 0
    while True:
        for position, (x, y) in enumerate(data.train.epoch(epoch)):
            yield x, y, epoch, position
            count -= 1
            if count == 0:
                return
        epoch += 1


def sweep_rates(steps: int) -> np.ndarray:
    return START_LR * (END_LR / START_LR) ** (np.arange(steps) / (steps - 1))


def smoothed(losses: list[float]) -> list[float]:
    """fastai's smoothed loss: an exponential average with its start debiased (as Adam debiases its moments)."""
    average, out = 0.0, []
    for count, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING ** count))
    return out


def valley(rates: list[float], losses: list[float]) -> float:
    """fastai's suggestion: the middle of the longest decreasing run of the loss.

    As fastai does, the first tenth (the loss barely moves) and the last five points (it is diverging)
    are left out; the run is the longest decreasing subsequence, which tolerates noise.
    """
    skip = len(losses) // 10
    rates, losses = rates[skip:len(losses) - 5], losses[skip:len(losses) - 5]
    longest = [1] * len(losses)
    start = end = 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[end] < longest[i]:
            end, start = i, max(0, i - longest[i])
    sections = (end - start) / 3
    return float(rates[start + int(sections) + int(sections / 2)])
