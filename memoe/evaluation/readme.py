"""Write measured results into docs/results.md and the README's method table from result files, so no figure in
them is typed by hand.

    python -m memoe.evaluation.readme --testbeds .cache/memoe/testbeds/*/report.json --evals runs/*.json
    python -m memoe.evaluation.readme --studies runs/studies/batch-size-counterfact.json
    python -m memoe.evaluation.readme --methods runs/studies/main-counterfact.json     # the README's method table
    python -m memoe.evaluation.readme --main-job runs/memoe-adapter/metrics.json       # the README's main-job table
    python -m memoe.evaluation.readme --real-model runs/studies/main-smollm2-*.json    # the README's real-model table

Replaces the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` (testbeds, adapters, studies,
evals in ``--results``; methods in ``--readme``); a study's PNGs are copied to ``docs/studies/`` and linked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
from pathlib import Path

from memoe.editors import REGISTRY
from memoe.evaluation.harness import describe_machine
from memoe.evaluation.metrics import MetricsTable, fmt_metric
from memoe.evaluation.tables import headline, metrics_table, run_label, skipped_line, summary_table
from memoe.io import write_text

EVAL_COLUMNS = ("cf_efficacy", "cf_paraphrase", "cf_neighbourhood", "cf_score", "reliability", "generality",
                "locality", "same_subject", "fluency", "gen_efficacy", "gen_paraphrase", "gen_neighbourhood", "gen_locality",
                "cf_plus_neighbourhood", "prefixed_efficacy", "same_subject_agreement", "shared_subject_batch", "perplexity_ratio")


def testbeds_section(reports: list[dict]) -> str:
    head = ("| testbed | parameters | build (s) | recall: requests | held-out phrasing | paraphrases | neighbourhood "
            "| MLP effect, subject's last token (layer) | MLP effect, prompt's last token (layer) | storage |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in sorted(reports, key=lambda r: r["name"]):
        rec = r["recall"]
        get = lambda k, rec=rec: f"{rec[k]['recall']:.3f}" if k in rec else "–"
        mlp = r["trace"]["effects"]["mlp"]

        def peak(vals):
            i = max(range(len(vals) - 1), key=vals.__getitem__)  # the last layer reads out; see storage_site
            return f"{vals[i]:+.3f} ({i})"

        rows.append(f"| {r['name']} | {r['parameters']:,} | {r['build_seconds']:.0f} | {get('requests')} | {get('heldout')} "
                    f"| {get('paraphrases')} | {get('neighbourhood')} | {peak(mlp['subject_last'])} | {peak(mlp['prompt_last'])} "
                    f"| {r.get('storage_site', '')} |")
    return head + "\n".join(rows) + f"\n\nMeasured on {platform.machine()}, {_cores()} CPU cores; build time is pretraining only."


def _cores() -> int:
    return os.cpu_count() or 0


def evals_section(results: list[tuple[str, dict]]) -> str:
    parts = []
    for path, res in results:
        speed = "; ".join(f"{run_label(r)}: {r['edits_per_second']} edits/s, peak {r['peak_memory_mb']:.0f} MiB"
                          for r in res["runs"].values())
        g = res["options"]["grid"]
        parts.append(f"**{res['dataset']['name']}, {res['dataset']['num_edits']} edits** (`{path}`; "
                     f"modes {', '.join(g['modes'])}, batch sizes {g['batch_sizes']}; {describe_machine(res['machine'])}):"
                     f"\n\n{metrics_table(res, EVAL_COLUMNS)}\n\n{speed}. Scoring: {res['pre_scoring']['prompts_per_second']} prompts/s.")
    return "\n\n".join(parts)


def adapters_section(results: list[tuple[str, dict]]) -> str:
    """``train.py`` results (``<adapter>/metrics.json``): the base beside the adapter, gate on and off, and beside the
    editors it was compared with on the same edits."""
    parts = []
    for path, res in results:
        t = MetricsTable()
        t.add("pre-edit", res["pre"])
        for label, m in res["adapter"].items():
            t.add(f"memoe, {label}", m)
        for name, m in res.get("compared", {}).items():
            t.add(f"{name}, one batch", m)
        cols = tuple(c for c in EVAL_COLUMNS if any(m.get(c) is not None for _, m in t.rows))
        tr, model = res["train"], res["options"]["edits"].get("model") or "the knowledge testbed"
        times = "".join(f"; {name} edited in {m['seconds']:.0f} s" for name, m in res.get("compared", {}).items())
        wall = f"; the whole job {res['wall_seconds'] / 60:.1f} min" if "wall_seconds" in res else ""
        parts.append(f"**{model}, {res['dataset']['name']}, {res['dataset']['num_edits']} edits** (`{path}`):\n\n"
                     f"{t.markdown(cols)}\n\nTraining: {tr['steps']} steps in {tr['seconds']} s ({tr['edits_per_second']} "
                     f"edits/s) on {tr['devices']} device(s){times}{wall}; peak resident memory {res['peak_rss_mb']:.0f} MiB.")
    return "\n\n".join(parts)


def studies_section(results: list[tuple[str, dict]], figures: Path, readme_dir: Path) -> str:
    """Each study: what it asks, how it was run, its table (runs, winners, skips) and its plots."""
    parts = []
    for path, res in results:
        g, where = res["definition"]["grid"], describe_machine(res["machine"])
        took = sum(r.get("wall_seconds", 0) for r in res["runs"].values())
        imgs = []
        for png in sorted(Path(path).parent.glob(Path(path).stem + "-*.png")):
            figures.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, figures / png.name)
            imgs.append(f"![{png.stem}]({(figures / png.name).relative_to(readme_dir).as_posix()})")
        parts.append(f"**Study `{res['name']}`** ({res['description']}) on {res['dataset']['name']}, "
                     f"{res['dataset']['num_edits']} edits per run, editors {', '.join(g['editors'])}, modes "
                     f"{', '.join(g['modes'])}; `{path}`, {len(res['runs'])} runs in {took / 60:.1f} min of run time "
                     f"({where}):\n\n{summary_table(res)}\n\n" + "\n".join(imgs))
    return "\n\n".join(parts)


def methods_section(result: dict) -> str:
    """One row per registered method: what it does, its paper, and its headline figure from a study over every editor
    (CounterFact Score after a batch, and after all batches of the sequential-batch run)."""
    runs = list(result["runs"].values())
    sizes = sorted({r["batch_size"] for r in runs})
    head = (f"| method | what it does | paper | CF Score, batch of {sizes[-1]} | CF Score, sequential batches of {sizes[-1]} "
            f"(final) |\n|---|---|---|---|---|")
    rows = []
    for name, cls in REGISTRY.items():
        got = {r["mode"]: headline(r).get("cf_score") for r in runs if r["editor"] == name and r["batch_size"] == sizes[-1]}
        cell = lambda mode, got=got: fmt_metric(got.get(mode))
        rows.append(f"| `{name}` | {cls.summary} | {cls.paper} | {cell('batch')} | {cell('sequential-batch')} |")
    d = result["dataset"]
    return (head + "\n" + "\n".join(rows) + f"\n\nFigures: study `{result['name']}` on the {d['name']} testbed, "
            f"{d['num_edits']} edits (pre-edit CF Score {result['pre'].get('cf_score', 0):.3f}; "
            f"{describe_machine(result['machine'])}); the real model's tables are in docs/results/.")


#: Columns of the README's real-model table, per dataset: the scores the dataset's papers report (CounterFact's with
#: their magnitudes; zsRE's token accuracy), EasyEdit's locality, fluency, the generation view and the perplexity.
REAL_MODEL_COLUMNS = {
    "counterfact": ("cf_efficacy", "cf_efficacy_mag", "cf_paraphrase", "cf_paraphrase_mag", "cf_neighbourhood",
                    "cf_neighbourhood_mag", "cf_score", "locality", "fluency", "gen_efficacy", "gen_paraphrase",
                    "gen_neighbourhood", "perplexity_ratio"),
    "zsre": ("zsre_efficacy", "zsre_paraphrase", "zsre_specificity", "locality", "fluency", "gen_reliability",
             "gen_generality", "gen_locality", "perplexity_ratio"),
}


def real_model_section(results: list[tuple[str, dict]]) -> str:
    """Each study on a real model as one table: the pre-edit row, then every run right after its batches (current)
    and, for the sequential modes, after all edits (final), with its edits/s and peak memory."""
    parts = []
    for path, res in results:
        t, speed = MetricsTable(), {}
        t.add("pre-edit", res["pre"])
        for r in res["runs"].values():
            label = run_label(r)
            t.add(f"{label} (current)" if r["final"] else label, r["current"])
            if r["final"]:
                t.add(f"{label} (final)", r["final"])
            split = ", ".join(f"{k} {v:.0f} s" for k, v in (r.get("time_split") or {}).items())
            speed[label] = f"{r['edits_per_second']:.3f} edits/s, peak {r['peak_memory_mb']:.0f} MiB ({split})"
        d, g = res["dataset"], res["definition"]["grid"]
        wanted = REAL_MODEL_COLUMNS["zsre" if d["name"].startswith("zsre") else "counterfact"]
        cols = tuple(c for c in wanted if any(m.get(c) is not None for _, m in t.rows))
        missing = [k for k in res["order"] if k not in res["runs"]]
        speeds = "; ".join(f"{k}: {v}" for k, v in speed.items())
        parts.append(f"**{res['protocol']['model']}, {d['name']}, first {d['num_edits']} records** (`{path}`; editors "
                     f"{', '.join(g['editors'])}; {describe_machine(res['machine'])}):\n\n{t.markdown(cols)}\n\n"
                     f"Edits per second (edit time alone), peak memory and time split: {speeds}."
                     + (f" Not yet run: {', '.join(missing)}." if missing else "")
                     + (f" {skipped_line(res)}" if res.get("skipped") else ""))
    return "\n\n".join(parts)


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- results:{name} --> ... <!-- /results:{name} --> markers in the file")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def main(results_file: str, readme: str, testbeds: list[str], evals: list[str], adapters: list[str] | None = None,
         studies: list[str] | None = None, methods: str | None = None, evals_section_name: str = "evals",
         main_job: str | None = None, real_model: list[str] | None = None) -> None:
    load = lambda paths: [(p, json.loads(Path(p).read_text())) for p in paths]
    if testbeds or evals or adapters or studies:
        text = Path(results_file).read_text()
        if studies:
            root = Path(results_file).resolve().parent
            text = replace_section(text, "studies", studies_section(load(studies), root / "studies", root))
        if testbeds:
            text = replace_section(text, "testbeds", testbeds_section([r for _, r in load(testbeds)]))
        if evals:
            text = replace_section(text, evals_section_name, evals_section(load(evals)))
        if adapters:
            text = replace_section(text, "adapters", adapters_section(load(adapters)))
        write_text(results_file, text)
    if methods:
        write_text(readme, replace_section(Path(readme).read_text(), "methods", methods_section(json.loads(Path(methods).read_text()))))
    if main_job:
        write_text(readme, replace_section(Path(readme).read_text(), "main-job", adapters_section(load([main_job]))))
    if real_model:
        write_text(readme, replace_section(Path(readme).read_text(), "real-model", real_model_section(load(real_model))))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="docs/results.md", help="the results page to update (default: docs/results.md)")
    ap.add_argument("--readme", default="README.md", help="the README whose method table --methods updates (default: README.md)")
    ap.add_argument("--testbeds", nargs="*", default=[], help="testbed report.json files")
    ap.add_argument("--evals", nargs="*", default=[], help="evaluate.py result JSON files")
    ap.add_argument("--adapters", nargs="*", default=[], help="train.py metrics.json files")
    ap.add_argument("--studies", nargs="*", default=[], help="evaluate.py --study result JSON files (PNGs beside them)")
    ap.add_argument("--methods", help="a study result over every editor: the README's method table")
    ap.add_argument("--evals-section", default="evals", help="the marker name --evals writes between (default: evals)")
    ap.add_argument("--main-job", help="the main job's metrics.json (python train.py): the README's main-job table")
    ap.add_argument("--real-model", nargs="*", default=[], help="studies on a real model (main-smollm2): the README's main table")
    a = ap.parse_args()
    main(a.results, a.readme, a.testbeds, a.evals, a.adapters, a.studies, a.methods, a.evals_section, a.main_job, a.real_model)
