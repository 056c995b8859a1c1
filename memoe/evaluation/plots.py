"""PNG figures in the style of the Llama-3 batch-size study: metrics against batch size or number of edits."""

from __future__ import annotations

from pathlib import Path

PANELS = (("cf_efficacy", "Efficacy Score"), ("cf_paraphrase", "Paraphrase Score"), ("cf_neighbourhood", "Neighbourhood Score"))


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


def plot_runs(runs: list[dict], output: str | Path, view: str = "final") -> list[str]:
    """Metrics against batch size (when runs differ in batch size) and efficacy against edits applied.

    ``view``: ``final`` (all edits re-scored at the end; ``current`` where a mode restores) or ``current``.
    Returns the PNG paths written beside ``output`` (``<stem>-batch-size.png``, ``<stem>-edits.png``).
    """
    plt = _plt()
    out, written = Path(output), []
    series: dict[str, list[tuple[int, dict]]] = {}
    for r in runs:
        metrics = r.get(view) or r["current"]
        series.setdefault(f"{r['editor']} {r['mode']}", []).append((r["batch_size"], metrics))
    if any(len({b for b, _ in pts}) > 1 for pts in series.values()):
        fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
        for ax, (key, title) in zip(axes, PANELS):
            for label, pts in series.items():
                pts = sorted((b, m[key]) for b, m in pts if m.get(key) is not None)
                if pts:
                    ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_title(title)
            ax.set_ylim(-0.02, 1.02)
        axes[-1].legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out.with_name(out.stem + "-batch-size.png")))
        plt.close(fig)
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
