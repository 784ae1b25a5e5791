"""LLaMA-family configuration (LLaMA, Mistral, Qwen2) with Hugging Face field names.

The three architectures share one network (RoPE, grouped-query attention, RMSNorm, SwiGLU); they
differ in a few fields: Qwen2 puts a bias on the q/k/v projections, Mistral (v0.1) and Qwen2 may
use sliding-window attention. `config.json` maps one to one, in both the transformers 4 form
(`rope_theta` + `rope_scaling`) and the transformers 5 form (`rope_parameters`).

The GPT-2-style names that the rest of condensa reads (`n_layer`, `n_head`, `n_embd`,
`n_positions`, `head_dim`, `n_kv_head`) are properties, so calibration, evaluation and training
never branch on the family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from condensa.errors import ConfigError
from condensa.model.hf_config import HFConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Fields of config.json that say nothing about the network (or that transformers derives).
_HF_BOOKKEEPING = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "_name_or_path",
    "attn_implementation", "_attn_implementation", "problem_type", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "max_window_layers", "layer_types", "task_specific_params",
    "add_cross_attention", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
}

# Where config.json leaves a field out, transformers uses the class default of its model type.
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  sliding_window=4096, bos_token_id=None, eos_token_id=None),
}

_ROPE_KEYS = {  # rope type -> keys it needs besides rope_type / rope_theta
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _frozen(value):
    """Lists -> tuples and dicts -> sorted pair tuples, so the config stays hashable (it is static under jit)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value):
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
        return {k: _thawed(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


def _canonical_rope_scaling(value):
    """One spelling of the same scaling, so equal settings give equal (and equally hashed) configs:
    `type` (transformers < 4.45) becomes `rope_type`, `rope_theta` lives in its own field, and
    the default type means no scaling (None)."""
    params = dict(_thawed(value) or {})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.pop("rope_theta", None)
    if params.get("rope_type", "default") == "default" and len(params) <= 1:
        return None
    return _frozen(params)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(HFConfig):
    """The shape and numerics of a LLaMA-family network. Field names match `transformers.LlamaConfig`.

    `rope_scaling` holds the HF dict (`{"rope_type": "llama3", "factor": 8.0, ...}`) or None; it is
    stored as sorted pairs so the config is hashable. `model_type` is llama, mistral or qwen2.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool | None = None  # Qwen2 only: its sliding_window applies only when this is true
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a LLaMA-family type; use one of "
                              f"{', '.join(MODEL_TYPES)}.")
        sizes = {"num_attention_heads": self.num_attention_heads, "hidden_size": self.hidden_size,
                 "num_key_value_heads": 1 if self.num_key_value_heads is None else self.num_key_value_heads}
        bad = [f"{name}={value}" for name, value in sizes.items() if value < 1]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: these sizes must be positive integers.")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; choose the heads so that head_dim is a whole number, or set head_dim."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads}: each KV head serves an equal group of query heads (GQA)."
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even: rotary embeddings rotate pairs of dimensions.")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; the LLaMA family uses 'silu' (SwiGLU).")
        object.__setattr__(self, "eos_token_id", _frozen(self.eos_token_id))
        object.__setattr__(self, "rope_scaling", _canonical_rope_scaling(self.rope_scaling))
        self._check_rope()

    def _check_rope(self) -> None:
        params = self.rope_parameters
        rope_type = params["rope_type"]
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not supported; condensa implements "
                f"{', '.join(repr(t) for t in ROPE_TYPES)} (None means 'default'). Use a checkpoint with one of "
                "those, or remove rope_scaling to run without scaling (at the original context length)."
            )
        missing = [key for key in _ROPE_KEYS[rope_type] if key not in params]
        if missing:
            raise ConfigError(f"rope_scaling of type {rope_type!r} needs {', '.join(missing)}; add them to config.json.")
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} (RoPE on part of each head) is "
                              "not supported; condensa rotates the whole head, as LLaMA, Mistral and Qwen2 do.")

    # ---- the names the rest of condensa reads -------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_head(self) -> int:
        return self.num_key_value_heads

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def n_positions(self) -> int:
        """The longest sequence the model runs exactly. With an active sliding window, sequences up to
        the window see every earlier key, so plain causal attention is exact up to there (and
        condensa implements no windowed attention beyond it)."""
        window = self.active_sliding_window
        return self.max_position_embeddings if window is None else min(self.max_position_embeddings, window)

    @property
    def active_sliding_window(self) -> int | None:
        if self.model_type == "qwen2" and not self.use_sliding_window:
            return None
        return self.sliding_window

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 has biases on q/k/v (never on o); LLaMA and Mistral follow `attention_bias` for all four."""
        return True if self.model_type == "qwen2" else self.attention_bias

    @property
    def o_bias(self) -> bool:
        return False if self.model_type == "qwen2" else self.attention_bias

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """The HF transformers 5 view: `{"rope_type": ..., "rope_theta": ..., plus the scaling keys}`."""
        params = dict(_thawed(self.rope_scaling) or {})
        rope_type = params.pop("rope_type", "default")
        return {"rope_type": rope_type, "rope_theta": float(self.rope_theta), **params}

    # ---- config.json in and out ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "LlamaConfig":
        """Builds a config from an HF-style dict; unknown network fields are refused by name."""
        values = dict(values)
        model_type = values.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{source} describes a {model_type!r} model, not one of {', '.join(MODEL_TYPES)}.")
        rope = values.pop("rope_parameters", None)
        if rope is not None and not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object such as "
                              '{"rope_type": "default", "rope_theta": 10000.0}; got ' + f"{rope!r}.")
        if rope is not None:  # transformers 5: theta and scaling in one dict (it wins over the old fields)
            values["rope_theta"] = rope.get("rope_theta", values.get("rope_theta", cls.rope_theta))
            values["rope_scaling"] = rope
        elif isinstance(values.get("rope_scaling"), dict) and "rope_theta" in values["rope_scaling"]:
            values.setdefault("rope_theta", values["rope_scaling"]["rope_theta"])
        fields = cls.network_fields(values, bookkeeping=_HF_BOOKKEEPING, source=source, family=model_type)
        return cls(**{**_TYPE_DEFAULTS[model_type], **fields})

    def to_hf_dict(self) -> dict[str, Any]:
        """The dict written to config.json. It carries the rope settings in both the transformers 4
        form (`rope_theta`, `rope_scaling`) and the transformers 5 form (`rope_parameters`)."""
        values = {f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self)}
        values["rope_parameters"] = self.rope_parameters
        values["architectures"] = [_ARCHITECTURES[self.model_type]]
        if self.model_type == "qwen2":  # Qwen2 has no attention_bias / mlp_bias fields (its biases are fixed)
            values.pop("attention_bias")
            values.pop("mlp_bias")
        else:
            values.pop("use_sliding_window")
        return values


PRESETS: dict[str, dict[str, Any]] = {
    # head_dim 64 so the Pallas kernels (head_dim 64 or 128) run on the tiny model too
    "llama-tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=True),
}
