"""Write measured results into README.md from result files, so no figure in it is typed by hand.

    python -m memoe.evaluation.readme --testbeds .cache/memoe/testbeds/*/report.json --evals runs/*.json
    python -m memoe.evaluation.readme --studies runs/studies/batch-size-counterfact.json

Replaces the text between ``<!-- results:testbeds -->`` / ``<!-- results:evals -->`` / ``<!-- results:studies -->``
and the matching ``<!-- /results:... -->`` markers; a study's PNGs are copied to ``docs/studies/`` and linked.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
from pathlib import Path

from memoe.evaluation.harness import describe_machine
from memoe.evaluation.metrics import MetricsTable
from memoe.io import write_text

EVAL_COLUMNS = ("cf_efficacy", "cf_paraphrase", "cf_neighbourhood", "cf_score", "reliability", "generality",
                "locality", "same_subject", "fluency")


def testbeds_section(reports: list[dict]) -> str:
    head = ("| testbed | parameters | build (s) | recall: requests | held-out phrasing | paraphrases | neighbourhood "
            "| MLP effect, subject's last token (layer) | MLP effect, prompt's last token (layer) | storage |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in sorted(reports, key=lambda r: r["name"]):
        rec = r["recall"]
        get = lambda k: f"{rec[k]['recall']:.3f}" if k in rec else "–"  # noqa: E731
        mlp = r["trace"]["effects"]["mlp"]

        def peak(vals):
            i = max(range(len(vals) - 1), key=vals.__getitem__)  # the last layer reads out; see storage_site
            return f"{vals[i]:+.3f} ({i})"

        rows.append(f"| {r['name']} | {r['parameters']:,} | {r['build_seconds']:.0f} | {get('requests')} | {get('heldout')} "
                    f"| {get('paraphrases')} | {get('neighbourhood')} | {peak(mlp['subject_last'])} | {peak(mlp['prompt_last'])} "
                    f"| {r.get('storage_site', '')} |")
    return head + "\n".join(rows) + f"\n\nMeasured on {platform.machine()}, {_cores()} CPU cores; build time is pretraining only."


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def evals_section(results: list[tuple[str, dict]]) -> str:
    parts = []
    for path, res in results:
        t = MetricsTable()
        t.add("pre-edit", res["pre"])
        for r in res["runs"]:
            t.add(f"{r['editor']} {r['mode']} b={r['batch_size']} (current)", r["current"])
            if r["final"]:
                t.add(f"{r['editor']} {r['mode']} b={r['batch_size']} (final)", r["final"])
        cols = tuple(c for c in EVAL_COLUMNS if any(m.get(c) is not None for _, m in t.rows))
        speed = "; ".join(f"{r['editor']} {r['mode']} b={r['batch_size']}: {r['edits_per_second']} edits/s, "
                          f"peak {r['peak_memory_mb']:.0f} MiB" for r in res["runs"])
        o = res["options"]
        # files written before the machine was recorded: the device option, else this project's CPU machine
        where = describe_machine(res["machine"]) if "machine" in res else (o.get("device") or "cpu")
        parts.append(f"**{res['dataset']['name']}, {res['dataset']['num_edits']} edits** (`{path}`; "
                     f"modes {', '.join(o['modes'])}, batch sizes {o['batch_sizes']}; {where}):\n\n{t.markdown(cols)}\n\n{speed}. "
                     f"Scoring: {res['pre_scoring']['prompts_per_second']} prompts/s.")
    return "\n\n".join(parts)


def adapters_section(results: list[tuple[str, dict]]) -> str:
    """``train.py`` results (``<adapter>/metrics.json``): the base beside the adapter, gate on and off."""
    parts = []
    for path, res in results:
        t = MetricsTable()
        t.add("pre-edit", res["pre"])
        for label, m in res["adapter"].items():
            t.add(f"memoe, {label}", m)
        cols = tuple(c for c in EVAL_COLUMNS if any(m.get(c) is not None for _, m in t.rows))
        tr = res["train"]
        parts.append(f"**{res['dataset']['name']}, {res['dataset']['num_edits']} edits** (`{path}`):\n\n{t.markdown(cols)}\n\n"
                     f"Training: {tr['steps']} steps in {tr['seconds']} s ({tr['edits_per_second']} edits/s) on "
                     f"{tr['devices']} device(s), peak resident memory {res['peak_rss_mb']:.0f} MiB.")
    return "\n\n".join(parts)


def studies_section(results: list[tuple[str, dict]], figures: Path, readme_dir: Path) -> str:
    """Each study: what it asks, how it was run, its table (runs, winners, skips) and its plots."""
    from memoe.evaluation.study import study_markdown

    parts = []
    for path, res in results:
        d, where = res["definition"], describe_machine(res["machine"])
        took = sum(r.get("wall_seconds", 0) for r in res["runs"].values())
        imgs = []
        for png in sorted(Path(path).parent.glob(Path(path).stem + "-*.png")):
            figures.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, figures / png.name)
            imgs.append(f"![{png.stem}]({(figures / png.name).relative_to(readme_dir).as_posix()})")
        parts.append(f"**Study `{res['study']}`** ({res['description']}) on {res['dataset']['name']}, "
                     f"{res['dataset']['num_edits']} edits per run, editors {', '.join(d['editors'])}, modes "
                     f"{', '.join(d['modes'])}; `{path}`, {len(res['runs'])} runs in {took / 60:.1f} min of run time "
                     f"({where}):\n\n{study_markdown(res)}\n\n" + "\n".join(imgs))
    return "\n\n".join(parts)


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no <!-- results:{name} --> ... <!-- /results:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def main(readme: str, testbeds: list[str], evals: list[str], adapters: list[str] | None = None,
         studies: list[str] | None = None) -> None:
    text = Path(readme).read_text()
    if studies:
        root = Path(readme).resolve().parent
        text = replace_section(text, "studies", studies_section([(p, json.loads(Path(p).read_text())) for p in studies],
                                                               root / "docs" / "studies", root))
    if testbeds:
        text = replace_section(text, "testbeds", testbeds_section([json.loads(Path(p).read_text()) for p in testbeds]))
    if evals:
        text = replace_section(text, "evals", evals_section([(p, json.loads(Path(p).read_text())) for p in evals]))
    if adapters:
        text = replace_section(text, "adapters", adapters_section([(p, json.loads(Path(p).read_text())) for p in adapters]))
    write_text(readme, text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", default="README.md", help="file to update (default: README.md)")
    ap.add_argument("--testbeds", nargs="*", default=[], help="testbed report.json files")
    ap.add_argument("--evals", nargs="*", default=[], help="evaluate.py result JSON files")
    ap.add_argument("--adapters", nargs="*", default=[], help="train.py metrics.json files")
    ap.add_argument("--studies", nargs="*", default=[], help="evaluate.py --study result JSON files (PNGs beside them)")
    a = ap.parse_args()
    main(a.readme, a.testbeds, a.evals, a.adapters, a.studies)
