"""Opening a GGUF file (llama.cpp's format) through the `gguf` package, with errors that say what to do.

A GGUF holds the metadata (architecture, shape, tokenizer) and the tensors, many of them quantised
in blocks. `gguf.GGUFReader` memory-maps the file, so a tensor is read (and dequantised to
float32) only when asked for, one at a time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from condensa.errors import CheckpointError

# The tensor types condensa reads: the plain floats, and the block quantisations that `gguf`
# dequantises exactly as llama.cpp does (tested against transformers' GGUF loader for the first six).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
INSTALL_GGUF = "pip install gguf"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"reading a .gguf file needs the gguf package; `{INSTALL_GGUF}`.") from None
    return gguf


class GGUFFile:
    """Metadata and lazily dequantised tensors of one GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        gguf = _gguf()
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except (ValueError, IndexError, KeyError, OSError, TypeError) as err:  # what short or garbled files raise
            raise CheckpointError(
                f"{self.path} is truncated or is not a GGUF file ({err}); download or convert it again."
            ) from None
        self._tensors = {t.name: t for t in self._reader.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value: a scalar, a string, or a list; `default` when the key is absent."""
        field = self._reader.get_field(key)
        if field is None:
            return default
        return field.contents()

    def has(self, key: str) -> bool:
        return self._reader.get_field(key) is not None

    @property
    def architecture(self) -> str:
        arch = self.value("general.architecture")
        if arch is None:
            raise CheckpointError(f"{self.path} has no general.architecture; it is not a model GGUF.")
        return str(arch)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in NumPy order (GGUF lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def unsupported_types(self) -> dict[str, list[str]]:
        """Tensor type -> the names of the tensors stored in it, for the types condensa cannot read."""
        found: dict[str, list[str]] = {}
        for name, tensor in self._tensors.items():
            if tensor.tensor_type.name not in SUPPORTED_TYPES:
                found.setdefault(tensor.tensor_type.name, []).append(name)
        return found

    def check_types(self) -> None:
        """A `CheckpointError` naming every tensor type that condensa cannot dequantise."""
        unsupported = self.unsupported_types()
        if unsupported:
            kinds = ", ".join(f"{kind} ({len(names)} tensors, e.g. {names[0]})" for kind, names in unsupported.items())
            raise CheckpointError(
                f"{self.path} stores tensors in quantisation types condensa does not read: {kinds}. Supported: "
                f"{', '.join(SUPPORTED_TYPES)}; re-quantise the model to one of these (llama.cpp's llama-quantize)."
            )

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 NumPy in its NumPy shape, dequantised if it is quantised."""
        gguf = _gguf()
        tensor = self._tensors[name]
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            self.check_types()
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (ValueError, IndexError) as err:
            raise CheckpointError(f"{self.path}: tensor {name} ({kind}) could not be read ({err}); the file is "
                                  "truncated or corrupt: download or convert it again.") from None
        values = np.asarray(values, dtype=np.float32).reshape(self.shape(name))
        return values


def open_gguf(path: str | Path) -> GGUFFile:
    """`GGUFFile(path)`, shared while the file is unchanged: parsing the metadata of a real model
    (its tokenizer's 49k-entry arrays) takes seconds, and the model and its tokenizer both need it."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror}); pass an existing .gguf file.") from None
    return _open_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open_cached(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)

