"""python -m condensa.eval.study CONFIG [--stages ...] [--models ...] [--section.key value ...]

The real-data study of docs/results.md, in stages that each fit one GPU session:

  train     pretrain the stand-in GPT-2 on the corpus, fine-tune copies with the concentration
            losses, and measure each model's dense perplexity on held-out corpus text and WikiText-2
  evaluate  calibrate Top-θ (every k) and the tile gate (every f) on corpus training blocks, then
            measure perplexity and kept fractions of every rule on both held-out sets
  time      time whole-model prefill and per-layer prefill / decode attention: dense against the
            Pallas kernels, at the smallest gate budget whose perplexity cost is within 1% (GPU)
  report    write results.md and the plots from the JSON of the other stages

Every stage writes JSON under OUT/results/. A stage that needs a model it cannot find in OUT/models
trains it first (seeded, so the same model), so stages can run in separate sessions.

Examples:
  python -m condensa.eval.study configs/study-gpu.yaml --stages train,evaluate
  python -m condensa.eval.study configs/study-gpu.yaml --stages time --models base,tile4
  python -m condensa.eval.study configs/study-gpu.yaml --stages report --report_dir docs
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from condensa.cli import config_from_dict, key_help, load_config, parse_overrides, run_main, write_json
from condensa.errors import ConfigError
from condensa.eval.bench.timing import environment
from condensa.eval.study import config as study_config
from condensa.eval.study import evaluation, report, timing, training
from condensa.eval.study.config import BASE
from condensa.eval.study.report import answers

STAGES = ("train", "evaluate", "time", "report")


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """What one invocation runs; every other --key is a key of the study's config (StudyConfig)."""

    stages: str = ",".join(STAGES)  # comma list of train, evaluate, time, report
    models: str = ""  # comma list of the config's models to run (default: all of them)
    report_dir: str = ""  # where stage report writes results.md and its plots (default: OUT/report)


def _merge_json(path: Path, update: dict) -> None:
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(update)
    write_json(path, current)


def parse_command_line(argv: list[str]):
    """`(config, stages, models, report_dir, config_path)` from the command line, checked: unknown
    stages, models and config keys are refused before anything runs."""
    argv = list(argv)
    path = argv.pop(0) if argv and not argv[0].startswith("--") else None
    pairs = parse_overrides(argv)
    own = {f.name for f in dataclasses.fields(StudyRun)}
    run = config_from_dict(StudyRun, {key: value for key, value in pairs if key in own})
    stages = run.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}.")
    models_arg, report_dir = run.models, run.report_dir or None
    cfg = load_config(study_config.StudyConfig, path, [f"--{key}={value}" for key, value in pairs if key not in own])
    models = study_config.check_models(cfg, models_arg.split(",") if models_arg else cfg.model_names())
    study_config.check_models(cfg, list(cfg.evaluation.models))
    study_config.check_models(cfg, list(cfg.timing.models))
    return cfg, stages, models, report_dir, path


def help_text() -> str:
    """--help: what the study does, the options of this command, then every key of the study's config."""
    return "\n\n".join([__doc__.rstrip(), key_help(StudyRun, "options of this command:"),
                        key_help(study_config.StudyConfig, "study config keys (YAML keys, or --section.key value):")])


@run_main
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        return
    cfg, stages, models, report_dir, path = parse_command_line(argv)

    results = Path(cfg.out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "config.json", study_config.as_dict(cfg))
    if stages != ["report"]:
        write_json(results / "environment.json", environment())
    say = lambda message: print(f"[study] {message}", flush=True)  # noqa: E731

    if "train" in stages:
        _merge_json(results / "train.json", training.run(cfg, models, progress=say))
    if "evaluate" in stages:
        selected = [n for n in (cfg.evaluation.models or models) if n in models]
        if not selected:
            say("evaluate: none of --models is in evaluation.models; nothing to evaluate")
        for name in selected:
            write_json(results / f"evaluate_{name}.json", evaluation.evaluate_model(cfg, name))
            evaluation.plot_model(cfg, name, results / "figures")
            say(f"{name}: evaluated")
    if "time" in stages:
        res = report.load_results(results)
        names = [n for n in dict.fromkeys([*cfg.timing.models, *_best_condensed(res)]) if n in models]
        for name in names:
            if name not in res["evaluate"]:
                raise ConfigError(f"model {name} has no evaluation yet; run --stages evaluate --models {name} first.")
            _merge_json(results / "timing.json", {name: timing.time_model(cfg, name, res["evaluate"][name])})
            say(f"{name}: timed")
    if "report" in stages:
        command = "python -m condensa.eval.study " + " ".join([path or "", "--stages train,evaluate,time,report"]).strip()
        written = report.write(results, Path(report_dir) if report_dir else Path(cfg.out) / "report", command)
        say(f"report: {written}")


def _best_condensed(res: dict) -> list[str]:
    """The fine-tune that computes the fewest tiles within the perplexity limit (question a)."""
    candidates = [(a["tile_fraction"], n) for n, a in answers(res)["a"].items() if n != BASE and a["tile_fraction"]]
    return [min(candidates)[1]] if candidates else []


if __name__ == "__main__":
    sys.exit(main())
