"""`load_pretrained` / `save_pretrained`: Hugging Face GPT-2 directories in and out."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.errors import CheckpointError
from condensa.hub import resolve_model_dir
from condensa.model.config import GPT2Config
from condensa.model.gpt2 import GPT2
from condensa.model.hf_convert import export_tensors, load_into

_WEIGHT_FILES = ["config.json", "model.safetensors", "pytorch_model.bin"]


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({err}); download or export the checkpoint again."
        ) from None


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path.parent} has only pytorch_model.bin, which needs PyTorch to read; "
            "`pip install torch`, or convert the checkpoint to model.safetensors."
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"{path} is truncated or corrupt ({err}); download the checkpoint again.") from None
    return {k: v.float().numpy() for k, v in state.items()}


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """The tensors of an HF model directory, preferring safetensors over a torch pickle."""
    if (directory / "model.safetensors").is_file():
        return _read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _read_torch_bin(directory / "pytorch_model.bin")
    raise CheckpointError(
        f"{directory} has no model.safetensors or pytorch_model.bin; it is not a model directory."
    )


def load_pretrained(name_or_path: str | os.PathLike, *, dtype=jnp.float32, seed: int = 0, **model_kwargs):
    """Loads a GPT-2 from a local HF directory or a hub id. Returns `(model, config)`.

    Parameters stay float32; `dtype` is the compute dtype. Extra keyword arguments (for example
    `attention=AttentionConfig(...)` or `remat=True`) go to the `GPT2` constructor.
    """
    directory = resolve_model_dir(name_or_path, allow_patterns=_WEIGHT_FILES)
    config = GPT2Config.from_json_file(directory / "config.json")
    tensors = read_weights(directory)
    model = GPT2(config, dtype=dtype, rngs=nnx.Rngs(seed), **model_kwargs)
    load_into(model, tensors, source=str(directory))
    model.eval()
    return model, config


def save_pretrained(model: GPT2, config: GPT2Config, path: str | os.PathLike, tokenizer=None) -> Path:
    """Writes config.json + model.safetensors (+ the tokenizer) that `GPT2LMHeadModel.from_pretrained`
    loads with nothing missing. Files are written to temporaries and renamed, so an interrupted save
    never leaves a half-written model where a good one was."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / "config.json", lambda p: Path(p).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n"))
    tensors = export_tensors(model)
    _atomic_write(path / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
