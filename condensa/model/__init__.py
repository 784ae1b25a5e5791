"""GPT-2 and the LLaMA family in Flax NNX: the networks, their configs, HF weights in and out, the KV
cache and generation. `registry` maps config.json's model_type to a family."""

from condensa.model.causal_lm import ModelOutput
from condensa.model.gpt2.config import GPT2Config
from condensa.model.generate import generate
from condensa.model.gpt2.network import GPT2
from condensa.model.io import load_pretrained, save_pretrained
from condensa.model.kv_cache import KVCache
from condensa.model.llama.network import Llama
from condensa.model.llama.config import LlamaConfig
from condensa.model.registry import model_class_for, preset  # presets of every family

__all__ = [
    "GPT2", "GPT2Config", "KVCache", "Llama", "LlamaConfig", "ModelOutput", "generate", "load_pretrained",
    "model_class_for", "preset", "save_pretrained",
]
