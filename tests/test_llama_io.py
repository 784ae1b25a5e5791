"""LLaMA-family checkpoints in and out: export to transformers, sharded safetensors both ways,
config.json in the transformers 4 and 5 forms, and clear errors for what is not supported."""

from __future__ import annotations

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import condensa
from condensa.errors import CheckpointError, ConfigError
from condensa.model.llama.config import LlamaConfig
from condensa.model.registry import config_from_dict, model_class_for, preset
from tests.llama_helpers import LLAMA3_SCALING, make_hf_llama


def _logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A saved tiny GQA LLaMA with llama3 rope scaling (untied lm_head)."""
    path = tmp_path_factory.mktemp("llama_io")
    make_hf_llama(seed=3, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING).save_pretrained(path)
    return path


@pytest.mark.parametrize("shards", [1, "many"])
def test_export_loads_in_transformers_with_the_same_logits(hf_dir, tmp_path, caplog, shards):
    model, config = condensa.load_pretrained(hf_dir)
    out = condensa.save_pretrained(model, config, tmp_path / "export",
                                   max_shard_bytes=60_000 if shards == "many" else 2**40)
    index = out / "model.safetensors.index.json"
    if shards == "many":
        assert index.is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 2
        assert not (out / "model.safetensors").exists()
    else:
        assert (out / "model.safetensors").is_file() and not index.exists()
    with caplog.at_level(logging.WARNING):
        reloaded, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [r for r in caplog.records if "newly initialized" in r.getMessage() or "not used" in r.getMessage()]
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"

    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 30))
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    assert np.abs(ours - _logits(reloaded.eval(), ids)).max() <= 1e-4
    again, again_config = condensa.load_pretrained(out)
    assert again_config == config
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids)).logits), ours)


def test_sharded_safetensors_written_by_transformers_load(tmp_path):
    hf = make_hf_llama(seed=4, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    model, _ = condensa.load_pretrained(tmp_path)
    ids = np.random.RandomState(1).randint(0, 101, (1, 24))
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - _logits(hf, ids)).max() <= 1e-4

    missing = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing}.*download the missing shards"):
        condensa.load_pretrained(tmp_path)


def test_sharded_gpt2_checkpoints_load_too(tmp_path):
    from tests.conftest import make_hf_model

    hf = make_hf_model(seed=6)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = condensa.load_pretrained(tmp_path)
    ids = np.random.RandomState(2).randint(0, 99, (1, 16))
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - _logits(hf, ids)).max() <= 1e-4


def test_bfloat16_checkpoints_load_into_float32_parameters(tmp_path):
    hf = make_hf_llama(seed=5).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model, _ = condensa.load_pretrained(tmp_path)
    kernel = model.layers[0].self_attn.q_proj.kernel.get_value()
    assert kernel.dtype == jnp.float32
    want = hf.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T  # HF Linear is [out, in]
    np.testing.assert_array_equal(np.asarray(kernel), want)


def test_wrong_or_missing_tensors_are_reported_together(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)  # GQA wants [16, 64]
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        condensa.load_pretrained(tmp_path)
    message = str(err.value)
    assert "k_proj.weight" in message and "(64, 64)" in message and "(16, 64)" in message
    assert "missing tensor 'model.norm.weight'" in message


# ---- config.json ---------------------------------------------------------------------------------


def test_rope_settings_read_in_both_transformers_forms():
    base = dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2)
    old = config_from_dict({**base, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = config_from_dict({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}})
    assert old.rope_parameters == new.rope_parameters == {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}
    plain = config_from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert plain.rope_scaling is None and plain.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert hash(old) == hash(new)  # static under jit
    assert LlamaConfig.from_dict(old.to_hf_dict()) == old  # what save_pretrained writes reads back


def test_both_families_expose_the_same_shape_names():
    llama = preset("llama-tiny", vocab_size=300)
    gpt2 = preset("tiny", vocab_size=300)
    for config, family in ((llama, "Llama"), (gpt2, "GPT2")):
        assert model_class_for(config).__name__ == family
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "n_positions", "head_dim", "vocab_size"):
            assert isinstance(getattr(config, name), int), name
    assert (llama.n_head, llama.n_kv_head, llama.head_dim, llama.n_positions) == (4, 2, 64, 256)
    assert gpt2.n_kv_head == gpt2.n_head
    qwen = config_from_dict({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "num_hidden_layers": 1, "sliding_window": 16, "use_sliding_window": False})
    assert (qwen.qkv_bias, qwen.o_bias, qwen.n_positions) == (True, False, 32768)  # window off: full context


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling_lists_the_supported_types(rope_type):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                          "rope_scaling": {"rope_type": rope_type, "factor": 4.0}})
    message = str(err.value)
    assert repr(rope_type) in message and all(t in message for t in ("'default'", "'linear'", "'llama3'"))


def test_unknown_model_type_lists_the_supported_types(hf_dir, tmp_path):
    values = json.loads((hf_dir / "config.json").read_text())
    values["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="'gpt_neox'.*gpt2, llama, mistral, qwen2"):
        condensa.load_pretrained(tmp_path)


@pytest.mark.parametrize("change,message", [
    (dict(num_key_value_heads=3), "must divide num_attention_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_kv_heads=2), "Did you mean 'num_key_value_heads'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs low_freq_factor"),
])
def test_bad_llama_configs_say_what_to_do(change, message):
    values = {**dict(model_type="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2), **change}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_bad_llama_preset_overrides_and_sizes_are_clear_errors():
    from condensa.errors import ConfigError
    from condensa.model import LlamaConfig
    from condensa.model.llama.config import LlamaConfig as Direct
    from condensa.model.registry import preset

    assert LlamaConfig is Direct
    with pytest.raises(ConfigError, match="not fields of the LLaMA config"):
        preset("llama-tiny", n_layer=4)  # GPT-2's name for num_hidden_layers
    with pytest.raises(ConfigError, match="must be positive"):
        LlamaConfig(num_key_value_heads=0)
    with pytest.raises(ConfigError, match="rope_parameters must be an object"):
        LlamaConfig.from_dict({"model_type": "llama", "rope_parameters": 10000.0})
