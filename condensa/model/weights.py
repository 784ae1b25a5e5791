"""Reading checkpoint tensors one at a time: single or sharded safetensors, or PyTorch pickles.

A large model must not sit in host memory twice (once as the file's tensors, once as parameters),
so `CheckpointReader` maps names to files and reads a tensor only when asked; loaders assign it
into the model and drop it before reading the next. Safetensors files are memory-mapped; a
PyTorch pickle is opened with `mmap=True`, so its tensors are not read until converted either.
Sharded checkpoints (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) are read
through their `weight_map`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from condensa.errors import CheckpointError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# What a hub download of a model directory needs (shards are named in the index).
WEIGHT_PATTERNS = ["config.json", SAFETENSORS, SAFETENSORS_INDEX, "model-*.safetensors", TORCH_BIN, TORCH_INDEX,
                   "pytorch_model-*.bin"]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a valid shard index ({err!r}); download the checkpoint again.") from None
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        raise CheckpointError(f"{index} lists shard file(s) {', '.join(missing)} that are not in {index.parent}; "
                              "download the missing shards.")
    return dict(weight_map)


class CheckpointReader:
    """Lazy tensor access over an HF model directory. Use as a context manager; `get` returns one
    tensor as a NumPy or JAX array in the file's dtype (bfloat16 comes back as a JAX array)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        d = self.directory
        if (d / SAFETENSORS_INDEX).is_file():
            self.kind, self._files = "safetensors", _weight_map(d / SAFETENSORS_INDEX)
        elif (d / SAFETENSORS).is_file():
            self.kind, self._files = "safetensors", None
        elif (d / TORCH_INDEX).is_file():
            self.kind, self._files = "torch", _weight_map(d / TORCH_INDEX)
        elif (d / TORCH_BIN).is_file():
            self.kind, self._files = "torch", None
        else:
            raise CheckpointError(
                f"{d} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}; it is not a model directory."
            )
        self._open: dict[str, object] = {}
        if self._files is None:
            single = SAFETENSORS if self.kind == "safetensors" else TORCH_BIN
            self._files = {name: single for name in self._handle(single).keys()}

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str):
        handle = self._handle(self._files[name])
        if self.kind == "torch":
            return handle[name].float().numpy()
        try:
            if handle.get_slice(name).get_dtype() == "BF16":  # NumPy has no bfloat16: read it with JAX
                return self._handle(self._files[name], framework="flax").get_tensor(name)
            return handle.get_tensor(name)
        except KeyError:
            raise CheckpointError(f"{self.directory} maps {name} to {self._files[name]}, which does not contain it; "
                                  "the index and its shards do not belong together: download the checkpoint again.") from None
        except (SafetensorError, OSError, ValueError) as err:  # what truncated or garbled data raises
            raise CheckpointError(f"{self.directory / self._files[name]} is truncated or corrupt ({err}); "
                                  "download or export the checkpoint again.") from None

    def _handle(self, filename: str, framework: str = "numpy"):
        key = f"{framework}:{filename}"
        if key not in self._open:
            path = self.directory / filename
            if self.kind == "torch":
                self._open[key] = _torch_load(path)
            else:
                from safetensors import safe_open

                try:
                    self._open[key] = safe_open(str(path), framework=framework)
                except Exception as err:
                    raise CheckpointError(f"{path} is truncated or corrupt ({err}); download or export the "
                                          "checkpoint again.") from None
        return self._open[key]

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _torch_load(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path.parent} has only PyTorch pickles ({path.name}), which need PyTorch to read; "
            "`pip install torch`, or convert the checkpoint to safetensors."
        ) from None
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # pickles older than torch 1.6's zip format cannot be memory-mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"{path} is truncated or corrupt ({err}); download the checkpoint again.") from None


def read_all(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) checkpoint as float32 NumPy: for small models only."""
    with CheckpointReader(directory) as reader:
        return {name: np.asarray(reader.get(name), np.float32) for name in reader.keys()}
