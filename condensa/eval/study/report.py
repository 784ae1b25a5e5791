"""The study's report: Markdown tables and PNG plots generated from the stages' JSON, never typed.

Every number in `results.md` is formatted here from `results/*.json`; `answers` derives the four
questions of the study from the same files, so re-running a stage and the report updates both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from condensa import jsonio
from condensa.eval.study.config import BASE
from condensa.figures import new_figure, save_figure
from condensa.eval.sweep import read_results
from condensa.kernels.toptheta_decode import ROW_MODES


def load_results(results: Path) -> dict:
    """{"train", "evaluate": {model: ...}, "timing", "environment"} from a study's results folder."""
    def read(name):
        path = results / name
        return json.loads(path.read_text()) if path.is_file() else None

    evaluate = {p.stem.removeprefix("evaluate_"): read_results(p) for p in sorted(results.glob("evaluate_*.json"))}
    return {"train": read("train.json") or {}, "evaluate": evaluate, "timing": read("timing.json") or {},
            "environment": read("environment.json") or {}, "config": read("config.json") or {}}


def pct(x, digits=1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def num(x, digits=2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _rows(evaluation: dict, split: str) -> list[dict]:
    return evaluation.get(split, {}).get("rows", [])


def _within(rows, dense_ppl, limit, pred):
    return [r for r in rows if pred(r) and r["ppl"] <= dense_ppl * (1 + limit)]


def answers(res: dict, limit: float | None = None) -> dict:
    """(a) kept elements / tiles at Δppl <= limit per model, against the base model's dense ppl;
    (b) Top-θ kept per row on WikiText-2 / on corpus text; (c) the timing speed-ups; (d) where
    SDC + VMC helped. Missing stages give missing entries, not errors. `limit` defaults to the
    study's timing.max_delta_ppl."""
    if limit is None:
        limit = res.get("config", {}).get("timing", {}).get("max_delta_ppl", 0.01)
    out: dict = {"limit": limit, "a": {}, "b": {}, "c": {}, "d": {}}
    evaluate = res["evaluate"]
    if BASE in evaluate:
        base_dense = evaluate[BASE]["corpus"]["dense"]["ppl"]
        for name, ev in evaluate.items():
            rows = _rows(ev, "corpus")
            toptheta = _within(rows, base_dense, limit, lambda r: r["method"] == "toptheta" and r["tile_budget"] is None)
            tiles = _within(rows, base_dense, limit, lambda r: r["method"] == "toptheta" and not r.get("decode_gate"))
            best_el = min(toptheta, key=lambda r: r["kept_fraction"], default=None)
            best_tile = min(tiles, key=lambda r: r["tile_kept_fraction"], default=None)
            out["a"][name] = {
                "dense_ppl": ev["corpus"]["dense"]["ppl"], "dense_vs_base": ev["corpus"]["dense"]["ppl"] / base_dense - 1,
                "kept_fraction": best_el and best_el["kept_fraction"], "kept_rule": best_el and _rule(best_el),
                "tile_fraction": best_tile and best_tile["tile_kept_fraction"], "tile_rule": best_tile and _rule(best_tile),
            }
        base = out["a"][BASE]
        for name, entry in out["a"].items():
            entry["fewer_elements"] = _ratio(base["kept_fraction"], entry["kept_fraction"])
            entry["fewer_tiles"] = _ratio(base["tile_fraction"], entry["tile_fraction"])
    for name, ev in evaluate.items():
        corpus = {r["k"]: r for r in _rows(ev, "corpus")
                  if r["method"] == "toptheta" and r["tile_budget"] is None and r["compensation"] == "none"}
        wiki = {r["k"]: r for r in _rows(ev, "wikitext")
                if r["method"] == "toptheta" and r["tile_budget"] is None and r["compensation"] == "none"}
        out["b"][name] = {k: {"corpus": corpus[k]["kept_per_row"], "wikitext": wiki[k]["kept_per_row"],
                              "ratio": wiki[k]["kept_per_row"] / corpus[k]["kept_per_row"]}
                          for k in sorted(set(corpus) & set(wiki))}
        effect = ev.get("corpus", {}).get("compensation_effect", [])
        out["d"][name] = {
            "ungated_helped": sum(e["helped"] for e in effect if e["tile_budget"] is None),
            "ungated_total": sum(1 for e in effect if e["tile_budget"] is None),
            "gated_helped": sum(e["helped"] for e in effect if e["tile_budget"] is not None),
            "gated_total": sum(1 for e in effect if e["tile_budget"] is not None),
        }
    for name, timing in res["timing"].items():
        rules = timing.get("prefill_attention", {}).get("rules", {})
        decode = timing.get("decode_attention", {}).get("rules", {})
        out["c"][name] = {
            rule: {"prefill_attention": rules[rule].get("speedup_vs_cudnn"),
                   "prefill_model": timing.get("prefill_model", {}).get(rule, {}).get("speedup_vs_dense"),
                   "decode_attention": decode.get(rule, {}).get("speedup_vs_best_dense"),
                   "tile_fraction": rules[rule].get("tile_fraction")}
            for rule in rules
        }
    return out


def _v_loaded_md(rule: dict) -> str:
    """The V a decode rule read: blocks, and with masked row loads the rows themselves."""
    if rule.get("skip_v") in ROW_MODES:
        return f"{pct(rule['v_fraction'])} (rows read {pct(rule['v_row_fraction'], 2)})"
    return pct(rule["v_fraction"])


def _ratio(a, b):
    return a / b if a is not None and b else None


def _rule(row: dict) -> str:
    if "label" in row:
        return f"{row['label']}, k={row['k']}"
    rule = "top-k" if row["method"] == "topk" else "Top-θ"
    if row.get("tile_budget") is not None:
        rule = f"gate f={row['tile_budget']:g} + {rule}"
    if row.get("compensation", "none") != "none":
        rule += " + SDC+VMC"
    return f"{rule}, k={row['k']}"


# ---- Markdown ----------------------------------------------------------------------------------


def markdown(res: dict, figures: dict[str, str], command: str = "", json_copy: str | None = None) -> str:
    ans = answers(res)
    env = res["environment"]
    lines = ["# Stand-in study: a small GPT-2 pretrained on the shared corpus", "",
             "Generated by `python -m condensa.eval.study` from its JSON output"
             + (f" (a copy is in `{json_copy}`)" if json_copy else "") + "; do not edit by hand.", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    if env:
        lines += [f"Device: {env.get('device')} ×{env.get('device_count')} ({env.get('platform')}), jax {env.get('jax')}, "
                  f"flax {env.get('flax')}, Python {env.get('python')}, {env.get('date')}.", ""]
    lines += _models_table(res), ""
    for split, title in (("corpus", "held-out corpus text"), ("wikitext", "WikiText-2 test")):
        lines += [f"## Perplexity against kept attention: {title}", ""]
        for name, ev in res["evaluate"].items():
            if split in ev:
                lines += _sweep_table(name, ev[split]), ""
        if f"ppl_vs_kept_{split}" in figures:
            lines += [f"![perplexity vs kept fraction, {title}]({figures[f'ppl_vs_kept_{split}']})", ""]
    lines += _answers_md(ans), ""
    if res["timing"]:
        lines += _timing_md(res["timing"]), ""
    other = [(k, v) for k, v in figures.items() if not k.startswith("ppl_vs_kept")]
    if other:
        lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in other] + [""]
    return "\n".join(lines)


def _models_table(res: dict) -> str:
    rows = ["## The models", "",
            "| model | losses (λ) | steps | tokens | val ppl (train eval) | corpus ppl | WikiText-2 ppl | top-k mass (k of loss.topk.k) | mass in the gate structure's best tiles |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, t in res["train"].items():
        topk_key = next((k for k in t.get("final_eval", {}) if k.startswith("top") and k.endswith("_mass")), None)
        losses = ", ".join(f"{k} {v:g}" for k, v in t["losses"].items() if v) or "none"
        ev = t.get("final_eval", {})
        rows.append(f"| {name} | {losses} | {t['steps']} | {t['tokens']:,} | {num(ev.get('val_ppl'))} | "
                    f"{num(t['dense_ppl'].get('corpus'))} | {num(t['dense_ppl'].get('wikitext'))} | "
                    f"{pct(ev.get(topk_key))} | {pct(ev.get('oracle_tile_mass'))} |")
    return "\n".join(rows)


def _sweep_table(name: str, sweep: dict) -> str:
    dense_layers = sorted({layer for r in sweep["rows"] for layer in r.get("dense_layers", ())})
    kept_dense = f"; every rule leaves layer(s) {', '.join(map(str, dense_layers))} dense" if dense_layers else ""
    rows = [f"**{name}** (dense ppl {num(sweep['dense']['ppl'])}, {sweep['tokens']:,} tokens, context {sweep['context']}, "
            f"tiles {sweep['tile']}{kept_dense})", "",
            "| rule | k | ppl | Δppl | kept elements | kept per row | tiles computed | gate tile mass |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sweep["rows"]:
        rows.append(f"| {_rule(r).rsplit(', k=', 1)[0]} | {r['k']} | {num(r['ppl'])} | {pct(r['delta_ppl_rel'], 2)} | "
                    f"{pct(r['kept_fraction'], 2)} | {num(r['kept_per_row'], 1)} | {pct(r['tile_kept_fraction'])} | "
                    f"{pct(r['gate_tile_mass'])} |")
    return "\n".join(rows)


def _answers_md(ans: dict) -> str:
    limit = pct(ans["limit"], 0)
    out = ["## Answers", "",
           f"**(a) Does concentration training let Top-θ keep less at the same perplexity?** The smallest kept "
           f"fraction among the measured rules whose perplexity on held-out corpus text is within {limit} of the "
           "*base* model's dense perplexity (so a fine-tune's own perplexity cost counts against it). Goal: 2× fewer "
           "elements and 4× fewer tiles than the base model.", "",
           "| model | dense ppl vs base | kept elements | rule | fewer than base | tiles computed | rule | fewer than base |",
           "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |"]
    for name, a in ans["a"].items():
        out.append(f"| {name} | {pct(a['dense_vs_base'], 2)} | {pct(a['kept_fraction'], 2)} | {a['kept_rule'] or 'none within'} | "
                   f"{num(a['fewer_elements'])}× | {pct(a['tile_fraction'])} | {a['tile_rule'] or 'none within'} | "
                   f"{num(a['fewer_tiles'])}× |")
    out += ["", "**(b) Do corpus-calibrated thresholds hold on WikiText-2?** Top-θ's kept elements per row "
            "(mean over rows longer than k) on each set; a ratio near 1 means no recalibration is needed.", "",
            "| model | k | corpus | WikiText-2 | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, by_k in ans["b"].items():
        for k, b in by_k.items():
            out.append(f"| {name} | {k} | {num(b['corpus'], 1)} | {num(b['wikitext'], 1)} | {num(b['ratio'])} |")
    if ans["c"]:
        out += ["", "**(c) Kernel speed on these models** (ratios > 1 are faster than dense; details below).", "",
                "| model | rule | tiles computed | prefill attention vs cuDNN | whole-model prefill vs dense | decode attention vs best dense |",
                "| --- | --- | ---: | ---: | ---: | ---: |"]
        for name, rules in ans["c"].items():
            for rule, c in rules.items():
                out.append(f"| {name} | {rule} | {pct(c['tile_fraction'])} | {num(c['prefill_attention'])}× | "
                           f"{num(c['prefill_model'])}× | {num(c['decode_attention'])}× |")
    out += ["", "**(d) Does SDC + VMC help?** Count of (k, f) settings on held-out corpus text where Top-θ with "
            "SDC + VMC had a lower perplexity than without.", "",
            "| model | without gate | with gate |", "| --- | ---: | ---: |"]
    for name, d in ans["d"].items():
        out.append(f"| {name} | {d['ungated_helped']} of {d['ungated_total']} | {d['gated_helped']} of {d['gated_total']} |")
    return "\n".join(out)


def _budget_md(gate: str, chosen: dict) -> str:
    """How the timed budget was chosen and what it costs on held-out corpus text."""
    text = (f"{gate} budget f = {chosen.get('tile_budget', 'none')} (Δppl of the timed rule "
            f"{pct(chosen.get('delta_ppl_rel'), 2)}, compensation {chosen.get('compensation', '-')}")
    if chosen.get("gate_delta_ppl_rel") is not None:
        text += f"; the {gate} alone {pct(chosen['gate_delta_ppl_rel'], 2)}"
    if chosen.get("within_limit") is False:
        text += "; no budget was within the limit, this is the cheapest"
    return text + ")"


def _timing_md(timing: dict) -> str:
    out = ["## Timing details", ""]
    for name, t in timing.items():
        chosen = t.get("chosen") or {}
        out += [f"**{name}**: batch {t['batch']} × {t['seq_len']} tokens, {t['heads']} heads of {t['head_dim']}; "
                f"k = {t['k']}; {_budget_md('gate', chosen)}"
                + (f"; decoding: {_budget_md('decode gate', t['chosen_decode'])}" if t.get("chosen_decode") else "")
                + (f"; layer(s) {', '.join(map(str, t['dense_layers']))} dense in every rule" if t.get("dense_layers") else "")
                + ".", "",
                "| measurement | rule | time (ms) | vs dense | tiles / K blocks | empty tiles / V blocks | max rel. error |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        whole = t["prefill_model"]
        out.append(f"| whole-model prefill | dense (cuDNN) | {num(1e3 * whole['dense_cudnn']['median_s'])} | 1.00× | | | |")
        for rule, e in whole.items():
            if rule != "dense_cudnn":
                out.append(f"| whole-model prefill | {rule} | {num(1e3 * e['median_s']) if 'median_s' in e else 'check failed'} | "
                           f"{num(e.get('speedup_vs_dense'))}× | | | {num(e['rel_error_vs_reference'], 4)} |")
        pre = t["prefill_attention"]
        out.append(f"| prefill attention, all layers | cuDNN | {num(1e3 * pre['cudnn_s'])} | 1.00× | | | |")
        for rule, e in pre["rules"].items():
            out.append(f"| prefill attention, all layers | {rule} | {num(1e3 * e['kernel_s'])} | {num(e['speedup_vs_cudnn'])}× | "
                       f"{pct(e['tile_fraction'])} | {pct(e['empty_fraction'])} | {num(e['max_rel_error'], 4)} |")
        dec = t["decode_attention"]
        for base, s in dec["dense_s"].items():
            out.append(f"| decode attention, all layers | {base} | {num(1e3 * s, 3) if s else 'n/a'} | "
                       f"{num(dec['best_dense_s'] / s) if s else 'n/a'}× | | | |")
        for rule, e in dec["rules"].items():
            out.append(f"| decode attention, all layers | {rule} | {num(1e3 * e['kernel_s'], 3)} | "
                       f"{num(e['speedup_vs_best_dense'])}× | {pct(e['k_fraction'])} | {_v_loaded_md(e)} | "
                       f"{num(e['max_rel_error'], 4)} |")
        for rule, e in t.get("ppl_parity", {}).items():
            out.append(f"| perplexity on held-out corpus text | {rule}: kernel {num(e['kernel'], 3)}, reference "
                       f"{num(e['reference'], 3)} | | | | | {num(e['rel_diff'], 5)} |")
        out.append("")
        if pre.get("grid"):
            out += [f"Prefill attention of **{name}** with every calibrated rule, all layers, against cuDNN "
                    f"({num(1e3 * pre['cudnn_s'])} ms), next to the rule's perplexity cost on held-out corpus text:", "",
                    "| rule | k | Δppl | tiles computed | time (ms) | vs cuDNN | max rel. error |",
                    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for g in pre["grid"]:
                out.append(f"| {g['label']} | {g['k']} | {pct(g['delta_ppl_rel'], 2)} | {pct(g['tile_fraction'])} | "
                           f"{num(1e3 * g['kernel_s'])} | {num(g['speedup_vs_cudnn'])}× | {num(g['max_rel_error'], 4)} |")
            out.append("")
    return "\n".join(out)


# ---- plots ---------------------------------------------------------------------------------------


def plot_ppl_vs_kept(res: dict, split: str, path: Path) -> Path | None:
    """Per model: Top-θ perplexity against kept elements, and gate + Top-θ against computed tiles."""
    evaluate = {n: ev for n, ev in res["evaluate"].items() if split in ev}
    if not evaluate:
        return None
    fig, (left, right) = new_figure(1, 2, figsize=(11, 4.2))
    for name, ev in evaluate.items():
        rows = ev[split]["rows"]
        el = sorted((r for r in rows if r["method"] == "toptheta" and r["tile_budget"] is None
                     and r["compensation"] == "none"), key=lambda r: r["kept_fraction"])
        gated = sorted((r for r in rows if r["method"] == "toptheta" and r["tile_budget"] is not None
                        and not r.get("decode_gate")
                        and r["compensation"] == "none"), key=lambda r: r["tile_kept_fraction"])
        style = "-" if name == BASE else "--"
        left.plot([r["kept_fraction"] for r in el], [r["ppl"] for r in el], style, marker="o", label=name)
        right.plot([r["tile_kept_fraction"] for r in gated], [r["ppl"] for r in gated], style, marker="s", label=name)
    ks = sorted({r["k"] for ev in evaluate.values() for r in ev[split]["rows"]})
    for ax, xlabel in ((left, f"kept fraction of attention elements (Top-θ, k = {', '.join(map(str, ks))})"),
                       (right, "fraction of causal tiles computed (gate + Top-θ)")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"perplexity vs kept attention ({split}); base solid, fine-tunes dashed", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, tight=False)


def _committed_copy(results: Path, report_dir: Path) -> str | None:
    """Where the page says its JSON is, when the report is made from a copy committed under its own
    folder (docs/runs/<name>/results for docs/results.md): that path from the folder above; else None."""
    results, report_dir = results.resolve(), report_dir.resolve()
    if not results.is_relative_to(report_dir):
        return None
    return str(results.relative_to(report_dir.parent))


def write(results: Path, report_dir: Path, command: str = "") -> Path:
    """Writes report_dir/results.md and its plots (report_dir/img/study/) from results/*.json."""
    res = load_results(results)
    figures_dir = report_dir / "img" / "study"
    figures: dict[str, str] = {}
    for split in ("corpus", "wikitext"):
        path = plot_ppl_vs_kept(res, split, figures_dir / f"ppl_vs_kept_{split}.png")
        if path is not None:
            figures[f"ppl_vs_kept_{split}"] = str(path.relative_to(report_dir))
    for png in sorted((results / "figures").glob("*.png")) if (results / "figures").is_dir() else []:
        target = figures_dir / png.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png.read_bytes())
        figures[png.stem] = str(target.relative_to(report_dir))
    text = markdown(res, figures, command, json_copy=_committed_copy(results, report_dir))
    discussion = report_dir / "results_discussion.md"  # hand-written prose that cites the tables, no numbers of its own
    if discussion.is_file():
        text += "\n" + discussion.read_text()
    lead = report_dir / "results_real_model.md"  # the real model's results lead the page (exp/condense_report.py)
    if lead.is_file():
        text = lead.read_text().rstrip("\n") + "\n\n" + text
    (report_dir / "results.md").write_text(text)
    (report_dir / "answers.json").write_text(jsonio.dumps(answers(res), indent=2, default=str) + "\n")
    return report_dir / "results.md"
