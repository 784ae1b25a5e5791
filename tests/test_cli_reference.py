"""docs/cli.md is generated from the tools' parsers; it must match what the code says today."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

import pytest

from condensa import cli_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_docs_cli_md_is_up_to_date():
    expected = cli_reference.render()
    actual = DOC.read_text() if DOC.is_file() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 "docs/cli.md", "generated"))[:40])
        raise AssertionError(f"docs/cli.md is stale: run `python -m condensa.cli_reference` to refresh it.\n{diff}")


def test_every_cli_is_in_the_reference_with_its_options():
    text = cli_reference.render()
    for tool in cli_reference.TOOLS:
        assert f"## {tool.command}\n" in text
        module = __import__(tool.module, fromlist=["build_parser"])
        if not hasattr(module, "build_parser"):  # parses by hand; its --help prints the docstring
            assert module.__doc__.strip() in text
            continue
        parser = module.build_parser()
        assert isinstance(parser, argparse.ArgumentParser)
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text, f"{tool.command}: {flag} is missing from the reference"
    for key in ("`data.vocab_limit`", "`attention.tile_budget`", "`loss.topk.k`", "`tolerance`"):
        assert key in text  # nested config keys are listed with their dotted names


def test_help_does_not_depend_on_the_terminal_width(monkeypatch):
    # argparse wraps to $COLUMNS (through shutil.get_terminal_size); the generated file must not.
    rendered = set()
    for columns in ("40", "250"):
        monkeypatch.setenv("COLUMNS", columns)
        rendered.add(cli_reference.render())
    assert len(rendered) == 1


def test_every_option_has_a_description_in_the_reference_and_in_help():
    """Every row of the key tables in docs/cli.md says what the key does (the comment beside its
    field); every flag of every parser has a help string; and the tools whose options are config
    keys list each key in --help with that description."""
    import importlib
    import re

    from condensa.cli import config_rows

    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in cli_reference.render().splitlines()
             if line.startswith("| `")]
    keys = [row for row in cells if len(row) == 4]  # key | type | default | description
    assert len(keys) > 200 and [row[0] for row in keys if not row[3].strip()] == []
    for tool in cli_reference.TOOLS:
        module = importlib.import_module(tool.module)
        if not hasattr(module, "build_parser"):  # parses by hand (the study): its help_text() is --help
            text = module.help_text()
            module, name = tool.config.split(":")
            for key, _, _, note in config_rows(getattr(importlib.import_module(module), name)):
                assert f"--{key} " in text and note.split()[0] in text, f"{tool.command}: --{key}"
            continue
        parser = module.build_parser()
        assert all(action.help for action in parser._actions), f"{tool.command}: a flag without help"
        text = cli_reference.help_text(parser)
        if tool.config is None or "config keys (" not in text:
            continue  # its own flags (calibrate, export): checked above
        module, name = tool.config.split(":")
        for key, _, _, note in config_rows(getattr(importlib.import_module(module), name)):
            assert f"--{key} " in text and note.split()[0] in text, f"{tool.command}: --{key}"
    train = cli_reference.help_text(importlib.import_module("condensa.train.__main__").build_parser())
    assert "--loss.select.f " in train  # the key list is generated, not copied by hand (it had drifted)


def test_bench_train_and_masses_read_the_command_lines_of_docs_benchmarks():
    # docs/benchmarks.md records these commands with dashes (before the shared parser); they still parse
    from condensa.cli import parse_config_args
    from condensa.errors import ConfigError
    from condensa.eval.bench import masses, train

    cfg = parse_config_args(["--seq-len", "2048", "--batch-size", "4", "--remat", "false", "--settings", "none,topk"],
                            train.TrainBenchConfig, **train.PARSER)
    assert (cfg.seq_len, cfg.batch_size, cfg.remat, cfg.settings) == (2048, 4, False, "none,topk")
    cfg = parse_config_args(["--seq-len", "4096", "--top-k", "64"], masses.MassesBenchConfig, **masses.PARSER)
    assert (cfg.seq_len, cfg.top_k) == (4096, 64)
    with pytest.raises(ConfigError, match="bfloat16 or float32"):
        parse_config_args(["--dtype", "float16"], masses.MassesBenchConfig, **masses.PARSER)


def test_command_line_values_reach_each_field_type_as_written(tmp_path):
    from condensa.cli import load_config, parse_config_args
    from condensa.export import PARSER as EXPORT, ExportConfig
    from condensa.sparsity.calibration import CalibrationConfig
    from condensa.train.config import TrainConfig

    # str fields take the text (YAML would read 1:30 as the sexagesimal 90, and yes as true) ...
    cfg = parse_config_args(["--run", "r", "--thresholds", "1:30"], ExportConfig, **EXPORT)
    assert cfg.thresholds == "1:30"
    assert parse_config_args(["--run", "r", "--thresholds", "null"], ExportConfig, **EXPORT).thresholds is None
    # ... a mapping field's keys are parsed (an int stays an int), several values make a list, and
    # --config may come after the overrides
    train = load_config(TrainConfig, None, ["--model_overrides.n_positions", "2048"])
    assert train.model_overrides == {"n_positions": 2048}
    config = tmp_path / "c.yaml"
    config.write_text("k: 99\nsamples: 4\n")
    cal = parse_config_args(["--model", "m", "--data", "a.txt", "b.txt", "--out", "o", "--k", "8", "--config",
                             str(config)], CalibrationConfig, prog="p", description="d")
    assert (cal.k, cal.samples, cal.data) == (8, 4, ("a.txt", "b.txt"))


def test_the_tools_that_write_results_point_to_docs_metrics_md():
    """Issue 29: the metric names are explained in one place, and --help says where."""
    import importlib

    for module in ("condensa.train.__main__", "condensa.calibrate", "condensa.eval.ppl_cli", "condensa.eval.sweep_cli",
                   "condensa.eval.generate_cli"):
        assert "docs/metrics.md" in importlib.import_module(module).build_parser().format_help(), module
    assert "[metrics.md](metrics.md)" in cli_reference.render()
    assert (DOC.parent / "metrics.md").is_file()
