"""What every `python -m condensa.<cmd>` shares: YAML + dotted overrides into dataclasses, a
progress bar that is quiet off a terminal, JSON/JSONL output, and one-line errors with exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import inspect
import itertools
import math
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from tqdm.auto import tqdm

from condensa import jsonio
from condensa.errors import CondensaError, ConfigError, did_you_mean

T = TypeVar("T")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a command-line user reads it: `warning: ...`, without the source line of the
    library call that raised it."""
    return f"warning: {message}\n"


def run_main(main: Callable[[Sequence[str] | None], Any]) -> Callable[[Sequence[str] | None], int]:
    """Wraps a CLI entry point: a `CondensaError` becomes one line on stderr and exit status 2. A
    command that fails in any way takes back the output folders it made without results
    (`_remove_if_no_results`)."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        global _depth
        formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
        if _depth == 0:
            _OUTPUTS.clear()  # folders a library call saw outside any command
        _depth += 1
        earlier = set(_OUTPUTS)  # an enclosing command's folders are its own to judge
        succeeded = False
        try:
            main(argv)
            succeeded = True
        except CondensaError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"error: no space left on the device of {err.filename or 'the output folder'} ({err.strerror}). "
                  "Free some space and run the same command again.", file=sys.stderr)
            return 2
        finally:
            _depth -= 1
            mine = [folder for folder in _OUTPUTS if folder not in earlier]
            if not succeeded:
                _remove_if_no_results(mine)
            for folder in mine:
                del _OUTPUTS[folder]
            warnings.formatwarning = formatwarning
        return 0

    return wrapper


# The output folders that `check_writable` saw during the running command: for each, the first
# folder of its path that the command created (None if it existed) and every path it held then
# (None for one too big to list). A command that fails removes what it added when that is no result.
_OUTPUTS: dict[Path, tuple[Path | None, frozenset[Path] | None]] = {}
_SNAPSHOT_LIMIT = 10_000  # a folder holding more (--out . in a big tree) is not listed, and never cleaned
_depth = 0  # run_main calls under way
CONFIG_FILES = ("config.json", "config.yaml")  # what a command writes that describes results, not one


def _note_output(folder: Path) -> None:
    folder = folder.absolute()
    if folder in _OUTPUTS:
        return
    created = None
    if not folder.exists():
        created = folder
        while not created.parent.exists() and created.parent != created.parent.parent:
            created = created.parent
    before = frozenset()
    if folder.is_dir():
        listed = list(itertools.islice(folder.rglob("*"), _SNAPSHOT_LIMIT + 1))
        before = frozenset(listed) if len(listed) <= _SNAPSHOT_LIMIT else None
    _OUTPUTS[folder] = (created, before)


def _remove_if_no_results(folders: Iterable[Path]) -> None:
    """After a failed command, in each output folder it wrote to: when all it added is config files
    and empty folders (a config without the results it describes only misleads), those are removed,
    and the folder too where the command created it. Anything there before the command, and every
    folder where it added any other file (checkpoints, metrics, partial results), is left alone."""
    for folder in folders:
        created, before = _OUTPUTS[folder]
        if before is None or not folder.is_dir():
            continue
        new = [p for p in folder.rglob("*") if p not in before]
        files = [p for p in new if p.is_symlink() or not p.is_dir()]
        if any(p.name not in CONFIG_FILES or p.is_symlink() for p in files):
            continue
        try:
            for path in files:
                path.unlink()
            for path in sorted((p for p in new if p not in files), key=lambda p: len(p.parts), reverse=True):
                path.rmdir()
            if created is not None:
                path = folder
                while not any(path.iterdir()):
                    path.rmdir()
                    if path == created:
                        break
                    path = path.parent
        except OSError:
            continue  # a folder that is not empty after all (something else writes there): leave it


def plural(count: int, noun: str) -> str:
    """A count with its noun, singular for one: '1 window', '3 windows' (nouns that take an s)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def progress(iterable: Iterable[T] | None = None, **kwargs) -> tqdm:
    """A tqdm bar that stays silent when stderr is not a terminal (logs, CI), unless forced."""
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def write_json(path: str | Path, value: Any) -> None:
    """Writes strict JSON (NaN and infinities as null: `condensa.jsonio`), through a temporary file
    so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(jsonio.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Appends one JSON line; NaN and infinities become null, since JSON has no spelling for them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(jsonio.dumps(record) + "\n")


def check_writable(folder: str | Path, flag: str = "--out", *, create: bool = True) -> Path:
    """Proves that `folder` takes a file, before any work starts: an unwritable output folder found
    only when the results are saved wastes the run. It creates the folder, or with `create=False`
    (for commands that must leave nothing behind when they refuse) probes its nearest existing
    parent instead."""
    folder = Path(folder).expanduser()
    _note_output(folder)
    where = folder
    if not create:
        while not where.exists() and where.parent != where:
            where = where.parent
    probe = where / f".condensa-write-check-{os.getpid()}"
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CondensaError(f"cannot write to the output folder {folder} ({err.strerror or err}); "
                            f"choose another {flag} or fix its permissions.") from None
    return folder


# ---- dataclass configs ---------------------------------------------------------------------------


def _comments(cls) -> dict[str, str]:
    """field name -> the `# comment` after it in the class source. Written here: the parsers that
    read field docs (tyro, simple_parsing) are not among the project's dependencies."""
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


def config_parser(cls: type, *, prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a config-driven tool: `--config FILE.yaml` plus `--key value` /
    `--section.key value` overrides for any field of the dataclass `cls`; `--help` lists the keys.
    Each tool's `build_parser()` returns it, for `--help` and for docs/cli.md."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=KeyListFormatter,
                                     epilog="\n\n".join(filter(None, [epilog, key_help(cls)])))
    parser.add_argument("--config", help=f"YAML file with the keys of {cls.__name__}")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs that override it (below)")
    return parser


def key_help(cls: type, title: str = "config keys (YAML keys, or --key value on the command line):") -> str:
    """Every key of the config dataclass `cls` with its type, default and description: the part of
    --help that says what each option does."""
    lines = [title]
    for key, kind, default, note in config_rows(cls):
        lines.append(f"  --{key} {kind} (default {default})" + (f"\n        {note}" if note else ""))
    return "\n".join(lines)


class KeyListFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs as argparse does, but keeps indented blocks (the key list, examples)
    line for line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        def indented(paragraph: str) -> bool:
            lines = paragraph.splitlines()
            return len(lines) > 1 and all(line.startswith("  ") for line in lines[1:])

        return "\n\n".join(paragraph if indented(paragraph) else super(KeyListFormatter, self)._fill_text(
            paragraph, width, indent) for paragraph in text.split("\n\n"))


def parse_config_args(argv: Sequence[str] | None, cls: type[T], *, prog: str, description: str,
                      epilog: str | None = None) -> T:
    """Parses a config-driven tool's command line (see `config_parser`) into a `cls`."""
    argv, config = _take_config_flag(list(sys.argv[1:] if argv is None else argv))
    parser = config_parser(cls, prog=prog, description=description, epilog=epilog)
    args, rest = parser.parse_known_args(argv)
    return load_config(cls, config or args.config, [*rest, *args.overrides])


def _take_config_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without `--config FILE`, and FILE: the flag may come after overrides, which argparse's
    catch-all positional would otherwise swallow as one more key."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[:i] + argv[i + 2:], argv[i + 1]
        if arg.startswith("--config="):
            return argv[:i] + argv[i + 1:], arg.split("=", 1)[1]
    return argv, None


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Builds `cls` (a dataclass, possibly nested) from a YAML file and `--a.b value` overrides.

    Unknown keys are refused with a "did you mean"; values are checked against the field types.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file.")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys at the top level.")
    for key, raw in parse_overrides(overrides):
        _set_dotted(values, key, _Override(raw))
    config = _build(cls, values, prefix="")
    object.__setattr__(config, _GIVEN, frozenset(_dotted_keys(values)))
    return config


_GIVEN = "_condensa_given_keys"


def given_keys(config: Any, section: str = "") -> frozenset[str] | None:
    """The keys that the YAML file or the command line set when `config` was built by `load_config`,
    dotted (`attention.k`), or inside `section` without its prefix (`k`); None for a config built in
    Python. A tool that fills keys left unset from elsewhere (a thresholds file's k and tile
    geometry) must tell them from defaults the user typed."""
    keys = getattr(config, _GIVEN, None)
    if keys is None or not section:
        return keys
    return frozenset(key[len(section) + 1:] for key in keys if key.startswith(section + "."))


def _dotted_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, prefix + key + ".")
    return keys


class _Override(str):
    """A command-line value, kept as typed until its field's type is known: a `str` field takes it
    verbatim (YAML would read "1:30" as the number 90), any other field takes it as YAML."""

    def parsed(self) -> Any:
        return yaml.safe_load(str(self)) if self else ""

    def for_type(self, hint) -> Any:
        """The value for a field of type `hint`: text for `str` (and `str | None` unless it says null),
        YAML otherwise; overrides inside a mapping (`--section.dict_field.key value`) parsed too."""
        text_types = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if str in text_types and (type(None) not in text_types or self.strip() not in ("null", "~", "None")):
            return str(self)
        return _parsed_overrides(self.parsed())


def _parsed_overrides(value: Any) -> Any:
    """`value` with every `_Override` inside its mappings and lists parsed as YAML."""
    if isinstance(value, _Override):
        return value.parsed()
    if isinstance(value, dict):
        return {k: _parsed_overrides(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_parsed_overrides(v) for v in value]
    return value


def config_from_dict(cls: type[T], values: dict[str, Any], *, prefix: str = "") -> T:
    """Builds `cls` from an already-parsed mapping (a section of a larger YAML file), with the same
    unknown-key and type checks as `load_config`."""
    return _build(cls, dict(values or {}), prefix=prefix)


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """`['--a.b', '3', '--c=x', '--d', 'p', 'q']` -> `[('a.b', '3'), ('c', 'x'), ('d', 'p,q')]`; dashes in
    keys become underscores."""
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value.")
        key = arg[2:]
        values = []
        if "=" in key:
            key, value = key.split("=", 1)
            values = [value]
        while i + 1 < len(args) and not args[i + 1].startswith("--") and not (values and "=" in arg):
            values.append(args[i + 1])  # several values (--data a.txt b.txt) make one comma list
            i += 1
        value = ",".join(values) if values else "true"  # a bare flag is true
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def _set_dotted(values: dict, key: str, value: Any) -> None:
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section.")
    node[parts[-1]] = value


def _build(cls, values: dict[str, Any], prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key {prefix + key!r}.{did_you_mean(key, fields, prefix)} "
                f"Known keys here: {', '.join(prefix + f for f in fields)}."
            )
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad config for {prefix or cls.__name__}: {err}") from None


def _coerce(hint, value, name: str):
    if isinstance(value, _Override):
        value = value.for_type(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} is a section; give it as a mapping, or set {name}.<key>.")
        return _build(hint, value, prefix=name + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key {name!r} cannot be {value!r}.")
    if origin in (list, tuple, Sequence):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
        inner = args[0] if args else Any
        coerced = [_coerce(inner, v, name) for v in items]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} must be a mapping.")
        return _parsed_overrides(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key {name!r} must be one of {', '.join(map(repr, args))}; got {value!r}.")
        return value
    if hint is Any:
        return _parsed_overrides(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {name!r} must be true or false; got {value!r}.")
    if hint in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and isinstance(value, float)):
            raise ConfigError(f"config key {name!r} must be a {hint.__name__}; got {value!r}.")
        if hint is float and math.isnan(value):
            raise ConfigError(f"config key {name!r} is NaN; give it a number.")
        return hint(value)
    if hint is str:
        return str(value)
    return value
