"""Evaluation: perplexity, sparsity sweeps, generation studies and benchmarks."""
