"""Every user mistake around models gives a CondensaError that says what to do."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import condensa
from condensa.errors import CheckpointError, ConfigError, HubUnavailableError, ModelInputError


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as err:
        condensa.load_pretrained(tmp_path / "no-such-model")
    assert "config.json" in str(err.value)


def test_truncated_safetensors(tiny_hf_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_hf_dir / name).read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        condensa.load_pretrained(tmp_path)


def test_config_of_another_architecture(tiny_hf_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes())
    neox = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 99, "architectures": ["GPTNeoXForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(neox))
    with pytest.raises(ConfigError, match="'gpt_neox'.*Supported model_type values: gpt2, llama"):
        condensa.load_pretrained(tmp_path)


def test_gpt2_weights_under_a_llama_config_report_the_missing_tensors(tiny_hf_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes())
    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 99, "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(CheckpointError, match="missing tensor 'model.embed_tokens.weight'"):
        condensa.load_pretrained(tmp_path)


def test_weight_of_the_wrong_shape_is_reported_with_all_problems(tiny_hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tiny_hf_dir / "model.safetensors"))
    tensors["transformer.h.0.mlp.c_fc.weight"] = np.zeros((32, 100), np.float32)
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        condensa.load_pretrained(tmp_path)
    message = str(err.value)
    assert "h.0.mlp.c_fc.weight" in message and "(32, 100)" in message and "(32, 128)" in message
    assert "missing tensor 'ln_f.bias'" in message  # both problems in one error


def test_unknown_config_field_gets_a_suggestion(tiny_hf_dir, tmp_path):
    values = json.loads((tiny_hf_dir / "config.json").read_text())
    values["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "model.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="Did you mean 'n_layer'"):
        condensa.load_pretrained(tmp_path)


def test_hub_id_while_offline_names_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="local directory"):
        condensa.load_pretrained("openai-community/gpt2")


def test_input_ids_outside_vocab_or_too_long(tiny_hf_dir):
    model, config = condensa.load_pretrained(tiny_hf_dir)
    with pytest.raises(ModelInputError, match="outside the vocabulary"):
        model(jnp.full((1, 4), config.vocab_size, jnp.int32))
    with pytest.raises(ModelInputError, match="longer than n_positions"):
        model(jnp.zeros((1, config.n_positions + 1), jnp.int32))
    with pytest.raises(ModelInputError, match="n_positions"):
        model.init_cache(1, config.n_positions + 1)


@pytest.mark.parametrize("layer", [2, 7, -3])
def test_attention_figure_refuses_a_layer_the_model_does_not_have(tiny_hf_dir, layer):
    from condensa.eval.attention_figure import FigureConfig, draw

    with pytest.raises(ConfigError, match=rf"--layer {layer} is not a layer of this model \(0\.\.1"):
        draw(FigureConfig(model=str(tiny_hf_dir), thresholds="checked-after-the-layer.safetensors", layer=layer))


def test_model_overrides_typo_gets_a_suggestion():
    from condensa.model.registry import preset

    with pytest.raises(ConfigError, match="n_embdd.*Did you mean 'n_embd'"):
        preset("tiny", n_embdd=32)


def test_a_missing_path_under_a_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **_: pytest.fail("asked the hub"))
    with pytest.raises(CheckpointError, match="runs/nomodel does not exist"):
        condensa.load_pretrained("runs/nomodel")
    from condensa.data import load_tokenizer
    from condensa.errors import DataError

    with pytest.raises(DataError, match="runs/missing does not exist"):
        load_tokenizer("runs/missing")


def test_an_unreachable_hub_fails_within_seconds_and_names_both_possibilities(monkeypatch):
    import socket
    import time

    from condensa import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HUB_PROBE_SECONDS", 0.5)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))  # DNS that hangs
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="neither a local folder.*nor reachable on the Hugging Face hub"):
        condensa.load_pretrained("someone/some-model")
    assert time.perf_counter() - start < 5
