"""Resume after the process is killed (SIGKILL, no clean shutdown) reaches the same parameters.

Bitwise on CPU: the resumed run restores parameters, optimizer state, RNG counters and the data
position, and XLA's CPU code is deterministic for a fixed program, so nothing may differ.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.train_helpers import read_jsonl, tiny_args, tiny_config

S = 15  # the kill comes after the checkpoint of step S; the runs go to 2S


def _extra():
    return []


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    from condensa.train.loop import train

    root = tmp_path
    # The interrupted run: a separate process, killed once step S is on disk.
    killed = root / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "condensa.train", *tiny_args(killed, 2 * S, *_extra())],
        cwd=os.getcwd(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    deadline = time.time() + 240
    while not (killed / "checkpoints" / str(S)).is_dir():
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / str(2 * S)).exists(), "the run finished before it was killed"

    train(tiny_config(killed, 2 * S, *_extra()))  # resumes from step S
    train(tiny_config(root / "straight", 2 * S, *_extra()))  # the uninterrupted reference

    resumed, straight = load_file(killed / "hf" / "model.safetensors"), load_file(root / "straight" / "hf" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)

    log = [r for r in read_jsonl(killed / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in log] == list(range(1, 2 * S + 1))  # the steps redone after the kill are logged once
    ref = [r for r in read_jsonl(root / "straight" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]
