"""GPT-2 in Flax NNX: the network, its config, HF weights in and out, the KV cache and generation."""

from condensa.model.config import GPT2Config, preset
from condensa.model.generate import generate
from condensa.model.gpt2 import GPT2, ModelOutput
from condensa.model.io import load_pretrained, save_pretrained
from condensa.model.kv_cache import KVCache

__all__ = ["GPT2", "GPT2Config", "KVCache", "ModelOutput", "generate", "load_pretrained", "preset", "save_pretrained"]
