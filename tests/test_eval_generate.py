"""`python -m condensa.eval generate`: kept V rows per KV-cache decoding step and token agreement
with dense greedy decoding, checked against the prefill path and `condensa.model.generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from condensa.cli import run_main
from tests.conftest import CORPUS_DIR, TOKENIZER_DIR, WIKITEXT_TEST, require_shared
from tests.test_eval_sweep import trained_model_dir  # noqa: F401  (the shared session fixture)

K, BUDGET, TILE, PROMPT, NEW = 16, 0.25, 16, 64, 4  # the sweep test's settings: compiled functions are shared


@pytest.fixture(scope="module")
def setup(trained_model_dir, tmp_path_factory):  # noqa: F811
    """The model, its text codec, and gated / ungated Top-θ thresholds calibrated on the corpus."""
    from condensa.data import load_token_stream, pack_blocks
    from condensa.eval.sweep_cli import ModelText
    from condensa.model import load_pretrained
    from condensa.sparsity.calibration import GateSpec, calibrate

    model, _ = load_pretrained(trained_model_dir)
    text = ModelText.for_model(str(trained_model_dir), str(TOKENIZER_DIR))
    stream = load_token_stream(str(require_shared(CORPUS_DIR / "misc" / "inaugural.txt")), text.tokenizer,
                               cache_dir=trained_model_dir.parent.parent / "token-cache")
    blocks = pack_blocks(text.to_model_ids(stream), 128)[:16]
    root = tmp_path_factory.mktemp("generate")
    files = {}
    for name, gate in (("plain", None), ("gated", GateSpec(TILE, TILE, BUDGET, 1))):
        files[name] = calibrate(model, blocks, k=K, gate=gate).save(root / f"{name}.safetensors")
    return model, text, files, trained_model_dir


def generate_cli(args) -> int:
    from condensa.eval.__main__ import main

    return run_main(main)(["generate", *args])


def base_args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--tokenizer", str(TOKENIZER_DIR), "--data", str(require_shared(WIKITEXT_TEST)),
            "--prompts", "1", "--prompt_tokens", str(PROMPT), "--max_new_tokens", str(NEW), "--out", str(out), *extra]


def gated_args(threshold_file):
    return ["--attention.mode", "toptheta", "--attention.k", str(K), "--attention.tile_gate", "true",
            "--attention.block_q", str(TILE), "--attention.block_k", str(TILE), "--attention.tile_budget", str(BUDGET),
            "--thresholds", str(threshold_file)]


def test_cli_reports_v_rows_per_step_and_agreement(setup, tmp_path):
    from PIL import Image

    from condensa.model import generate

    model, text, files, model_dir = setup
    assert generate_cli(base_args(model_dir, tmp_path, *gated_args(files["gated"]))) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert [s["row_length"] for s in result["steps"]] == [PROMPT + 1 + i for i in range(NEW)]
    for step in result["steps"]:
        assert 0 < step["v_rows_fraction"] < 1  # rows of 65+ keys at k = 16 under a gate keep few V rows
        assert len(step["per_layer"]) == model.config.n_layer
    assert np.isclose(result["v_rows_fraction"], np.mean([s["v_rows_fraction"] for s in result["steps"]]))
    # the prompt is cut from the text as documented, and the dense reference is the product's
    # greedy decoding (condensa.model.generate); agreement is counted against it
    from condensa.eval.generate_cli import GenerateConfig, prompt_ids

    sample = result["samples"][0]
    ids = prompt_ids(GenerateConfig(data=[str(WIKITEXT_TEST)], prompts=1, prompt_tokens=PROMPT), text.encode)[0]
    assert sample["prompt_ids"] == ids.tolist()
    assert sample["dense_ids"] == generate(model, ids[None], NEW)[0, PROMPT:].tolist()
    same = np.asarray(sample["dense_ids"]) == np.asarray(sample["sparse_ids"])
    assert np.isclose(result["token_agreement"], same.mean())
    assert 0 <= result["token_agreement"] <= 1
    assert result["first_divergence"][0] == NEW or result["token_agreement"] < 1
    assert json.loads((tmp_path / "config.json").read_text())["attention"]["tile_gate"] is True
    with Image.open(tmp_path / "v_rows.png") as image:
        assert image.format == "PNG" and image.size[0] >= 300
        assert np.asarray(image.convert("L"), np.float64).std() > 5


def test_decode_v_rows_match_the_prefill_rows_without_a_gate(setup):
    """Without a gate, decoding keeps exactly what prefill keeps: step s needs the V rows that row
    P + s of a full prefill pass over prompt + generated tokens keeps (counted here in NumPy)."""
    import jax.numpy as jnp

    from condensa.attention import AttentionConfig
    from condensa.eval.generate_cli import decode_trace
    from condensa.sparsity import Thresholds

    model, text, files, _ = setup
    attention = AttentionConfig(mode="toptheta", k=K)
    thresholds = Thresholds.load(files["plain"])
    ids = text.encode(require_shared(WIKITEXT_TEST).read_text()[:5000])[:PROMPT]
    trace = decode_trace(model, ids[None], NEW, attention, thresholds)
    full = np.concatenate([ids, trace["tokens"][0]])
    probs = model(jnp.asarray(full[None]), attention=attention, thresholds=thresholds, return_attention=True).attentions
    for step in range(NEW):
        row = PROMPT + step  # the query fed at this step: the last prompt token, then each generated token
        expected = [[(np.asarray(p)[0, h, row, : row + 1] > 0).mean() for h in range(p.shape[1])] for p in probs]
        np.testing.assert_allclose(trace["v_rows"][step], expected, atol=1e-6)


def test_bad_input(setup, tmp_path, capsys):
    from condensa.sparsity import Thresholds

    model, _, files, model_dir = setup
    other = Thresholds(theta=np.zeros((3, 4, 64), np.float32), sdc_delta=np.zeros((3, 4, 64), np.float32), k=K,
                       model=(("n_layer", 3), ("n_head", 4), ("n_embd", 64), ("n_positions", 64), ("vocab_size", 99)))
    other.save(tmp_path / "other.safetensors")
    (tmp_path / "empty.txt").write_text("   \n")
    cases = {
        "thresholds of another model": (base_args(model_dir, tmp_path / "a", *gated_args(tmp_path / "other.safetensors")),
                                        "n_layer=3"),
        "empty text": ([*base_args(model_dir, tmp_path / "b", *gated_args(files["gated"])), "--data",
                        str(tmp_path / "empty.txt")], "no text"),
        "k above the context": (base_args(model_dir, tmp_path / "c", "--attention.mode", "topk", "--attention.k", "128"),
                                "k=128"),
        "dense against dense": (base_args(model_dir, tmp_path / "f"), "--attention.mode"),
        "no thresholds for Top-θ": (base_args(model_dir, tmp_path / "d", "--attention.mode", "toptheta"), "--thresholds"),
        "too long": (base_args(model_dir, tmp_path / "e", "--attention.mode", "topk", "--max_new_tokens", "100"),
                     "n_positions"),
    }
    for name, (args, needle) in cases.items():
        assert generate_cli(args) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err, (name, err)
