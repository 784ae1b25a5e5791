"""Condensation training on the real model (issue 23), as one GPU job: fine-tune SmolLM2-135M from
its GGUF with each concentration loss and a control (λ = 0), then measure every model's dense and
sparse perplexity on WikiText-2 windows and a held-out book, with the time each stage took.

    python exp/condense_real.py --model /tmp/smollm2.gguf --train_data /tmp/data/misc \
        --data /tmp/data/wiki.test.raw --book /tmp/data/gutenberg/melville-moby_dick.txt \
        --runs control,select:1.0,tile:1.0,topk:0.1 --steps 200 --runs_dir /tmp/condense --out $OUT/condense
    python exp/condense_real.py ... --stages eval          # evaluate runs trained by an earlier call

A run is `loss:λ` (loss one of topk, tile, select; `control` is λ = 0), trained by
`condensa.train` from configs/smollm2-finetune.yaml with these overrides; checkpoints stay in
--runs_dir (a warm device keeps /tmp between calls), so training and evaluation can be split
across calls. Evaluation loads the GGUF in bf16 and puts each run's parameters in it, then runs
the layer-by-layer reference ops of exp/real_model_tiles.py. Windows 0..n/2-1 of the WikiText
text choose (the "choose" half), windows n/2..n-1 report it (the "report" half); each Δ is against
the *original* model's dense perplexity on the same windows, with a 95% bootstrap interval.
Results accumulate in OUT/results.json after every run and rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from condensa import AttentionConfig, load_pretrained
from condensa.cli import config_from_dict
from condensa.data import load_tokenizer, read_text_file
from condensa.determinism import require_deterministic_ops
from condensa.errors import CondensaError
from condensa.train.config import TrainConfig
from condensa.train.run_model import with_run_weights
from real_model_tiles import LayerRunner, evaluate, gate_rule, kept_tile_fraction, paired_delta, windows_of

LOSSES = ("topk", "tile", "select")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the GGUF (or named model) every run starts from")
    p.add_argument("--train_data", default="../shared/data/corpus/misc", help="training text (no held-out text)")
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--book", default="../shared/data/corpus/gutenberg/melville-moby_dick.txt")
    p.add_argument("--config", default="configs/smollm2-finetune.yaml", help="the fine-tune recipe")
    p.add_argument("--runs", default="control,select:1.0", help="comma-separated loss:λ, or control")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (each run, each seed)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--warmup", type=int, default=20, help="steps of lr warmup, and of λ's ramp")
    p.add_argument("--topk_k", type=int, default=64)
    p.add_argument("--f", type=float, default=0.25, help="the tile and select losses' budget")
    p.add_argument("--seq", type=int, default=8192, help="evaluation window")
    p.add_argument("--windows", type=int, default=12, help="WikiText windows: the first half chooses, the second reports")
    p.add_argument("--book_windows", type=int, default=4)
    p.add_argument("--budgets", default="0.25,0.125")
    p.add_argument("--selectors", default="rowmean+shared,oracle+shared,window")
    p.add_argument("--book_selectors", default="rowmean+shared")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--train_dtype", default="bfloat16")
    p.add_argument("--stages", default="train,eval")
    p.add_argument("--deterministic", action="store_true",
                   help="bit-identical fine-tunes per seed (train.deterministic: XLA's deterministic switch, set at "
                        "start, and XLA attention instead of cuDNN; evaluation runs under the switch too)")
    p.add_argument("--original", action="store_true", help="also evaluate the original model (stage eval)")
    p.add_argument("--runs_dir", default="runs/condense")
    p.add_argument("--out", default="runs/condense-report")
    return p.parse_args()


def run_name(spec: str, seed: int) -> str:
    return f"{spec.replace(':', '-')}-s{seed}"


def train_config(args, spec: str, seed: int) -> TrainConfig:
    """The recipe of --config with this run's loss, λ and seed (λ = 0 for the control)."""
    values = yaml.safe_load(Path(args.config).read_text())
    loss, _, weight = spec.partition(":")
    if loss != "control" and loss not in LOSSES:
        raise SystemExit(f"unknown run {spec!r}: control or loss:λ with loss one of {', '.join(LOSSES)}")
    values.update(out=str(Path(args.runs_dir) / run_name(spec, seed)), model=args.model)
    values["data"] = {**values["data"], "source": args.train_data, "tokenizer": args.model, "seq_len": args.seq_len}
    values["optimizer"] = {**values["optimizer"], "lr": args.lr, "warmup_steps": args.warmup}
    terms = {"topk": {"k": args.topk_k}, "tile": {"f": args.f}, "select": {"f": args.f}}
    values["loss"] = {"tile_size": args.block,
                      **{name: {**terms[name], "weight": float(weight) if name == loss else 0.0,
                                "warmup_steps": args.warmup} for name in LOSSES}}
    values["train"] = {**values["train"], "steps": args.steps, "batch_size": args.batch, "seed": seed,
                       "dtype": args.train_dtype, "eval_every": args.steps, "eval_batches": 4,
                       "eval_attention_metrics": False, "export": False, "log_every": 10,
                       "deterministic": args.deterministic}
    values["checkpoint"] = {"every": max(1, args.steps // 2), "keep": 1, "async_save": False}  # a call cut short resumes
    return config_from_dict(TrainConfig, values)


def train_run(args, name: str, spec: str, seed: int, results: dict, save) -> bool:
    """Fine-tunes one run (resuming its checkpoint if a call was cut short); False if it failed,
    with the error kept in the results so that the other runs still go ahead."""
    from condensa.train.loop import train

    if name in results["train"] and "error" not in results["train"][name]:
        return True  # a failed run is tried again: its error may have been the machine's
    cfg = train_config(args, spec, seed)
    start = time.perf_counter()
    try:
        final = train(cfg)
    except Exception as error:  # noqa: BLE001 - one run's failure must not stop the sweep
        results["train"][name] = {"spec": spec, "seed": seed, "error": f"{type(error).__name__}: {error}"}
        print(f"training {name} failed: {error}", flush=True)
        save()
        return False
    seconds = time.perf_counter() - start
    log = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    results["train"][name] = {"spec": spec, "seed": seed, "seconds": seconds, "final": final,
                              "log": [r for r in log if "loss" in r or "val_loss" in r]}
    print(f"trained {name} in {seconds:.0f} s: {final}", flush=True)
    save()
    return True


@dataclasses.dataclass
class EvalSet:
    """The evaluation texts and rules, shared by every model."""

    windows: np.ndarray
    book_windows: np.ndarray
    halves: dict
    wikitext_rules: dict
    book_rules: dict
    runner: LayerRunner | None = None


def eval_setup(args, results: dict) -> EvalSet:
    tokenizer = load_tokenizer(args.model)
    ids = np.asarray(tokenizer(read_text_file(Path(args.data)))["input_ids"], np.int32)
    book = np.asarray(tokenizer(read_text_file(Path(args.book)))["input_ids"], np.int32)
    windows = windows_of(ids, args.seq, args.windows)
    budgets = [float(x) for x in args.budgets.split(",")]
    results["kept_tiles"] = {str(f): kept_tile_fraction(args.seq, args.block, f) for f in budgets}

    def rules(selectors):
        return {"dense": AttentionConfig(),
                **{f"{s}@{f}": gate_rule(s, f, args.block) for s in filter(None, selectors.split(",")) for f in budgets}}

    return EvalSet(windows=windows, book_windows=windows_of(book, args.seq, args.book_windows),
                   halves={"choose": slice(0, len(windows) // 2), "report": slice(len(windows) // 2, len(windows))},
                   wikitext_rules=rules(args.selectors), book_rules=rules(args.book_selectors))


def evaluate_model(args, name: str, texts: EvalSet, results: dict, save) -> None:
    """Dense and sparse perplexity of one model (the original, or a run's fine-tune)."""
    if name in results["eval"]:
        return
    start = time.perf_counter()
    model, _ = load_pretrained(args.model, dtype=jnp.dtype(args.dtype))
    if name != "original":
        try:
            model = with_run_weights(model, Path(args.runs_dir) / name)
        except CondensaError as error:  # e.g. a checkpoint that does not read back: train it again
            results["train"].pop(name, None)
            results.setdefault("eval_errors", {})[name] = str(error)
            print(f"evaluating {name} failed (it is trained again on the next call): {error}", flush=True)
            save()
            return
    runner = texts.runner = texts.runner.use(model) if texts.runner else LayerRunner(model)  # compiled once
    row = {"wikitext": {rule: evaluate(runner, texts.windows, attention, 2048)
                        for rule, attention in texts.wikitext_rules.items()},
           "book": {rule: evaluate(runner, texts.book_windows, attention, 2048)
                    for rule, attention in texts.book_rules.items()}}
    row["seconds"] = time.perf_counter() - start
    results["eval"][name] = row
    results.get("eval_errors", {}).pop(name, None)  # an earlier failure of this run is now past
    print(f"evaluated {name} in {row['seconds']:.0f} s:",
          {k: round(v["ppl"], 3) for k, v in row["wikitext"].items()}, flush=True)
    results["deltas"] = deltas(results, texts.halves)
    save()


def _half(rule: dict, part: slice) -> dict:
    return {key: rule[key][part] for key in ("nll_per_window", "nll_tail_per_window")}


def deltas(results: dict, halves: dict) -> dict:
    """Δppl (%) of every model and rule against the original's dense perplexity on the same windows
    (and against the control's, for its seed), per half of the WikiText windows and on the book."""
    evals = results["eval"]
    if "original" not in evals:
        return {}
    out = {}
    for name, row in evals.items():
        control = evals.get(f"control-s{results['train'].get(name, {}).get('seed', 0)}")
        for text, rules in row.items():
            if text == "seconds":
                continue
            parts = halves if text == "wikitext" else {"all": slice(None)}
            for part_name, part in parts.items():
                base = _half(evals["original"][text]["dense"], part)
                for rule, r in rules.items():
                    key = f"{name}|{text}:{part_name}|{rule}"
                    d = {"vs_original": paired_delta(_half(r, part), base)}
                    if control is not None:
                        d["vs_control"] = paired_delta(_half(r, part), _half(control[text]["dense"], part))
                    out[key] = d
    return out


def main() -> None:
    args = parse_args()
    if args.deterministic:
        require_deterministic_ops()  # now, before anything starts JAX's backend
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = Path(args.runs_dir) / "results.json"
    results = json.loads(state.read_text()) if state.is_file() else {"train": {}, "eval": {}}
    results.update(args=vars(args), device=str(jax.devices()[0]), jax=jax.__version__,
                   xla_flags=os.environ.get("XLA_FLAGS", ""))

    def save():
        text = json.dumps(results, indent=1)
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(text)
        (out / "results.json").write_text(text)

    stages = args.stages.split(",")
    texts = eval_setup(args, results) if "eval" in stages else None
    if texts is not None and args.original:
        evaluate_model(args, "original", texts, results, save)  # first: every Δ is against it
    for seed in [int(s) for s in args.seeds.split(",")]:
        for spec in args.runs.split(","):
            name = run_name(spec, seed)
            trained = train_run(args, name, spec, seed, results, save) if "train" in stages else True
            if texts is not None and trained:
                evaluate_model(args, name, texts, results, save)
    save()


if __name__ == "__main__":
    main()
