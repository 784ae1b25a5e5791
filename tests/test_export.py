"""python -m condensa.export: a checkpoint of a tiny training run -> an HF directory that
transformers reproduces; damaged, missing or mismatched inputs give one clear line and exit 2.

One tiny run (the resume test's settings, 30 steps, checkpoints at 15 and 30) serves every test;
tests that damage checkpoints work on a copy. The CLI runs in-process so that the compiled model
initialisers are shared between the exports.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from condensa.export import THRESHOLDS_FILE as THRESHOLDS
from condensa.export import cli
from tests.train_helpers import tiny_config

STEPS = 30  # tiny_args checkpoints every 15 steps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from condensa.train.loop import train

    out = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(out, STEPS))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["15", "30"]
    return out


def _weights(directory):
    return load_file(directory / "model.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _damaged_copy(run, tmp_path, damage: dict[str, str]):
    """A copy of the run whose checkpoint step -> 'truncate' | 'garble' has its array files damaged."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step, how in damage.items():
        data = sorted(p for p in (copy / "checkpoints" / step).rglob("*") if p.is_file() and "/d/" in str(p))
        assert data, "orbax's array data files were not found; the damage would test nothing"
        for p in data:
            raw = p.read_bytes()
            if how == "truncate":
                p.write_bytes(raw[: len(raw) // 2])
            else:  # same length, bytes in the middle replaced
                rng = np.random.default_rng(0)
                middle = len(raw) // 4
                p.write_bytes(raw[:middle] + rng.integers(0, 256, len(raw) - 2 * middle, np.uint8).tobytes() + raw[-middle:])
    return copy


def test_export_verifies_against_transformers_and_equals_the_final_weights(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli([str(run), "--out", str(out), "--verify"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed

    record = json.loads((out / "export.json").read_text())
    assert record["step"] == STEPS
    assert 0 <= record["verify"]["max_abs_logit_diff"] <= 1e-4 and record["verify"]["tokens"] > 8
    # The training loop exported the same (last) step into run/hf: the weights must be identical.
    _assert_same_weights(_weights(out), _weights(run / "hf"))
    # A vocab-limited run ships its id map, not a tokenizer whose ids would be wrong.
    assert json.loads((out / "vocab_map.json").read_text()) == json.loads((run / "hf" / "vocab_map.json").read_text())
    assert not (out / "tokenizer.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["15", "30"]  # the run is untouched
    for folder in (out, run / "hf"):  # the export CLI's, and the training loop's own export
        # the run trained with --dropout 0, and the config says so (the preset's 0.1 would mislead)
        config = json.loads((folder / "config.json").read_text())
        assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.0
        # readable by others, like any file the user writes (atomic writes made them 0600)
        assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.suffix in (".json", ".safetensors")} == {
            p.name: 0o666 & ~_umask() for p in folder.iterdir() if p.suffix in (".json", ".safetensors")}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_step_picks_an_earlier_checkpoint_and_thresholds_are_checked_and_copied(run, tmp_path, capsys):
    from condensa.model import GPT2Config
    from condensa.sparsity.thresholds import Thresholds, model_fingerprint

    config = GPT2Config.from_json_file(run / "hf" / "config.json")

    def thresholds(n_layer):
        shape = (n_layer, config.n_head, config.n_positions)
        fingerprint = model_fingerprint(config.replace(n_layer=n_layer))
        return Thresholds(theta=np.full(shape, 0.5, np.float32), sdc_delta=np.zeros(shape, np.float32), k=4,
                          model=fingerprint)

    good = thresholds(config.n_layer).save(tmp_path / "good.safetensors")
    wrong = thresholds(config.n_layer + 1).save(tmp_path / "wrong.safetensors")

    # The checkpoints/ folder names the run too; without --out the export goes to RUN/hf-step<N>.
    assert cli([str(run / "checkpoints"), "--step", "15", "--thresholds", str(good)]) == 0
    out = run / "hf-step15"
    assert json.loads((out / "export.json").read_text())["step"] == 15
    assert (out / "thresholds.safetensors").read_bytes() == good.read_bytes()
    early, final = _weights(out), _weights(run / "hf")
    assert any(not np.array_equal(early[k], final[k]) for k in final), "step 15 exported the step-30 weights"

    capsys.readouterr()
    assert cli([str(run), "--out", str(tmp_path / "bad"), "--thresholds", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "n_layer=3" in err and "calibrate" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()  # refused before anything was written

    assert cli([str(run), "--step", "7", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint of step 7" in capsys.readouterr().err


def test_a_damaged_latest_checkpoint_falls_back_and_all_damaged_is_a_clear_error(run, tmp_path, capsys):
    copy = _damaged_copy(run, tmp_path, {"30": "truncate"})
    with pytest.warns(UserWarning, match="step 30"):
        assert cli([str(copy), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["step"] == 15

    _damaged_copy(run, tmp_path / "all", {"30": "truncate", "15": "garble"})
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert cli([str(tmp_path / "all" / "run"), "--out", str(tmp_path / "hf-all")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "truncated or corrupt" in err and "step 30" in err and "step 15" in err
    assert "Traceback" not in err and not (tmp_path / "hf-all").exists()
    # Nothing in the run was moved aside or deleted (the export only reads).
    assert sorted(p.name for p in (tmp_path / "all" / "run" / "checkpoints").iterdir()) == ["15", "30"]
    assert not (tmp_path / "all" / "run" / "corrupt").exists()

    assert cli([str(tmp_path / "all" / "run"), "--step", "15", "--out", str(tmp_path / "hf15")]) == 2
    assert "step 15" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not-a-run", "is not the output folder"),
    ("no-checkpoints", "has no checkpoints"),
])
def test_folders_without_a_checkpoint_exit_2(case, message, tmp_path, run, capsys):
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "no-checkpoints":
        shutil.copy(run / "config.yaml", folder / "config.yaml")
    assert cli([str(folder), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (folder / "checkpoints").exists()  # no empty checkpoints folder was created


def test_verify_reports_a_mismatch_and_a_missing_torch(run, tmp_path, capsys, monkeypatch):
    import condensa.model.transformers_check as check

    real = check.transformers_logits
    monkeypatch.setattr(check, "transformers_logits", lambda d, ids: real(d, ids) + 1e-3)
    assert cli([str(run), "--out", str(tmp_path / "off"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "does not reproduce the model" in err and "0.001" in err

    monkeypatch.setattr(check, "transformers_logits", real)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert cli([str(run), "--out", str(tmp_path / "notorch"), "--verify"]) == 2
    assert "pip install torch" in capsys.readouterr().err


def test_export_into_another_models_folder_is_refused_unless_forced(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli([str(run), "--out", str(out)]) == 0
    assert cli([str(run), "--out", str(out)]) == 0  # the same run again: replaced without --force
    (out / THRESHOLDS).write_bytes(b"another model's thresholds")
    (out / "notes.md").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli(["--model", str(run / "hf"), "--out", str(out)]) == 2  # another source
    err = capsys.readouterr().err
    assert "not an export of" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    assert cli(["--model", str(run / "hf"), "--out", str(out), "--force"]) == 0
    assert not (out / THRESHOLDS).exists()  # the stale thresholds went with the old export
    assert (out / "notes.md").read_text() == "the user's own file"
    assert json.loads((out / "export.json").read_text())["source"] == str(run / "hf")


def test_run_weights_go_onto_a_model_in_its_own_dtype(run):
    # A fine-tune is judged in the dtype of the model it came from: its float32 parameters are cast.
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from condensa.train.run_model import restore_run, with_run_weights

    trained = restore_run(run, step=15).model
    base = restore_run(run, step=30).model
    nnx.update(base, jax.tree.map(lambda p: jnp.zeros_like(p, jnp.bfloat16), nnx.state(base, nnx.Param)))
    with_run_weights(base, run, step=15)
    got, want = nnx.state(base, nnx.Param), nnx.state(trained, nnx.Param)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert g.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(g), np.asarray(jnp.asarray(w, jnp.bfloat16)), err_msg=str(path))


def test_the_run_ends_with_its_loss_and_sparsity_curves(run):
    """Drawn by the training loop itself (tests/test_train_plots.py checks what they show)."""
    from PIL import Image

    for name in ("loss.png", "sparsity.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG"
