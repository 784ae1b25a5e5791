"""`Thresholds`: file format round trip, validation against models and configs, pytree behaviour."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from condensa.attention import AttentionConfig
from condensa.errors import ThresholdsError
from condensa.model import GPT2Config
from condensa.sparsity import Thresholds, load_thresholds
from condensa.sparsity.thresholds import fill_uncalibrated, model_fingerprint

CFG = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=16)


def make(config=CFG, gate=True, **meta) -> Thresholds:
    rng = np.random.default_rng(0)
    shape = (config.n_layer, config.n_head, config.n_positions)
    extra = dict(tile_theta=rng.normal(size=shape[:2] + (4,)).astype(np.float32),
                 tile_theta_decode=rng.normal(size=shape[:2] + (4,)).astype(np.float32),
                 block_q=4, block_k=4, tile_budget=0.25, sink_tiles=1) if gate else {}
    values = dict(theta=rng.normal(size=shape).astype(np.float32), sdc_delta=rng.uniform(size=shape).astype(np.float32),
                  k=4, layer_k=((1, 6),), model=model_fingerprint(config), samples=3, data="corpus.txt")
    values.update(extra)
    values.update(meta)
    return Thresholds(**values)


def test_save_load_round_trip(tmp_path):
    th = make()
    path = th.save(tmp_path / "t.safetensors")
    back = load_thresholds(path, CFG, AttentionConfig(mode="toptheta", k=4, layer_k="1:6", tile_gate=True,
                                                      block_q=4, block_k=4, tile_budget=0.25))
    for name in ("theta", "sdc_delta", "tile_theta", "tile_theta_decode"):
        np.testing.assert_array_equal(getattr(back, name), getattr(th, name))
    assert back.metadata() == th.metadata()
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:  # the documented file layout
        meta = json.loads(f.metadata()["condensa"])
        assert set(f.keys()) == {"theta", "sdc_delta", "tile_theta", "tile_theta_decode"}
    assert meta["model"]["n_positions"] == 16 and meta["k"] == 4 and meta["layer_k"] == [[1, 6]]
    assert meta["block_q"] == 4 and meta["tile_budget"] == 0.25 and meta["data"] == "corpus.txt"


@pytest.mark.parametrize("change", [dict(n_layer=3), dict(n_head=2), dict(n_positions=32)])
def test_other_model_shape_is_refused(tmp_path, change):
    path = make().save(tmp_path / "t.safetensors")
    with pytest.raises(ThresholdsError, match=next(iter(change))):
        load_thresholds(path, CFG.replace(**change))


def test_non_finite_values_are_refused(tmp_path):
    from safetensors.numpy import save_file

    th = make()
    with pytest.raises(ThresholdsError, match="NaN or infinite"):
        make(theta=np.full((2, 4, 16), np.nan, np.float32)).save(tmp_path / "x.safetensors")
    path = tmp_path / "bad.safetensors"
    theta = np.asarray(th.theta).copy()
    theta[1, 2, 3] = np.inf
    save_file({"theta": theta, "sdc_delta": np.asarray(th.sdc_delta)}, str(path),
              metadata={"condensa": json.dumps(make(gate=False).metadata())})
    with pytest.raises(ThresholdsError, match="theta holds NaN"):
        load_thresholds(path)


def test_attention_config_mismatches_are_refused(tmp_path):
    path = make().save(tmp_path / "t.safetensors")
    ok = dict(mode="toptheta", k=4, layer_k="1:6")
    with pytest.raises(ThresholdsError, match="placement='pre'"):
        load_thresholds(path, CFG, AttentionConfig(**ok, placement="post"))
    with pytest.raises(ThresholdsError, match="per-layer k"):
        load_thresholds(path, CFG, AttentionConfig(mode="toptheta", k=4))
    with pytest.raises(ThresholdsError, match="block_q"):
        load_thresholds(path, CFG, AttentionConfig(**ok, tile_gate=True, block_q=8, block_k=8, tile_budget=0.25))
    no_gate = make(gate=False).save(tmp_path / "n.safetensors")
    with pytest.raises(ThresholdsError, match="no tile-gate"):
        load_thresholds(no_gate, CFG, AttentionConfig(**ok, tile_gate=True))


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ThresholdsError, match="does not exist"):
        Thresholds.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ThresholdsError, match="not a readable"):
        Thresholds.load(junk)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ThresholdsError, match="not a condensa thresholds file"):
        Thresholds.load(tmp_path / "w.safetensors")


def test_is_a_pytree_with_static_metadata():
    th = make()
    leaves, treedef = jax.tree_util.tree_flatten(th)
    assert len(leaves) == 4
    traces = []

    @jax.jit
    def first_theta(t):
        traces.append(1)
        return t.for_layer(1).theta[:, 0] + t.k

    np.testing.assert_allclose(first_theta(th), np.asarray(th.theta)[1, :, 0] + 4)
    new = jax.tree_util.tree_map(lambda a: a + 1, th)
    np.testing.assert_allclose(first_theta(new), np.asarray(th.theta)[1, :, 0] + 5)
    assert len(traces) == 1  # new threshold values do not recompile
    assert new.k == 4 and new.model == th.model


def test_lookup_and_interpolation():
    th = make(gate=False)
    table = np.asarray(th.theta)[0, 1]
    assert th.lookup(0, 1, 5) == pytest.approx(table[4])
    assert th.lookup(0, 1, 10_000) == pytest.approx(table[-1])  # past the table: nearest
    values = np.array([[0.0, 1.0, 5.0, 2.0, 7.0, 0.0]])
    known = np.array([[False, True, False, True, False, False]])
    np.testing.assert_allclose(fill_uncalibrated(values, known)[0], np.interp(np.arange(6), [1, 3], [1.0, 2.0]))
    assert np.isfinite(fill_uncalibrated(values, np.zeros_like(known))).all()


def test_the_file_supplies_the_settings_left_unset():
    """Issue 29: k, placement and the gate's geometry come from the file; a caller repeats none of them."""
    th = make(placement="post")
    rule = th.attention()
    assert (rule.mode, rule.placement, rule.k, rule.layer_k, rule.tile_gate) == ("toptheta", "post", 4, ((1, 6),), True)
    assert (rule.block_q, rule.block_k, rule.tile_budget, rule.sink_tiles) == (4, 4, 0.25, 1)
    assert th.attention(vmc=True, backend="pallas").vmc  # the fields the file does not record pass through
    assert not make(gate=False).attention().tile_gate
    # a CLI's parsed config: the fields it was given win, the rest (left at their defaults) come from the file
    parsed = AttentionConfig(k=64, block_q=128, sdc="none")
    assert th.resolve(parsed, given={"sdc"}).k == 4
    assert th.resolve(parsed, given=set()).block_q == 4
    # a config built in Python (given=None): fields at AttentionConfig's defaults count as unset
    assert th.resolve(AttentionConfig(vmc=True)) == th.attention(vmc=True)


def test_an_explicit_setting_that_agrees_or_that_the_file_does_not_use_is_kept():
    th = make()
    assert th.attention(k=4, tile_budget=0.25, block_q=4, block_k=4, sink_tiles=1) == th.attention()
    topk = th.attention(mode="topk", k=9)  # top-k reads no θ: any k; the gate still comes from the file
    assert (topk.k, topk.layer_k, topk.tile_gate, topk.block_q) == (9, (), True, 4)
    ungated = th.attention(tile_gate=False, block_q=8, block_k=8)  # without the gate its geometry is unused
    assert (ungated.tile_gate, ungated.block_q, ungated.k) == (False, 8, 4)
    oracle = th.attention(tile_selector="oracle", tile_budget=0.5)  # a budgeted selector reads no Θ
    assert (oracle.tile_gate, oracle.tile_budget) == (True, 0.5)


@pytest.mark.parametrize("setting, option", [
    (dict(k=8), "--attention.k 8"), (dict(layer_k="1:7"), "--attention.layer_k 1:7"),
    (dict(placement="post"), "--attention.placement post"), (dict(block_q=8), "--attention.block_q 8"),
    (dict(tile_budget=0.5), "--attention.tile_budget 0.5"), (dict(sink_tiles=2), "--attention.sink_tiles 2"),
])
def test_an_explicit_setting_the_thresholds_cannot_serve_is_refused(setting, option):
    from condensa.errors import CondensaError

    th = make()
    parsed = AttentionConfig(**setting)
    with pytest.raises(CondensaError, match=f"{option} differs") as err:
        th.resolve(parsed, given=set(setting), source="t.safetensors")
    name = next(iter(setting))
    assert f"Leave --attention.{name} out" in str(err.value) and "python -m condensa.calibrate" in str(err.value)
    with pytest.raises(ThresholdsError, match=f"{name}="):  # the Python spelling names the argument
        th.attention(**setting)
