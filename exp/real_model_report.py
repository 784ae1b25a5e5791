"""The real-model report: Markdown tables from the results of `exp/real_model_tiles.py`.

    python exp/real_model_report.py runs/real/results.json                          # print it
    python exp/real_model_report.py runs/real/results.json --into docs/real-model.md

`exp/real_model_tiles.py` writes OUT/real-model.md with this after every run, so one command gives
the whole report. `--into` replaces the part of a page between the markers of `--block` (see
`markers`) and keeps the hand-written text around it. Several results files are merged in order (a later run's entry
replaces an earlier one of the same name), for runs split into stages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

def markers(block: str) -> tuple[str, str]:
    """The comments around a generated block named `block` in a page."""
    return f"<!-- generated {block}: begin -->", f"<!-- generated {block}: end -->"


def _pct(x: float) -> str:
    return f"{x:+.2f}%"


def _cell(r: dict | None) -> str:
    """Δppl against dense with its interval, and the tail's Δ."""
    if r is None:
        return ""
    tail = r.get("tail", {}).get("delta_pct")
    return (f"{_pct(r['delta_pct'])} [{r['lo_pct']:.2f}, {r['hi_pct']:.2f}]"
            + ("" if tail is None else f" / {_pct(tail)}"))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _by_rule_and_budget(grid: dict) -> tuple[list[str], list[str]]:
    """Rule names in first-seen order and budgets, descending, from keys "rule@f"."""
    rules, budgets = [], set()
    for key in grid:
        rule, _, f = key.rpartition("@")
        if rule not in rules:
            rules.append(rule)
        budgets.add(f)
    return rules, sorted(budgets, key=float, reverse=True)


def tiles_section(results: dict, key: str, title: str) -> list[str]:
    grid = results.get(key)
    if not grid:
        return []
    grid = {k: v for k, v in grid.items() if "@" in k}
    rules, budgets = _by_rule_and_budget(grid)
    kept = results.get("kept_tiles", {})
    rows = [[f, f"{100 * kept[f]:.1f}%" if f in kept else ""] + [_cell(grid.get(f"{rule}@{f}")) for rule in rules]
            for f in budgets]
    return [f"### {title}", "", "Δppl against dense [95% interval] / Δ on the last positions alone.", "",
            *_table(["f", "causal tiles kept", *rules], rows), ""]


def elements_section(results: dict) -> list[str]:
    topk, toptheta = results.get("topk", {}), results.get("toptheta", {})
    if not topk and not toptheta:
        return []
    ks = sorted({int(k) for k in topk} | {int(key.split("/")[0]) for key in toptheta})
    variants = []
    for key in toptheta:
        variant = key.split("/", 1)[1]
        if variant not in variants:
            variants.append(variant)
    header = ["k", "exact top-k", *[f"Top-θ, {v}" for v in variants]]
    rows = [[str(k), _cell(topk.get(str(k))), *[_cell(toptheta.get(f"{k}/{v}")) for v in variants]] for k in ks]
    return ["### Elements: exact top-k and Top-θ", "",
            "Top-θ variants: none (renormalised over the kept elements), sdc (calibrated Δ̄ added to the "
            "denominator), exact (the true dropped mass in the denominator: no renormalisation), expthr "
            "(the exp-threshold estimate of it), each alone or +vmc (V-mean compensation); post: thresholds "
            "on the probabilities (post-softmax placement, not renormalised).", "", *_table(header, rows), ""]


def compensation_section(results: dict) -> list[str]:
    """Per k and row length, averaged over layers: the mass Top-θ drops against Δ̄."""
    comp = results.get("compensation")
    if not comp:
        return []
    lines = ["### Dropped mass against the calibrated Δ̄", "",
             "Held-out windows, Top-θ without compensation; masses are Σ exp(a − max) per row, "
             "averaged over heads, rows in the length bucket, and layers. Kept share: the share of the "
             "row's softmax mass on the kept elements, exactly and as calibrated SDC assumes.", ""]
    for k, entry in comp.items():
        buckets = list(entry["per_layer"][0])
        rows = []
        for bucket in buckets:
            cells = [layer[bucket] for layer in entry["per_layer"]]
            mean = lambda name: sum(c[name] for c in cells) / len(cells)  # noqa: E731
            ratios = sorted(c["delta_bar_mean"] / max(c["dropped_mean"], 1e-12) for c in cells)
            optional = lambda name: f"{mean(name):.3f}" if name in cells[0] else ""  # noqa: E731
            rows.append([bucket, f"{mean('kept_elements'):.0f}", optional("rows_below_half_k"),
                         f"{mean('dropped_mean'):.3f}", f"{mean('dropped_median'):.3f}", f"{mean('delta_bar_mean'):.3f}",
                         f"{ratios[0]:.2f} / {ratios[len(ratios) // 2]:.2f} / {ratios[-1]:.2f}",
                         f"{mean('kept_share_exact'):.3f}", f"{mean('kept_share_sdc'):.3f}", optional("kept_share_topk")])
        lines += [f"k = {k}:", "", *_table(["row length", "kept elements", "rows keeping < k/2", "Δ mean", "Δ median",
                                              "Δ̄ mean", "Δ̄ / Δ by layer (min / median / max)", "kept share",
                                              "kept share as SDC assumes", "kept share of exact top-k"], rows), ""]
    return lines


def speed_section(results: dict) -> list[str]:
    prefill = results.get("prefill_seconds")
    lines = []
    if prefill:
        batches = list(prefill)
        rules = [r for r in prefill[batches[0]] if ":" not in r]
        dense = "dense (cuDNN)"
        rows = []
        for rule in rules:
            row = [rule]
            for b in batches:
                seconds = prefill[b].get(rule)
                ratio = prefill[b][dense] / seconds if seconds and dense in prefill[b] else None
                row.append("" if seconds is None else f"{1e3 * seconds:.1f} ms" + ("" if ratio is None else f" ({ratio:.2f}×)"))
            rows.append(row)
        lines += ["### Whole-model prefill", "", "Median time, and speed against the dense model on cuDNN in the "
                  "same process (higher is faster).", "", *_table(["rule", *[f"batch {b}" for b in batches]], rows), ""]
    for key in sorted(k for k in results if k.startswith("prepass_seconds")):
        entry = results[key]
        rows = [[name, f"{1e3 * v['kernel']:.3f}", f"{1e3 * v['prepass']:.3f}",
                 f"{1e3 * v['prepass_xla']:.3f}" if "prepass_xla" in v else "",
                 f"{100 * v['prepass'] / v['kernel']:.0f}%", f"{entry['cudnn'] / v['kernel']:.2f}×"]
                for name, v in entry.items() if isinstance(v, dict)]
        if rows:
            batch = key.removeprefix("prepass_seconds").removeprefix("_b") or "1"
            lines += [f"### One layer's attention, batch {batch}", "",
                      f"Layer 10's q, k, v from the text, shape {entry.get('shape')}, {entry.get('dtype')}; "
                      f"cuDNN {1e3 * entry['cudnn']:.3f} ms.", "",
                      *_table(["rule", "gated kernel (ms)", "its pre-pass (ms)", "XLA pre-pass (ms)",
                               "pre-pass / kernel", "kernel vs cuDNN"], rows), ""]
    if results.get("decode_attention"):
        from condensa.eval.bench.decode import summary_table

        lines += ["### Decode attention, batch 8", "", "The decode benchmark at the model's head shape "
                  "(synthetic cache, one head per query head), in the same process.", "",
                  summary_table(results["decode_attention"]), ""]
    return lines


def calibration_section(results: dict) -> list[str]:
    cal = results.get("calibration")
    if not cal:
        return []
    rows = [[k, f"{v['seconds']:.0f}", f"{v['host_vmhwm_gib']:.2f}",
             "" if v.get("device_peak_gib") is None else f"{v['device_peak_gib']:.2f}"] for k, v in cal["per_k"].items()]
    return ["### Top-θ calibration", "",
            f"{cal['blocks']} blocks of {cal['seq']} tokens from {len(cal['books'])} books; peaks are the process's "
            "after each calibration.", "",
            *_table(["k", "seconds", "host peak (GiB)", "device peak (GiB)"], rows), ""]


def dense_section(results: dict) -> list[str]:
    rows = []
    for key, label in (("dense_all", "all full windows"), ("dense", "the sparse rules' windows")):
        if key in results:
            r = results[key]
            rows.append([label, str(r["windows"]), f"{r['tokens']:,}", f"{r['ppl']:.2f}", f"{r['ppl_tail']:.2f}"])
    if "book" in results and "dense" in results["book"]:
        r = results["book"]["dense"]
        rows.append(["held-out book", str(r["windows"]), f"{r['tokens']:,}", f"{r['ppl']:.2f}", f"{r['ppl_tail']:.2f}"])
    return ["### Dense", "", *_table(["text", "windows", "tokens scored", "perplexity", "last positions"], rows), ""]


def render(results: dict) -> str:
    args = results.get("args", {})
    lines = [f"Generated by `exp/real_model_report.py` from `exp/real_model_tiles.py` results: model "
             f"{args.get('model')}, {args.get('seq')}-token windows, {args.get('dtype', 'bfloat16')}, "
             f"device {results.get('device')}, jax {results.get('jax')}.", ""]
    lines += dense_section(results)
    lines += tiles_section(results, "selectors", "Tile selection at equal tile counts")
    lines += tiles_section(results, "book", "The held-out book")
    lines += tiles_section(results, "gated", "Tile selector + Top-θ")
    lines += tiles_section(results, "decode", "Every row gated as its decoding step (teacher forced)")
    lines += elements_section(results)
    lines += compensation_section(results)
    lines += calibration_section(results)
    lines += speed_section(results)
    return "\n".join(lines)


def _merge_into(merged: dict, new: dict) -> None:
    """Nested dicts merge key by key; anything else (and `args`) is replaced."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "args":
            _merge_into(merged[key], value)
        else:
            merged[key] = value


def merge(paths: list[str]) -> dict:
    """The results of several runs, later entries replacing earlier ones of the same name."""
    merged: dict = {}
    for path in paths:
        _merge_into(merged, json.loads(Path(path).read_text()))
    return merged


def write_into(page: Path, report: str, block: str) -> None:
    """Replaces the text between the markers of `block` in `page` (or appends the markers and the report)."""
    begin, end = markers(block)
    text = page.read_text() if page.exists() else ""
    generated = f"{begin}\n{report}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + generated + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + generated + "\n"
    page.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files of exp/real_model_tiles.py, merged in order")
    p.add_argument("--into", default="", help="a Markdown page whose marked block to replace (default: print)")
    p.add_argument("--block", default="report", help="the name of that block (a page may hold several)")
    args = p.parse_args()
    report = render(merge(args.results))
    if args.into:
        write_into(Path(args.into), report, args.block)
    else:
        print(report)


if __name__ == "__main__":
    main()
