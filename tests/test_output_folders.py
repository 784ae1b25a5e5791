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
        "generate": (run_main(evaluate.main), ["generate", "--model", "/nonexistent-model", "--attention.mode", "topk"]),
    }


@pytest.mark.parametrize("command", ["calibrate", "ppl", "export", "generate"])
def test_an_unwritable_output_folder_is_named_before_any_work(command, tmp_path, capsys):
    """The model path does not exist either: the folder is checked first, so the user learns of it
    before a long load or run, not after."""
    (tmp_path / "a-file").write_text("not a folder")
    cli, args = _commands()[command]
    status = cli(args + ["--out", str(tmp_path / "a-file" / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "cannot write to the output folder" in err and "a-file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command,config_file", [("calibrate", "config.yaml"), ("ppl", "config.json"),
                                                 ("generate", "config.json")])
def test_a_failed_run_leaves_the_folders_config_alone(command, config_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    earlier = json.dumps({"model": "the earlier run's model"})
    (out / config_file).write_text(earlier)
    cli, args = _commands()[command]
    assert cli(args + ["--out", str(out)]) == 2  # the model does not exist
    capsys.readouterr()
    assert (out / config_file).read_text() == earlier


@pytest.mark.parametrize("command", ["ppl", "generate"])
def test_a_rule_without_thresholds_names_the_cli_flag_not_the_python_api(command, tmp_path, capsys):
    """Checked before the model loads (the model path does not exist here)."""
    cli, args = _commands()[command]
    assert cli(args + ["--attention.mode", "toptheta", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--thresholds FILE" in err and "Thresholds.load" not in err and "does not exist" not in err


def test_a_full_disk_anywhere_in_a_command_is_one_line_and_other_os_errors_stay_bugs(capsys):
    """The backstop for writes outside the checkpointer (metrics.jsonl, an export, a report)."""
    import errno

    from condensa.cli import run_main

    def fills_the_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl")

    assert run_main(fills_the_disk)([]) == 2
    err = capsys.readouterr().err
    assert err == ("error: no space left on the device of /data/run/metrics.jsonl (No space left on device). "
                   "Free some space and run the same command again.\n")

    def a_bug(argv):
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):
        run_main(a_bug)([])


def _failing_on_missing_text(command, model, tokenizer):
    """A command line that gets past the output folder and the model, then fails on the text."""
    from condensa.train import __main__ as train

    common = ["--model", str(model), "--tokenizer", str(tokenizer)]
    cli, args = {
        "calibrate": _commands()["calibrate"][0:1] + (common + ["--data", "/nonexistent.txt", "--k", "4"],),
        "ppl": (_commands()["ppl"][0], ["ppl", *common, "--data", "/nonexistent.txt"]),
        "generate": (_commands()["generate"][0], ["generate", *common, "--data", "/nonexistent.txt",
                                                  "--attention.mode", "topk", "--attention.k", "4"]),
        # the sweep wrote its config.json first: a failed sweep left a folder holding only that
        "sweep": (_commands()["ppl"][0], ["sweep", *common, "--data", "/nonexistent.txt", "--ks", "4"]),
        "train": (train.main, ["--init", "scratch", "--model_config", "tiny", "--data.source",
                                         "/nonexistent.txt", "--data.tokenizer", str(tokenizer)]),
    }[command]
    return cli, args


@pytest.mark.parametrize("command", ["calibrate", "ppl", "generate", "sweep", "train"])
def test_a_failed_command_leaves_no_folder_behind_and_no_user_file_is_touched(command, tiny_hf_dir, tmp_path, capsys):
    from tests.conftest import TOKENIZER_DIR, require_shared

    cli, args = _failing_on_missing_text(command, tiny_hf_dir, require_shared(TOKENIZER_DIR))
    out = tmp_path / "runs" / "new" / "out"  # its parents are made by the command too
    assert cli(args + ["--out", str(out)]) == 2
    assert "nonexistent.txt" in capsys.readouterr().err  # it failed where meant to, after making the folder
    assert list(tmp_path.iterdir()) == []

    # a folder that was there keeps everything it held, and what the failed command added is gone
    kept = tmp_path / "kept"
    (kept / "sub").mkdir(parents=True)
    (kept / "notes.txt").write_text("the user's")
    assert cli(args + ["--out", str(kept)]) == 2
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == ["notes.txt", "sub"]


def test_a_failed_command_keeps_a_folder_where_it_wrote_anything_but_a_config(tmp_path, capsys):
    from condensa.cli import check_writable, write_json
    from condensa.errors import CondensaError

    def fails_after_a_result(argv):
        out = check_writable(tmp_path / "out")
        write_json(out / "config.json", {})
        (out / "metrics.jsonl").write_text("{}\n")  # a result: the metrics up to the failure
        raise CondensaError("failed")

    def fails_after_the_config(argv):
        out = check_writable(tmp_path / "only-config")
        (out / "checkpoints").mkdir()
        write_json(out / "config.json", {})
        raise CondensaError("failed")

    assert run_main(fails_after_a_result)([]) == 2 and run_main(fails_after_the_config)([]) == 2
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "metrics.jsonl"]
    assert not (tmp_path / "only-config").exists()


def test_a_folder_too_big_to_list_is_never_cleaned(tmp_path, capsys, monkeypatch):
    """`--out .` in a large tree: listing it would cost more than the command, so it is left alone."""
    from condensa import cli as cli_module
    from condensa.cli import check_writable, write_json
    from condensa.errors import CondensaError

    monkeypatch.setattr(cli_module, "_SNAPSHOT_LIMIT", 2)
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text(name)

    def fails_after_the_config(argv):
        write_json(check_writable(tmp_path) / "config.json", {})
        raise CondensaError("failed")

    assert run_main(fails_after_the_config)([]) == 2
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "config.json"]
