"""Measure editors: every editor over the same edits in every requested mode, with the paper metrics.

    python evaluate.py --editor ft --dataset counterfact --num-edits 100 --mode sequential-batch --batch-size 10
    python evaluate.py --trace --dataset synthetic          # causal trace of the model: where facts live
    python evaluate.py --study batch-size --dataset counterfact   # a comparison study (configs/studies/)
    python evaluate.py --locate kn --model smollm2-135m --dataset counterfact   # knowledge neurons per layer

Writes ``--output`` (JSON: per run the pre-edit, current and final metrics, edit time, edits per second, peak
memory, scoring throughput; per batch its time, efficacy and the editor's own figures; the machine) and a Markdown
table beside it; ``--plot`` adds PNG figures. Without ``--model`` the editors run on the knowledge testbed of the
dataset (built on first use, then cached). Every option is documented in docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from memoe.cli import add_options, overrides, run_cli
from memoe.config import bounds, from_dict
from memoe.data import load_edit_dataset
from memoe.data.loaders import DEFAULT_FILES, default_data_dir
from memoe.errors import ConfigError, DataError
from memoe.evaluation.known import select_known
from memoe.experiment import Experiment, load_experiment, load_subject, run_experiment
from memoe.io import write_json
from memoe.locate import KNOptions, answer_token, knowledge_neurons, plot_neurons, summarise
from memoe.models import load_model
from memoe.models.arch import model_parts
from memoe.trace import causal_trace, plot_trace


@dataclass
class TraceOptions:
    """The causal trace of ``--trace`` (ROME's protocol)."""

    facts: int = field(default=50, metadata=bounds(1))
    """Known facts averaged."""
    known: str = field(default="greedy", metadata=bounds(choices=("greedy", "prefers_true", "all")))
    """Which facts count as known: the greedy next token is the true target's first (ROME), P(true) > P(new), or all."""
    samples: int = field(default=2, metadata=bounds(1))
    """Noise samples per fact (ROME: 10)."""
    window: int = field(default=10, metadata=bounds(1))
    """Layers restored together for MLP and attention (ROME: 10)."""


@dataclass
class LocateOptions(KNOptions):
    """The knowledge neurons of ``--locate kn`` (Dai et al. 2022): per known fact, integrated gradients over its
    prompt and paraphrases, refined."""

    facts: int = field(default=20, metadata=bounds(1))
    """Known facts located."""
    known: str = field(default="greedy", metadata=bounds(choices=("greedy", "prefers_true", "all")))
    """Which facts count as known (as ``--trace-known``)."""
    paraphrases: int = field(default=2, metadata=bounds(0))
    """Paraphrase prompts of each record that vote beside its prompt in the refinement (the paper uses several)."""
    trace: str | None = None
    """A causal-trace JSON of the same model (``--trace``'s output), drawn beside the neurons in the figure."""


@dataclass
class Command:
    """What ``evaluate.py`` does with the experiment."""

    config: str | None = None
    """YAML of an experiment (the options below, nested as in configs/studies/); the command line goes on top."""
    study: str | None = None
    """Run a study: a name in configs/studies/ (batch-size, layers, lifelong, ...) or a YAML path. Running the same
    command again resumes an interrupted study."""
    restart: bool = False
    """With --study: discard an earlier result file and start over."""
    trace: bool = False
    """Run a causal trace of the model instead of editing (writes <output stem>-trace.json and .png)."""
    trace_options: TraceOptions = field(default_factory=TraceOptions, metadata={"cli_prefix": "trace-"})
    """The trace's settings."""
    locate: str | None = field(default=None, metadata=bounds(choices=("kn",)))
    """Locate facts instead of editing: ``kn``, each known fact's knowledge neurons by integrated gradients (writes
    <output stem>-locate-kn.json and .png)."""
    locate_options: LocateOptions = field(default_factory=LocateOptions, metadata={"cli_prefix": "locate-"})
    """The locator's settings."""


def parser() -> tuple[argparse.ArgumentParser, list, list]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return p, add_options(p, Command, "what to do"), add_options(p, Experiment, "the experiment")


def trace_pool(exp: Experiment):
    """(model, tokenizer, candidate records) for --trace: every record of the dataset (the testbed's, or the real
    file's); for CounterFact on a real model also EasyEdit's 2,000-record file when it lies in the data folder,
    since a small model knows few facts well enough to trace."""
    target = exp.edits
    if target.is_testbed():
        s = load_subject(target, exp.progress, exp.scoring.batch_size)
        return s.model, s.tok, (s.testbed.dataset.records if s.testbed else s.dataset.records)
    model, tok = load_model(target.model, target.dtype, target.device)
    records = load_edit_dataset(target.dataset, target.data_path, bad_records=target.bad_records, seed=target.seed).records
    extra = default_data_dir() / DEFAULT_FILES["counterfact-easyedit"]
    if target.dataset == "counterfact" and not target.data_path and extra.is_file():
        records = records + load_edit_dataset("counterfact-easyedit", str(extra), bad_records="skip").records
    return model, tok, records


def known_facts(exp: Experiment, known: str, n: int, what: str):
    """(model, tokenizer, the first ``n`` facts the model knows under rule ``known``, how they were chosen)."""
    model, tok, pool = trace_pool(exp)
    t0 = time.perf_counter()
    pool = [r for r in pool if r.request.target_true]
    if known == "all":
        facts, selection = pool[:n], {"rule": "all", "tried": min(len(pool), n)}
        selection["kept"] = len(facts)
    else:
        facts, selection = select_known(model, tok, pool, n, known, exp.scoring.batch_size)
    selection["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{what}: {selection['kept']} known facts ({selection['rule']}) among the first {selection['tried']} candidate "
          f"records ({selection['seconds']} s)", flush=True)
    if not facts:
        raise DataError(f"no fact among {selection['tried']} records is known to the model under rule {known!r}; "
                        "try prefers_true or all")
    return model, tok, facts, selection


def trace_main(exp: Experiment, opts: TraceOptions) -> None:
    model, tok, facts, selection = known_facts(exp, opts.known, opts.facts, "trace")
    t0 = time.perf_counter()
    result = causal_trace(model, tok, [(r.request.prompt, r.request.subject, r.request.target_true) for r in facts],
                          samples=opts.samples, window=opts.window, progress=exp.progress, seed=exp.edits.seed)
    result.selection = selection
    result.settings["seconds"] = round(time.perf_counter() - t0, 1)
    result.settings["model"] = exp.edits.model or "testbed"
    out = Path(exp.output).with_name(Path(exp.output).stem + "-trace")
    write_json(out.with_suffix(".json"), result.to_dict())
    plot_trace(result, str(out.with_suffix(".png")), title=f"causal trace, {exp.edits.model or 'testbed'}, {exp.edits.dataset}")
    print(f"p clean {result.p_clean:.3f}, corrupted {result.p_corrupt:.3f} over {result.n_facts} facts "
          f"({result.settings['seconds']} s)")
    for kind in result.effects:
        for pos, vals in result.effects[kind].items():
            print(f"{kind:<6} {pos:<14} " + " ".join("  nan " if v != v else f"{v:+.3f}" for v in vals))
    for kind in result.effects:
        print(f"peak {kind}: {result.peak(kind)}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def locate_main(exp: Experiment, opts: LocateOptions) -> None:
    model, tok, facts, selection = known_facts(exp, opts.known, opts.facts, "knowledge neurons")
    trace = None
    if opts.trace:
        try:
            trace = json.loads(Path(opts.trace).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--locate-trace {opts.trace}: not a readable trace JSON ({e})") from None
    L = model_parts(model).num_layers
    t0 = time.perf_counter()
    found = []
    for r in tqdm(facts, desc="knowledge neurons", unit="fact", disable=not exp.progress):
        prompts = [r.request.text] + list(r.paraphrase_prompts[: opts.paraphrases])
        found.append(knowledge_neurons(model, tok, prompts, answer_token(tok, r.request.target_true), None, opts))
    seconds = round(time.perf_counter() - t0, 1)
    summary = summarise(found, L)
    result = {"model": exp.edits.model or "testbed", "dataset": exp.edits.dataset, "settings": asdict(opts),
              "selection": selection, "seconds": seconds, **summary,
              "trace_peaks": {k: trace[k] for k in ("peak_mlp", "peak_hidden") if k in trace} if trace else None,
              "facts_found": [{"prompt": r.request.text, "target": r.request.target_true, **asdict(f)}
                              for r, f in zip(facts, found)]}
    out = Path(exp.output).with_name(Path(exp.output).stem + "-locate-kn")
    write_json(out.with_suffix(".json"), result)
    plot_neurons(summary, str(out.with_suffix(".png")), f"knowledge neurons, {result['model']}, {exp.edits.dataset}", trace)
    print(f"{summary['neurons']} neurons over {summary['facts']} facts ({summary['neurons_per_fact']:.1f} a fact, "
          f"{summary['facts_without_neurons']} with none) in {seconds} s")
    print("per layer: " + " ".join(f"{l}:{n}" for l, n in enumerate(summary["per_layer"]) if n))
    mean = "n/a" if summary["mean_layer"] is None else f"{summary['mean_layer']:.1f}"
    print(f"most neurons at layer {summary['peak_layer']}, mean layer {mean}"
          + (f"; causal trace MLP peak: layer {trace['peak_mlp']['layer']} ({trace['peak_mlp']['position']})" if trace else ""))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def run(argv: list[str] | None = None) -> int:
    p, cmd_opts, exp_opts = parser()
    ns = p.parse_args(argv)
    cmd = from_dict(Command, overrides(ns, cmd_opts))
    if cmd.config and cmd.study:
        raise ConfigError("give --config or --study, not both (a study is an experiment YAML that resumes)")
    exp = load_experiment(cmd.study or cmd.config, overrides(ns, exp_opts), study=cmd.study is not None)
    if cmd.trace and cmd.locate:
        raise ConfigError("give --trace or --locate, not both")
    if cmd.trace:
        trace_main(exp, cmd.trace_options)
        return 0
    if cmd.locate:
        locate_main(exp, cmd.locate_options)
        return 0
    try:
        result = run_experiment(exp, resume=cmd.study is not None and not cmd.restart)
    except KeyboardInterrupt:
        if cmd.study:
            print(f"\ninterrupted: completed runs are kept in {exp.output}; run the same command again to resume", file=sys.stderr)
            return 130
        raise
    if result["testbed"]:
        t = result["testbed"]
        print(f"testbed {t['name']}: {t['parameters']:,} parameters, recall "
              + ", ".join(f"{k} {v['recall']:.3f}" for k, v in t["recall"].items()) + f"; knowledge at the {t['storage_site']}")
    print(result["markdown"])
    print(f"\nscoring: {result['pre_scoring']['prompts_per_second']} prompts/s (pre-edit pass)")
    for key, r in result["runs"].items():
        print(f"{key}: {r['edits_per_second']} edits/s, peak memory {r['peak_memory_mb']} MiB, "
              f"{r['scoring']['prompts_per_second']} prompts/s scored")
    print(f"wrote {exp.output}, {Path(exp.output).with_suffix('.md')}" + "".join(f", {q}" for q in result["plots"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; a mistake in the input prints one line and returns 2 (:func:`memoe.cli.run_cli`)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
