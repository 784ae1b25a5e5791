"""Hugging Face LLaMA-family tensors <-> condensa's NNX parameters, one tensor at a time.

HF's `nn.Linear` stores weights as [out, in]; an NNX `Linear` kernel is [in, out], so matrices are
transposed both ways (embeddings and norms are copied). Loading assigns each tensor into the model
as soon as it is read, and saving writes shards of bounded size, so a large checkpoint never sits
in host memory twice. One table of (HF name, NNX path, transpose) drives both directions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa import jsonio
from condensa.model.llama.config import LlamaConfig
from condensa.model.param_paths import param_at, raise_mismatches
from condensa.model.weights import SAFETENSORS as SINGLE
from condensa.model.weights import SAFETENSORS_INDEX as INDEX

_PREFIX = "model."
# Buffers some checkpoints carry that hold no parameters (rotary tables are recomputed from the config).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def parameter_map(config: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name (with the `model.` prefix) -> (NNX path, whether to transpose)."""
    names: dict[str, tuple[tuple, bool]] = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
        "model.norm.weight": (("norm", "weight"), False),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    linears = [("self_attn", p, config.qkv_bias) for p in ("q_proj", "k_proj", "v_proj")]
    linears += [("self_attn", "o_proj", config.o_bias)]
    linears += [("mlp", p, config.mlp_bias) for p in ("gate_proj", "up_proj", "down_proj")]
    for i in range(config.n_layer):
        layer = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{layer}.{norm}.weight"] = (("layers", i, norm, "weight"), False)
        for module, proj, bias in linears:
            names[f"{layer}.{module}.{proj}.weight"] = (("layers", i, module, proj, "kernel"), True)
            if bias:
                names[f"{layer}.{module}.{proj}.bias"] = (("layers", i, module, proj, "bias"), False)
    return names


def _canonical(name: str) -> str:
    """Accepts checkpoints of the bare `LlamaModel` (tensors without the `model.` prefix)."""
    if name.startswith(_PREFIX) or name.startswith("lm_head."):
        return name
    return _PREFIX + name


def abstract_model(build, seed: int) -> nnx.Module:
    """`build()`'s model with shapes only: parameters are `ShapeDtypeStruct`s until `load_streaming`
    fills them, so loading never spends time or memory on a random initialisation it would discard.
    The dropout RNG streams (tiny) get concrete keys at once, one per stream, folded from `seed`."""
    model = nnx.eval_shape(build)
    base = jax.random.key(seed)
    for i, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))):
        if isinstance(variable, nnx.RngKey):
            variable.set_value(jax.random.fold_in(base, i))
        elif isinstance(variable, nnx.RngCount):
            variable.set_value(jnp.zeros(variable.get_value().shape, variable.get_value().dtype))
        else:
            raise TypeError(f"abstract_model cannot fill the non-parameter variable {path} ({type(variable).__name__})")
    return model


def load_streaming(model: nnx.Module, reader, *, source: str) -> None:
    """Copies the tensors of `reader` (a `CheckpointReader`) into `model`'s parameters one by one;
    every missing, unexpected or misshapen tensor is collected and reported in one `CheckpointError`.

    Each parameter is replaced in place (its random initial value is freed at once), so host memory
    holds the model plus one tensor, never the checkpoint twice.
    """
    config = model.config
    mapping = parameter_map(config)
    available = {_canonical(name): name for name in reader.keys()}
    state = nnx.state(model, nnx.Param)  # the model's own Variables: setting one updates the model
    problems = []
    for name in sorted(set(available) - set(mapping)):
        if _IGNORED.search(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: lm_head is embed_tokens (some exports write it anyway)
        problems.append(f"unexpected tensor {name!r}")
    for name, (path, transpose) in mapping.items():
        if name not in available:
            problems.append(f"missing tensor {name!r}")
            continue
        param = param_at(state, path)
        expected = param.get_value()
        value = reader.get(available[name])
        shape = tuple(value.shape[::-1]) if transpose else tuple(value.shape)
        if shape != tuple(expected.shape):
            problems.append(f"{name!r} has shape {tuple(value.shape)}, the config expects "
                            f"{tuple(expected.shape[::-1]) if transpose else tuple(expected.shape)}")
            continue
        value = jnp.asarray(value, expected.dtype)
        param.set_value(value.T if transpose else value)
        del value
    raise_mismatches(problems, source=source)
    nnx.update(model, state)


def iter_export_tensors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 NumPy tensor) pairs, produced one at a time."""
    state = nnx.state(model, nnx.Param)
    for name, (path, transpose) in parameter_map(model.config).items():
        value = np.asarray(param_at(state, path).get_value(), dtype=np.float32)
        yield name, np.ascontiguousarray(value.T if transpose else value)


def write_shards(tensors: Iterator[tuple[str, np.ndarray]], directory: Path, *, max_shard_bytes: int,
                 atomic_write) -> list[str]:
    """Writes `tensors` as model.safetensors, or as model-0000i-of-0000n.safetensors shards of at most
    `max_shard_bytes` each (a tensor larger than that gets a shard of its own) plus
    model.safetensors.index.json, the layout `from_pretrained` reads. Holds one shard in memory.
    Returns the files written; stale weight files of an earlier save are removed."""
    from safetensors.numpy import save_file

    shards: list[list[str]] = [[]]
    pending: dict[str, np.ndarray] = {}
    size = total = 0
    temporary = []

    def flush():
        nonlocal pending, size
        if not pending:
            return
        path = directory / f".shard-{len(temporary):05d}.safetensors.partial"
        save_file(pending, str(path), metadata={"format": "pt"})
        temporary.append(path)
        shards[-1] = list(pending)
        shards.append([])
        pending, size = {}, 0

    for name, value in tensors:
        if pending and size + value.nbytes > max_shard_bytes:
            flush()
        pending[name] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    shards = shards[:-1]
    n = len(temporary)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(temporary, names):
        atomic_write(directory / final, lambda p, tmp=tmp: Path(tmp).replace(p))
    index = directory / INDEX
    if n > 1:
        weight_map = {tensor: file for file, members in zip(names, shards) for tensor in members}
        body = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
        atomic_write(index, lambda p: Path(p).write_text(jsonio.dumps(body, indent=2) + "\n"))
    written = set(names) | ({INDEX} if n > 1 else set())
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / INDEX, directory / SINGLE]:
        if stale.name not in written and stale.is_file():
            stale.unlink()
    return sorted(written)

