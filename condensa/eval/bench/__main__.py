"""python -m condensa.eval.bench <benchmark> [options]

Benchmarks (each has its own --help):
  train     training throughput (tokens/s, MFU) of GPT-2 with and without the concentration loss
  prefill   sparse prefill attention kernels against dense attention
  decode    sparse decode attention kernels against dense attention
  masses    the fused kernel behind the concentration losses, against the path it replaces
  generate  whole-model generation at long context: TTFT, TPOT, tokens/s, peak memory
"""

from __future__ import annotations

import importlib
import sys

from condensa.errors import did_you_mean

# One line per benchmark: name -> module with a `main(argv)` (wrapped by condensa.cli.run_main).
BENCHMARKS = {
    "train": "condensa.eval.bench.train",
    "prefill": "condensa.eval.bench.prefill",
    "decode": "condensa.eval.bench.decode",
    "masses": "condensa.eval.bench.masses",
    "generate": "condensa.eval.bench.generate",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
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
