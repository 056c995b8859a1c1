"""Markdown tables of an experiment's result (the dict :func:`memoe.experiment.run_experiment` writes as JSON).

Everything here reads the runs' typed fields (``editor``, ``mode``, ``batch_size``, ``layer``); no label is parsed.
"""

from __future__ import annotations

from memoe.evaluation.metrics import MetricsTable, fmt_metric

#: Columns of the summary table and the metrics the plots show.
TABLE_METRICS = ("cf_efficacy", "cf_paraphrase", "cf_neighbourhood", "cf_score", "reliability", "generality", "locality",
                 "gen_efficacy", "gen_paraphrase", "gen_neighbourhood", "gen_locality", "cf_plus_neighbourhood", "prefixed_efficacy",
                 "same_subject_agreement", "shared_subject_batch", "perplexity_ratio")


def run_label(run: dict) -> str:
    """``"<editor> <mode> b=<B>"`` (+ ``" layer=<L>"``): how a run is named in tables, logs and result keys."""
    return f"{run['editor']} {run['mode']} b={run['batch_size']}" + ("" if run.get("layer") is None else f" layer={run['layer']}")


def headline(run: dict) -> dict:
    """The metrics a run is judged by: after all edits (``final``) where the mode keeps them, else ``current``."""
    return run["final"] or run["current"]


def winners(result: dict, metrics: tuple[str, ...] = TABLE_METRICS) -> dict[str, tuple[str, float]]:
    """Metric -> (run label, value) of the best run (on the headline metrics)."""
    best = {}
    for m in metrics:
        vals = [(run_label(r), headline(r).get(m)) for r in result["runs"].values() if headline(r).get(m) is not None]
        if vals:
            best[m] = max(vals, key=lambda kv: kv[1])
    return best


def summary_table(result: dict) -> str:
    """One row per run: headline metrics, speed and memory; then the winners and the skipped runs."""
    runs = result["runs"]
    cols = [m for m in TABLE_METRICS if any(headline(r).get(m) is not None for r in runs.values())]
    has_layer = any(r.get("layer") is not None for r in runs.values())
    head = ["editor", "mode", "batch"] + (["layer"] if has_layer else []) + cols + ["edits/s", "peak MiB"]
    fmt = fmt_metric
    pre = result["pre"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join(["pre-edit", "–", "–"] + (["–"] if has_layer else []) + [fmt(pre.get(m)) for m in cols] + ["–", "–"]) + " |"]
    for r in runs.values():
        h = headline(r)
        cells = [r["editor"], r["mode"], str(r["batch_size"])] + ([str(r.get("layer"))] if has_layer else [])
        cells += [fmt(h.get(m)) for m in cols] + [f"{r['edits_per_second']:.3f}", f"{r['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    text += ("\n\nMetrics after all edits are in (`final`) for the sequential modes; right after each batch "
             "(`current`) for the restoring modes.")
    best = winners(result, tuple(cols))
    if best:
        text += "\n\nBest run per metric: " + "; ".join(f"{m} — {k} ({fmt_metric(v)})" for m, (k, v) in best.items()) + "."
    if result.get("skipped"):
        text += "\n\n" + skipped_line(result)
    return text


def skipped_line(result: dict) -> str:
    """``Skipped: <runs> (<reason>); ...``, the runs grouped by reason ('' when none was skipped)."""
    by_reason: dict[str, list[dict]] = {}
    for s in result.get("skipped") or []:
        by_reason.setdefault(s["reason"], []).append(s)
    return "Skipped: " + "; ".join(f"{_compact(runs)} ({why})" for why, runs in by_reason.items()) + "." if by_reason else ""


def _compact(skipped: list[dict]) -> str:
    """Skipped runs, with the batch sizes of one reason folded when it covers every editor and mode alike."""
    sizes = sorted({s["batch_size"] for s in skipped})
    pairs = sorted({f"{s['editor']} {s['mode']}" for s in skipped})
    if len(skipped) == len(sizes) * len(pairs) and len(sizes) > 1:
        return f"batch sizes {', '.join(map(str, sizes))} for {', '.join(pairs)}"
    return ", ".join(run_label(s) for s in skipped)


def metrics_table(result: dict, columns: tuple[str, ...] | None = None) -> str:
    """Every metric of every run (or those of ``columns`` that some run has): the pre-edit row, then each run right
    after its batches (``current``) and, for the sequential modes, after all edits (``final``)."""
    t = MetricsTable()
    t.add("pre-edit", result["pre"])
    for r in result["runs"].values():
        t.add(f"{run_label(r)} (current)", r["current"])
        if r["final"]:
            t.add(f"{run_label(r)} (final)", r["final"])
    return t.markdown(tuple(c for c in columns if any(m.get(c) is not None for _, m in t.rows)) if columns else None)


def protocol_line(result: dict) -> str:
    """One paragraph naming how the numbers were made (the result's ``protocol``)."""
    p = result.get("protocol")
    if not p:
        return ""
    g = p.get("generation")
    sel = p["records"].get("rule", "")
    return (f"Protocol: {p['model']}, no chat template; records: {sel}; teacher-forced scores ({p['teacher_forced']})"
            + (f"; gen_* by greedy decoding (at most {g['max_new_tokens']} tokens, stopping at '.', a newline or the end; "
               f"hit: {g['hit']})" if g else "") + f"; scored {p['scored']}.")


def result_markdown(result: dict) -> str:
    """The Markdown file written beside a result: the summary, the protocol, then every metric."""
    return (summary_table(result) + "\n\n" + protocol_line(result) + "\n\nEvery metric, right after each batch (current) and "
            "after all edits (final):\n\n" + metrics_table(result))


__all__ = ["TABLE_METRICS", "headline", "metrics_table", "result_markdown", "run_label", "skipped_line", "summary_table",
           "winners"]
