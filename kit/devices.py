"""How a run executes on this machine: which devices, data parallelism, precision. How, never what.

The only module that knows `tf.distribute` and `keras.distribution`. Data parallelism splits each
stage's batch (the global batch, the table's number) evenly across the devices, and BatchNorm's
statistics are taken over the whole batch on every device (JAX: the step is one program over the
sharded batch; TensorFlow: the layers are switched to synchronized statistics). So every device
count trains the same model from the same batches, at the table's learning rate, and a run can
move between one and several devices on resume without changing what it learns.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.cli import KitError

ALL = "all"


def request_cpu_devices(count: int) -> None:
    """Split the CPU into `count` logical devices (for a machine without accelerators, and the tests).

    It must happen before the backend starts: JAX reads XLA_FLAGS when it first initialises, and
    TensorFlow refuses to reconfigure devices once any op has run.
    """
    if count <= 1:
        return
    flag = f"--xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = " ".join([*(f for f in os.environ.get("XLA_FLAGS", "").split()
                                          if not f.startswith("--xla_force_host_platform_device_count")), flag])
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        if not tf.config.list_physical_devices("GPU"):
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def cache_compilations(folder: Path) -> None:
    """Keep what XLA compiles in `folder` (JAX; Workdir.compiled, with the run), so a resume skips compiling.

    On an H100 XLA took 120-131 s to compile and autotune EfficientNetB6's training step, and every
    stage start and every resume paid it again; on this CPU a cached B0 step starts in 6.5 s
    instead of 23. Every program is kept, not only those JAX keeps by default (over 1 s to compile):
    building a network runs one small program per weight shape for its initializers, 52 for
    EfficientNet-Lite0, and on this CPU a warm cache builds it in 3.5 s instead of 18.8. JAX keys
    each entry by the program, the device kind, its own version and the XLA flags, so another GPU
    compiles afresh beside the old entries. The folder lives with the run's weights, which the
    notebooks keep between sessions (Drive, a Kaggle version's output), not with the image cache,
    which they put on a disk wiped each session. A JAX_COMPILATION_CACHE_DIR of your own wins (one
    cache for every run on a machine). Nothing is set up for TensorFlow: its XLA cache was not
    measured here (no TensorFlow on the GPU machine).
    """
    import keras

    if keras.backend.backend() == "jax":
        import jax

        folder = Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or folder)
        folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def keep_gpu_autotuning(folder: Path) -> None:
    """JAX on a GPU: XLA's per-fusion autotuning results kept in `folder` (with the run), set before the backend starts.

    Autotuning picks each convolution's kernel by timing the candidates; for B6 in bfloat16 it took
    over 200 s on an H100 and ran again in every session. The compilation cache (cache_compilations)
    keeps whole programs; this keeps the choices per fusion, so a changed program (another stage's
    unfrozen share, another batch) reuses those of the fusions it shares. It lives with the run,
    which the notebooks keep between sessions, not in the runtime's local cache that they wipe.
    Set only under JAX: TensorFlow's XLA would refuse a flag its version does not know.
    """
    import keras

    if keras.backend.backend() != "jax":
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_gpu_per_fusion_autotune")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_gpu_per_fusion_autotune_cache_dir={folder}"])


def request_determinism() -> None:
    """--deterministic before the backend starts: JAX's GPU kernels are chosen when XLA starts.

    TensorFlow's switch (enable_op_determinism) is thrown when a stage builds its model; the
    torch backend gets none from the kit, and says so in --help.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def jit_compile(setting: str) -> str | bool:
    """--jit auto|on|off as Keras' `compile(jit_compile=...)` takes it."""
    return {"auto": "auto", "on": True, "off": False}[setting]


def device_names() -> list[str]:
    """This process's devices for training: every accelerator (a TPU's cores under JAX), else every (logical) CPU.

    Under TensorFlow a TPU is refused (tpu_present): TensorFlow sees a TPU only through a TPU
    strategy the kit does not build, and would train on the CPU instead without a word.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        if not gpus and tpu_present():
            raise KitError("This machine has a TPU, which Keras' TensorFlow backend cannot reach here: the stage would "
                           "train on the CPU, a hundred times slower. Train under Keras' JAX backend, which takes "
                           "the TPU's cores as devices (--devices all splits each batch over them): "
                           "pip install -U 'jax[tpu]', then run the same command with KERAS_BACKEND=jax in front "
                           "(docs/devices-and-jax.md). Or pick a GPU runtime.")
        return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id}" for d in jax.devices()]
    return ["cpu:0"]  # the torch backend: one device


TPU_VARIABLES = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR")  # what TPU runtimes set (Colab, Kaggle, GCP)


def tpu_present(environ: dict | None = None, dev: Path = Path("/dev")) -> bool:
    """A Cloud TPU on this machine, seen without starting a framework: the variables TPU runtimes set, or
    the TPU's device files (/dev/accel0... on TPU v2-v4 VMs)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in TPU_VARIABLES) or any(dev.glob("accel[0-9]*"))


def choose_count(requested: str, available: int) -> int:
    """--devices N|all as a number, refusing more than the machine has."""
    if requested == ALL:
        return available
    count = int(requested)
    if count > available:
        raise KitError(f"--devices {count}: this machine has {available} device{'s' if available > 1 else ''} "
                       f"for training. Use --devices {available} (or all); on a CPU-only machine the devices are "
                       "logical ones, which need `--devices N` from the start of the command.")
    return count


@dataclass
class Parallel:
    """The devices one stage trains on: build the model inside `scope()`, pass batches through `split`."""

    count: int = 1
    _strategy: object = None  # tf.distribute.MirroredStrategy on TensorFlow with several devices

    @classmethod
    def over(cls, count: int) -> "Parallel":
        """Data parallel over the first `count` devices (one device: nothing distributed at all)."""
        import keras

        if count <= 1:
            return cls(1)
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            return cls(count, tf.distribute.MirroredStrategy(device_names()[:count]))
        if keras.backend.backend() == "jax":
            import jax

            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()[:count]))
            return cls(count)
        raise KitError("Several devices need Keras' TensorFlow or JAX backend; use --devices 1 with this one.")

    def scope(self):
        """Where the model and its optimizer are built: their variables are mirrored on every device."""
        return self._strategy.scope() if self._strategy is not None else contextlib.nullcontext()

    def prepare(self, model) -> None:
        """BatchNorm's statistics over the whole batch, not each device's share (TensorFlow needs telling)."""
        if self._strategy is None:
            return
        import keras

        for layer in _all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True

    def build_compiled(self, model, classes: int) -> None:
        """Build the compiled loss and metrics, which Keras does on the first batch it sees.

        Under tf.distribute it cannot do that from a batch already split across devices, so it is
        shown one plain batch first (a test step: the weights do not change; the metrics are reset
        before every training step anyway).
        """
        if self._strategy is None:
            return
        shape = (self.count, *model.input_shape[1:])
        model.test_on_batch(np.zeros(shape, np.uint8), np.eye(classes, dtype=np.float32)[[0] * self.count])

    def split(self, *arrays: np.ndarray):
        """The batch as the devices take it: TensorFlow wants each replica's share; JAX shards it itself."""
        if self._strategy is None:
            return arrays if len(arrays) > 1 else arrays[0]
        share = len(arrays[0]) // self.count

        def part(array):
            return self._strategy.experimental_distribute_values_from_function(
                lambda context: array[context.replica_id_in_sync_group * share:
                                      (context.replica_id_in_sync_group + 1) * share])

        parts = tuple(part(a) for a in arrays)
        return parts if len(parts) > 1 else parts[0]

    def predict(self, model, images: np.ndarray) -> np.ndarray:
        """model.predict_on_batch over the devices; a batch that does not split evenly is padded, then trimmed."""
        if self.count == 1:
            return np.asarray(model.predict_on_batch(images))
        missing = -len(images) % self.count
        padded = np.concatenate([images, np.repeat(images[-1:], missing, axis=0)]) if missing else images
        return np.asarray(model.predict_on_batch(self.split(padded)))[:len(images)]

    def describe(self) -> str:
        return "1 device" if self.count == 1 else f"{self.count} devices (data parallel)"

    def close(self) -> None:
        """Forget the distribution, so a later model in this process is built on one device again."""
        if self._strategy is None and self.count > 1:
            import keras

            keras.distribution.set_distribution(None)


def _all_layers(model):
    """Every layer, nested models' included (the backbone is a model inside the model)."""
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


# ---- precision and the accelerator, in words ----------------------------------------------------

def choose_precision(precision: str) -> str:
    """'auto' is the machine's rule (precision_for); any other value is taken as given."""
    if precision != "auto":
        return precision
    import keras

    return precision_for(_gpu_compute_capability(), keras.backend.backend())


def precision_for(compute_capability: float | None, backend: str = "tensorflow") -> str:
    """Mixed precision where the GPU has the units for it, Keras' mixed-precision guide's rule: float16 from
    compute capability 7.0 (V100, T4), bfloat16 from 8.0 (A100, L4, H100); float32 below 7.0 (Kaggle's P100,
    6.0, where float16 is slower than float32) and on a CPU (None).

    Under JAX a GPU trains in float32: mixed bfloat16 B6 never finished compiling on an H100 (XLA's
    convolution autotuning ran past 200 s), and no mixed setting has been seen to compile and win
    there yet. `--precision mixed_bfloat16` still asks for it.
    """
    if compute_capability is None or compute_capability < 7.0 or backend == "jax":
        return "float32"
    return "mixed_bfloat16" if compute_capability >= 8.0 else "mixed_float16"


def describe_device() -> str:
    """The accelerator a run is on, in words ('NVIDIA Tesla T4', 'CPU'): recorded with each checkpoint."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return "CPU" if device.platform == "cpu" else str(device.device_kind)
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return "CPU"


def _gpu_compute_capability() -> float | None:
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        major, minor = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (7, 0))
        return major + minor / 10
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "gpu":
            return None
        return float(getattr(device, "compute_capability", "7.0"))
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return major + minor / 10
    return None
