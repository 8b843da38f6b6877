"""Everything the kit is configured by, in one place: the competition preset, stages, profiles, paths.

Other modules import from here and never hard-code a size, a path or a rate.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

COMPETITION = "sf-dl-car-classification"
COMPETITION_URL = f"https://www.kaggle.com/competitions/{COMPETITION}"

# This competition's category index -> car model, from its description. Other datasets bring their
# own classes (data/dataset.json); nothing else in the kit counts or names classes.
COMPETITION_CLASSES: tuple[str, ...] = (
    "Lada Priora",
    "Ford Focus",
    "Lada 2114 (Samara)",
    "Lada 2110",
    "Lada 2107 (Zhiguli)",
    "Lada Niva",
    "Lada Kalina",
    "Lada 2109",
    "Volkswagen Passat",
    "Lada 21099",
)

# How long a Kaggle session may run, by accelerator, in minutes: 12 hours for CPU and GPU sessions, 9 for TPU
# sessions (https://www.kaggle.com/docs/notebooks, "Technical specifications"; some users report GPU sessions
# cut at 9 hours too). A pushed version trains until the limit less TRAINING_MARGIN_MIN, and its report and
# prediction must end SAVE_MARGIN_MIN before it, so Kaggle saves the output of a version that ended cleanly.
KAGGLE_SESSION_MINUTES = {"gpu": 720, "none": 720, "tpu": 540}
TRAINING_MARGIN_MIN = 30
SAVE_MARGIN_MIN = 10

SEED = 42
VAL_FRACTION = 0.2
TTA_VIEWS = 10
CACHE_SCALE = 1.15  # cached shorter side = 1.15 x the stage's image size, so random crops have room


@dataclass(frozen=True)
class Stage:
    """One row of the fine-tuning schedule (fastai's staged unfreezing, as a table)."""

    step: int
    image_size: int
    batch_size: int
    lr: float
    epochs: int
    trainable: float  # fraction of backbone blocks unfrozen, counted from the top
    light_augment: bool = False  # 448 px stages drop noise and colour shifts, as the recipe did
    plateau_patience: int = 3
    plateau_factor: float = 0.2
    early_stop_patience: int = 6
    steps_per_epoch: int | None = None  # None: the whole training split

    @property
    def min_lr(self) -> float:
        return self.lr / 100

    def describe_trainable(self) -> str:
        if self.trainable <= 0:
            return "head only"
        if self.trainable >= 1:
            return "all"
        return f"top {self.trainable:g} of the backbone"


# The original seven-stage EfficientNetB6 recipe (0.974 validation accuracy).
COLAB_STAGES: tuple[Stage, ...] = (
    Stage(1, 224, 64, 1e-4, 5, 0.0),
    Stage(2, 224, 32, 5e-5, 10, 0.5),
    Stage(3, 224, 32, 5e-5, 10, 0.75),
    Stage(4, 224, 16, 1e-5, 10, 1.0),
    Stage(5, 448, 4, 1e-5, 8, 1.0, light_augment=True),
    Stage(6, 448, 4, 1e-5, 6, 1.0, light_augment=True),  # continues stage 5
    Stage(7, 448, 4, 1e-6, 10, 1.0, light_augment=True, plateau_patience=2),
)

# Same shape, tiny sizes: all seven stages in a few minutes on a 2-core CPU.
SMOKE_STAGES: tuple[Stage, ...] = (
    Stage(1, 48, 32, 3e-3, 3, 0.0),
    Stage(2, 48, 32, 2e-3, 3, 0.5),
    Stage(3, 48, 32, 2e-3, 3, 0.75),
    Stage(4, 48, 32, 1e-3, 3, 1.0),
    Stage(5, 64, 32, 5e-4, 2, 1.0, light_augment=True),
    Stage(6, 64, 32, 5e-4, 2, 1.0, light_augment=True),
    Stage(7, 64, 32, 1e-4, 2, 1.0, light_augment=True, plateau_patience=2),
)

# The recipe's shape for a machine without a GPU: EfficientNet-Lite0 from its ImageNet weights (installed from
# the package registry), the head alone for ten epochs, then unfrozen as the recipe does, a short stage each,
# and the last three stages at a larger size; about 8 minutes on a 2-core CPU for stanford5's 480 photos
# (bench/real_cars.py). Lite0 is small and the data tiny, so its rates are the recipe's times 5 to 10.
CPU_STAGES: tuple[Stage, ...] = (
    Stage(1, 224, 32, 1e-3, 10, 0.0),
    Stage(2, 224, 32, 1e-4, 1, 0.5),
    Stage(3, 224, 32, 1e-4, 1, 0.75),
    Stage(4, 224, 32, 5e-5, 2, 1.0),
    Stage(5, 256, 32, 3e-5, 1, 1.0, light_augment=True),
    Stage(6, 256, 32, 2e-5, 1, 1.0, light_augment=True),
    Stage(7, 256, 32, 1e-5, 1, 1.0, light_augment=True, plateau_patience=2),
)

# Every profile has these seven steps; commands, reports and the model finder count them from here.
STEPS: tuple[int, ...] = tuple(stage.step for stage in COLAB_STAGES)
# The optional final fit: the last stage again, on training + validation images (kit.stage --final-fit).
FINAL_FIT_STEP = STEPS[-1] + 1


@dataclass(frozen=True)
class TrainingOptions:
    """What fine-tuning has added since the 2021 recipe; each off by default, so the recipe stays the recipe.

    Fixed when a stage starts and saved with it, like the stage's row: a resume continues the
    same training whatever flags it is given.
    """

    label_smoothing: float = 0.0  # share of each target spread over all classes
    ema: float = 0.0  # momentum of an exponential moving average of the weights, evaluated and saved; 0: off
    schedule: str = "plateau"  # "plateau": the recipe's ReduceLROnPlateau; "cosine": cosine decay per step
    warmup_epochs: float = 0.0  # linear warm-up before the cosine decay
    mixup: float = 0.0  # MixUp's Beta(alpha, alpha); 0: off
    cutmix: float = 0.0  # Keras CutMix's factor (Beta(a, a), a from [0, factor]); 0: off. With MixUp: one per batch
    weight_decay: float = 0.0  # > 0: AdamW with this decoupled weight decay instead of Adam
    bn: str = "train"  # the backbone's BatchNorm once it is wholly unfrozen: "train" (the recipe) or "frozen"
    layer_decay: float = 0.0  # backbone block k from the top trains at lr * D ** k, the head at lr; 0: off
    unfreeze_warmup: float = 0.0  # epochs of linear warm-up at each stage that unfreezes more of the backbone

    def describe(self) -> str:
        """The options that are on, for a stage's first line ('' for the recipe)."""
        parts = [f"label smoothing {self.label_smoothing:g}" if self.label_smoothing else "",
                 f"EMA {self.ema:g}" if self.ema else "",
                 (f"cosine schedule, {self.warmup_epochs:g} warm-up epochs" if self.schedule == "cosine" else ""),
                 f"MixUp {self.mixup:g}" if self.mixup else "", f"CutMix {self.cutmix:g}" if self.cutmix else "",
                 f"AdamW {self.weight_decay:g}" if self.weight_decay else "",
                 "BatchNorm frozen" if self.bn == "frozen" else "",
                 f"layer decay {self.layer_decay:g}" if self.layer_decay else "",
                 f"unfreeze warm-up {self.unfreeze_warmup:g} epochs" if self.unfreeze_warmup else ""]
        return ", ".join(part for part in parts if part)


SCHEDULES = ("plateau", "cosine")
BATCHNORM = ("train", "frozen")


@dataclass(frozen=True)
class Head:
    """The classifier on top of the backbone, as in the original recipe."""

    units: int = 256
    dropout: float = 0.25
    bn_momentum: float = 0.99  # Keras' default; tiny runs need 0.9 for the statistics to settle in time


@dataclass(frozen=True)
class Profile:
    name: str
    backbone: str
    weights: str  # "imagenet", "noisy-student", "none" or a path to a weights file
    stages: tuple[Stage, ...]
    head: Head = Head()
    options: TrainingOptions = TrainingOptions()
    synthetic: dict = field(default_factory=dict)  # download --synthetic arguments, smoke only
    subdir: str = ""  # the smoke profile keeps to <workdir>/smoke so it never touches real data


# What the measurements on real photos support (docs/accuracy.md, stanford5, 2026-12-01 to 12-03). Freezing the
# backbone's BatchNorm beat training it at both batch sizes measured: +0.039 +- 0.024 at batch 32 (--profile cpu,
# 3 seeds) and +0.139 +- 0.035 at the recipe's own batch of 4 (its stages 5-7 at 448 px, by proxy with Lite0,
# 2 seeds). The cause, statistics estimated from a handful of images, is the B6 recipe's too (batch 16 at stage 4,
# 4 at stages 5-7), so colab freezes it; --bn train is the 2021 recipe as it was. No training option beat the
# recipe beyond noise with pretrained weights (AdamW 0.05: -0.004 +- 0.004 over 3 seeds), so modern, once the
# recipe plus AdamW, is the recipe with what the measurements support: colab's own options, until one wins.
RECIPE_OPTIONS = TrainingOptions(bn="frozen")

DEFAULT_PROFILE = "colab"  # what --profile means when it is not given
PROFILES: dict[str, Profile] = {
    "colab": Profile("colab", "efficientnet-b6", "imagenet", COLAB_STAGES, options=RECIPE_OPTIONS),
    "modern": Profile("modern", "efficientnet-b6", "imagenet", COLAB_STAGES, options=RECIPE_OPTIONS),
    # Short stages: the head's BatchNorm needs a faster momentum to settle in a few dozen steps.
    "cpu": Profile("cpu", "efficientnet-lite0", "imagenet", CPU_STAGES, head=Head(bn_momentum=0.9),
                   options=RECIPE_OPTIONS),
    "smoke": Profile(
        "smoke",
        "tiny-cnn",
        "none",
        SMOKE_STAGES,
        head=Head(units=64, dropout=0.1, bn_momentum=0.9),
        synthetic={"per_class": 80, "test": 40, "size": (160, 120)},
        subdir="smoke",
    ),
}


def stage_of(profile: Profile, step: int) -> Stage:
    for stage in profile.stages:
        if stage.step == step:
            return stage
    raise KeyError(step)


def override_stage(stage: Stage, **changes) -> Stage:
    """The stage with every non-None command-line override applied."""
    return dataclasses.replace(stage, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Workdir:
    """The one folder that holds data, weights and submissions (Google Drive on Colab).

    `data_dir` moves the unpacked photos elsewhere (Colab's local disk, $KIT_DATA_DIR): tens of
    thousands of small files are slow to write to Drive and slow to read back after a disconnect.
    `cache_dir` moves the image caches (--cache-dir, else $KIT_CACHE_DIR): the one rule every
    command follows, so a stage, the prediction and the report share one cache per image size.
    `flags` are the command-line flags that name this folder, so every hint the kit prints can
    repeat them and a pasted command reaches the same place.
    """

    root: Path
    data_dir: Path | None = None
    flags: str = ""
    cache_dir: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))
        for name in ("data_dir", "cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    def __str__(self) -> str:
        return str(self.root)

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None, profile: Profile | None = None,
                cache_dir: str | os.PathLike | None = None) -> "Workdir":
        root = Path(path or os.environ.get("KIT_WORKDIR") or ".").expanduser().resolve()
        flags = []
        subdir = profile.subdir if profile is not None else ""
        if subdir:
            root = root / subdir
        if profile is not None and profile.name != DEFAULT_PROFILE:  # a pasted hint trains the same stage table
            flags += ["--profile", profile.name]
        if path:
            flags += ["--workdir", str(path)]
        if cache_dir:
            flags += ["--cache-dir", str(cache_dir)]

        def moved(given: str | os.PathLike | None) -> Path | None:  # a smoke run's folders beside the real ones
            return Path(given).expanduser().resolve() / subdir if given else None

        return cls(root, moved(os.environ.get("KIT_DATA_DIR")), "".join(f" {shlex.quote(flag)}" for flag in flags),
                   Path(cache_dir).expanduser().resolve() if cache_dir else moved(os.environ.get("KIT_CACHE_DIR")))

    def command(self, module: str, *args: str) -> str:
        """`python -m kit.X ARGS` with the flags that name this work directory, ready to paste."""
        return " ".join([f"python -m {module}", *args]) + self.flags

    @property
    def data(self) -> Path:
        return self.data_dir or self.root / "data"

    # This competition's layout under data/ (what --synthetic writes too); other datasets are found
    # through data/index.csv, which kit.download writes for every layout.
    @property
    def train_csv(self) -> Path:
        return self.data / "train.csv"

    @property
    def sample_submission(self) -> Path:
        return self.data / "sample-submission.csv"

    @property
    def train_dir(self) -> Path:
        return self.data / "train"

    @property
    def test_dir(self) -> Path:
        return self.data / "test_upload"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def cache(self) -> Path:
        """The image caches: --cache-dir, $KIT_CACHE_DIR (e.g. Colab's local disk, faster than Drive) or cache/."""
        return self.cache_dir or self.root / "cache"

    @property
    def compiled(self) -> Path:
        """XLA's compiled programs (JAX): kept with the run, which outlives a session, not with the image cache."""
        return self.weights / "compiled"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def tensorboard(self) -> Path:
        """The run's one TensorBoard event log: with the run, so a copied or pulled run keeps its curves."""
        return self.weights / "tensorboard"

    @property
    def manifest(self) -> Path:
        return self.weights / "state.json"

    @property
    def split_csv(self) -> Path:
        """The train/validation split belongs to the run (kept with its weights), not to the unpacked photos."""
        return self.weights / "split.csv"

    @property
    def pseudo_labels(self) -> Path:
        """The run's copy of the pseudo-label list it trains on (kit.pseudo writes one; --pseudo-labels copies it)."""
        return self.weights / "pseudo_labels.csv"

    @property
    def lock(self) -> Path:
        return self.root / ".kit.lock"

    def stage_dir(self, step: int) -> Path:
        return self.weights / f"stage_{step}"

    @property
    def submissions(self) -> Path:
        return self.root / "submissions"

    @property
    def report(self) -> Path:
        return self.submissions / "report"
