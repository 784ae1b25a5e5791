"""docs/cli.md is generated from the tools' parsers; it must match what the code says today."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

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
