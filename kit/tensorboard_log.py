"""The run's TensorBoard curves: one event log for all its stages and sessions, positioned in images seen.

    %load_ext tensorboard
    %tensorboard --logdir /content/drive/MyDrive/car-kit/weights/tensorboard

The position of every point is the number of training images the run has seen, every stage and
session before included, so a resumed run continues the same curves rather than starting new ones.
Points are held in memory and written when a checkpoint is saved, all of them belonging before it:
after a hard kill the run resumes from that checkpoint and logs the lost steps again, so the log
never holds a position twice and its positions only increase. The log lives in weights/, which
`--copy-run-from` and `kit.remote pull` carry with the run.
"""

from __future__ import annotations

import time
from pathlib import Path

from kit.files import atomic_path

LOG_EVERY = 20  # training steps per point: a B6 epoch at batch 4 is 3,000 steps


class EventLog:
    """Scalars by tag at a position, written through the `tensorboard` package's writer (any Keras backend)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._pending: list[tuple[str, float, int, float]] = []
        self._writer = None

    def add(self, tag: str, value: float, position: int) -> None:
        self._pending.append((tag, float(value), int(position), time.time()))

    def commit(self) -> None:
        """Write the points held so far (a checkpoint covering them has just been saved) and flush them."""
        if not self._pending:
            return
        if self._writer is None:  # one event file per session, made only when it has something to say
            from tensorboard.summary import Writer  # late: 0.7 s of imports, for the training commands only

            self.folder.mkdir(parents=True, exist_ok=True)
            self._writer = Writer(str(self.folder))
        for tag, value, position, wall_time in self._pending:
            self._writer.add_scalar(tag, value, position, wall_time=wall_time)
        self._writer.flush()
        self._pending.clear()

    def close(self) -> None:
        """Points no checkpoint covers are dropped: the resumed run logs those steps again."""
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def forget_after(folder: Path, position: int) -> None:
    """Drop every point past `position` from the run's event files: --restart discards the stages that logged them,
    and the stage trained again logs those positions anew (TensorBoard would show both, one over the other).

    Event files are append-only records, so each one that holds such points is written again without them
    (the tensorboard package's own record reader and writer), atomically.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(folder.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if not (event := event_pb2.Event.FromString(r)).HasField("summary")
                or event.step <= position]
        if len(kept) < len(records):
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                writer = RecordWriter(f)
                for record in kept:
                    writer.write(record)


class TrainingWindow:
    """The last LOG_EVERY steps' loss, accuracy and speed, as one point each."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.loss = self.correct = self.seconds = 0.0
        self.images = self.timed_images = self.steps = 0

    def add(self, loss: float, accuracy: float, images: int, seconds: float | None) -> None:
        self.loss += loss * images
        self.correct += accuracy * images
        self.images += images
        self.steps += 1
        if seconds is not None:  # the first step of a session compiles: no speed from it
            self.seconds += seconds
            self.timed_images += images

    def emit(self, log: EventLog, position: int, lr: float) -> None:
        if not self.images:
            return
        log.add("train/loss", self.loss / self.images, position)
        log.add("train/accuracy", self.correct / self.images, position)
        log.add("train/learning_rate", lr, position)
        if self.seconds > 0:
            log.add("train/images_per_s", self.timed_images / self.seconds, position)
        self.clear()
