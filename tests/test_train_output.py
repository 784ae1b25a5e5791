"""What a training run writes and says: every metrics.jsonl key is documented (docs/metrics.md),
and a run without a terminal reports its progress and where its results went (issue 29)."""

from __future__ import annotations

import os
import re
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


# ---- issue 29, point 8: without a terminal, progress lines and where the results went ---------------


def test_a_run_without_a_terminal_reports_progress_and_its_folder(run):
    out, stdout, stderr = run
    lines = stdout.splitlines()  # stderr keeps to warnings and errors
    assert any(l.startswith("training steps 1-10 (10 to go) -> ") for l in lines), stdout[-2000:]
    progress = [l for l in lines if re.match(r"step \d+/", l)]
    # a line per tenth of the steps after the first (which compiles and starts the clock)
    assert [l.split()[1] for l in progress] == [f"{s}/{STEPS}" for s in range(2, STEPS + 1)], progress
    for line in progress[:-1]:
        assert "(lm " in line and " tokens/s" in line and " ETA " in line, line
    assert progress[-1].startswith(f"step {STEPS}/{STEPS} (100%)") and progress[-1].endswith("done")
    assert any(l.startswith(f"step {STEPS} evaluation: ") and "val_ppl" in l for l in lines)
    # at the end: the folder, and what each entry holds
    summary = stdout[stdout.index(f"results in {out}:"):]
    for name, holds in (("config.yaml", "config"), ("metrics.jsonl", "docs/metrics.md"),
                        ("checkpoints/", f"checkpoints of steps {STEPS}"), ("hf/", "Hugging Face format")):
        assert re.search(rf"\n  {re.escape(name)} +.*{re.escape(holds)}", summary), summary


def test_plain_progress_keeps_a_steady_pace():
    import io

    from condensa.train.progress import PlainProgress

    now = [0.0]
    stream = io.StringIO()
    bar = PlainProgress(100, 0, tokens_per_step=1000, every_seconds=30, stream=stream, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] += 100.0 if step == 1 else (40.0 if step == 55 else 1.0)  # compiles, then one slow step
        bar.update(step, {"loss": 2.0, "lm_loss": 1.5})
    shown = [int(line.split()[1].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert shown == [10, 20, 30, 40, 50, 55, 60, 70, 80, 90, 100]  # each tenth, the slow step, and the end
    first = stream.getvalue().splitlines()[0]
    assert "1,000 tokens/s" in first and "ETA 1m30s" in first  # the compiling step is not in the rate
