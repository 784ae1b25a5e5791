"""Is fine-tuning deterministic given a seed? Compares two runs trained with the same settings
(e.g. `exp/condense_real.py --runs control --stages train` twice, into two --runs_dir): their
logged losses step by step, and their final parameters bit for bit.

    PYTHONPATH=. python exp/train_determinism.py RUN_A RUN_B --out $OUT/determinism.json

XLA's default GPU reductions may add in a different order from run to run (atomics), so run both
under the same XLA_FLAGS (`--xla_gpu_exclude_nondeterministic_ops=true` asks for deterministic
kernels) and say which in the report.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from condensa.checkpoint import flatten
from condensa.train.run_model import restore_run


def logged_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r and "step" in r}


def compare(run_a: Path, run_b: Path) -> dict:
    losses_a, losses_b = logged_losses(run_a), logged_losses(run_b)
    steps = sorted(set(losses_a) & set(losses_b))
    loss_diff = [abs(losses_a[s] - losses_b[s]) for s in steps]
    params_a, _ = flatten(nnx.state(restore_run(run_a).model, nnx.Param))
    params_b, _ = flatten(nnx.state(restore_run(run_b).model, nnx.Param))
    differing, max_abs = [], 0.0
    for name, a in params_a.items():
        a, b = np.asarray(a), np.asarray(params_b[name])
        if not np.array_equal(a, b):
            differing.append(name)
            max_abs = max(max_abs, float(np.max(np.abs(a.astype(np.float64) - b))))
    return {"steps_compared": len(steps), "losses_equal": all(d == 0.0 for d in loss_diff),
            "max_loss_difference": max(loss_diff, default=0.0),
            "first_differing_step": next((s for s, d in zip(steps, loss_diff) if d != 0.0), None),
            "arrays": len(params_a), "arrays_differing": len(differing), "max_abs_parameter_difference": max_abs,
            "bit_identical": not differing and all(d == 0.0 for d in loss_diff),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": str(jax.devices()[0]), "jax": jax.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--out", type=Path, default=None, help="write the comparison here as JSON")
    args = p.parse_args()
    report = compare(args.run_a, args.run_b)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
