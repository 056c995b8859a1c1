"""From options to results: pick the model (a testbed or a local checkpoint), the edits, the editors, run
every mode and write JSON + Markdown (+ PNG plots). ``evaluate.py`` and ``train.py`` are thin shells on this.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memoe.config import ConfigError, bounds, load_config
from memoe.data import EditDataset, load_edit_dataset
from memoe.editors import make_editor
from memoe.evaluation.harness import MODES, ScoreOptions, machine_info, pre_scores, run_mode
from memoe.evaluation.known import select_known
from memoe.evaluation.metrics import MetricsTable, compute_metrics
from memoe.io import write_json, write_text
from memoe.models import load_model, model_key
from memoe.models.loading import resolve_source

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DATASETS = ("synthetic", "counterfact", "counterfact-easyedit", "zsre")


@dataclass
class EvalConfig:
    """Options of ``evaluate.py`` (also readable from a YAML file with ``--config``)."""

    editors: list[str] = field(default_factory=lambda: ["ft"])
    """Registered editor names to run, each over the same edits and modes."""
    dataset: str = "synthetic"
    """Edit dataset: synthetic, counterfact, counterfact-easyedit or zsre."""
    data_path: str | None = None
    """File of the real dataset (default: the shared data directory)."""
    num_edits: int = field(default=100, metadata=bounds(1, 100_000))
    """How many edits (the first N records)."""
    modes: list[str] = field(default_factory=lambda: ["sequential-batch"], metadata=bounds(choices=MODES))
    """Editing modes to run."""
    batch_sizes: list[int] = field(default_factory=lambda: [10], metadata=bounds(1, 100_000))
    """Batch sizes for the batch modes (single/sequential always use 1)."""
    seed: int = 0
    """Seed for torch before each run (and the synthetic world)."""
    output: str = "runs/eval.json"
    """Result JSON; the Markdown table goes beside it (``.md``) and plots to ``<stem>-*.png``."""
    plot: bool = False
    """Draw metrics against batch size (several batch sizes) or number of edits (PNG)."""
    model: str | None = None
    """A real model to edit instead of the testbed: a preset (``smollm2-135m``), a GGUF file, or a Hugging Face folder
    (e.g. Llama-3-8B); a memoe testbed folder is edited on the records it learned. Editor configs come from
    ``configs/editors/<model>/`` (see :func:`editor_config_path`)."""
    known_only: bool = False
    """Keep only records whose unedited model prefers the true target over the new one (teacher-forced mean NLL,
    CounterFact's definition), the first ``num_edits`` such; the result file says how many were tried. Off by
    default, so numbers stay comparable with the papers."""
    dtype: str = field(default="float32", metadata=bounds(choices=("float32", "bfloat16", "float16")))
    """dtype of a loaded checkpoint."""
    device: str | None = None
    """Device of a loaded checkpoint (default: cuda if available); the testbed runs where it is built (CPU) unless set."""
    testbed_config: str | None = None
    """YAML of the testbed to build/load (default: ``configs/testbed/<dataset>.yaml``)."""
    editor_configs: dict = field(default_factory=dict)
    """Editor name -> YAML config (default: ``configs/editors/<name>.yaml`` if it exists)."""
    bad_records: str = field(default="skip", metadata=bounds(choices=("error", "skip")))
    """Bad records in a real dataset: stop with an error, or leave them out with a warning."""
    score_batch_size: int = field(default=64, metadata=bounds(1))
    """Prompts per scoring forward pass."""
    fluency_prompts: int = field(default=1, metadata=bounds(0))
    """Generation prompts per record for the fluency metric (0: off)."""
    progress: bool = True
    """Show progress bars."""


def testbed_config_path(dataset: str) -> Path:
    return CONFIG_DIR / "testbed" / f"{dataset}.yaml"


def editor_config_path(name: str, overrides: dict, model: str | None = None) -> str | None:
    """The YAML an editor runs with: ``--editor-config`` first; on a real model (not a testbed) the one made for it,
    ``configs/editors/<model key>/<name>.yaml`` (an error saying where to add it when there is none); on the
    testbed ``configs/editors/<name>.yaml``."""
    if name in overrides:
        return overrides[name]
    if model is not None and not (Path(model).expanduser() / "testbed.json").is_file():
        key = model_key(model)
        p = CONFIG_DIR / "editors" / key / f"{name}.yaml"
        if not p.exists():
            made = sorted(d.name for d in (CONFIG_DIR / "editors").iterdir() if d.is_dir() and (d / f"{name}.yaml").exists())
            raise ConfigError(f"no {name!r} config for model {key!r}: add {p.relative_to(CONFIG_DIR.parent)} (start from "
                              f"configs/editors/{name}.yaml and the model's causal trace) or pass --editor-config "
                              f"{name}=PATH" + (f"; models with one: {', '.join(made)}" if made else ""))
        return str(p)
    p = CONFIG_DIR / "editors" / f"{name}.yaml"
    return str(p) if p.exists() else None


def testbed_records(cfg: EvalConfig, meta: Path) -> EditDataset:
    """The first ``cfg.num_edits`` records of the dataset a testbed was trained on (its ``testbed.json``)."""
    from memoe.config import from_dict
    from memoe.testbed import TestbedConfig
    from memoe.testbed.build import make_corpus

    try:
        saved = json.loads(meta.read_text())["config"]
        tb = from_dict(TestbedConfig, {**saved, **({"data_path": cfg.data_path} if cfg.data_path else {})})
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise ValueError(f"{meta}: not a memoe testbed description ({e})") from None
    if tb.dataset != cfg.dataset:
        raise ValueError(f"--model {cfg.model} is a testbed of dataset {tb.dataset!r}, not {cfg.dataset!r}")
    return first_records(make_corpus(tb, cfg.bad_records)[0], cfg.num_edits)


def first_records(ds: EditDataset, n: int) -> EditDataset:
    """The first ``n`` records of a testbed's dataset, which must have them."""
    if n > len(ds):
        raise ValueError(f"--num-edits {n} exceeds the {len(ds)} records the testbed knows")
    return EditDataset(ds.name, ds.records[:n], ds.source, ds.meta)


def known_records(model, tok, ds: EditDataset, n: int, batch_size: int = 64) -> EditDataset:
    """The first ``n`` records of ``ds`` that the model knows (``prefers_true``); ``meta["selection"]`` says how
    many were tried and kept."""
    kept, info = select_known(model, tok, ds.records, n, "prefers_true", batch_size)
    print(f"--known-only: kept {info['kept']} of the first {info['tried']} records (the unedited model prefers the "
          "true target over the new one)", flush=True)
    return EditDataset(ds.name, kept, ds.source, {**ds.meta, "selection": info}, ds.skipped)


def load_subject(cfg: EvalConfig):
    """(model, tokenizer, edit dataset, testbed or None) for the options."""
    if cfg.model:
        model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
        meta = Path(cfg.model).expanduser() / "testbed.json"
        if meta.is_file():  # a memoe testbed: edit the facts it learned (a synthetic world depends on its size)
            ds = testbed_records(cfg, meta)
            return model, tok, (known_records(model, tok, ds, cfg.num_edits) if cfg.known_only else ds), None
        limit = None if cfg.known_only else cfg.num_edits
        ds = load_edit_dataset(cfg.dataset, cfg.data_path, limit=limit, bad_records=cfg.bad_records, seed=cfg.seed)
        if cfg.known_only:
            ds = known_records(model, tok, ds, cfg.num_edits, cfg.score_batch_size)
        if len(ds) < cfg.num_edits:
            raise ValueError(f"--num-edits {cfg.num_edits} exceeds the {len(ds)} usable records of {ds.source}"
                             + (" that the model knows" if cfg.known_only else ""))
        return model, tok, ds, None
    from memoe.testbed import TestbedConfig, build_testbed

    path = cfg.testbed_config or testbed_config_path(cfg.dataset)
    tb_cfg = load_config(TestbedConfig, path, {"data_path": cfg.data_path} if cfg.data_path else None)
    if tb_cfg.dataset != cfg.dataset:
        raise ValueError(f"testbed config {path} is for dataset {tb_cfg.dataset!r}, not {cfg.dataset!r}")
    tb = build_testbed(tb_cfg, progress=cfg.progress, verbose=False, bad_records=cfg.bad_records)  # callers print the report card if they want it
    if cfg.known_only:
        ds = known_records(tb.model, tb.tokenizer, tb.dataset, cfg.num_edits, cfg.score_batch_size)
    else:
        ds = first_records(tb.dataset, cfg.num_edits)
    if cfg.device:
        tb.model.to(cfg.device)
    return tb.model, tb.tokenizer, ds, tb


def run_evaluation(cfg: EvalConfig, subject: tuple | None = None) -> dict:
    """Run every editor x mode x batch size; write JSON and Markdown (and plots); return the result dict.

    Every editor and its config are checked before any work, and the result file is written after every run
    (``complete: false`` until the last), so a failure late in a long evaluation loses nothing finished.
    ``subject`` is what :func:`load_subject` returned, when the caller already loaded it.
    """
    if cfg.model and subject is None:
        resolve_source(cfg.model)  # a missing model file or package is named before anything else
    editors = {name: make_editor(name, editor_config_path(name, cfg.editor_configs, cfg.model)) for name in cfg.editors}
    model, tok, ds, tb = subject or load_subject(cfg)
    records = ds.records
    score = ScoreOptions(cfg.score_batch_size, cfg.fluency_prompts)
    t0 = time.perf_counter()
    pre = pre_scores(model, tok, records, score)
    pre_seconds = time.perf_counter() - t0
    runs = []
    table = MetricsTable()
    table.add("pre-edit", compute_metrics(pre, pre))
    out = Path(cfg.output)
    result = {
        "options": asdict(cfg),
        "model": cfg.model or (str(tb.path) if tb else None),
        "testbed": {k: tb.report.get(k) for k in ("name", "parameters", "build_seconds", "recall", "storage_site")} if tb else None,
        "dataset": {"name": ds.name, "source": ds.source, "num_edits": len(records),
                    "selection": ds.meta.get("selection", {"rule": "none (first records)"})},
        "pre": compute_metrics(pre, pre),
        "pre_scoring": {"prompts": pre.prompts_scored, "seconds": round(pre_seconds, 3),
                        "prompts_per_second": round(pre.prompts_scored / pre_seconds, 1)},
        "machine": machine_info(next(model.parameters()).device),
        "runs": runs,
        "complete": False,
    }
    for name, editor in editors.items():
        for mode in cfg.modes:
            # A batch never holds more than the edits there are: label it by what it is.
            sizes = dict.fromkeys(min(b, len(records)) for b in cfg.batch_sizes) if mode in ("batch", "sequential-batch") else [1]
            for b in sizes:
                torch.manual_seed(cfg.seed)
                r = run_mode(editor, model, tok, records, mode, b, pre=pre, score=score, progress=cfg.progress,
                             label=f"{name} {mode} b={b}")
                runs.append(r.to_dict())
                table.add(f"{name} {mode} b={b} (current)", r.current)
                if r.final:
                    table.add(f"{name} {mode} b={b} (final)", r.final)
                write_json(out, result)  # after every run
    result["complete"] = True
    write_json(out, result)
    md = table.markdown()
    write_text(out.with_suffix(".md"), md + "\n")
    result["markdown"] = md
    if cfg.plot:
        from memoe.evaluation.plots import plot_runs

        result["plots"] = plot_runs(runs, out)
    return result
