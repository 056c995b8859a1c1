"""The main job: train a MEMoE adapter on edit requests with Lightning, save it, and score it beside the base.

    python train.py                                   # 100 synthetic edits, default testbed, adapter -> runs/memoe-adapter
    python train.py --dataset counterfact --num-edits 100 --output-dir runs/cf-adapter
    python train.py --strategy ddp --devices 2 --accelerator cpu          # two processes (DDP)
    python train.py --checkpoint-dir runs/ckpt --checkpoint-every 50      # then: --resume last
    python train.py --model /path/to/Meta-Llama-3-8B --dtype bfloat16 --dataset counterfact \\
        --editor-config configs/editors/memoe-llama3-8b.yaml --precision bf16-mixed

On the first run the testbed is pretrained (a few minutes on 2 CPU cores) and cached under ``.cache/memoe``.
The adapter folder holds ``adapter_config.json`` + ``adapter_model.safetensors``: attach it to any loaded base
with ``memoe.attach(model, path)``. The table compares the base with the adapter, gate on and off.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memoe.config import ConfigError, bounds, load_config
from memoe.data import RecordError
from memoe.training import TrainerOptions


@dataclass
class TrainJob:
    """Options of ``train.py``."""

    dataset: str = "synthetic"
    """Edit dataset whose testbed (or ``model``) is edited: synthetic, counterfact, counterfact-easyedit, zsre."""
    data_path: str | None = None
    """File of the real dataset (default: ``../shared/data`` or ``$MEMOE_DATA_DIR``)."""
    num_edits: int = field(default=100, metadata=bounds(1))
    """Edits to train on (the first N records)."""
    editor_config: str | None = None
    """MEMoE editor YAML (adapter shape, training; default ``configs/editors/memoe.yaml``)."""
    testbed_config: str | None = None
    """Testbed YAML (default ``configs/testbed/<dataset>.yaml``)."""
    model: str | None = None
    """A real model to train on instead of the testbed: a preset (``smollm2-135m``), a GGUF file or a Hugging Face
    folder (e.g. Llama-3-8B). The MEMoE config then comes from ``configs/editors/<model>/memoe.yaml`` unless
    ``editor_config`` is given."""
    known_only: bool = False
    """Train only on records the unedited model knows (prefers the true target over the new one)."""
    dtype: str = field(default="float32", metadata=bounds(choices=("float32", "bfloat16", "float16")))
    """dtype of ``model``."""
    output_dir: str = "runs/memoe-adapter"
    """Where the adapter is saved (and ``metrics.json`` beside it)."""
    max_steps: int | None = field(default=None, metadata=bounds(1))
    """Override the config's maximum training steps."""
    seed: int = 0
    """Seed of training (row order, router noise)."""
    trainer: TrainerOptions = field(default_factory=lambda: TrainerOptions(logger="csv", log_dir="runs/logs"))
    """Lightning Trainer options (accelerator, devices, strategy, precision, logger, checkpoints, resume)."""
    progress: bool = True
    """Progress bars."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="synthetic (default), counterfact, counterfact-easyedit or zsre")
    p.add_argument("--data-path", help="file of the real dataset")
    p.add_argument("--num-edits", type=int, help="edits to train on (default: 100)")
    p.add_argument("--editor-config", help="MEMoE YAML (default: configs/editors/memoe.yaml)")
    p.add_argument("--testbed-config", help="testbed YAML (default: configs/testbed/<dataset>.yaml)")
    p.add_argument("--model", help="real model instead of the testbed: a preset (smollm2-135m), a .gguf file or a Hugging Face folder")
    p.add_argument("--known-only", action="store_true", default=None,
                   help="train only on records the unedited model knows (prefers the true target over the new one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of --model")
    p.add_argument("--output-dir", help="adapter folder (default: runs/memoe-adapter)")
    p.add_argument("--max-steps", type=int, help="maximum training steps (default: from the config)")
    p.add_argument("--seed", type=int, help="seed (default: 0)")
    p.add_argument("--accelerator", help="auto (the model's device), cpu, gpu")
    p.add_argument("--devices", type=int, help="devices / processes (default: 1)")
    p.add_argument("--strategy", help="auto, ddp, ddp_spawn, fsdp")
    p.add_argument("--precision", help="32-true (default), bf16-mixed, 16-mixed, bf16-true")
    p.add_argument("--logger", help="csv (default), tensorboard or none")
    p.add_argument("--log-dir", help="logger folder (default: runs/logs)")
    p.add_argument("--checkpoint-dir", help="write Lightning checkpoints (safetensors + JSON) here")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: only the last)")
    p.add_argument("--resume", help="continue from a checkpoint (.json path, or 'last' in --checkpoint-dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> TrainJob:
    trainer_keys = ("accelerator", "devices", "strategy", "precision", "logger", "log_dir", "checkpoint_dir",
                    "checkpoint_every", "resume")
    job = {k: v for k, v in vars(args).items() if k not in trainer_keys + ("no_progress",) and v is not None}
    trainer = {"logger": "csv", "log_dir": "runs/logs", **{k: getattr(args, k) for k in trainer_keys if getattr(args, k) is not None}}
    trainer["progress"] = not args.no_progress
    job["trainer"] = trainer
    job["progress"] = not args.no_progress
    return load_config(TrainJob, None, job)


def main(argv: list[str] | None = None) -> int:
    import torch

    from memoe.adapters import MEMoEAdapter
    from memoe.editors import make_editor
    from memoe.evaluation.metrics import MetricsTable, compute_metrics, raw_scores
    from memoe.io import write_json
    from memoe.pipeline import EvalConfig, editor_config_path, load_subject
    from memoe.testbed import format_report
    from memoe.training import fit_adapter

    try:
        job = setup(parse_args(argv))
        editor = make_editor("memoe", editor_config_path("memoe", {"memoe": job.editor_config} if job.editor_config else {}, job.model))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = editor.config
    cfg.train.seed = job.seed
    if job.max_steps is not None:
        cfg.train.max_steps = job.max_steps
    try:
        subject = load_subject(EvalConfig(dataset=job.dataset, data_path=job.data_path, num_edits=job.num_edits,
                                          model=job.model, dtype=job.dtype, testbed_config=job.testbed_config,
                                          progress=job.progress, known_only=job.known_only))
        model, tok, ds, tb = subject
        records = ds.records
        requests = [r.request for r in records]
        rank0 = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"  # DDP relaunches this script
        if tb is not None and rank0:
            print(format_report(tb.report))
            print(f"(cached at {tb.path})\n")
        pre = raw_scores(model, tok, records) if rank0 else None

        adapter = MEMoEAdapter.create(model, tok, cfg.adapter).attach(model)
        adapter.add_anchors(tok, [r.subject for r in requests])
        info = fit_adapter(model, tok, adapter, requests, cfg.train, job.trainer)
    except (ConfigError, FileNotFoundError, RecordError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = info["seconds"]
    trainer = info.pop("trainer")
    if not trainer.is_global_zero:
        return 0  # DDP: the other processes only train
    out = Path(job.output_dir)
    adapter.save(out)  # saved before scoring: a failure there loses no training
    table = MetricsTable()
    table.add("pre-edit", compute_metrics(pre, pre))
    runs = {}
    for gate in (True, False):
        adapter.config.gate_unanchored = gate
        runs[f"gate {'on' if gate else 'off'}"] = m = compute_metrics(raw_scores(model, tok, records), pre)
        table.add(f"memoe, gate {'on' if gate else 'off'}", m)
    adapter.config.gate_unanchored = cfg.adapter.gate_unanchored
    result = {"options": asdict(job), "editor_config": asdict(cfg),
              "dataset": {"name": ds.name, "num_edits": len(records), "selection": ds.meta.get("selection")},
              "train": {**info, "seconds": round(seconds, 2), "edits_per_second": round(len(records) / seconds, 3),
                        "devices": trainer.num_devices, "strategy": type(trainer.strategy).__name__},
              "pre": compute_metrics(pre, pre), "adapter": runs, "peak_rss_mb": _peak_rss_mb(),
              "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    write_json(out / "metrics.json", result)
    print(table.markdown())
    print(f"\ntrained {len(records)} edits in {seconds:.1f} s ({result['train']['edits_per_second']} edits/s, "
          f"{info['steps']} steps, {trainer.num_devices} device(s)); adapter saved to {out}")
    return 0


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    sys.exit(main())
