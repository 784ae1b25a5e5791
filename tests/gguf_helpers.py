"""Tiny GGUF files written the way llama.cpp's converter writes them, from random transformers models.

This is the tests' own, independent writer: llama.cpp's tensor names, its Q/K row permutation for
LLaMA, GPT-2's transposed Conv1D weights, 1-D tensors kept in float32, and the tokenizer as
metadata. condensa's reader must undo all of it; transformers' GGUF loader is the second opinion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times; "
               "1234 apples cost 56.7 dollars in 1999!\n\nNew paragraph: don't stop, we'll see.")


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of LLaMA's Q/K rows (rotate-half -> adjacent pairs)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def byte_level_vocab(size: int = 300, text: str = SAMPLE_TEXT * 20):
    """(tokens, merges, eos id) of a small byte-level BPE trained on `text`, with `<|endoftext|>` last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    import json

    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])] + ["<|endoftext|>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges, len(tokens) - 1


def sentencepiece_vocab(size: int = 300, text: str = SAMPLE_TEXT * 20):
    """(tokens, scores, types) of a small SentencePiece-style BPE vocabulary: <unk>, <s>, </s>, the 256
    byte tokens, the visible space, then pieces (with the visible-space marker) scored by merge rank."""
    from tokenizers import SentencePieceBPETokenizer

    tok = SentencePieceBPETokenizer(add_prefix_space=True)
    tok.train_from_iterator([text], vocab_size=size - 259, min_frequency=1, show_progress=False)
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
    types = [2, 3, 3] + [6] * 256 + [1]
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(p for p in pieces if p not in tokens):
        if len(tokens) < size:
            tokens.append(piece)
            types.append(1)
            scores.append(-float(rank))
    while len(tokens) < size:  # llama.cpp's UNUSED type fills a vocabulary up to the model's size
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
        scores.append(-1e9)
    return tokens, scores, types


def _add_tokenizer(writer, tokenizer: str | None, vocab_size: int) -> None:
    if tokenizer is None:
        return
    if tokenizer == "gpt2":
        tokens, merges, eos = byte_level_vocab(vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if i == eos else 1 for i in range(len(tokens))])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(eos)
        writer.add_eos_token_id(eos)
    else:
        tokens, scores, types = sentencepiece_vocab(vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    assert len(tokens) == vocab_size, (len(tokens), vocab_size)


def _store(writer, name: str, value: np.ndarray, qtype: str) -> None:
    import gguf

    value = np.ascontiguousarray(value, dtype=np.float32)
    kind = gguf.GGMLQuantizationType[qtype if value.ndim == 2 else "F32"]  # llama.cpp keeps 1-D tensors in F32
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, value)
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, value.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)


def _llama_tensors(hf):
    config = hf.config
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    if not config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        yield f"blk.{i}.attn_q.weight", permute_rows(q, config.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", permute_rows(k, config.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"]
        yield f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"]
        yield f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"]
        yield f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"]


def _gpt2_tensors(hf):
    config = hf.config
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    yield "token_embd.weight", state["transformer.wte.weight"]
    yield "position_embd.weight", state["transformer.wpe.weight"]
    yield "output_norm.weight", state["transformer.ln_f.weight"]
    yield "output_norm.bias", state["transformer.ln_f.bias"]
    yield "output.weight", state["transformer.wte.weight"]  # llama.cpp writes the tied head as a copy
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(config.n_layer):
        for hf_name, gguf_name in names.items():
            weight = state[f"transformer.h.{i}.{hf_name}.weight"]
            yield f"blk.{i}.{gguf_name}.weight", weight.T if weight.ndim == 2 else weight  # Conv1D is [in, out]
            yield f"blk.{i}.{gguf_name}.bias", state[f"transformer.h.{i}.{hf_name}.bias"]


def write_gguf(path: str | Path, hf, qtype: str = "F32", tokenizer: str | None = "gpt2", arch: str | None = None) -> Path:
    """Writes `hf` (a transformers LLaMA or GPT-2 model) to `path` as a GGUF whose matrices are stored
    in `qtype`. `tokenizer`: "gpt2" (byte-level BPE), "llama" (SentencePiece) or None."""
    import gguf

    config = hf.config
    family = "gpt2" if config.model_type == "gpt2" else "llama"
    writer = gguf.GGUFWriter(str(path), arch or family)
    prefix = arch or family
    if family == "gpt2":
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        tensors = _gpt2_tensors(hf)
    else:
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        tensors = _llama_tensors(hf)
    writer.add_uint32(f"{prefix}.vocab_size", config.vocab_size)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    for name, value in tensors:
        _store(writer, name, value, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
