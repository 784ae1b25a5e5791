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
    assert status == 2 and "optimizer.lrr" in err and "Did you mean 'lr'?" in err


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
