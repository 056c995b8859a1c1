"""PNG figures in the style of the Llama-3 batch-size study: metrics against batch size, edit layer or number
of edits, one line per editor and mode."""

from __future__ import annotations

from pathlib import Path

PANELS = (("cf_efficacy", "Efficacy Score"), ("cf_paraphrase", "Paraphrase Score"), ("cf_neighbourhood", "Neighbourhood Score"))
ZSRE_PANELS = (("reliability", "Reliability"), ("generality", "Generality"), ("locality", "Locality"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    from memoe.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return str(path)


def panels_for(points: dict[str, list[tuple[float, dict]]]) -> tuple:
    """CounterFact's three scores where the runs have them, else EasyEdit's (zsRE)."""
    has = lambda key: any(m.get(key) is not None for pts in points.values() for _, m in pts)  # noqa: E731
    return PANELS if has("cf_paraphrase") or has("cf_neighbourhood") else ZSRE_PANELS


def plot_lines(points: dict[str, list[tuple[float, dict]]], path: Path, xlabel: str, log_x: bool = False,
               title: str | None = None) -> str:
    """One panel per metric; ``points``: line label -> [(x, metrics)]. Returns the PNG path."""
    plt = _plt()
    panels = panels_for(points)
    # one colour per editor (a label's first word), solid lines for restoring modes, dashed for sequential ones
    editors = list(dict.fromkeys(label.split()[0] for label in points))
    colours = {e: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(editors)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.9, 3.6))
    xs_all = sorted({x for pts in points.values() for x, _ in pts})
    for ax, (key, name) in zip(axes, panels):
        for label, pts in points.items():
            xy = sorted((x, m[key]) for x, m in pts if m.get(key) is not None)
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label, color=colours[label.split()[0]],
                        linestyle="--" if "sequential" in label else "-")
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [str(int(x)) if float(x).is_integer() else str(x) for x in xs_all])  # the measured points
        ax.set_xlabel(xlabel)
        ax.set_title(name)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.9 / (4.6 * len(panels) + 1.9), 1))
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_runs(runs: list[dict], output: str | Path, view: str = "final") -> list[str]:
    """Metrics against batch size (when runs differ in batch size) and efficacy against edits applied.

    ``view``: ``final`` (all edits re-scored at the end; ``current`` where a mode restores) or ``current``.
    Returns the PNG paths written beside ``output`` (``<stem>-batch-size.png``, ``<stem>-edits.png``).
    """
    plt = _plt()
    out, written = Path(output), []
    series: dict[str, list[tuple[int, dict]]] = {}
    for r in runs:
        series.setdefault(f"{r['editor']} {r['mode']}", []).append((r["batch_size"], r.get(view) or r["current"]))
    if any(len({b for b, _ in pts}) > 1 for pts in series.values()):
        written.append(plot_lines(series, out.with_name(out.stem + "-batch-size.png"), "batch size", log_x=True))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in runs:
        xs, ys, done = [], [], 0
        for b in r["batches"]:
            done += b["size"]
            xs.append(done)
            ys.append(b["efficacy"])
        ax.plot(xs, ys, marker=".", label=f"{r['editor']} {r['mode']} b={r['batch_size']}")
    ax.set_xlabel("edits applied")
    ax.set_ylabel("Efficacy Score of the batch just applied")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out.with_name(out.stem + "-edits.png")))
    plt.close(fig)
    return written


def plot_study(result: dict, output: str | Path) -> list[str]:
    """The study's figures beside ``output``: ``-batch-size.png`` (metrics after all edits against batch
    size, one line per editor and mode), ``-layers.png`` (against the edit layer) and ``-edits.png`` (all
    edits so far re-scored at each checkpoint, against the number of edits), each where the study varies it."""
    from memoe.evaluation.study import headline

    out, runs, written = Path(output), list(result["runs"].values()), []
    name = f"{result['study']}, {result['dataset']['name']}"
    by_size: dict[str, list] = {}
    by_layer: dict[str, list] = {}
    by_edits: dict[str, list] = {}
    for r in runs:
        where = "" if r.get("layer") is None else f" layer {r['layer']}"
        by_size.setdefault(f"{r['editor']} {r['mode']}{where}", []).append((r["batch_size"], headline(r)))
        if r.get("layer") is not None:
            by_layer.setdefault(f"{r['editor']} {r['mode']} b={r['batch_size']}", []).append((r["layer"], headline(r)))
        if r.get("checkpoints"):
            by_edits[f"{r['editor']} {r['mode']} b={r['batch_size']}{where}"] = [(c["edits"], c["metrics"]) for c in r["checkpoints"]]
    if any(len(pts) > 1 for pts in by_size.values()):
        written.append(plot_lines(by_size, out.with_name(out.stem + "-batch-size.png"), "batch size", log_x=True, title=name))
    if any(len(pts) > 1 for pts in by_layer.values()):
        written.append(plot_lines(by_layer, out.with_name(out.stem + "-layers.png"), "edit layer", title=name))
    if by_edits:
        written.append(plot_lines(by_edits, out.with_name(out.stem + "-edits.png"), "edits applied", title=name))
    return written
