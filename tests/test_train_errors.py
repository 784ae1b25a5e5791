"""Bad input to `python -m condensa.train` gives one clear error line and exit status 2."""

from __future__ import annotations

import re

import pytest

from condensa.errors import TrainingError
from tests.train_helpers import tiny_args, tiny_config


def _main(argv, capsys):
    from condensa.train.__main__ import main

    status = main(argv)
    return status, capsys.readouterr().err


def test_help_explains_the_command(capsys):
    from condensa.train.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m condensa.train" in out and "--init scratch" in out and "resumes" in out


def test_empty_data_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    args = tiny_args(tmp_path / "run", 4) + ["--data.source", str(tmp_path / "empty.txt")]
    status, err = _main(args, capsys)
    assert status == 2 and "empty" in err and "Traceback" not in err


def test_seq_len_longer_than_n_positions(tmp_path, capsys):
    status, err = _main(tiny_args(tmp_path / "run", 4) + ["--data.seq_len", "48"], capsys)
    assert status == 2 and "n_positions=32" in err and "--data.seq_len 32" in err


def test_unknown_config_key_suggests_the_right_one(tmp_path, capsys):
    status, err = _main(tiny_args(tmp_path / "run", 4) + ["--optimizer.lrr", "1e-3"], capsys)
    assert status == 2 and "optimizer.lrr" in err and "Did you mean 'optimizer.lr'?" in err


def test_incompatible_run_in_output_folder(tmp_path, capsys):
    from condensa.train.output_folder import write_config

    write_config(tmp_path / "run", tiny_config(tmp_path / "run", 4))
    changed = tiny_args(tmp_path / "run", 4) + ["--model_overrides", "{n_embd: 64, n_positions: 32}"]
    status, err = _main(changed, capsys)
    assert status == 2 and "incompatible config" in err and "n_embd" in err and "new --out" in err


def test_nan_loss_stops_the_run_and_saves_nothing_bad(tmp_path):
    from condensa.checkpoint import Checkpointer
    from condensa.train.loop import train

    cfg = tiny_config(tmp_path / "run", 20, "--optimizer.lr", "1e30", "--optimizer.grad_clip", "0",
                      "--optimizer.warmup_steps", "0", "--checkpoint.every", "1")
    with pytest.raises(TrainingError, match=r"at step (\d+)") as info:
        train(cfg)
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert bad_step > 1  # step 1 itself was finite and checkpointed
    steps = Checkpointer(tmp_path / "run" / "checkpoints").steps()
    assert steps and max(steps) < bad_step
    assert not (tmp_path / "run" / "hf").exists()  # no export of a broken model


def test_unwritable_output_folder_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    status, err = _main(tiny_args(tmp_path / "a-file" / "run", 4), capsys)
    assert status == 2 and "cannot write to the output folder" in err and "a-file" in err and "Traceback" not in err


def test_nan_parameters_are_never_checkpointed(tmp_path):
    """The loss a step reports is from before its update: the saved parameters are checked too."""
    import jax
    import numpy as np

    from condensa.checkpoint import Checkpointer, flatten
    from condensa.train.loop import train

    # an lr that overflows float32: the first update already poisons the parameters, while the
    # loss it reports (from before that update) is still finite
    cfg = tiny_config(tmp_path / "run", 20, "--optimizer.lr", "1e300", "--optimizer.grad_clip", "0",
                      "--optimizer.warmup_steps", "0", "--checkpoint.every", "1", "--checkpoint.keep", "50")
    with pytest.raises(TrainingError, match=r"last good checkpoint: step (\d+)") as info:
        train(cfg)
    named = int(re.search(r"last good checkpoint: step (\d+)", str(info.value)).group(1))
    manager = Checkpointer(tmp_path / "run" / "checkpoints")
    assert max(manager.steps(), default=0) == named  # here the very first update overflowed: none
    for step in manager.steps():
        restored = manager._manager.restore(step)["state"]
        flat, _ = flatten(dict(restored))
        bad = [k for k, v in flat.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
               and not np.all(np.isfinite(np.asarray(jax.device_get(v))))]
        assert not bad, f"checkpoint {step} holds non-finite arrays: {bad[:3]}"
    manager.close()


def test_every_checkpoint_corrupt_is_refused_until_restart(tmp_path, capsys):
    from tests.train_helpers import read_jsonl

    out = tmp_path / "run"
    args = tiny_args(out, 4, "--checkpoint.every", "2", "--train.export", "false")
    assert _main(args, capsys)[0] == 0
    lines_before = (out / "metrics.jsonl").read_text()
    for step_dir in (out / "checkpoints").iterdir():
        for f in step_dir.rglob("*"):
            if f.is_file() and f.stat().st_size > 0:
                f.write_bytes(b"\x00garbage" * 4)
    with pytest.warns(UserWarning, match="corrupt"):
        status, err = _main(args, capsys)
    assert status == 2 and "--restart" in err and "corrupt" in err
    assert (out / "metrics.jsonl").read_text() == lines_before  # nothing overwritten
    assert _main(args, capsys)[0] == 2  # still refused once the corrupt ones are set aside
    status, err = _main(args + ["--restart"], capsys)
    assert status == 0
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # one copy of the metrics, not two


def test_a_second_run_in_a_locked_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    import json
    import os
    import subprocess
    import sys

    from condensa.train.run_lock import LOCK_FILE, StaleLockWarning

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                 "started": "2026-12-05T10:00:00+00:00"}))
        status, err = _main(tiny_args(out, 2, "--train.export", "false"), capsys)
        assert status == 2 and f"pid {holder.pid}" in err and "2026-12-05T10:00:00" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(StaleLockWarning, match=f"pid {holder.pid}"):
        status, _ = _main(tiny_args(out, 2, "--train.export", "false"), capsys)
    assert status == 0 and not (out / LOCK_FILE).exists()  # released at the end


@pytest.mark.parametrize("flag,value,expected", [
    ("--optimizer.lr", "-1e-3", "cannot be negative"),
    ("--optimizer.lr", "nan", "is NaN"),
    ("--loss.tile.f", "nan", "is NaN"),
])
def test_bad_numbers_are_refused_at_parse_time(tmp_path, capsys, flag, value, expected):
    status, err = _main(tiny_args(tmp_path / "run", 2) + [flag, value], capsys)
    assert status == 2 and expected in err and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_metrics_lines_are_json_even_for_nan(tmp_path):
    import json

    from condensa.cli import append_jsonl

    append_jsonl(tmp_path / "m.jsonl", {"step": 1, "loss": float("nan"), "ppl": [float("inf"), 2.0]})
    line = (tmp_path / "m.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {
        "step": 1, "loss": None, "ppl": [None, 2.0]}


def test_a_truncated_checkpoint_gives_one_warning_line_and_the_resume_is_said_and_logged(tmp_path, capsys):
    """Resumed in a fresh process with stderr a pipe, as a script or a job scheduler runs it: the
    truncated checkpoint is one `warning:` line (orbax's abandoned reads used to add about 600
    lines of `Event loop is closed` tracebacks), and the resume is on stderr and in metrics.jsonl."""
    import os
    import subprocess
    import sys

    from tests.train_helpers import read_jsonl

    out = tmp_path / "run"
    args = tiny_args(out, 4, "--checkpoint.every", "2", "--train.export", "false")
    assert _main(args, capsys)[0] == 0
    for f in (out / "checkpoints" / "4").rglob("*"):
        if f.is_file() and "/d/" in str(f):  # the array data: half of each file
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "condensa.train", *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "checkpoint step 4" in warned[0] and "truncated or corrupt" in warned[0]
    assert "resumed from step 2 of" in proc.stderr
    resumes = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "resume"]
    assert [r["step"] for r in resumes] == [2]


@pytest.fixture()
def small_disk(tmp_path):
    """A mount point whose size the test sets (tmpfs); skipped where mounting is not allowed."""
    import shutil
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                                        capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root), so a full disk cannot be made")

    def resize(size_bytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount)], check=True)

    yield mount, resize
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_while_saving_is_one_line_and_the_run_resumes_once_space_is_freed(tmp_path, small_disk):
    """A real full disk (a tmpfs with room for one checkpoint): one `error:` line, exit status 2,
    the complete checkpoint kept; with room again, the same command resumes and ends where an
    uninterrupted run ends. The run is a subprocess, as the user runs it (orbax's threads log there)."""
    import os
    import subprocess
    import sys

    from tests.train_helpers import read_jsonl

    mount, resize = small_disk
    extra = ("--checkpoint.every", "2", "--checkpoint.keep", "1", "--train.export", "false",
             "--data.cache_dir", str(tmp_path / "token-cache"))

    def run(out):
        return subprocess.run([sys.executable, "-m", "condensa.train", *tiny_args(out, 6, *extra)], capture_output=True,
                              text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)

    from condensa.train.loop import train

    train(tiny_config(tmp_path / "straight", 6, *extra))  # the reference run, in this process: only its numbers matter
    one = sum(f.stat().st_size for f in (tmp_path / "straight" / "checkpoints" / "6").rglob("*") if f.is_file())
    resize(int(one * 1.5) + 64 * 1024)  # the first checkpoint fits, the second does not
    full = run(mount / "run")
    assert full.returncode == 2, full.stderr[-3000:]
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on the device of"), full.stderr[-3000:]
    assert "the last complete checkpoint, step 2, is kept" in lines[0]
    assert sorted(p.name for p in (mount / "run" / "checkpoints").iterdir()) == ["2"]

    resize(64 * 1024 * 1024)
    resumed = run(mount / "run")
    assert resumed.returncode == 0 and "resumed from step 2" in resumed.stderr, resumed.stderr[-2000:]
    losses = lambda out: [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]  # noqa: E731
    assert losses(mount / "run") == losses(tmp_path / "straight")
