"""Tiny random LLaMA-family models built with transformers (PyTorch, CPU, eager attention)."""

from __future__ import annotations

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def hf_config(kind: str = "llama", **overrides):
    """A transformers config for tests: 2 layers, 8 query heads sharing 2 KV heads (GQA), eager attention
    so that attention probabilities are returned. `kind`: llama, mistral or qwen2."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    values = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    if kind == "mistral":
        values["sliding_window"] = None
    values.update(overrides)
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind](**values)


def make_hf_llama(seed: int = 0, kind: str = "llama", **overrides):
    """A randomly initialised `LlamaForCausalLM` (or Mistral / Qwen2) in eval mode. Norm weights are
    randomised too (they start at 1), so a wrong norm mapping cannot hide."""
    import torch
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}[kind]
    model = cls(hf_config(kind, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model
