"""The main job: train a MEMoE adapter on edit requests with Lightning, save it, attach it to a freshly loaded base
and score it beside the unedited model and beside MEMIT on the same edits.

    python train.py                                   # SmolLM2-135M, 100 real CounterFact edits (shipped), adapter -> runs/memoe-adapter
    python train.py --model testbed --dataset synthetic   # the synthetic knowledge testbed (built on first use)
    python train.py --model testbed --dataset counterfact --num-edits 100 --output-dir runs/cf-adapter
    python train.py --strategy ddp --devices 2 --accelerator cpu          # two processes (DDP)
    python train.py --checkpoint-dir runs/ckpt --checkpoint-every 50      # then: --resume last
    python train.py --align --model smollm2-135m      # LTE's alignment phase: the LoRA the lte editor uses
    python train.py --model /path/to/Meta-Llama-3-8B --dtype bfloat16 --dataset counterfact \\
        --editor-config configs/editors/memoe-llama3-8b.yaml --precision bf16-mixed

On the first run the model is converted from its GGUF file (a testbed: pretrained, a few minutes on 2 CPU cores)
and cached under ``.cache/memoe``, as are MEMIT's covariance statistics. The adapter folder holds
``adapter_config.json`` + ``adapter_model.safetensors``: attach it to any loaded base with ``memoe.attach(model,
path)``. The table compares the base, the adapter (gate on and off) and the ``--compare`` editors (teacher-forced
CounterFact metrics and the stress set: CounterFact+, prefixed efficacy, same-subject agreement; evaluate.py gives the
full protocol).
Every option is documented in docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memoe.adapters.bypass import detach
from memoe.cli import add_options, overrides, run_cli
from memoe.config import bounds, from_dict
from memoe.data import load_edit_dataset
from memoe.editors import attach, make_editor
from memoe.errors import ConfigError
from memoe.evaluation.generation import greedy_answers
from memoe.evaluation.metrics import MetricsTable, ScoreOptions, compute_metrics, raw_scores
from memoe.experiment import EditTarget, Job, load_subject
from memoe.io import write_json
from memoe.models import load_model
from memoe.testbed import format_report
from memoe.training import TrainerOptions
from memoe.training.alignment import AlignConfig, alignment_rows, fit_alignment, save_alignment


@dataclass
class TrainJob(Job):
    """Options of ``train.py``: the edits (as for ``evaluate.py``), the MEMoE config and the Lightning Trainer."""

    edits: EditTarget = field(default_factory=lambda: EditTarget(dataset="counterfact-sample", model="smollm2-135m"))
    """What is edited (default: SmolLM2-135M-Instruct, the first 100 of the CounterFact records memoe ships)."""
    editor_config: str | None = None
    """MEMoE editor YAML (adapter shape, training; default: the shipped memoe config for the model)."""
    output_dir: str = "runs/memoe-adapter"
    """Where the adapter is saved (and ``metrics.json`` beside it)."""
    max_steps: int | None = field(default=None, metadata=bounds(1))
    """Override the config's maximum training steps."""
    trainer: TrainerOptions = field(default_factory=lambda: TrainerOptions(logger="csv", log_dir="runs/logs"))
    """Lightning Trainer options (accelerator, devices, strategy, precision, logger, checkpoints, resume)."""
    compare: list[str] = field(default_factory=lambda: ["memit"])
    """Editors applied to the same edits as one batch (their shipped config for the model), each scored beside the
    adapter and then undone; ``none``: no comparison."""
    align: bool = False
    """Run LTE's alignment phase instead: train the LoRA that the ``lte`` editor attaches (``--align-*`` options)."""
    align_options: AlignConfig = field(default_factory=AlignConfig, metadata={"cli_prefix": "align-"})
    """LTE's alignment phase: its data sources, row mix, LoRA shape and training."""


def parser() -> tuple[argparse.ArgumentParser, list]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return p, add_options(p, TrainJob, "the job")


def run(argv: list[str] | None = None) -> int:
    p, opts = parser()
    job = from_dict(TrainJob, overrides(p.parse_args(argv), opts))
    job.trainer.progress = job.progress
    if job.align:
        return align(job)
    editor = make_editor("memoe", job.editor_config, {"train": {"seed": job.edits.seed, "max_steps": job.max_steps}},
                         job.edits.config_key())
    editor.config.trainer = job.trainer
    compare = [] if job.compare == ["none"] else job.compare
    comparisons = [make_editor(name, None, None, job.edits.config_key()) for name in compare]  # config errors first
    t_start = time.perf_counter()
    subject = load_subject(job.edits, job.progress)
    model, tok, ds, tb = subject.model, subject.tok, subject.dataset, subject.testbed
    records = ds.records
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"  # DDP relaunches this script
    if tb is not None and rank0:
        print(format_report(tb.report))
        print(f"(cached at {tb.path})\n")
    if rank0:
        print(f"{len(records)} edits from {ds.name} ({ds.source}) on {job.edits.model or 'the testbed'}; scoring the "
              "unedited model ...", flush=True)
    scoring = ScoreOptions(fluency_prompts=0, generation=False, stress=True, perplexity_texts=0)  # + same-subject, CF+
    pre = raw_scores(model, tok, records, scoring) if rank0 else None

    info = editor.apply(model, tok, [r.request for r in records]).info
    if not info["global_zero"]:
        return 0  # DDP: the other processes only train
    out = Path(job.output_dir)
    editor.adapter(model).save(out)  # saved before scoring: a failure there loses no training
    detach(model)  # the trained model is the base again
    # The saved adapter on a freshly loaded base: what a user who ships the adapter gets.
    e = job.edits  # the model alone: the records are already loaded
    fresh = load_model(e.model, e.dtype, e.device)[0] if e.model else model
    adapter = attach(fresh, out)
    table = MetricsTable()
    table.add("pre-edit", compute_metrics(pre, pre))
    runs = {}
    gate = adapter.config.gate_unanchored
    for on in (True, False):
        adapter.config.gate_unanchored = on
        runs[f"gate {'on' if on else 'off'}"] = m = compute_metrics(raw_scores(fresh, tok, records, scoring), pre)
        table.add(f"memoe, gate {'on' if on else 'off'}", m)
    adapter.config.gate_unanchored = gate
    adapter.detach()
    compared = {}
    for other in comparisons:
        print(f"{other.name} on the same {len(records)} edits (one batch) ...", flush=True)
        result = other.apply(fresh, tok, [r.request for r in records])
        compared[other.name] = m = {**compute_metrics(raw_scores(fresh, tok, records, scoring), pre), "seconds": round(result.seconds, 2),
                                    "time_split": result.info.get("time_split")}
        result.restore()
        table.add(f"{other.name} (one batch, {result.seconds:.0f} s)", m)
    seconds = info["seconds"]
    result = {"options": asdict(job), "editor_config": asdict(editor.config),
              "dataset": {"name": ds.name, "num_edits": len(records), "selection": ds.meta.get("selection")},
              "train": {**{k: v for k, v in info.items() if k != "global_zero"}, "seconds": round(seconds, 2),
                        "edits_per_second": round(len(records) / seconds, 3)},
              "pre": compute_metrics(pre, pre), "adapter": runs, "compared": compared, "peak_rss_mb": _peak_rss_mb(),
              "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
              "wall_seconds": round(time.perf_counter() - t_start, 1)}
    write_json(out / "metrics.json", result)
    print(table.markdown())
    print(f"\ntrained {len(records)} edits in {seconds:.1f} s ({result['train']['edits_per_second']} edits/s, "
          f"{info['steps']} steps, {info['devices']} device(s)); adapter saved to {out}; "
          f"{result['wall_seconds']:.0f} s in all")
    return 0


def source_records(spec: str) -> list:
    """The records of one ``dataset:start:stop`` alignment source."""
    try:
        name, start, stop = spec.rsplit(":", 2)
        start, stop = int(start), int(stop)
    except ValueError:
        raise ConfigError(f"--align-source {spec!r}: expected dataset:start:stop, e.g. counterfact-easyedit:1000:1400") from None
    if not 0 <= start < stop:
        raise ConfigError(f"--align-source {spec!r}: need 0 <= start < stop")
    return load_edit_dataset(name, limit=stop, bad_records="skip").records[start:stop]


def align(job: TrainJob) -> int:
    """LTE's alignment phase on the job's model: build the parallel dataset, train the LoRA, save it."""
    cfg = job.align_options
    subject = load_subject(job.edits, job.progress)
    model, tok = subject.model, subject.tok
    records = [r for spec in cfg.sources for r in source_records(spec)]
    print(f"alignment data: {len(records)} records from {', '.join(cfg.sources)}; answering out-of-scope and plain "
          "queries with the unedited model ...", flush=True)
    rows = alignment_rows(records, cfg, lambda qs: greedy_answers(model, tok, qs, cfg.answer_tokens))
    info = fit_alignment(model, tok, rows, cfg, job.trainer)
    if not info["global_zero"]:
        return 0
    out = Path(cfg.output_dir)
    save_alignment(model, cfg, out)
    write_json(out / "alignment.json", {"options": asdict(job), "train": info, "peak_rss_mb": _peak_rss_mb()})
    print(f"aligned on {info['rows']} rows {info['rows_by_kind']} in {info['seconds']:.1f} s ({info['steps']} steps; loss "
          f"{info['first_loss']:.3f} -> {info['last_loss']:.3f}); LoRA saved to {out}: set `lora: {out}` in the lte "
          "editor's config")
    return 0


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> int:
    """The command line; a mistake in the input prints one line and returns 2 (:func:`memoe.cli.run_cli`)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
