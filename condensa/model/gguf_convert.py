"""A GGUF file seen as a Hugging Face checkpoint: its config as config.json values, its tensors
under HF names, one at a time.

Then the loaders that read HF directories (`llama.convert.load_streaming`, `gpt2.convert.load_into`)
read GGUF files too, with the same checks. Three things differ from an HF checkpoint:
- names: llama.cpp's (`blk.0.attn_q.weight`), mapped with `gguf`'s own name table;
- layout: llama.cpp permutes the rows of LLaMA's Q and K projections (for its interleaved rotary
  embedding), so they are permuted back here; GPT-2's Conv1D weights are stored transposed;
- values: quantised blocks are dequantised to float32 as each tensor is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from condensa.errors import CheckpointError, ConfigError
from condensa.model.gguf_file import GGUFFile
from condensa.model.gpt2.convert import parameter_map as gpt2_map
from condensa.model.llama.convert import parameter_map as llama_map

# GGUF general.architecture -> the HF model_type condensa runs it as.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def model_type_of(gguf_file: GGUFFile) -> str:
    arch = gguf_file.architecture
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{gguf_file.path} holds a {arch!r} model; condensa reads GGUF files of these architectures: "
            f"{', '.join(ARCHITECTURES)}."
        )
    return ARCHITECTURES[arch]


def _required(gguf_file: GGUFFile, key: str) -> Any:
    value = gguf_file.value(key)
    if value is None:
        raise CheckpointError(f"{gguf_file.path} lacks the metadata key {key}; the file is incomplete: convert it again.")
    return value


def _vocab_size(gguf_file: GGUFFile, arch: str) -> int:
    if "token_embd.weight" not in gguf_file:
        raise CheckpointError(f"{gguf_file.path} has no token_embd.weight tensor; the file is incomplete.")
    return int(gguf_file.value(f"{arch}.vocab_size", gguf_file.shape("token_embd.weight")[0]))


def _token_ids(gguf_file: GGUFFile) -> dict[str, Any]:
    ids = {}
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        value = gguf_file.value(f"tokenizer.ggml.{key}")
        if value is not None:
            ids[field] = int(value)
    return ids


def _llama_config(gguf_file: GGUFFile, arch: str, model_type: str) -> dict[str, Any]:
    heads = int(_required(gguf_file, f"{arch}.attention.head_count"))
    hidden = int(_required(gguf_file, f"{arch}.embedding_length"))
    head_dim = int(gguf_file.value(f"{arch}.attention.key_length", hidden // heads))
    rotary = int(gguf_file.value(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ConfigError(f"{gguf_file.path} rotates {rotary} of {head_dim} dimensions per head (partial rotary "
                          "embeddings), which condensa does not support.")
    if "rope_freqs.weight" in gguf_file:
        raise ConfigError(f"{gguf_file.path} carries per-frequency rope factors (rope_freqs.weight, LLaMA 3.1-style "
                          "scaling), which condensa cannot read from a GGUF; load the Hugging Face checkpoint instead.")
    values: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=_vocab_size(gguf_file, arch),
        hidden_size=hidden,
        intermediate_size=int(_required(gguf_file, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_required(gguf_file, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_file.value(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(_required(gguf_file, f"{arch}.context_length")),
        rms_norm_eps=float(gguf_file.value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(gguf_file.value(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in gguf_file,
        **_token_ids(gguf_file),
    )
    scaling = gguf_file.value(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        values["rope_scaling"] = {"rope_type": str(scaling), "factor": float(gguf_file.value(f"{arch}.rope.scaling.factor", 1.0))}
    if model_type == "llama":
        values["attention_bias"] = "blk.0.attn_q.bias" in gguf_file
    return values


def _gpt2_config(gguf_file: GGUFFile) -> dict[str, Any]:
    return dict(
        model_type="gpt2",
        vocab_size=_vocab_size(gguf_file, "gpt2"),
        n_positions=int(_required(gguf_file, "gpt2.context_length")),
        n_embd=int(_required(gguf_file, "gpt2.embedding_length")),
        n_layer=int(_required(gguf_file, "gpt2.block_count")),
        n_head=int(_required(gguf_file, "gpt2.attention.head_count")),
        n_inner=int(_required(gguf_file, "gpt2.feed_forward_length")),
        layer_norm_epsilon=float(gguf_file.value("gpt2.attention.layer_norm_epsilon", 1e-5)),
        **_token_ids(gguf_file),
    )


def config_values(gguf_file: GGUFFile) -> dict[str, Any]:
    """The config.json values of the model in `gguf_file` (HF field names)."""
    model_type = model_type_of(gguf_file)
    if model_type == "gpt2":
        return _gpt2_config(gguf_file)
    return _llama_config(gguf_file, gguf_file.architecture, model_type)


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation: per head, its converter interleaves the two halves of
    the rotary dimensions (HF's rotate-half layout -> GGUF's adjacent pairs); this puts them back."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_names(config, model_type: str) -> list[str]:
    """Every HF tensor name condensa's loaders know for `config`, plus `lm_head.weight`."""
    names = list(gpt2_map(config) if model_type == "gpt2" else llama_map(config))
    return names + ([] if "lm_head.weight" in names else ["lm_head.weight"])


class GGUFCheckpoint:
    """The tensors of a GGUF file under HF names, dequantised on demand: the interface of
    `weights.CheckpointReader` (`keys`, `get`, context manager), so the HF loaders read it as is.
    A tensor with no HF counterpart keeps its GGUF name, and the loaders report it as unexpected."""

    def __init__(self, gguf_file: GGUFFile, config):
        import gguf

        self.file = gguf_file
        self.config = config
        self.model_type = model_type_of(gguf_file)
        gguf_file.check_types()
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_file.architecture)
        table = gguf.get_tensor_name_map(arch, config.n_layer)  # HF name -> GGUF name, from llama.cpp's own list
        to_hf = {}
        for hf_name in _hf_names(config, self.model_type):
            hf_base, _, suffix = hf_name.rpartition(".")
            gguf_base = table.get_name(hf_base)
            if gguf_base is not None:
                to_hf[f"{gguf_base}.{suffix}"] = hf_name
        self._source = {to_hf.get(name, name): name for name in gguf_file.tensor_names()}  # HF name -> GGUF name

    def keys(self) -> list[str]:
        return list(self._source)

    def __contains__(self, name: str) -> bool:
        return name in self._source

    def get(self, name: str) -> np.ndarray:
        gguf_name = self._source[name]
        value = self.file.tensor(gguf_name)
        if self.model_type == "llama":
            if gguf_name.startswith("blk.") and ".attn_q." in gguf_name:
                value = unpermute_rows(value, self.config.num_attention_heads)
            elif gguf_name.startswith("blk.") and ".attn_k." in gguf_name:
                value = unpermute_rows(value, self.config.num_key_value_heads)
        elif self.model_type == "gpt2" and name.endswith(_GPT2_TRANSPOSED):
            value = np.ascontiguousarray(value.T)
        return value

    def close(self) -> None:
        """Nothing to release: the file is memory-mapped by `gguf` and unmapped with it."""

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
