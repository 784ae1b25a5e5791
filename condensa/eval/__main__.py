"""`python -m condensa.eval <command>`: perplexity and sparsity evaluation tools."""

from __future__ import annotations

import importlib
import sys

from condensa.cli import run_main
from condensa.errors import ConfigError, did_you_mean
from condensa.eval import COMMANDS


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m condensa.eval <command> [--help]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            raise ConfigError(f"unknown command {argv[0]!r}.{did_you_mean(argv[0], COMMANDS)}")
        return
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(run_main(main)())
