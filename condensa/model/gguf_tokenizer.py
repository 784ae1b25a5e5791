"""The tokenizer a GGUF file describes, rebuilt with the `tokenizers` library.

A GGUF carries no tokenizer.json: it stores the vocabulary, the merges (or scores) and the special
token ids as metadata, under llama.cpp's keys. Two families cover the models condensa runs:
- `gpt2`: byte-level BPE (GPT-2, SmolLM2, LLaMA 3, Qwen2), with the pre-tokenizer split that
  `tokenizer.ggml.pre` names;
- `llama`: SentencePiece BPE (LLaMA 1/2, Mistral), merges recovered from the token scores.
The result is a transformers fast tokenizer (`PreTrainedTokenizerFast`), so it saves with
`save_pretrained` next to an exported model, like any other.
"""

from __future__ import annotations

import warnings

from condensa.errors import CheckpointError
from condensa.model.gguf_file import GGUFFile

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types
_SPACE = "\u2581"  # SentencePiece's visible space

# Pre-tokenizer splits (regular expressions over the text) for the `tokenizer.ggml.pre` names
# whose merges were learned on them. GPT-2's own split is the ByteLevel default.
_GPT2_SPLIT = None
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT,
    "smollm": "digits",  # SmolLM: every digit on its own, then GPT-2's split
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
TOKENIZER_MODELS = ("gpt2", "llama")


def has_tokenizer(gguf_file: GGUFFile) -> bool:
    return gguf_file.has("tokenizer.ggml.tokens") and gguf_file.has("tokenizer.ggml.model")


def _byte_level_pre_tokenizer(pre: str | None, source):
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZER_SPLITS:
        warnings.warn(f"{source}: tokenizer.ggml.pre {pre!r} is not one condensa knows; splitting text as GPT-2 does, "
                      "which may tokenize some text differently from the model's own tokenizer.", stacklevel=4)
    split = PRE_TOKENIZER_SPLITS.get(pre, _GPT2_SPLIT)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _vocabulary_part(gguf_file: GGUFFile, key: str, kind: str):
    """A metadata array the tokenizer of this kind cannot do without."""
    value = gguf_file.value(key)
    if value is None:
        raise CheckpointError(f"{gguf_file.path} has a {kind} vocabulary but no {key}; convert the model again, "
                              "or pass --tokenizer DIR.")
    return value


def _byte_level(gguf_file: GGUFFile, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models

    merges = _vocabulary_part(gguf_file, "tokenizer.ggml.merges", "byte-level BPE")
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(gguf_file.value("tokenizer.ggml.pre"), gguf_file.path)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece stores scores, not merges: every split of a token into two vocabulary entries is
    a merge, ranked by the merged token's score (higher merges first), as sentencepiece applies them."""
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece(gguf_file: GGUFFile, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _vocabulary_part(gguf_file, "tokenizer.ggml.scores", "SentencePiece")
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = gguf_file.value("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores),
                                     unk_token=None if unk is None else tokens[int(unk)], fuse_unk=True,
                                     byte_fallback=True))
    prefix = [normalizers.Prepend(_SPACE)] if gguf_file.value("tokenizer.ggml.add_space_prefix", True) else []
    tokenizer.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", _SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tokenizer


def gguf_tokenizer(gguf_file: GGUFFile):
    """A `PreTrainedTokenizerFast` for the tokenizer stored in `gguf_file`."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    if not has_tokenizer(gguf_file):
        raise CheckpointError(f"{gguf_file.path} holds no tokenizer (no tokenizer.ggml.tokens); pass --tokenizer DIR "
                              "with the model's tokenizer.json, or use a GGUF converted with its tokenizer.")
    kind = str(gguf_file.value("tokenizer.ggml.model"))
    tokens = [str(t) for t in gguf_file.value("tokenizer.ggml.tokens")]
    if kind == "gpt2":
        tokenizer = _byte_level(gguf_file, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece(gguf_file, tokens)
    else:
        raise CheckpointError(f"{gguf_file.path} holds a {kind!r} tokenizer; condensa rebuilds these from a GGUF: "
                              f"{', '.join(TOKENIZER_MODELS)}. Pass --tokenizer DIR with the model's tokenizer.json.")
    types = gguf_file.value("tokenizer.ggml.token_type") or []
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind_id in enumerate(types) if kind_id == _CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind_id in enumerate(types) if kind_id == _USER_DEFINED])

    def special(key):
        index = gguf_file.value(f"tokenizer.ggml.{key}")
        return None if index is None or not 0 <= int(index) < len(tokens) else tokens[int(index)]

    bos = special("bos_token_id")
    add_bos = bool(gguf_file.value("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
    )
    template = gguf_file.value("tokenizer.chat_template")
    if template is not None:
        wrapped.chat_template = str(template)
    return wrapped
