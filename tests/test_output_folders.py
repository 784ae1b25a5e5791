"""Every command that writes an output folder checks it before any work starts, and a failed
run leaves a folder's earlier results and their config as they were."""

from __future__ import annotations

import json

import pytest

from condensa.cli import run_main


def _commands():
    from condensa import calibrate, export
    from condensa.eval import __main__ as evaluate

    return {
        "calibrate": (run_main(calibrate.main), ["--model", "/nonexistent-model", "--data", "/nonexistent.txt"]),
        "ppl": (run_main(evaluate.main), ["ppl", "--model", "/nonexistent-model", "--data", "/nonexistent.txt"]),
        "export": (run_main(export.main), ["--model", "/nonexistent-model"]),
    }


@pytest.mark.parametrize("command", ["calibrate", "ppl", "export"])
def test_an_unwritable_output_folder_is_named_before_any_work(command, tmp_path, capsys):
    """The model path does not exist either: the folder is checked first, so the user learns of it
    before a long load or run, not after."""
    (tmp_path / "a-file").write_text("not a folder")
    cli, args = _commands()[command]
    status = cli(args + ["--out", str(tmp_path / "a-file" / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "cannot write to the output folder" in err and "a-file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command,config_file", [("calibrate", "config.yaml"), ("ppl", "config.json")])
def test_a_failed_run_leaves_the_folders_config_alone(command, config_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    earlier = json.dumps({"model": "the earlier run's model"})
    (out / config_file).write_text(earlier)
    cli, args = _commands()[command]
    assert cli(args + ["--out", str(out)]) == 2  # the model does not exist
    capsys.readouterr()
    assert (out / config_file).read_text() == earlier


def test_ppl_without_thresholds_names_the_cli_flag_not_the_python_api(tmp_path, capsys):
    cli, args = _commands()["ppl"]
    assert cli(args + ["--attention.mode", "toptheta", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--thresholds FILE" in err and "Thresholds.load" not in err
