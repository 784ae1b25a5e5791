"""`load_pretrained` / `save_pretrained`: Hugging Face model directories in and out.

config.json's `model_type` picks the family (`condensa.model.registry`): GPT-2 checkpoints are
small and read whole; LLaMA-family checkpoints (llama, mistral, qwen2) are read tensor by tensor
from single or sharded files and written in shards, so a large model is never held twice. GGUF
files load through the same code: `gguf_convert` presents one as an HF checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa import jsonio
from condensa.errors import CheckpointError
from condensa.model.gguf_convert import GGUFCheckpoint, config_values
from condensa.model.gguf_file import open_gguf
from condensa.model.gpt2.config import GPT2Config
from condensa.model.gpt2.network import GPT2
from condensa.model.gpt2.convert import export_tensors, load_into
from condensa.model.llama.convert import abstract_model, iter_export_tensors, load_streaming, write_shards
from condensa.model.registry import build_model, config_from_dict, config_from_json_file
from condensa.model.sources import resolve_model
from condensa.model.weights import SAFETENSORS_INDEX, TORCH_INDEX, WEIGHT_PATTERNS, CheckpointReader, read_all

_WEIGHT_FILES = WEIGHT_PATTERNS
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # the LLaMA family is written in shards of at most this many bytes


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
    if (directory / SAFETENSORS_INDEX).is_file() or (
            not (directory / "model.safetensors").is_file() and (directory / TORCH_INDEX).is_file()):
        return read_all(directory)  # sharded: small enough to read whole for GPT-2
    if (directory / "model.safetensors").is_file():
        return _read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _read_torch_bin(directory / "pytorch_model.bin")
    raise CheckpointError(
        f"{directory} has no model.safetensors or pytorch_model.bin; it is not a model directory."
    )


def load_pretrained(name_or_path: str | os.PathLike, *, dtype=jnp.float32, seed: int = 0, **model_kwargs):
    """Loads a model and returns `(model, config)`. `name_or_path` is a local HF directory, a `.gguf`
    file (or a folder holding one), a named model such as `smollm2-135m`, or a hub id.

    The family comes from config.json's `model_type` (or the GGUF's architecture): gpt2 (`GPT2`) or
    llama / mistral / qwen2 (`Llama`); any other is a `ConfigError` that lists the supported ones.
    Parameters stay float32 (GGUF tensors are dequantised to it); `dtype` is the compute dtype.
    Extra keyword arguments (for example `attention=AttentionConfig(...)` or `remat=True`) go to the
    model constructor.
    """
    source = resolve_model(name_or_path, allow_patterns=_WEIGHT_FILES)
    if source.is_gguf:
        gguf_file = open_gguf(source.path)
        config = config_from_dict(config_values(gguf_file), source=str(source.path))
        reader = GGUFCheckpoint(gguf_file, config)
    else:
        config = config_from_json_file(source.path / "config.json")
        reader = None if isinstance(config, GPT2Config) else CheckpointReader(source.path)
    model = _build(config, reader, source=str(source.path), dtype=dtype, seed=seed, **model_kwargs)
    model.eval()
    return model, config


def _build(config, reader, *, source: str, dtype, seed: int, **model_kwargs):
    """The model of `config` with its weights from `reader` (None: a GPT-2 directory, read whole)."""
    if isinstance(config, GPT2Config):
        tensors = read_weights(Path(source)) if reader is None else _gpt2_tensors(reader, source)
        model = GPT2(config, dtype=dtype, rngs=nnx.Rngs(seed), **model_kwargs)
        load_into(model, tensors, source=source)
        return model

    with reader:  # tensor by tensor: the model is never in memory twice
        model = abstract_model(lambda: build_model(config, dtype=dtype, rngs=nnx.Rngs(seed), **model_kwargs), seed)
        load_streaming(model, reader, source=source)
    return model


def _gpt2_tensors(reader, source: str) -> dict[str, np.ndarray]:
    """A GGUF GPT-2's tensors. llama.cpp writes the tied output matrix as a copy of the embedding
    (`lm_head.weight` here); condensa's GPT-2 is always tied, so a copy that differs is refused."""
    tensors = {name: reader.get(name) for name in reader.keys()}
    head = tensors.pop("lm_head.weight", None)
    embedding = tensors.get("wte.weight")
    if head is not None and embedding is not None and not (  # a copy quantised apart differs by its rounding only
            head.shape == embedding.shape and np.linalg.norm(head - embedding) <= 0.05 * np.linalg.norm(embedding)):
        raise CheckpointError(f"{source} has an output matrix that differs from its token embedding; condensa's "
                              "GPT-2 ties them, as every released GPT-2 does, so this model cannot be loaded.")
    return tensors


def save_pretrained(model, config, path: str | os.PathLike, tokenizer=None, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes config.json + the weights (+ the tokenizer) that transformers' `from_pretrained`
    (`GPT2LMHeadModel`, `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`) loads with
    nothing missing. LLaMA-family weights go into shards of at most `max_shard_bytes` (one
    model.safetensors when they fit) with a model.safetensors.index.json. Files are written to
    temporaries and renamed, so an interrupted save never leaves a half-written model where a good
    one was."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / "config.json", lambda p: Path(p).write_text(jsonio.dumps(config.to_hf_dict(), indent=2) + "\n"))
    if isinstance(config, GPT2Config):
        tensors = export_tensors(model)
        _atomic_write(path / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        # readers prefer a shard index: one left by an earlier sharded save would shadow this file
        for stale in [path / SAFETENSORS_INDEX, *path.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
    else:
        write_shards(iter_export_tensors(model), path, max_shard_bytes=int(max_shard_bytes), atomic_write=_atomic_write)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _atomic_write(target: Path, write) -> None:
    """`write(tmp)`, then `tmp` renamed to `target`. mkstemp makes the temporary private (0600), so
    it is given the mode a plain `open` would: an exported model is read by other users and tools."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
