"""What a training run writes and says: every metrics.jsonl key is documented (docs/metrics.md),
and a run without a terminal reports its progress and where its results went (issue 29)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.metrics_doc import undocumented
from tests.train_helpers import read_jsonl, tiny_args

STEPS = 10
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with every concentration loss on, as a log file sees it: stdout and stderr are
    pipes, not a terminal."""
    out = tmp_path_factory.mktemp("train-output") / "run"
    args = tiny_args(out, STEPS, "--loss.tile.weight", "0.1", "--loss.gate.weight", "0.1",
                     "--loss.select.weight", "0.1", "--train.batch_size", "4", "--checkpoint.every", str(STEPS),
                     "--checkpoint.async_save", "false")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "condensa.train", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout, done.stderr


def test_every_metrics_key_is_in_docs_metrics_md(run):
    out, _, _ = run
    records = read_jsonl(out / "metrics.jsonl")
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert {"L_topk", "L_tile", "L_gate", "L_select", "oracle_tile_mass", "gate_tile_mass"} <= set().union(*records)
    assert not undocumented(*records), "add these keys to docs/metrics.md"
