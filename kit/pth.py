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
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


class DamagedPth(pickle.UnpicklingError):
    """The file's sizes do not add up (a tensor past its storage, a storage past the file): nothing is allocated."""


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

    def array(self, name: str) -> np.ndarray:
        """The tensor's elements, copied out of its storage, once every index is known to lie inside it.

        as_strided trusts its arguments: a stride past the storage reads (or faults on) memory that is
        not the file's, and zero strides make a few bytes a gigabyte. So a tensor must be a view that
        stays inside its storage and holds no more elements than the storage does (a saved state dict
        never repeats an element), which bounds what is allocated by what the file holds.
        """
        flat = self.storage.data
        if flat is None:
            raise DamagedPth(f"tensor {name}'s storage {self.storage.key} has no data in the file")
        if self.offset < 0 or any(n < 0 for n in self.size) or any(s < 0 for s in self.stride) \
                or len(self.size) != len(self.stride):
            raise DamagedPth(f"tensor {name} has a negative offset, size or stride, or not one stride per "
                             f"dimension (offset {self.offset}, size {self.size}, stride {self.stride})")
        count = math.prod(self.size)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if count else self.offset - 1
        if last >= len(flat) or count > len(flat):
            raise DamagedPth(f"tensor {name} ({count} elements, offset {self.offset}, stride {self.stride}) "
                             f"reaches past its storage of {len(flat)} elements")
        if not self.size:
            return flat[self.offset].copy()
        return np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                               [s * flat.itemsize for s in self.stride]).copy()


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise DamagedPth(f"a tensor is built from a {type(storage).__name__}, not a storage")
    return _Tensor(storage, int(offset), tuple(map(int, size)), tuple(map(int, stride)))


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
    """name -> array for every tensor of a legacy-format `.pth` state dict; refuses anything else.

    Every size the file states is checked against the bytes it holds before anything is allocated.
    """
    path = Path(path)
    storages: dict[str, _Storage] = {}
    if zipfile.is_zipfile(path):
        raise pickle.UnpicklingError(f"{path} is in PyTorch's zip format (torch.save since 1.6); only the legacy "
                                     "format of the published EfficientNet-Lite files is read")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # Every pickle in the file goes through the restricted unpickler, the plain numbers too.
            if _Unpickler(f, {}).load() != LEGACY_MAGIC:
                raise pickle.UnpicklingError("it is not a legacy PyTorch file")
            _Unpickler(f, {}).load()  # protocol version
            _Unpickler(f, {}).load()  # system info
            result = _Unpickler(f, storages).load()
            for key in _Unpickler(f, {}).load():  # the storages' keys, in the order their bytes follow
                _read_storage(f, storages, str(key), size)
        if not isinstance(result, dict):
            raise UnsafePickle(f"it holds a {type(result).__name__}, not a state dict")
        return {name: tensor.array(name) for name, tensor in result.items() if isinstance(tensor, _Tensor)}
    except pickle.UnpicklingError as error:
        raise type(error)(f"{path}: {error}") from None


def _read_storage(f: BinaryIO, storages: dict[str, _Storage], key: str, file_size: int) -> None:
    """One storage's bytes, after checking that the file holds as many as its header claims."""
    if key not in storages:
        raise DamagedPth(f"the file lists bytes for storage {key}, which no tensor uses")
    storage = storages[key]
    header = f.read(8)
    if len(header) < 8:
        raise DamagedPth(f"the file ends before storage {key}'s bytes")
    count = int(np.frombuffer(header, "<i8")[0])
    nbytes = count * np.dtype(storage.dtype).itemsize
    if count < 0 or nbytes > file_size - f.tell():
        raise DamagedPth(f"storage {key} claims {count} elements ({nbytes} bytes), more than the "
                         f"{file_size - f.tell()} bytes left in the file")
    storage.data = np.frombuffer(f.read(nbytes), storage.dtype)
