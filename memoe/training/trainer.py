"""Running the Lightning Trainer for a bypass adapter: options, pickle-free checkpoints, the stop rule.

:func:`fit_adapter` is the one entry point: the ``memoe`` editor calls it for every batch of edits and
``train.py`` calls it with the user's Trainer options (accelerator, devices, strategy, precision, steps,
checkpoints, resume, logger).

Checkpoints are written by :class:`SafetensorsCheckpointIO`: every tensor of Lightning's checkpoint dict
(adapter weights, optimizer moments) goes to ``<name>.safetensors`` and the rest (loop counters, callback
states, hyper-parameters) to ``<name>.json``; never pickle. Both are written atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from memoe.config import bounds
from memoe.contexts import PrefixMemo
from memoe.errors import CacheError, MissingFileError
from memoe.io import load_tensors, save_tensors, write_json
from memoe.training.data import EditDataModule
from memoe.training.module import AdapterTrainingModule, TrainConfig


@dataclass
class TrainerOptions:
    """Lightning Trainer options exposed to users (``train.py``) and to the editors' configs."""

    accelerator: str = field(default="auto", metadata=bounds(choices=("auto", "cpu", "gpu", "cuda", "mps")))
    """Where to train; ``auto``: the device the base model is on."""
    devices: int = field(default=1, metadata=bounds(1))
    """Processes/devices (with ``strategy: ddp``, one process each; on CPU, 2 processes on 2 cores work)."""
    strategy: str = field(default="auto", metadata=bounds(choices=("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed")))
    """Distribution strategy; ``ddp`` finds unused experts (top-k routing leaves some idle in a step)."""
    precision: str = field(default="32-true", metadata=bounds(choices=("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")))
    """Lightning precision; the base keeps its own dtype, the adapter computes in float32 unless ``*-true``."""
    logger: str = field(default="none", metadata=bounds(choices=("none", "csv", "tensorboard")))
    """Training log writer (``csv`` is always available)."""
    log_dir: str = "runs/logs"
    """Folder of the logger's files."""
    checkpoint_dir: str | None = None
    """Folder for checkpoints (``last.json``/``last.safetensors``, and every ``checkpoint_every`` steps); null: none."""
    checkpoint_every: int = field(default=0, metadata=bounds(0))
    """Steps between checkpoints (0: only the last one, at the end)."""
    resume: str | None = None
    """Checkpoint to continue from (path to a ``.json`` checkpoint written here, or ``last``)."""
    progress: bool = field(default=False, metadata={"cli": False})
    """Show Lightning's progress bar (``train.py`` sets it from its own ``--no-progress``)."""


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoints as safetensors (tensors) + JSON (everything else)."""

    @staticmethod
    def _split(obj: Any, tensors: dict, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            if not all(isinstance(k, (str, int)) for k in obj):
                raise TypeError(f"checkpoint key types at {path!r} are not JSON-able: {list(obj)[:3]}")
            return {"__dict__": [[k, SafetensorsCheckpointIO._split(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"__list__": [SafetensorsCheckpointIO._split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if hasattr(obj, "__dataclass_fields__") or hasattr(obj, "items"):
            return SafetensorsCheckpointIO._split(dict(obj.items()) if hasattr(obj, "items") else vars(obj), tensors, path)
        return {"__repr__": repr(obj)}  # e.g. a Namespace in hparams: kept readable, not restorable

    @staticmethod
    def _join(obj: Any, tensors: dict) -> Any:
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__dict__" in obj:
                return {k: SafetensorsCheckpointIO._join(v, tensors) for k, v in obj["__dict__"]}
            if "__list__" in obj:
                return [SafetensorsCheckpointIO._join(v, tensors) for v in obj["__list__"]]
            return obj.get("__repr__", obj)
        return obj

    @staticmethod
    def _paths(path) -> tuple[Path, Path]:
        p = Path(path)
        stem = p.with_suffix("") if p.suffix in (".ckpt", ".json", ".safetensors") else p
        return stem.with_suffix(".json"), stem.with_suffix(".safetensors")

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        tree = self._split(checkpoint, tensors, "ckpt")
        j, s = self._paths(path)
        save_tensors(s, tensors)
        write_json(j, tree)  # last: a checkpoint counts once its JSON is there

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        j, s = self._paths(path)
        if not j.exists() or not s.exists():
            raise MissingFileError(f"checkpoint not found: {j} and {s} must both exist")
        try:
            tree = json.loads(j.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"corrupt checkpoint {j}: {e}") from None
        return self._join(tree, load_tensors(s))

    def remove_checkpoint(self, path) -> None:
        for p in self._paths(path):
            if p.exists():
                os.unlink(p)


class StopAtLoss(Callback):
    """End training once every edit's worst row NLL over a whole pass is below ``threshold`` (on all ranks)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        worst = pl_module.worst_nll()
        done = worst is not None and worst < self.threshold
        if trainer.strategy.reduce_boolean_decision(done, all=True):
            trainer.should_stop = True


def _accelerator(opts: TrainerOptions, model) -> tuple[str, Any]:
    dev = next(model.parameters()).device
    if opts.accelerator != "auto":
        return opts.accelerator, opts.devices
    if dev.type == "cuda":
        return "gpu", [dev.index or 0] if opts.devices == 1 else opts.devices
    return dev.type, opts.devices


def make_trainer(opts: TrainerOptions, model, max_steps: int, callbacks: list[Callback]) -> L.Trainer:
    from lightning.pytorch.strategies import DDPStrategy

    accelerator, devices = _accelerator(opts, model)
    strategy: Any = opts.strategy
    if strategy in ("ddp", "ddp_spawn"):  # experts a step does not route to get no gradient
        strategy = DDPStrategy(find_unused_parameters=True, start_method="spawn" if strategy == "ddp_spawn" else "popen")
    logger: Any = False
    if opts.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(opts.log_dir, name="memoe")
    elif opts.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(opts.log_dir, name="memoe")
    callbacks = list(callbacks)
    if opts.checkpoint_dir:
        callbacks.append(ModelCheckpoint(dirpath=opts.checkpoint_dir, filename="step{step}", auto_insert_metric_name=False,
                                         every_n_train_steps=opts.checkpoint_every or None, save_top_k=-1, save_last=True))
    return L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, precision=opts.precision, max_steps=max_steps,
        max_epochs=-1, logger=logger, callbacks=callbacks, enable_checkpointing=bool(opts.checkpoint_dir),
        enable_progress_bar=opts.progress, enable_model_summary=False, log_every_n_steps=1,
        plugins=[SafetensorsCheckpointIO()], num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=opts.log_dir,
    )


@contextlib.contextmanager
def quiet(on: bool):
    """Silence Lightning's banners (device summary, tips) and its known-harmless warnings."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero")
    levels = [logging.getLogger(n).level for n in names]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available but not used|LeafSpec|"
                                "TPU available|tensorboardX|Checkpoint directory|sync_dist|module.s. in eval mode).*")
        if on:
            for n in names:
                logging.getLogger(n).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for n, lv in zip(names, levels):
                logging.getLogger(n).setLevel(lv)


def resume_path(opts: TrainerOptions) -> str | None:
    """The checkpoint ``opts.resume`` names (``last``: the last one in ``checkpoint_dir``), checked to exist."""
    resume = opts.resume
    if resume == "last" and opts.checkpoint_dir:
        resume = str(Path(opts.checkpoint_dir) / "last.json")
    if resume is not None and not Path(resume).is_file():
        raise MissingFileError(f"--resume {opts.resume}: no checkpoint at {resume}"
                                + ("" if opts.checkpoint_dir or opts.resume != "last" else " (give --checkpoint-dir)"))
    return resume


def fit_adapter(model, tok, adapter, requests, cfg: TrainConfig, opts: TrainerOptions | None = None) -> dict:
    """Train the (attached) ``adapter`` on ``requests``; returns steps, seconds, worst NLL, the devices and strategy,
    whether this process is the global rank zero (DDP), and the trainer."""
    opts = opts or TrainerOptions()
    if adapter.attached_to is not model:
        raise ValueError("attach the adapter to the model before training it")
    cfg = PrefixMemo().apply(model, tok, cfg)  # editors pass theirs resolved; train.py generates here
    torch.manual_seed(cfg.seed)
    dm = EditDataModule(tok, requests, cfg.context_prefixes, cfg.kl_templates, cfg.batch_size, cfg.seed, cfg.kl_other_relations,
                        cfg.same_relation_templates)
    module = AdapterTrainingModule(model, adapter, cfg, dm.rows)
    callbacks = [StopAtLoss(cfg.stop_loss)] if cfg.stop_loss > 0 else []
    resume = resume_path(opts)
    t0 = time.perf_counter()
    with quiet(not opts.progress):
        trainer = make_trainer(opts, model, cfg.max_steps, callbacks)
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    adapter.to(next(model.parameters()).device).eval()  # Lightning's teardown moves the module to the CPU
    return {"steps": trainer.global_step, "seconds": time.perf_counter() - t0, "worst_nll": module.worst_nll(),
            "rows": len(dm.rows), "devices": trainer.num_devices, "strategy": type(trainer.strategy).__name__,
            "global_zero": trainer.is_global_zero, "trainer": trainer}
