"""Comparison studies: a grid of editor x mode x batch size (x edit layer) runs over the same edits, one JSON.

A study is a YAML file in ``configs/studies/`` (or any path) read into :class:`StudyConfig`:

- ``batch-size``: batch and sequential-batch editing at batch sizes 1 ... 1,024, every editor;
- ``layers``: single-layer editing at each layer (``layers: [0, 1, ...]``);
- ``lifelong``: sequential-batch editing scored every ``checkpoint_every`` edits (forgetting curves).

:func:`run_study` writes the result file after *every* run (atomically: temp file, then rename), so an
interrupted study (Ctrl-C, crash, killed job) resumes from its last completed run when started again with
the same definition and output; a run is never redone and the file is never half written. Each run is
seeded the same way whether or not the study was interrupted, so a resumed study equals an uninterrupted one.
Batch sizes larger than the number of edits are skipped (and listed as such): one batch of all edits is
already the run at batch size N.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memoe.config import ConfigError, bounds, load_config, merge, read_yaml
from memoe.editors import editor_class, make_editor
from memoe.evaluation.harness import MODES, RESTORING, ScoreOptions, machine_info, pre_scores, run_mode
from memoe.evaluation.metrics import compute_metrics
from memoe.io import write_json, write_text
from memoe.pipeline import CONFIG_DIR, DATASETS, EvalConfig, editor_config_path, load_subject, testbed_config_path

STUDY_DIR = CONFIG_DIR / "studies"
#: Columns of the study table and the metrics the plots show.
TABLE_METRICS = ("cf_efficacy", "cf_paraphrase", "cf_neighbourhood", "cf_score", "reliability", "generality", "locality")
#: Fields of the definition that decide what the runs are; a result file is resumed only when they match.
_DEFINING = ("dataset", "data_path", "testbed_config", "model", "known_only", "num_edits", "editors", "modes", "batch_sizes",
             "editor_batch_sizes", "skip", "layers", "checkpoint_every", "editor_configs", "editor_overrides", "seed", "fluency_prompts")


@dataclass
class StudyConfig:
    """One study: every combination of ``editors`` x ``modes`` x ``batch_sizes`` (x ``layers``)."""

    name: str = "study"
    """Name, used in the default output path and in titles."""
    description: str = ""
    """What the study asks (printed above its table)."""
    dataset: str = field(default="counterfact", metadata=bounds(choices=DATASETS))
    """Edit dataset (its testbed is built on first use unless ``model`` is given)."""
    data_path: str | None = None
    """File of the real dataset (default: the shared data directory)."""
    testbed_config: str | None = None
    """Testbed YAML (default: ``configs/testbed/<dataset>.yaml``)."""
    model: str | None = None
    """A real model to edit instead of the testbed: a preset (``smollm2-135m``), a GGUF file or a Hugging Face folder."""
    known_only: bool = False
    """Keep only records the unedited model knows (prefers the true target over the new one), the first ``num_edits``."""
    dtype: str = field(default="float32", metadata=bounds(choices=("float32", "bfloat16", "float16")))
    """dtype of ``model``."""
    device: str | None = None
    """Device of ``model`` (default: cuda if available)."""
    num_edits: int = field(default=64, metadata=bounds(1))
    """Edits per run: the first N records, the same for every run."""
    editors: list[str] = field(default_factory=lambda: ["memit"])
    """Registered editor names."""
    modes: list[str] = field(default_factory=lambda: ["batch", "sequential-batch"], metadata=bounds(choices=MODES))
    """Editing modes (single and sequential always use batch size 1)."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64, 256, 1024], metadata=bounds(1))
    """Batch sizes of the batch modes; sizes above ``num_edits`` are skipped."""
    editor_batch_sizes: dict = field(default_factory=dict)
    """Editor name -> its own batch sizes instead of ``batch_sizes`` (e.g. ROME, which applies a batch as
    consecutive single edits, only at 1)."""
    skip: dict = field(default_factory=dict)
    """Run key (``"<editor> <mode> b=<B>"``) -> why it is left out; listed with the skipped runs."""
    layers: list[int] | None = None
    """Layer sweep: run every combination once per layer, each editor editing that one layer only."""
    checkpoint_every: int | None = field(default=None, metadata=bounds(1))
    """Non-restoring modes: re-score all edits applied so far every K edits (forgetting curves)."""
    editor_configs: dict = field(default_factory=dict)
    """Editor name -> YAML config (default: ``configs/editors/<name>.yaml``)."""
    editor_overrides: dict = field(default_factory=dict)
    """Editor name -> config keys set on top of its YAML for this study (e.g. fewer training steps)."""
    seed: int = 0
    """Seed for torch before each run."""
    output: str | None = None
    """Result JSON (default: ``runs/studies/<name>-<dataset>.json``); table (.md) and PNGs go beside it."""
    score_batch_size: int = field(default=64, metadata=bounds(1))
    """Prompts per scoring forward pass."""
    fluency_prompts: int = field(default=0, metadata=bounds(0))
    """Generation prompts per record for the fluency metric (0: off, the default for speed)."""
    progress: bool = True
    """Show progress bars."""


def study_path(name: str) -> Path:
    """A study name (``configs/studies/<name>.yaml``) or a YAML path -> the file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    p = STUDY_DIR / f"{name}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in STUDY_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no study named {name!r}; known studies: {known} (or give a YAML path)")
    return p


def load_study(name: str, overrides: dict | None = None) -> StudyConfig:
    cfg = load_config(StudyConfig, study_path(name), overrides)
    for e in cfg.editors:
        editor_class(e)  # unknown names fail here, before anything runs
    cfg.output = str(output_path(cfg))
    if cfg.testbed_config and not Path(cfg.testbed_config).exists() and (CONFIG_DIR.parent / cfg.testbed_config).exists():
        cfg.testbed_config = str(CONFIG_DIR.parent / cfg.testbed_config)  # relative to the repository, as shipped
    return cfg


def output_path(cfg: StudyConfig) -> Path:
    """The result file: ``output``, else ``runs/studies/<name>-<dataset>.json``."""
    return Path(cfg.output or f"runs/studies/{cfg.name}-{cfg.dataset}.json")


@dataclass(frozen=True)
class RunSpec:
    editor: str
    mode: str
    batch_size: int
    layer: int | None = None

    @property
    def key(self) -> str:
        return f"{self.editor} {self.mode} b={self.batch_size}" + ("" if self.layer is None else f" layer={self.layer}")


def plan(cfg: StudyConfig) -> tuple[list[RunSpec], dict[str, str]]:
    """The runs of a study in order, and the skipped combinations with the reason."""
    runs, skipped = [], {}
    for layer in cfg.layers if cfg.layers is not None else [None]:
        for editor in cfg.editors:
            for mode in cfg.modes:
                sizes = cfg.editor_batch_sizes.get(editor, cfg.batch_sizes) if mode in ("batch", "sequential-batch") else [1]
                for b in dict.fromkeys(sizes):
                    spec = RunSpec(editor, mode, b, layer)
                    if spec.key in cfg.skip:
                        skipped[spec.key] = cfg.skip[spec.key]
                    elif b > cfg.num_edits:
                        skipped[spec.key] = f"batch size above the {cfg.num_edits} edits"
                    elif not RESTORING[mode] and not editor_class(editor).supports_sequential:
                        skipped[spec.key] = f"{editor} has no sequential modes"
                    else:
                        runs.append(spec)
    return runs, skipped


def config_contents(cfg: StudyConfig) -> dict:
    """What the YAML files a study reads say now (editor configs, the testbed config): a result file stores it, so
    a study whose files changed since is never resumed with runs made under the old settings."""
    contents = {f"editor {e}": read_yaml(p) if (p := editor_config_path(e, cfg.editor_configs, cfg.model)) else {}
                for e in cfg.editors}
    if cfg.model is None:
        contents["testbed"] = read_yaml(cfg.testbed_config or testbed_config_path(cfg.dataset))
    return contents


def definition(cfg: StudyConfig) -> dict:
    return {**{k: getattr(cfg, k) for k in _DEFINING}, "config_contents": config_contents(cfg)}


def _resume(out: Path, cfg: StudyConfig, restart: bool) -> dict:
    """Completed runs from an earlier attempt of the same study at ``out`` (empty when starting afresh)."""
    if restart or not out.exists():
        return {}
    try:
        old = json.loads(out.read_text())
        old_def, runs = old["definition"], old["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{out} is not a study result file ({e}); move it away or pass --restart") from None
    new_def = json.loads(json.dumps(definition(cfg)))  # tuples -> lists, as stored
    for k in new_def:
        if old_def.get(k) != new_def[k]:
            raise ConfigError(f"{out} holds a different study ({k!r}: {old_def.get(k)!r} there, {new_def[k]!r} now); "
                              "pass --restart to start over or choose another output")
    return runs


def run_study(cfg: StudyConfig, restart: bool = False, subject: tuple | None = None, log=print) -> dict:
    """Run (or resume) every run of the study; write JSON, Markdown and PNGs; return the result dict."""
    out = output_path(cfg)
    specs, skipped = plan(cfg)
    done = _resume(out, cfg, restart)
    if done:
        log(f"resuming {out}: {sum(s.key in done for s in specs)} of {len(specs)} runs already done")
    eval_cfg = EvalConfig(dataset=cfg.dataset, data_path=cfg.data_path, testbed_config=cfg.testbed_config, model=cfg.model,
                          dtype=cfg.dtype, device=cfg.device, num_edits=cfg.num_edits, seed=cfg.seed, progress=cfg.progress,
                          known_only=cfg.known_only, score_batch_size=cfg.score_batch_size)
    model, tok, ds, tb = subject or load_subject(eval_cfg)
    records = ds.records
    score = ScoreOptions(cfg.score_batch_size, cfg.fluency_prompts)
    pre = pre_scores(model, tok, records, score)
    result = {
        "study": cfg.name, "description": cfg.description, "definition": definition(cfg),
        "machine": machine_info(next(model.parameters()).device),
        "model": cfg.model or (str(tb.path) if tb else None),
        "testbed": {k: tb.report.get(k) for k in ("name", "parameters", "storage_site")} if tb else None,
        "dataset": {"name": ds.name, "source": ds.source, "num_edits": len(records),
                    "selection": ds.meta.get("selection", {"rule": "none (first records)"})},
        "pre": compute_metrics(pre, pre), "runs": dict(done), "skipped": skipped,
        "order": [s.key for s in specs], "complete": False,
    }
    write_json(out, result)
    t_start = time.perf_counter()
    for i, spec in enumerate(specs):
        if spec.key in result["runs"]:
            continue
        over = dict(cfg.editor_overrides.get(spec.editor) or {})
        if spec.layer is not None:
            over = merge(over, editor_class(spec.editor).layer_override([spec.layer]))
        editor = make_editor(spec.editor, editor_config_path(spec.editor, cfg.editor_configs, cfg.model), over)
        torch.manual_seed(cfg.seed)  # the same seed per run: a resumed study equals an uninterrupted one
        log(f"[{i + 1}/{len(specs)}] {spec.key}")
        t0 = time.perf_counter()
        r = run_mode(editor, model, tok, records, spec.mode, spec.batch_size, pre=pre, score=score, progress=cfg.progress,
                     label=spec.key, checkpoint_every=cfg.checkpoint_every).to_dict()
        r.update(layer=spec.layer, wall_seconds=round(time.perf_counter() - t0, 2))
        result["runs"][spec.key] = r
        write_json(out, result)  # after every run: the resume point
    result["complete"] = True
    result["seconds_this_session"] = round(time.perf_counter() - t_start, 1)
    result["runs"] = {k: result["runs"][k] for k in result["order"]}
    write_json(out, result)
    result["markdown"], result["plots"] = render(result, out)
    return result


def render(result: dict, out: str | Path) -> tuple[str, list[str]]:
    """Write the study's Markdown table and PNGs beside ``out``; return (table, PNG paths)."""
    from memoe.evaluation.plots import plot_study

    md = study_markdown(result)
    write_text(Path(out).with_suffix(".md"), md + "\n")
    return md, plot_study(result, out)


def headline(run: dict) -> dict:
    """The metrics a run is judged by: after all edits (``final``) where the mode keeps them, else ``current``."""
    return run["final"] or run["current"]


def winners(result: dict, metrics: tuple[str, ...] = TABLE_METRICS) -> dict[str, tuple[str, float]]:
    """Metric -> (run key, value) of the best run (on the headline metrics)."""
    best = {}
    for m in metrics:
        vals = [(k, headline(r).get(m)) for k, r in result["runs"].items() if headline(r).get(m) is not None]
        if vals:
            best[m] = max(vals, key=lambda kv: kv[1])
    return best


def study_markdown(result: dict) -> str:
    """The study table: one row per run, headline metrics, speed and memory; then the winners and skips."""
    runs = result["runs"]
    cols = [m for m in TABLE_METRICS if any(headline(r).get(m) is not None for r in runs.values())]
    has_layer = any(r.get("layer") is not None for r in runs.values())
    head = (["editor", "mode", "batch"] + (["layer"] if has_layer else []) + cols +
            ["edits/s", "peak MiB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pre = result["pre"]
    lines.append("| pre-edit | – | – |" + (" – |" if has_layer else "") + "".join(f" {pre.get(m):.3f} |" if pre.get(m) is not None else " – |" for m in cols) + " – | – |")
    for r in runs.values():
        h = headline(r)
        cells = [r["editor"], r["mode"], str(r["batch_size"])] + ([str(r.get("layer"))] if has_layer else [])
        cells += [f"{h[m]:.3f}" if h.get(m) is not None else "–" for m in cols]
        cells += [f"{r['edits_per_second']:.3f}", f"{r['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    text += ("\n\nMetrics after all edits are in (`final`) for the sequential modes; right after each batch "
             "(`current`) for the restoring modes.")
    best = winners(result, tuple(cols))
    if best:
        text += "\n\nBest run per metric: " + "; ".join(f"{m} — {k} ({v:.3f})" for m, (k, v) in best.items()) + "."
    if result.get("skipped"):
        by_reason: dict[str, list[str]] = {}
        for key, why in result["skipped"].items():
            by_reason.setdefault(why, []).append(key)
        text += "\n\nSkipped: " + "; ".join(f"{_compact(keys)} ({why})" for why, keys in by_reason.items()) + "."
    return text


def _compact(keys: list[str]) -> str:
    """Run keys, with the batch sizes of one reason folded when it covers every editor and mode alike."""
    sizes = sorted({int(k.split("b=")[1].split()[0]) for k in keys})
    runs = {k.split(" b=")[0] for k in keys}
    if len(keys) == len(sizes) * len(runs) and len(sizes) > 1:
        return f"batch sizes {', '.join(map(str, sizes))} for {', '.join(sorted(runs))}"
    return ", ".join(keys)


__all__ = ["RunSpec", "StudyConfig", "headline", "load_study", "plan", "render", "run_study", "study_markdown", "winners"]


if __name__ == "__main__":  # python -m memoe.evaluation.study RESULT.json: redraw the table and plots only
    import sys

    for arg in sys.argv[1:]:
        print(render(json.loads(Path(arg).read_text()), arg)[1])
