"""A stage's clock: what each phase costs, whether the next one fits the time budget, when to checkpoint, and
stop requests.

Costs are measured as a stage runs and kept in the manifest by image size, so a new session knows them before
it has measured anything: `Timer.would_pass` asks whether a phase and the checkpoint after it fit before the
deadline, and `start_cost` whether a stage's set-up and first checkpoint fit at all (kit.training's `run_all`
asks before it starts one). SIGINT and SIGTERM become a request to stop at the next batch with a checkpoint.
"""

from __future__ import annotations

import signal
import sys
import time

from kit.config import Stage, Workdir
from kit.dataset import Split
from kit.pipeline import cache_is_complete, labelled_paths
from kit.records import Execution

SAVE_INTERVAL_S = 600  # a checkpoint about every 10 minutes of training unless --save-every says otherwise


class Timer:
    """Wall time across sessions, and what the next setup, step, validation and save will cost.

    Costs are kept in the manifest by image size, so a new session (and `run_all`, before it
    starts a stage) knows them before it has measured anything: the budget is honest from the
    first batch, and a stage is not started when its set-up and first checkpoint do not fit.
    """

    def __init__(self, costs: dict, stage: Stage, budget_deadline: float):
        self.costs, self.size, self.batch = costs, str(stage.image_size), stage.batch_size
        self.deadline = budget_deadline
        self.mark = self.last_save = time.monotonic()
        known = costs.get("by_size", {}).get(self.size, {})
        self.cost = {"setup": known.get("setup", 0.0), "validation": known.get("validation", 0.0),
                     "save": costs.get("save", 5.0), "step": known.get("step_per_image", 0.0) * self.batch}

    def note(self, what: str, seconds: float) -> None:
        # Steps are many and alike: a running mean. The rest are rare: keep the recent worst, so the
        # budget check errs on the side of stopping in time.
        if what == "step":
            self.cost[what] = seconds if not self.cost[what] else 0.9 * self.cost[what] + 0.1 * seconds
        else:
            self.cost[what] = max(seconds, 0.8 * self.cost[what])
        by_size = self.costs.setdefault("by_size", {}).setdefault(self.size, {})
        if what == "save":
            self.costs["save"] = self.cost["save"]
        elif what == "step":
            by_size["step_per_image"] = self.cost["step"] / self.batch
        else:
            by_size[what] = self.cost[what]

    def would_pass(self, what: str) -> bool:
        """Would doing `what` and then saving overrun the deadline?"""
        return time.time() + self.cost[what] + 2 * self.cost["save"] > self.deadline

    def save_due(self, every: int | None, step: int) -> bool:
        return step % every == 0 if every else time.monotonic() - self.last_save > SAVE_INTERVAL_S

    def lap(self) -> float:
        """Seconds since the last lap (or the start): the stage's wall time, added to its state at each save."""
        now = time.monotonic()
        seconds, self.mark = now - self.mark, now
        return seconds


def start_cost(workdir: Workdir, stage: Stage, costs: dict, split: Split, execution: Execution) -> float:
    """Seconds stage `stage` needs, by what earlier sessions measured, to set up and save its first checkpoint.

    0 for what was never measured: the first stage of a run always starts.
    """
    by_size = costs.get("by_size", {})
    known = by_size.get(str(stage.image_size))
    if known is None and by_size:  # a new size: scale the largest known one by the pixels
        size = max(by_size, key=int)
        ratio = (stage.image_size / int(size)) ** 2
        known = {k: v * ratio for k, v in by_size[size].items()}
    known = known or {}
    images = len(split.train) + len(split.val)
    cached = cache_is_complete(workdir.cache, "train", labelled_paths(split), stage.image_size)
    cache = 0.0 if cached else images * costs.get("cache_image_s", 0)
    step = known.get("step_per_image", 0.0) * stage.batch_size
    steps_per_epoch = stage.steps_per_epoch or images // stage.batch_size
    epoch = steps_per_epoch * step + known.get("validation", 0.0)
    first = execution.save_every * step if execution.save_every else min(SAVE_INTERVAL_S, epoch)
    return cache + known.get("setup", 0.0) + first + costs.get("save", 0.0)


class StopRequests:
    """SIGINT/SIGTERM ask for a checkpoint at the next batch boundary instead of dying mid-step."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping at the next batch with a checkpoint (press Ctrl-C again to abort without one)",
              file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
