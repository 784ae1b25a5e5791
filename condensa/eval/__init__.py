"""Evaluation: perplexity, sparsity sweeps, generation studies and benchmarks."""

# `python -m condensa.eval <command>`: command -> (module with `main(argv)`, one-line description).
# Here, below the commands, so that the dispatcher and the CLI reference read one table.
COMMANDS = {
    "ppl": ("condensa.eval.ppl_cli", "strided sliding-window perplexity under any attention rule"),
    "sweep": ("condensa.eval.sweep_cli", "perplexity vs kept attention for top-k, Top-θ and gate + Top-θ, with plots"),
    "generate": ("condensa.eval.generate_cli", "kept V rows per decoding step and token agreement with dense"),
}
