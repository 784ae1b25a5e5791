"""Model families by config.json's `model_type`: which config class reads it, which network runs it.

Everything downstream (loading, saving, calibration, evaluation, training from scratch) asks this
module instead of naming GPT-2, so a new family is one entry here plus its model, config and
weight conversion. Both config classes expose n_layer, n_head, n_kv_head, n_embd, n_positions,
head_dim and vocab_size, so callers never branch on the family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from condensa.errors import ConfigError, did_you_mean
from condensa.model.gpt2 import config as gpt2_config
from condensa.model.llama import config as llama_config
from condensa.model.gpt2.config import GPT2Config
from condensa.model.gpt2.network import GPT2
from condensa.model.hf_config import read_config_json
from condensa.model.llama.network import Llama
from condensa.model.llama.config import LlamaConfig

# model_type -> (config class, model class); mistral and qwen2 share LLaMA's network
FAMILIES: dict[str, tuple[type, type]] = {
    "gpt2": (GPT2Config, GPT2),
    "llama": (LlamaConfig, Llama),
    "mistral": (LlamaConfig, Llama),
    "qwen2": (LlamaConfig, Llama),
}


def _family(model_type: str, source: str) -> tuple[type, type]:
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{source} describes a {model_type!r} model, which condensa does not support.{did_you_mean(model_type, FAMILIES)} "
            f"Supported model_type values: {', '.join(FAMILIES)}."
        )
    return FAMILIES[model_type]


def config_from_dict(values: dict[str, Any], *, source: str = "config"):
    """A `GPT2Config` or `LlamaConfig`, chosen by `values["model_type"]` (GPT-2 when absent, as in old exports)."""
    model_type = values.get("model_type", "gpt2")
    config_class, _ = _family(str(model_type), source)
    return config_class.from_dict(values, source=source)


def config_from_json_file(path: str | Path):
    """`config_from_dict` of the config.json at `path`."""
    return config_from_dict(read_config_json(path), source=str(path))


def model_class_for(config) -> type:
    """The NNX network class for a config object (`GPT2` or `Llama`)."""
    return _family(config.model_type, "the config")[1]


def build_model(config, **kwargs):
    """`model_class_for(config)(config, **kwargs)` (kwargs: dtype, attention, remat, rngs)."""
    return model_class_for(config)(config, **kwargs)


def preset_names() -> tuple[str, ...]:
    return (*gpt2_config.PRESETS, *llama_config.PRESETS)


def preset(name: str, **overrides: Any):
    """A named model shape from either family (`tiny`, `gpt2-small`, ..., `llama-tiny`), with field overrides."""
    if name in llama_config.PRESETS:
        unknown = sorted(set(overrides) - set(LlamaConfig.field_names()))
        if unknown:
            raise ConfigError(
                f"model_overrides {', '.join(unknown)} are not fields of the LLaMA config of preset {name!r}."
                f"{did_you_mean(unknown[0], LlamaConfig.field_names())} LLaMA presets take HF names "
                "(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, max_position_embeddings, ...)."
            )
        return LlamaConfig(**{**llama_config.PRESETS[name], **overrides})
    if name in gpt2_config.PRESETS:
        return gpt2_config.preset(name, **overrides)
    raise ConfigError(
        f"unknown model preset {name!r}.{did_you_mean(name, preset_names())} Choose one of: {', '.join(preset_names())}."
    )
