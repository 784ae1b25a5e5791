"""The README's examples work as written: its marked shell blocks and every Python block.

README.md marks its example blocks with an HTML comment on the line before the ```bash fence:
- `<!-- example -->`: every command runs exactly as written, in order;
- `<!-- example: quickstart -->`: the opening block. Its `python -m condensa.train` command runs
  with the overrides in SHRINK appended (the `pip install` before it is skipped): as written it
  trains for 300 steps on the whole corpus, minutes on a CPU, while the examples after it only
  need a trained model in runs/quickstart/hf and checkpoints in runs/quickstart/checkpoints;
- `<!-- example: parse-only -->`: too slow to run here (the sweep takes minutes on a CPU); its
  command line is parsed into the tool's config, so every option it uses must exist and be valid.

Every ```python block runs too, after the shell examples (which train the model and calibrate the
thresholds that the Python API section loads), in order and in one namespace, as a reader pasting
them into one interpreter would.

Everything runs in a temporary working directory that looks like a checkout (configs/ linked,
../shared linked to the shared data), so nothing is written into the repository. Each
`python -m MODULE ARGS` command runs its module as `__main__` in this process, with `sys.argv` and
the working directory a shell would give it: the same entry point and arguments, without paying
for a new interpreter (imports, tokenizer loading and XLA compiles are ~15 s a command on 2 cores).
"""

from __future__ import annotations

import importlib
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import CORPUS_DIR, SHARED_DATA, TOKENIZER_DIR, WIKITEXT_TEST, require_shared

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- example(?::\s*([\w-]+))?\s*-->\n```bash\n(.*?)^```", re.M | re.S)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
SHRINK = [
    "--train.steps", "4", "--checkpoint.every", "2", "--train.eval_batches", "0",
    "--train.remat", "false",  # remat only saves memory, and costs compile time on a CPU
    "--data.source", "../shared/data/corpus/misc/inaugural.txt",  # one file: no tokenizing 20 MB of corpus
    "--data.cache_dir", "token-cache",  # inside the temporary directory, not ~/.cache
]


def examples(kind: str | None) -> list[str]:
    """The commands of the README blocks marked `<!-- example[: kind] -->`, one per line."""
    commands = []
    for marker, body in BLOCK.findall((ROOT / "README.md").read_text()):
        if (marker or None) == kind:
            body = body.replace("\\\n", " ")
            commands += [line.strip() for line in body.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def python_blocks() -> list[tuple[int, str]]:
    """(line of its first statement, code) of every ```python block of the README, in order."""
    text = (ROOT / "README.md").read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_readme_marks_its_examples():
    assert len(examples("quickstart")) == 1 and "python -m condensa.train configs/quickstart.yaml" in examples("quickstart")[0]
    assert any("condensa.export" in c for c in examples(None)) and examples("parse-only")
    assert len(python_blocks()) >= 2 and any("load_pretrained" in code for _, code in python_blocks())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    for path in (TOKENIZER_DIR, CORPUS_DIR, WIKITEXT_TEST):
        require_shared(path)
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)  # ../shared from repo/
    repo = root / "repo"
    repo.mkdir()
    (repo / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    return repo


def _run(command: str, repo: Path, monkeypatch, capsys) -> str:
    """Runs `python -m MODULE ARGS` like a shell in `repo` would; returns what it printed."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"] and len(argv) > 2, f"README example is not `python -m ...`: {command}"
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
    capsys.readouterr()
    try:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    out, err = capsys.readouterr()
    assert code == 0, f"README example failed (exit {code}): {command}\n{err[-3000:]}"
    return out


def test_readme_examples_run_as_written(workdir, monkeypatch, capsys):
    (train,) = [c for c in examples("quickstart")[0].split("&&") if "condensa.train" in c]
    _run(f"{train.strip()} {shlex.join(SHRINK)}", workdir, monkeypatch, capsys)
    assert (workdir / "runs" / "quickstart" / "hf" / "model.safetensors").is_file()

    printed = "".join(_run(command, workdir, monkeypatch, capsys) for command in examples(None))

    runs = workdir / "runs"
    assert "kept/row" in printed and "verify: max |logit difference|" in printed
    dense = json.loads((runs / "ppl-dense" / "results.json").read_text())
    sparse = json.loads((runs / "ppl-toptheta" / "results.json").read_text())
    assert dense["tokens"] == sparse["tokens"] > 1000
    assert sparse["mode"] == "toptheta" and 0.5 < sparse["ppl"] / dense["ppl"] < 2.0
    export = json.loads((runs / "quickstart" / "hf-sparse" / "export.json").read_text())
    assert export["step"] == 4 and export["verify"]["max_abs_logit_diff"] <= 1e-4
    assert (runs / "quickstart" / "hf-sparse" / "thresholds.safetensors").is_file()

    # the Python blocks, on the model and thresholds the commands above made; a traceback names its README line
    monkeypatch.chdir(workdir)
    namespace = {"__name__": "__readme__"}
    for line, code in python_blocks():
        exec(compile("\n" * (line - 1) + code, str(ROOT / "README.md"), "exec"), namespace)
    assert (runs / "exported" / "model.safetensors").is_file()  # under runs/, which git ignores


def test_parse_only_examples_have_valid_options(workdir):
    from condensa.cli import parse_config_args
    from condensa.cli_reference import TOOLS

    by_command = {tool.command: tool for tool in TOOLS}
    for command in examples("parse-only"):
        argv = shlex.split(command)
        assert argv[:2] == ["python", "-m"], command
        name = " ".join(argv[:4]) if argv[2] in ("condensa.eval", "condensa.eval.bench") else " ".join(argv[:3])
        tool = by_command[name]
        args = argv[len(name.split()):]
        module = importlib.import_module(tool.module)
        if hasattr(module, "parse_command_line"):  # a staged driver with its own command line (the study)
            module.parse_command_line(args)
            continue
        module_name, cls_name = tool.config.split(":")
        config = parse_config_args(args, getattr(importlib.import_module(module_name), cls_name), **module.PARSER)
        for flag in (a for a in args if a.startswith("--")):
            key = flag[2:].split("=")[0]
            if key == "config":  # the YAML file the other options override
                continue
            target = config
            for part in key.split("."):  # dotted keys reach nested sections (--attention.tile_gate)
                assert hasattr(target, part), f"{command}: {flag} did not reach the config"
                target = getattr(target, part)
