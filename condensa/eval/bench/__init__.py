"""Benchmarks, run as scripts (`python -m condensa.eval.bench <name> ...`), never as timed tests."""

# Here, below the commands, so that the dispatcher and the CLI reference read one table.
USAGE = """python -m condensa.eval.bench <benchmark> [options]

Benchmarks (each has its own --help):
  train     training throughput (tokens/s, MFU) of GPT-2 with and without the concentration loss
  prefill   sparse prefill attention kernels against dense attention
  decode    sparse decode attention kernels against dense attention
  masses    the fused kernel behind the concentration losses, against the path it replaces
  generate  whole-model generation at long context: TTFT, TPOT, tokens/s, peak memory
"""

# One line per benchmark: name -> module with a `main(argv)`.
BENCHMARKS = {
    "train": "condensa.eval.bench.train",
    "prefill": "condensa.eval.bench.prefill",
    "decode": "condensa.eval.bench.decode",
    "masses": "condensa.eval.bench.masses",
    "generate": "condensa.eval.bench.generation",
}
