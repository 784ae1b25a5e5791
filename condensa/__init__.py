"""condensa: sparse, fast transformer attention in JAX.

The public API: load a GPT-2 or LLaMA-family model (`load_pretrained`), run it (`GPT2`, `Llama`),
choose its attention rule (`AttentionConfig`), and write it back for transformers (`save_pretrained`).
"""

from condensa.attention import AttentionConfig
from condensa.errors import CondensaError
from condensa.model import GPT2, GPT2Config, Llama, LlamaConfig, generate, load_pretrained, save_pretrained

__version__ = "0.1.0"
__all__ = [
    "AttentionConfig", "CondensaError", "GPT2", "GPT2Config", "Llama", "LlamaConfig", "generate", "load_pretrained",
    "save_pretrained",
]
