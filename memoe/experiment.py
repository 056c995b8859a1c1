"""One experiment, one runner: what is edited, the grid of runs, how they are scored.

An :class:`Experiment` says *what is edited* (:class:`EditTarget`: a testbed or a real model, the dataset, the first
N records), *the grid* (:class:`Grid`: editors x modes x batch sizes, optionally x edit layers) and *the scoring*
(:class:`~memoe.evaluation.harness.ScoreOptions`). ``evaluate.py`` runs one from its command line, a study is one
read from ``configs/studies/<name>.yaml``, and ``train.py`` shares :class:`EditTarget`. :func:`run_experiment`
runs it: every run over the same edits, the result file written after every run (atomically), so a study resumed
with ``resume=True`` picks up after its last completed run; an evaluation is the same thing without resume.
Each run is seeded the same way whether or not it was resumed, so a resumed study equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memoe.config import bounds, from_dict, load_config, merge, read_yaml
from memoe.data import EditDataset, load_edit_dataset
from memoe.editors import editor_class, make_editor
from memoe.errors import ConfigError, DataError
from memoe.evaluation.generation import PROTOCOL as GENERATION_PROTOCOL
from memoe.evaluation.harness import MODES, ScoreOptions, get_mode, machine_info, pre_scores, run_mode
from memoe.evaluation.known import select_known
from memoe.evaluation.metrics import PERPLEXITY_TOKENS, PREFIX, compute_metrics
from memoe.evaluation.plots import plot_experiment
from memoe.evaluation.tables import result_markdown, run_label
from memoe.io import write_json, write_text
from memoe.models import load_model, model_key
from memoe.models.loading import resolve_source
from memoe.resources import editor_config_path, shipped, study_path, testbed_config_path
from memoe.testbed import Testbed, TestbedConfig, build_testbed
from memoe.testbed.build import make_corpus

DATASETS = ("synthetic", "counterfact", "counterfact-easyedit", "zsre", "counterfact-sample")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EditTarget:
    """What is edited: a model (the dataset's knowledge testbed, or a real model) and the first N records of a dataset."""

    dataset: str = field(default="synthetic", metadata=bounds(choices=DATASETS))
    """Edit dataset: synthetic, counterfact, counterfact-easyedit, zsre, or counterfact-sample (CounterFact's first 200
    records, shipped with memoe: no ``../shared`` needed)."""
    data_path: str | None = None
    """File of the real dataset (default: ``../shared/data`` or ``$MEMOE_DATA_DIR``)."""
    num_edits: int = field(default=100, metadata=bounds(1, 100_000))
    """How many edits: the first N records (of those the model knows, with ``known_only``)."""
    model: str | None = None
    """A real model to edit instead of the testbed: a preset (``smollm2-135m``), a GGUF file or a Hugging Face folder
    (e.g. Llama-3-8B); editor configs then come from ``configs/editors/<model>/``. A memoe testbed folder is edited
    on the records it learned; ``testbed`` (or none) is the dataset's knowledge testbed, built on first use."""
    known_only: bool = False
    """Keep only records whose unedited model prefers the true target over the new one (teacher-forced mean NLL,
    CounterFact's definition), the first ``num_edits`` such; the result says how many were tried. Off by default,
    so numbers stay comparable with the papers."""
    testbed_config: str | None = None
    """Testbed YAML to build or load (default: ``configs/testbed/<dataset>.yaml``)."""
    dtype: str = field(default="float32", metadata=bounds(choices=DTYPES))
    """dtype of ``model``."""
    device: str | None = None
    """Device of ``model`` (default: cuda if available); the testbed runs where it is built (CPU) unless set."""
    bad_records: str = field(default="skip", metadata=bounds(choices=("error", "skip")))
    """Bad records in a real dataset: stop with an error, or leave them out with a warning."""
    seed: int = 0
    """Seed of the synthetic world, of torch before each run, and of training."""

    def __post_init__(self) -> None:
        if self.model == "testbed":
            self.model = None

    def is_testbed(self) -> bool:
        return self.model is None or (Path(self.model).expanduser() / "testbed.json").is_file()

    def config_key(self) -> str | None:
        """Where its editor configs are filed: None for a testbed (``configs/editors/``), else the model's key."""
        return None if self.is_testbed() else model_key(self.model)


@dataclass
class Grid:
    """The runs: every editor x mode x batch size (x edit layer), each over the same edits."""

    editors: list[str] = field(default_factory=lambda: ["ft"], metadata=bounds(nonempty=True))
    """Registered editor names, each run with its shipped config for the model unless ``editor_configs`` names one."""
    modes: list[str] = field(default_factory=lambda: ["sequential-batch"], metadata=bounds(choices=tuple(MODES), nonempty=True))
    """Editing modes: single, batch, sequential, sequential-batch."""
    batch_sizes: list[int] = field(default_factory=lambda: [10], metadata=bounds(1, nonempty=True))
    """Batch sizes of the batch modes (single and sequential use 1); a size above ``num_edits`` runs as one batch of all."""
    mode_batch_sizes: dict[str, list[int]] = field(default_factory=dict)
    """Mode -> its own batch sizes instead of ``batch_sizes`` (e.g. batch at 100, sequential-batch at 10). YAML only."""
    editor_batch_sizes: dict[str, list[int]] = field(default_factory=dict)
    """Editor name -> its own batch sizes instead of ``batch_sizes`` or ``mode_batch_sizes`` (e.g. ROME only at 1).
    YAML only."""
    skip: dict[str, str] = field(default_factory=dict, metadata={"cli": False})
    """Run (``"<editor> <mode> b=<B>"``) -> why it is left out; listed with the skipped runs. YAML only."""
    layers: list[int] | None = None
    """Layer sweep: run the grid once per layer, each editor editing that one layer only."""
    checkpoint_every: int | None = field(default=None, metadata=bounds(1))
    """Sequential modes: re-score every edit applied so far after each K edits (forgetting curves)."""
    editor_configs: dict[str, str] = field(default_factory=dict)
    """Editor name -> YAML config instead of its shipped one (command line: ``--editor-config NAME=PATH``)."""
    editor_overrides: dict[str, dict] = field(default_factory=dict)
    """Editor name -> config keys set on top of its YAML (e.g. fewer training steps). YAML only."""


@dataclass
class Job:
    """What every job that edits a model declares: the edits and whether to show progress bars."""

    edits: EditTarget = field(default_factory=EditTarget)
    """What is edited."""
    progress: bool = True
    """Show progress bars."""


@dataclass
class Experiment(Job):
    """An evaluation or a study: the edits, the grid of runs, the scoring, where the result goes."""

    name: str = "eval"
    """Name, in titles and the default output of a study (``runs/studies/<name>-<dataset>.json``)."""
    description: str = ""
    """What the experiment asks (printed above its table)."""
    grid: Grid = field(default_factory=Grid)
    """The runs."""
    scoring: ScoreOptions = field(default_factory=ScoreOptions, metadata={"cli_prefix": "score-"})
    """How every run is scored."""
    output: str = "runs/eval.json"
    """Result JSON; its tables (``.md``) and plots (``<stem>-*.png``) go beside it."""
    plot: bool = False
    """Draw metrics against batch size, layer or number of edits (PNG)."""


# -- loading ------------------------------------------------------------------------------------------------

def load_experiment(path: str | None = None, overrides: dict | None = None, study: bool = False) -> Experiment:
    """An experiment from a YAML file (a study name or path with ``study=True``) with ``overrides`` on top.

    A study writes to ``runs/studies/<name>-<dataset>.json`` unless it says otherwise; paths in a shipped study
    (``configs/testbed/...``) resolve to the shipped files wherever memoe is installed."""
    source = study_path(path) if study and path else path
    data = read_yaml(source) if source else {}
    if study and "output" not in data and "output" not in (overrides or {}):
        dataset = merge(data.get("edits") or {}, (overrides or {}).get("edits") or {}).get("dataset", EditTarget.dataset)
        data["output"] = f"runs/studies/{data.get('name', 'study')}-{dataset}.json"
    try:
        exp = from_dict(Experiment, merge(data, overrides or {}))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    if exp.edits.testbed_config:
        exp.edits.testbed_config = str(shipped(exp.edits.testbed_config))
    for e in exp.grid.editors:
        editor_class(e)  # an unknown name fails here, before anything runs
    return exp


# -- the subject: model, tokenizer, records -------------------------------------------------------------------

@dataclass
class Subject:
    """What an experiment edits, loaded: the model, its tokenizer, the records, and the testbed if it is one."""

    model: torch.nn.Module
    tok: object
    dataset: EditDataset
    testbed: Testbed | None = None

    def describe(self, target: EditTarget) -> dict:
        """The result file's account of what was edited."""
        tb, ds = self.testbed, self.dataset
        return {
            "model": target.model or (str(tb.path) if tb else None),
            "testbed": {k: tb.report.get(k) for k in ("name", "parameters", "build_seconds", "recall", "storage_site")} if tb else None,
            "dataset": {"name": ds.name, "source": ds.source, "num_edits": len(ds.records),
                        "selection": ds.meta.get("selection", {"rule": "none (first records)"})},
        }


def first_records(ds: EditDataset, n: int) -> EditDataset:
    """The first ``n`` records of a testbed's dataset, which must have them."""
    if n > len(ds):
        raise DataError(f"--num-edits {n} exceeds the {len(ds)} records the testbed knows")
    return EditDataset(ds.name, ds.records[:n], ds.source, ds.meta)


def known_records(model, tok, ds: EditDataset, n: int, batch_size: int = 64) -> EditDataset:
    """The first ``n`` records of ``ds`` that the model knows (``prefers_true``); ``meta["selection"]`` says how
    many were tried and kept."""
    kept, info = select_known(model, tok, ds.records, n, "prefers_true", batch_size)
    print(f"--known-only: kept {info['kept']} of the first {info['tried']} records (the unedited model prefers the "
          "true target over the new one)", flush=True)
    return EditDataset(ds.name, kept, ds.source, {**ds.meta, "selection": info}, ds.skipped)


def _testbed_dataset(target: EditTarget, meta: Path) -> EditDataset:
    """The dataset a testbed folder was trained on (its ``testbed.json``)."""
    try:
        saved = json.loads(meta.read_text())["config"]
        tb = from_dict(TestbedConfig, {**saved, **({"data_path": target.data_path} if target.data_path else {})})
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise ConfigError(f"{meta}: not a memoe testbed description ({e})") from None
    if tb.dataset != target.dataset:
        raise ConfigError(f"--model {target.model} is a testbed of dataset {tb.dataset!r}, not {target.dataset!r}")
    return make_corpus(tb, target.bad_records)[0]


def load_subject(target: EditTarget, progress: bool = True, score_batch_size: int = 64) -> Subject:
    """Load (or build) the model and pick the records: the first ``num_edits``, or of those it knows."""
    pick = lambda model, tok, ds: (known_records(model, tok, ds, target.num_edits, score_batch_size) if target.known_only
                                   else first_records(ds, target.num_edits))
    if target.model and target.is_testbed():  # a memoe testbed folder: edit the facts it learned
        model, tok = load_model(target.model, target.dtype, target.device)
        return Subject(model, tok, pick(model, tok, _testbed_dataset(target, Path(target.model).expanduser() / "testbed.json")))
    if target.model:
        model, tok = load_model(target.model, target.dtype, target.device)
        ds = load_edit_dataset(target.dataset, target.data_path, limit=None if target.known_only else target.num_edits,
                               bad_records=target.bad_records, seed=target.seed)
        if len(ds) < target.num_edits and not target.known_only:
            raise DataError(f"--num-edits {target.num_edits} exceeds the {len(ds)} usable records of {ds.source}")
        ds = pick(model, tok, ds)
        if len(ds) < target.num_edits:
            raise DataError(f"--num-edits {target.num_edits} exceeds the {len(ds)} usable records of {ds.source} that the model knows")
        return Subject(model, tok, ds)
    path = target.testbed_config or testbed_config_path(target.dataset)
    tb_cfg = load_config(TestbedConfig, path, {"data_path": target.data_path} if target.data_path else None)
    if tb_cfg.dataset != target.dataset:
        raise ConfigError(f"testbed config {path} is for dataset {tb_cfg.dataset!r}, not {target.dataset!r}")
    tb = build_testbed(tb_cfg, progress=progress, verbose=False, bad_records=target.bad_records)
    ds = pick(tb.model, tb.tokenizer, tb.dataset)
    if target.device:
        tb.model.to(target.device)
    return Subject(tb.model, tb.tokenizer, ds, tb)


# -- the grid -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    editor: str
    mode: str
    batch_size: int
    layer: int | None = None

    @property
    def key(self) -> str:
        return run_label(dataclasses.asdict(self))


def plan(exp: Experiment) -> tuple[list[RunSpec], list[dict]]:
    """The runs in order, and the skipped combinations (their fields and ``reason``). A batch never holds more
    than the N edits there are: a larger size runs as one batch of N, once."""
    g, n = exp.grid, exp.edits.num_edits
    runs, skipped = [], []
    for layer in g.layers if g.layers is not None else [None]:
        for editor in g.editors:
            for mode in g.modes:
                m = get_mode(mode)
                seen = set()  # runs and skips of this editor and mode so far
                for requested in g.editor_batch_sizes.get(editor, g.mode_batch_sizes.get(mode, g.batch_sizes)):
                    spec = RunSpec(editor, mode, m.batch_size(min(requested, n)), layer)
                    asked = RunSpec(editor, mode, m.batch_size(requested), layer)
                    if asked in seen:
                        continue
                    reason = (g.skip.get(asked.key) or g.skip.get(spec.key)
                              or (f"batch size above the {n} edits" if spec in seen else None)
                              or (f"{editor} has no sequential modes" if not m.restores and not editor_class(editor).supports_sequential else None))
                    if reason:
                        skipped.append({**dataclasses.asdict(asked), "reason": reason})
                    else:
                        runs.append(spec)
                    seen.update((spec, asked))
    return runs, skipped


def config_contents(exp: Experiment) -> dict:
    """What the YAML files an experiment reads say now (editor configs, the testbed config): a result file stores it,
    so a study whose files changed since is never resumed with runs made under the old settings."""
    key = exp.edits.config_key()
    contents = {}
    for e in exp.grid.editors:
        path = exp.grid.editor_configs.get(e) or editor_config_path(e, key)
        contents[f"editor {e}"] = read_yaml(path) if path else {}
    if exp.edits.model is None:
        contents["testbed"] = read_yaml(exp.edits.testbed_config or testbed_config_path(exp.edits.dataset))
    return contents


def definition(exp: Experiment) -> dict:
    """Everything that decides what the runs are: a result file is resumed only when this matches."""
    d = dataclasses.asdict(exp)
    for k in ("progress", "output", "plot", "description"):
        d.pop(k)
    d["edits"].pop("device")
    return {**d, "config_contents": config_contents(exp)}


#: Grid fields that only choose which runs exist: a study resumed with other values keeps the runs still planned.
SELECTION_FIELDS = ("editors", "modes", "batch_sizes", "mode_batch_sizes", "editor_batch_sizes", "skip")


def _editor_settings(d: dict, editor: str) -> list:
    """What decides one editor's runs in a stored definition: its YAML's contents, config path and overrides."""
    g = d.get("grid") or {}
    return [(d.get("config_contents") or {}).get(f"editor {editor}"), (g.get("editor_configs") or {}).get(editor),
            (g.get("editor_overrides") or {}).get(editor)]


def _resume(out: Path, exp: Experiment, planned: set[str], log=print) -> dict:
    """Completed runs of an earlier attempt of the same experiment at ``out`` (empty when there is none), of those
    whose keys are ``planned`` now.

    The same experiment: the same edits, scoring and testbed config, and the same grid but for the fields that only
    choose which runs exist (``SELECTION_FIELDS``). A run is kept while it is still planned and its editor's
    settings (YAML contents, config path, overrides) are what they were then, so editors, modes and batch sizes can
    be added to a study, and one editor retuned, without redoing the other runs."""
    if not out.exists():
        return {}
    try:
        old = json.loads(out.read_text())
        old_def, runs = old["definition"], old["runs"]
        if not isinstance(runs, dict):
            raise TypeError("runs is not a mapping")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{out} is not a memoe result file ({e}); move it away or pass --restart") from None
    new_def = json.loads(json.dumps(definition(exp)))  # tuples -> lists, as stored
    per_editor = SELECTION_FIELDS + ("editor_configs", "editor_overrides")
    shared = lambda d: {**d, "grid": {k: v for k, v in (d.get("grid") or {}).items() if k not in per_editor},
                        "config_contents": {k: v for k, v in (d.get("config_contents") or {}).items() if not k.startswith("editor ")}}
    old_shared, new_shared = shared(old_def), shared(new_def)
    for k in new_shared:
        if old_shared.get(k) != new_shared[k]:
            raise ConfigError(f"{out} holds a different experiment ({k!r}: {old_shared.get(k)!r} there, {new_shared[k]!r} now); "
                              "pass --restart to start over or choose another output")
    changed = {e for e in exp.grid.editors if _editor_settings(old_def, e) != _editor_settings(new_def, e)}
    for e in sorted(changed & {r.get("editor") for r in runs.values()}):
        log(f"{out}: the settings of {e} changed since its runs were made; they run again")
    return {k: r for k, r in runs.items() if k in planned and r.get("editor") not in changed}


# -- the runner -----------------------------------------------------------------------------------------------

def run_experiment(exp: Experiment, resume: bool = False, subject: Subject | None = None, log=print) -> dict:
    """Run every run of the grid (with ``resume``, those an earlier attempt at the same output did not finish);
    write the result JSON after every run, then its Markdown and plots; return the result dict.

    Every editor and its config are checked before any work, so a typo fails in a second, not after the model loaded.
    ``subject``: what :func:`load_subject` returned, when the caller already loaded it.
    """
    out = Path(exp.output)
    if exp.edits.model and subject is None:
        resolve_source(exp.edits.model)  # a missing model file or package is named before anything else
    specs, skipped = plan(exp)
    key = exp.edits.config_key()
    editors = {}  # (name, layer) -> editor, made once: a layer sweep's editors differ only in their layer

    def editor_for(spec: RunSpec):
        if (spec.editor, spec.layer) not in editors:
            over = dict(exp.grid.editor_overrides.get(spec.editor) or {})
            if spec.layer is not None:
                over = merge(over, editor_class(spec.editor).layer_override([spec.layer]))
            editors[spec.editor, spec.layer] = make_editor(spec.editor, exp.grid.editor_configs.get(spec.editor), over, key)
        return editors[spec.editor, spec.layer]

    for spec in specs:  # every editor and its config checked (and made once) before the model loads
        editor_for(spec)
    done = _resume(out, exp, {s.key for s in specs}, log) if resume else {}
    if done:
        log(f"resuming {out}: {sum(s.key in done for s in specs)} of {len(specs)} runs already done")
    subject = subject or load_subject(exp.edits, exp.progress, exp.scoring.batch_size)
    model, tok, records = subject.model, subject.tok, subject.dataset.records
    t0 = time.perf_counter()
    pre = pre_scores(model, tok, records, exp.scoring)
    pre_seconds = time.perf_counter() - t0
    result = {
        "name": exp.name, "description": exp.description, "definition": definition(exp), "options": dataclasses.asdict(exp),
        **subject.describe(exp.edits),
        "pre": compute_metrics(pre, pre),
        "pre_scoring": {"prompts": pre.prompts_scored, "seconds": round(pre_seconds, 3),
                        "prompts_per_second": round(pre.prompts_scored / pre_seconds, 1)},
        "machine": machine_info(next(model.parameters()).device),
        "protocol": protocol(exp, subject),
        "runs": dict(done), "skipped": skipped, "order": [s.key for s in specs], "complete": False,
    }
    write_json(out, result)
    t_start = time.perf_counter()
    for i, spec in enumerate(specs):
        if spec.key in result["runs"]:
            continue
        torch.manual_seed(exp.edits.seed)  # the same seed per run: a resumed study equals an uninterrupted one
        if len(specs) > 1:
            log(f"[{i + 1}/{len(specs)}] {spec.key}")
        t0 = time.perf_counter()
        r = run_mode(editor_for(spec), model, tok, records, spec.mode, spec.batch_size, pre=pre, score=exp.scoring,
                     progress=exp.progress, label=spec.key, checkpoint_every=exp.grid.checkpoint_every)
        r.layer = spec.layer
        result["runs"][spec.key] = {**r.to_dict(), "wall_seconds": round(time.perf_counter() - t0, 2)}
        write_json(out, result)  # after every run: the resume point
    result["complete"] = True
    result["seconds_this_session"] = round(time.perf_counter() - t_start, 1)
    result["runs"] = {k: result["runs"][k] for k in result["order"]}
    write_json(out, result)
    result["markdown"], result["plots"] = render(result, out, exp.plot)
    return result


def protocol(exp: Experiment, subject: Subject) -> dict:
    """How the numbers were made, stated in every result file and table."""
    s = exp.scoring
    return {
        "model": exp.edits.model or "memoe knowledge testbed", "chat_template": None,
        "records": subject.dataset.meta.get("selection", {"rule": "none (first records)"}),
        "teacher_forced": "P(x) = exp(-mean token NLL of the whole target); CounterFact scores compare P(new) with P(true); "
                          "EasyEdit locality compares argmax tokens with the unedited model's",
        "generation": {**GENERATION_PROTOCOL, "max_new_tokens": s.gen_max_new_tokens} if s.generation else None,
        "stress": {"cf_plus_neighbourhood": "the edit's sentence (request prompt + new target) before each neighbourhood prompt",
                   "prefixed_efficacy": f"the request prompt after {PREFIX!r}",
                   "same_subject_agreement": "next-token argmax after the subject asked about other relations equals the "
                                             "unedited model's"} if s.stress else None,
        "perplexity": f"{s.perplexity_texts} held-out Wikipedia paragraphs (gensim's sample), {PERPLEXITY_TOKENS} tokens each"
                      if s.perplexity_texts else None,
        "scored": "current: each batch right after it is applied; final: every edit after the last batch (sequential modes)"
                  + (f"; every {exp.grid.checkpoint_every} edits (checkpoints)" if exp.grid.checkpoint_every else ""),
    }


def render(result: dict, out: str | Path, plot: bool = True) -> tuple[str, list[str]]:
    """Write a result's Markdown (and with ``plot`` its PNGs) beside ``out``; return (Markdown, PNG paths)."""
    md = result_markdown(result)
    write_text(Path(out).with_suffix(".md"), md + "\n")
    return md, plot_experiment(result, out) if plot else []


__all__ = ["DATASETS", "EditTarget", "Experiment", "Grid", "Job", "RunSpec", "Subject", "first_records", "known_records",
           "load_experiment", "load_subject", "plan", "render", "run_experiment"]


if __name__ == "__main__":  # python -m memoe.experiment RESULT.json: redraw the tables and plots only
    import sys

    for arg in sys.argv[1:]:
        print(render(json.loads(Path(arg).read_text()), arg)[1])
