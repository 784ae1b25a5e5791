"""Data parallel on 4 fake CPU devices gives the loss curve of 1 device (within 1e-5)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from tests.train_helpers import read_jsonl, tiny_args, tiny_config

STEPS = 30  # as in the resume test, so the 1-device run reuses its compiled step


def test_four_devices_match_one(tmp_path):
    from condensa.train.loop import train

    extra = ["--train.export", "false", "--train.eval_batches", "0"]
    script = textwrap.dedent(f"""
        import jax
        assert jax.device_count() == 4, jax.devices()
        from condensa.cli import load_config
        from condensa.train.config import TrainConfig
        from condensa.train.loop import train
        train(load_config(TrainConfig, None, {tiny_args(tmp_path / "dp4", STEPS, *extra)!r}))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr[-3000:]

    train(tiny_config(tmp_path / "one", STEPS, *extra))
    curve = lambda name: np.array([r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"])  # noqa: E731
    one = curve("one")
    assert len(one) == STEPS and one[-1] < one[0]
    np.testing.assert_allclose(curve("dp4"), one, atol=1e-5, rtol=0)
