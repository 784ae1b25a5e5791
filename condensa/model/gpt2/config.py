"""GPT-2 configuration with Hugging Face field names, so `config.json` maps one to one."""

from __future__ import annotations

import dataclasses
from typing import Any

from condensa.errors import ConfigError, did_you_mean
from condensa.model.hf_config import HFConfig

# Fields of HF's config.json that say nothing about the network (generation defaults, bookkeeping).
# They are accepted and dropped so that a real hub config loads without noise.
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "task_specific_params", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "initializer_range", "pad_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "_name_or_path", "n_ctx", "attn_implementation", "_attn_implementation", "problem_type",
    "add_cross_attention", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
}

_SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")


@dataclasses.dataclass(frozen=True)
class GPT2Config(HFConfig):
    """The shape and numerics of a GPT-2 network. Field names match `transformers.GPT2Config`."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "choose n_head so that head_dim = n_embd / n_head is a whole number."
            )
        if self.activation_function not in _SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"use one of {', '.join(_SUPPORTED_ACTIVATIONS)}."
            )
        if not self.tie_word_embeddings:
            raise ConfigError(
                "tie_word_embeddings=False is not supported: condensa's GPT-2 ties lm_head to wte, "
                "as every released GPT-2 does."
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def n_kv_head(self) -> int:
        """Key/value heads: one per query head in GPT-2 (the LLaMA family may share them: GQA)."""
        return self.n_head

    @property
    def model_type(self) -> str:
        return "gpt2"

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "GPT2Config":
        """Builds a config from an HF-style dict; unknown network fields are refused by name."""
        model_type = values.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(
                f"{source} describes a {model_type!r} model, not GPT-2; read it with condensa.load_pretrained "
                "or condensa.model.registry.config_from_json_file, which pick the model family."
            )
        return cls(**cls.network_fields(values, bookkeeping=_HF_BOOKKEEPING, source=source, family="GPT-2"))

    def to_hf_dict(self) -> dict[str, Any]:
        """The dict written to config.json; `transformers.GPT2Config(**d)` reads it back."""
        values = dataclasses.asdict(self)
        values["model_type"] = "gpt2"
        values["architectures"] = ["GPT2LMHeadModel"]
        return values


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


def preset(name: str, **overrides: Any) -> GPT2Config:
    """A named model shape (`tiny`, `gpt2-small`, ...), with field overrides."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}.{did_you_mean(name, PRESETS)} "
            f"Choose one of: {', '.join(PRESETS)}."
        )
    unknown = sorted(set(overrides) - set(GPT2Config.field_names()))
    if unknown:
        raise ConfigError(
            f"model_overrides {', '.join(unknown)} are not fields of the GPT-2 config of preset {name!r}."
            f"{did_you_mean(unknown[0], GPT2Config.field_names())} GPT-2 presets take n_embd, n_layer, n_head, "
            "n_positions, ...")
    return GPT2Config(**{**PRESETS[name], **overrides})
