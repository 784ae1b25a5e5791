"""Fault injection: a training run killed (SIGKILL) at a random moment, or inside a checkpoint
save, or inside the final export, resumes to the uninterrupted run's exact losses and
parameters. CI runs the trials below; the slow run sets CONDENSA_FAULT_TRIALS=50:

    CONDENSA_FAULT_TRIALS=50 python -m pytest -q tests/test_fault_injection.py
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.train_helpers import read_jsonl, tiny_args, tiny_config

STEPS = 30  # checkpoints at 15 and 30 (tiny_args), then the export
TRIALS = int(os.environ.get("CONDENSA_FAULT_TRIALS", "5"))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _child(out, kill_at: str | None = None) -> subprocess.Popen:
    env = {**ENV, **({"CONDENSA_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.Popen([sys.executable, "-m", "condensa.train", *tiny_args(out, STEPS)], cwd=os.getcwd(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run, in a child process like the killed ones, and how long it took."""
    out = tmp_path_factory.mktemp("straight") / "run"
    start = time.perf_counter()
    proc = _child(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out, time.perf_counter() - start


def _trial_plan(trial: int) -> tuple[str | None, float]:
    """Trials 0 and 1 die inside a save and inside the export; the rest at a random moment."""
    if trial == 0:
        return "checkpoint-save:30", 0.0  # step 15 is on disk: the resume starts there
    if trial == 1:
        return "export", 0.0
    return None, random.Random(trial).uniform(0.1, 0.95)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_killed_run_resumes_to_the_uninterrupted_run(trial, straight, tmp_path):
    from condensa.train.loop import train

    reference, seconds = straight
    out = tmp_path / "run"
    kill_at, fraction = _trial_plan(trial)
    proc = _child(out, kill_at)
    if kill_at is None:
        try:
            proc.wait(timeout=fraction * seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=600)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if kill_at is not None:
        assert proc.returncode == -signal.SIGKILL, f"the run was to die at {kill_at}: {err[-2000:]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale lock or a set-aside partial checkpoint says so; both are fine here
        train(tiny_config(out, STEPS))  # resumes wherever the kill left it

    resumed, want = load_file(out / "hf" / "model.safetensors"), load_file(reference / "hf" / "model.safetensors")
    assert resumed.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(resumed[name], want[name], err_msg=f"{name} (trial {trial}, {kill_at or fraction})")
    log = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    ref = [r for r in read_jsonl(reference / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]
    assert (out / "hf" / "vocab_map.json").is_file() and not (out / "run.lock").exists()
