"""`python -m condensa.eval.bench <benchmark>`: runs one benchmark (the table is in condensa.eval.bench)."""

from __future__ import annotations

import importlib
import sys

from condensa.errors import did_you_mean
from condensa.eval.bench import BENCHMARKS, USAGE


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark {name!r}.{did_you_mean(name, BENCHMARKS)} Choose one of: "
              f"{', '.join(BENCHMARKS)}.", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError as err:
        if err.name != BENCHMARKS[name]:
            raise
        print(f"error: benchmark {name!r} is not available in this version of condensa.", file=sys.stderr)
        return 2
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
