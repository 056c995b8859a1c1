"""PNG figures in the style of the Llama-3 batch-size study: metrics against batch size, edit layer or number
of edits, one line per editor and mode (a colour per editor; dashed where edits accumulate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memoe.evaluation.harness import get_mode
from memoe.evaluation.tables import headline, run_label
from memoe.io import atomic_path

PANELS = (("cf_efficacy", "Efficacy Score"), ("cf_paraphrase", "Paraphrase Score"), ("cf_neighbourhood", "Neighbourhood Score"))
ZSRE_PANELS = (("reliability", "Reliability"), ("generality", "Generality"), ("locality", "Locality"))


@dataclass
class Line:
    """One plotted line: its legend label, the editor (its colour), whether its mode keeps edits (dashed), and the
    points (x, metrics)."""

    label: str
    editor: str
    accumulates: bool
    points: list[tuple[float, dict]] = field(default_factory=list)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return str(path)


def panels_for(lines: list[Line]) -> tuple:
    """CounterFact's three scores where the runs have them, else EasyEdit's (zsRE)."""
    has = lambda key: any(m.get(key) is not None for line in lines for _, m in line.points)
    return PANELS if has("cf_paraphrase") or has("cf_neighbourhood") else ZSRE_PANELS


def plot_lines(lines: list[Line], path: Path, xlabel: str, log_x: bool = False, title: str | None = None) -> str:
    """One panel per metric, one line per :class:`Line`. Returns the PNG path."""
    plt = _plt()
    panels = panels_for(lines)
    editors = list(dict.fromkeys(line.editor for line in lines))
    colours = {e: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(editors)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.9, 3.6))
    xs_all = sorted({x for line in lines for x, _ in line.points})
    for ax, (key, name) in zip(axes, panels):
        for line in lines:
            xy = sorted((x, m[key]) for x, m in line.points if m.get(key) is not None)
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=line.label, color=colours[line.editor],
                        linestyle="--" if line.accumulates else "-")
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


def _line(lines: dict, label: str, run: dict) -> Line:
    return lines.setdefault(label, Line(label, run["editor"], not get_mode(run["mode"]).restores))


def plot_experiment(result: dict, output: str | Path) -> list[str]:
    """An experiment's figures beside ``output``, each where the experiment varies its x: ``-batch-size.png`` (headline
    metrics against batch size, one line per editor and mode), ``-layers.png`` (against the edit layer), ``-edits.png``
    (all edits so far re-scored at each checkpoint; without checkpoints, the efficacy of each batch just applied)."""
    out, runs, written = Path(output), list(result["runs"].values()), []
    title = f"{result['name']}, {result['dataset']['name']}"
    by_size: dict[str, Line] = {}
    by_layer: dict[str, Line] = {}
    by_edits: dict[str, Line] = {}
    for r in runs:
        where = "" if r.get("layer") is None else f" layer {r['layer']}"
        _line(by_size, f"{r['editor']} {r['mode']}{where}", r).points.append((r["batch_size"], headline(r)))
        if r.get("layer") is not None:
            _line(by_layer, f"{r['editor']} {r['mode']} b={r['batch_size']}", r).points.append((r["layer"], headline(r)))
    if any(len(line.points) > 1 for line in by_size.values()):
        written.append(plot_lines(list(by_size.values()), out.with_name(out.stem + "-batch-size.png"), "batch size", log_x=True, title=title))
    if any(len(line.points) > 1 for line in by_layer.values()):
        written.append(plot_lines(list(by_layer.values()), out.with_name(out.stem + "-layers.png"), "edit layer", title=title))
    if any(r.get("checkpoints") for r in runs):
        for r in runs:
            if r.get("checkpoints"):
                _line(by_edits, run_label(r), r).points += [(c["edits"], c["metrics"]) for c in r["checkpoints"]]
        written.append(plot_lines(list(by_edits.values()), out.with_name(out.stem + "-edits.png"), "edits applied", title=title))
    else:
        written.append(_plot_batches(runs, out.with_name(out.stem + "-edits.png")))
    return written


def _plot_batches(runs: list[dict], path: Path) -> str:
    """Efficacy of each batch right after it was applied, against the number of edits applied so far."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in runs:
        xs, ys, done = [], [], 0
        for b in r["batches"]:
            done += b["size"]
            xs.append(done)
            ys.append(b["efficacy"])
        ax.plot(xs, ys, marker=".", label=run_label(r))
    ax.set_xlabel("edits applied")
    ax.set_ylabel("Efficacy Score of the batch just applied")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
