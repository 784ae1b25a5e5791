"""Map Hugging Face GPT-2 tensor names to condensa's NNX parameters and back.

HF's `Conv1D` stores weights as [in, out], the same as an NNX `Linear` kernel, so weights are
copied, never transposed. One table of (HF name, NNX path) pairs drives both directions.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from condensa.model.gpt2.config import GPT2Config
from condensa.model.param_paths import param_at, raise_mismatches

# HF buffers and aliases that carry no parameters of their own.
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|^lm_head\.weight$")
_PREFIX = "transformer."


def parameter_map(config: GPT2Config) -> dict[str, tuple]:
    """HF tensor name (without the `transformer.` prefix) -> NNX state path."""
    names = {
        "wte.weight": ("wte", "embedding"),
        "wpe.weight": ("wpe", "embedding"),
        "ln_f.weight": ("ln_f", "scale"),
        "ln_f.bias": ("ln_f", "bias"),
    }
    per_layer = {
        "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
        "attn.c_attn.weight": ("attn", "c_attn", "kernel"), "attn.c_attn.bias": ("attn", "c_attn", "bias"),
        "attn.c_proj.weight": ("attn", "c_proj", "kernel"), "attn.c_proj.bias": ("attn", "c_proj", "bias"),
        "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
        "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"), "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
        "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"), "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
    }
    for i in range(config.n_layer):
        for hf, path in per_layer.items():
            names[f"h.{i}.{hf}"] = ("h", i, *path)
    return names


def load_into(model: nnx.Module, tensors: dict[str, np.ndarray], *, source: str) -> None:
    """Copies HF `tensors` into `model`'s parameters; every missing, unexpected or misshapen tensor
    is collected and reported in one `CheckpointError`."""
    tensors = {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in tensors.items()}
    mapping = parameter_map(model.config)
    state = nnx.state(model, nnx.Param)
    problems = []
    for name in sorted(set(tensors) - set(mapping)):
        if not _IGNORED.search(name):
            problems.append(f"unexpected tensor {name!r}")
    for name, path in mapping.items():
        if name not in tensors:
            problems.append(f"missing tensor {name!r}")
            continue
        param = param_at(state, path)
        value = np.asarray(tensors[name])
        expected = param.get_value()
        if value.shape != expected.shape:
            problems.append(f"{name!r} has shape {value.shape}, the config expects {expected.shape}")
            continue
        param.set_value(value.astype(expected.dtype))
    raise_mismatches(problems, source=source)
    nnx.update(model, state)


def export_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters under HF names (with the `transformer.` prefix), as float32 numpy."""
    state = nnx.state(model, nnx.Param)
    return {
        _PREFIX + name: np.ascontiguousarray(np.asarray(param_at(state, path).get_value(), dtype=np.float32))
        for name, path in parameter_map(model.config).items()
    }
