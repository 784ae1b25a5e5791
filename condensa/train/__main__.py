"""python -m condensa.train [config.yaml] [--section.key value ...]

Fine-tunes a GPT-2 (`--model gpt2` or a directory) or pretrains one from scratch (`--init scratch
--model-config tiny`) with the concentration losses of DESIGN.md. The output folder (`--out`)
receives the resolved config.yaml, metrics.jsonl (every key explained in docs/metrics.md; and
TensorBoard events with tensorboardX), orbax checkpoints, the final HF export in hf/, and the
loss and sparsity curves drawn at the end (loss.png, sparsity.png).
Running the same command again resumes from the newest good checkpoint there. One run at a time
holds a folder (run.lock). When every checkpoint there is corrupt the run refuses to start; add
--restart to start over from step 0. On a terminal a progress bar runs; without one (a log file)
plain progress lines (step, loss, tokens/s, ETA) come at a steady pace. At the end the run says
where its results are and what each file there holds.

Examples:
  python -m condensa.train configs/quickstart.yaml
  python -m condensa.train configs/quickstart.yaml --loss.topk.weight 0.5 --out runs/topk
  python -m condensa.train configs/gpt2-wikitext.yaml --optimizer.lr 3e-5 --train.dtype bfloat16

Set CONDENSA_DISTRIBUTED=1 on every host of a multi-host run (see condensa/train/parallel.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from condensa.cli import key_help, load_config, run_main
from condensa.train.config import TrainConfig
from condensa.train.progress import describe_folder


def build_parser() -> argparse.ArgumentParser:
    """The command line, for --help and docs/cli.md (the keys are TrainConfig's, read by `load_config`)."""
    parser = argparse.ArgumentParser(prog="python -m condensa.train", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=key_help(TrainConfig))
    parser.add_argument("config", nargs="?", help="YAML file with TrainConfig keys (configs/*.yaml)")
    parser.add_argument("--restart", action="store_true",
                        help="start over from step 0 when no checkpoint in --out reads back intact")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value pairs that override it")
    return parser


@run_main
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return
    path = argv.pop(0) if argv and not argv[0].startswith("--") else None
    if os.environ.get("CONDENSA_DISTRIBUTED") == "1":
        import jax

        jax.distributed.initialize()
    from condensa.train.loop import train  # lazy: after jax.distributed.initialize()

    restart = "--restart" in argv
    argv = [a for a in argv if a != "--restart"]
    cfg = load_config(TrainConfig, path, argv)
    result = train(cfg, restart=restart)
    if result:
        print(" ".join(f"{k}={v:.4g}" for k, v in result.items()))
    print(describe_folder(Path(cfg.out)))


if __name__ == "__main__":
    sys.exit(main())
