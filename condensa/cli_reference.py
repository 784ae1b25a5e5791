"""docs/cli.md, the command-line reference, generated from the tools' own parsers.

    python -m condensa.cli_reference            # rewrites docs/cli.md
    python -m condensa.cli_reference --check    # exit 1 when docs/cli.md is stale

Each tool exposes `build_parser()` (or, for one that parses by hand, prints its module docstring);
its `--help` text goes into the reference as it is, followed,
for tools driven by a config dataclass, by a table of every key (dotted for nested sections) with
its type, default and the comment beside it in the source. The help is formatted at a fixed width,
so the file does not depend on the terminal it was made in. tests/test_cli_reference.py fails when
the file is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path

WIDTH = 100  # columns of the help text, whatever the terminal
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


@dataclasses.dataclass(frozen=True)
class Tool:
    command: str  # what the user types
    module: str  # the module with build_parser() (else its docstring is the help)
    config: str | None = None  # "module:Class" of its config dataclass
    summary: str = ""


TOOLS = (
    Tool("python -m condensa.train", "condensa.train.__main__", "condensa.train.config:TrainConfig",
         "fine-tune or pretrain GPT-2 with the concentration losses"),
    Tool("python -m condensa.calibrate", "condensa.calibrate", "condensa.sparsity.calibration:CalibrationConfig",
         "calibrate Top-θ thresholds and the tile gate"),
    Tool("python -m condensa.export", "condensa.export", "condensa.export:ExportConfig",
         "a training checkpoint to a Hugging Face directory (with thresholds), verified in transformers"),
    Tool("python -m condensa.eval ppl", "condensa.eval.ppl_cli", "condensa.eval.ppl_cli:PerplexityConfig",
         "sliding-window perplexity under any attention rule"),
    Tool("python -m condensa.eval sweep", "condensa.eval.sweep_cli", "condensa.eval.sweep_cli:SweepConfig",
         "perplexity against kept attention, with tables and plots"),
    Tool("python -m condensa.eval generate", "condensa.eval.generate_cli", "condensa.eval.generate_cli:GenerateConfig",
         "kept V rows per decoding step and agreement with dense decoding"),
    Tool("python -m condensa.eval.study", "condensa.eval.study.__main__", "condensa.eval.study.config:StudyConfig",
         "the real-data study behind docs/results.md, in stages"),
    Tool("python -m condensa.eval.attention_figure", "condensa.eval.attention_figure", None,
         "a dense and a sparse attention map side by side (the README picture)"),
    Tool("python -m condensa.eval.bench train", "condensa.eval.bench.train", None,
         "training throughput and MFU"),
    Tool("python -m condensa.eval.bench masses", "condensa.eval.bench.masses", None,
         "the fused kernel behind the concentration losses"),
    Tool("python -m condensa.eval.bench prefill", "condensa.eval.bench.prefill",
         "condensa.eval.bench.prefill:PrefillBenchConfig", "prefill attention kernels against cuDNN"),
    Tool("python -m condensa.eval.bench decode", "condensa.eval.bench.decode",
         "condensa.eval.bench.decode:DecodeBenchConfig", "decode attention kernels against XLA and cuDNN"),
)


def help_text(parser: argparse.ArgumentParser) -> str:
    """`parser`'s --help at WIDTH columns, whatever the terminal (argparse reads $COLUMNS)."""
    base = parser.formatter_class
    parser.formatter_class = lambda prog: base(prog, width=WIDTH, max_help_position=32)
    try:
        return parser.format_help().rstrip() + "\n"
    finally:
        parser.formatter_class = base


def _comments(cls) -> dict[str, str]:
    """field name -> the `# comment` after it in the class source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*?#\s*(.+)$", line)
        if match:
            found.setdefault(match.group(1), match.group(2).strip())
    return found


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _shown(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, comment) for every leaf field of a (nested) config dataclass."""
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    rows = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            rows += config_rows(hint, prefix + field.name + ".")
            continue
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        rows.append((prefix + field.name, str(kind), _shown(_default(field)), comments.get(field.name, "")))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _dispatcher_sections() -> list[str]:
    from condensa.eval.__main__ import COMMANDS
    from condensa.eval.bench import __main__ as bench

    lines = ["## python -m condensa.eval", "", "Dispatches to one evaluation command; each has its own `--help`.", "",
             "| command | what it does |", "| --- | --- |"]
    lines += [f"| `python -m condensa.eval {name}` | {_cell(text)} |" for name, (_, text) in COMMANDS.items()]
    lines += ["", "## python -m condensa.eval.bench", "", "```text", bench.__doc__.strip(), "```", ""]
    return lines


def render() -> str:
    """The whole of docs/cli.md."""
    lines = [
        "# Command-line reference",
        "",
        "<!-- Generated by `python -m condensa.cli_reference` from the tools' parsers and config classes; "
        "do not edit by hand. -->",
        "",
        "Every tool is `python -m condensa.<tool>`. Config-driven tools take `--config FILE.yaml` and dotted "
        "overrides (`--attention.k 16`, `--optimizer.lr 3e-4`; lists as `a,b,c`); a user mistake prints one "
        "line on stderr and exits with status 2. The README has worked examples.",
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    lines += [f"| [`{t.command}`](#{_anchor(t.command)}) | {_cell(t.summary)} |" for t in TOOLS]
    lines.append("")
    for tool in TOOLS:
        if tool.command == "python -m condensa.eval ppl":
            lines += _dispatcher_sections()
        module = importlib.import_module(tool.module)
        text = help_text(module.build_parser()) if hasattr(module, "build_parser") else module.__doc__.strip()
        lines += [f"## {tool.command}", "", "```text", text.rstrip(), "```", ""]
        if tool.config:
            module, name = tool.config.split(":")
            cls = getattr(importlib.import_module(module), name)
            lines += [f"Config keys (`{name}`; YAML keys or `--key value` overrides):", "",
                      "| key | type | default | |", "| --- | --- | --- | --- |"]
            lines += [f"| `{key}` | `{_cell(kind)}` | `{_cell(default)}` | {_cell(note)} |"
                      for key, kind, default, note in config_rows(cls)]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, spaces to dashes, punctuation dropped."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m condensa.cli_reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_PATH), help="file to write (default: docs/cli.md)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    text, path = render(), Path(args.out)
    if args.check:
        stale = not path.is_file() or path.read_text() != text
        print(f"{path} is {'stale: run python -m condensa.cli_reference' if stale else 'up to date'}")
        return int(stale)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
