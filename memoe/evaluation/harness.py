"""The four editing modes of the Llama-3 batch-size study, and measuring any editor with them.

- ``single``: each request alone on a fresh model (restore between);
- ``batch``: batches of B, restoring the model between batches;
- ``sequential``: one request at a time, never restoring;
- ``sequential-batch``: successive batches of B, never restoring.

Every batch is scored right after it is applied ("current"); the non-restoring modes also re-score all N
edits at the end ("final", which shows forgetting). Locality always compares with the *unedited* model's
scores, computed once before any edit (the pre-edit row).
"""

from __future__ import annotations

import os
import platform
import threading
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from memoe.data.records import EditRecord
from memoe.editors.base import Editor, EditResult
from memoe.errors import ConfigError, DataError
from memoe.evaluation.metrics import (
    RawScores,
    ScoreOptions,
    compute_metrics,
    concat,
    edited_neighbours,
    raw_scores,
    shared_subject_batch,
    subject_probes,
    subset,
)


@dataclass(frozen=True)
class Mode:
    """An editing mode: whether it applies batches of B (else one request per ``apply``) and whether it restores the
    model after each ``apply`` (else edits accumulate and all N are re-scored at the end, "final")."""

    name: str
    batched: bool
    restores: bool

    def batch_size(self, requested: int) -> int:
        return requested if self.batched else 1


#: The four modes by name (the only place that says what a mode means).
MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("single", batched=False, restores=True),
    Mode("batch", batched=True, restores=True),
    Mode("sequential", batched=False, restores=False),
    Mode("sequential-batch", batched=True, restores=False),
)}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ConfigError(f"unknown mode {name!r}; choose one of {list(MODES)}")
    return MODES[name]


def machine_info(device: torch.device | str) -> dict:
    """Where a measurement ran: stored with study results, printed by the benches."""
    device = torch.device(device)
    return {"platform": platform.machine(), "cpus": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__}


def describe_machine(info: dict) -> str:
    """``x86_64, 2 CPU threads, cpu`` (+ the GPU's name, + the torch version where recorded)."""
    text = f"{info['platform']}, {info['cpus']} CPU threads, {info['device']}" + (f" ({info['gpu']})" if info.get("gpu") else "")
    return text + (f", torch {info['torch']}" if info.get("torch") else "")


class PeakMemory:
    """Peak memory during a block, in MiB: CUDA's allocator peak on a GPU, else the process's resident set
    sampled every 5 ms (``peak_mb`` absolute, ``delta_mb`` above the level at entry)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_mb = self.delta_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._base = self._peak = self._rss_mb()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss_mb())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._rss_mb())
        self.delta_mb = self.peak_mb - self._base
        return False


@dataclass
class RunResult:
    """One editor in one mode over N edits: every field ``evaluate.py`` writes."""

    editor: str
    mode: str
    batch_size: int
    num_edits: int
    pre: dict
    current: dict
    final: dict | None
    edit_seconds: float
    edits_per_second: float
    peak_memory_mb: float
    peak_memory_delta_mb: float
    restores: int
    scoring: dict = field(default_factory=dict)
    time_split: dict = field(default_factory=dict)
    """Seconds per part, over all batches: the edit's own parts (closed forms: covariance, targets, keys, solve;
    MEMoE: training) as its ``info["time_split"]`` gives them, and ``scoring``."""
    config: dict = field(default_factory=dict)
    batches: list[dict] = field(default_factory=list)
    layer: int | None = None
    """The one layer edited (layer sweeps), else None: the editor's config chose its layers."""
    checkpoints: list[dict] = field(default_factory=list)
    """Non-restoring modes with ``checkpoint_every``: every edit applied so far re-scored after each K edits
    (``{"edits": n, "metrics": ...}``), the forgetting curve."""

    def to_dict(self) -> dict:
        return asdict(self)


def batches_for(mode: str, n: int, batch_size: int) -> list[range]:
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    b = get_mode(mode).batch_size(batch_size)
    return [range(s, min(n, s + b)) for s in range(0, n, b)]


def info_summary(info: dict) -> dict:
    """What of an edit's ``info`` each batch keeps in the result file: numbers, strings and flat maps of them
    (CoachHooK's α per layer, training steps); lists such as per-step losses stay out, they would swamp the file."""
    plain = (int, float, str, bool)
    return {k: v for k, v in info.items()
            if isinstance(v, plain) or (isinstance(v, dict) and all(isinstance(x, plain) for x in v.values()))}


def run_mode(editor: Editor, model, tok, records: list[EditRecord], mode: str, batch_size: int = 1,
             pre: RawScores | None = None, score: ScoreOptions | None = None, progress: bool = True,
             label: str | None = None, checkpoint_every: int | None = None) -> RunResult:
    """Apply ``records`` with ``editor`` in ``mode`` and score them; the model is restored at the end.

    ``checkpoint_every`` (non-restoring modes): also re-score all edits applied so far each time another K
    edits are in, and after the last batch.
    """
    score = score or ScoreOptions()
    if not records:
        raise DataError("no records to edit")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    chunks = batches_for(mode, len(records), batch_size)
    restores = get_mode(mode).restores
    if not restores and not editor.supports_sequential:
        raise ConfigError(f"editor {editor.name!r} does not support the {mode!r} mode")
    probes = subject_probes(records)  # the subject under other relations, from the whole run's templates
    skip = edited_neighbours(records)  # neighbours that the run itself edits
    sc = lambda recs: raw_scores(model, tok, recs, score, probes, skip)
    # the metrics of the first n records; the batch-level stress set needs the batches, beside the per-record metrics
    metrics = lambda rs, n: {**compute_metrics(rs, subset(pre, list(range(n)))),
                             "shared_subject_batch": shared_subject_batch(rs, records[:n], [c for c in chunks if c.stop <= n])}
    if pre is None:
        pre = sc(records)
    device = next(model.parameters()).device
    live: list[EditResult] = []
    current_parts: list[RawScores] = []
    per_batch, n_restores, edit_seconds, peak, peak_delta = [], 0, 0.0, 0.0, 0.0
    split: dict[str, float] = {}
    checkpoints, next_checkpoint, final = [], checkpoint_every, None
    bar = tqdm(total=len(records), desc=label or f"{editor.name} {mode}", unit="edit", disable=not progress)
    try:
        for chunk in chunks:
            recs = [records[i] for i in chunk]
            with PeakMemory(device) as mem:
                result = editor.apply(model, tok, [r.request for r in recs])
            live.append(result)
            edit_seconds += result.seconds
            for part, sec in result.info.get("time_split", {}).items():
                split[part] = split.get(part, 0.0) + sec
            peak, peak_delta = max(peak, mem.peak_mb), max(peak_delta, mem.delta_mb)
            part = sc(recs)
            current_parts.append(part)
            per_batch.append({"start": chunk.start, "size": len(chunk), "seconds": round(result.seconds, 4),
                              "efficacy": compute_metrics(part)["cf_efficacy"], "info": info_summary(result.info)})
            if restores:
                live.pop().restore()
                n_restores += 1
            elif next_checkpoint is not None and (chunk.stop >= next_checkpoint or chunk.stop == len(records)):
                so_far = sc(records[: chunk.stop])
                checkpoints.append({"edits": chunk.stop, "metrics": metrics(so_far, chunk.stop)})
                next_checkpoint = (chunk.stop // checkpoint_every + 1) * checkpoint_every
                final = so_far  # after the last batch this is the final scoring: not scored twice
            bar.update(len(chunk))
        bar.close()
        current = concat(current_parts)
        if restores:
            final = None
        elif not checkpoints or checkpoints[-1]["edits"] != len(records):
            final = sc(records)
    finally:
        for result in reversed(live):  # back to the unedited model, whatever happened
            result.restore()
            n_restores += 1
    scored = current.prompts_scored + (final.prompts_scored if final else 0)
    scoring_seconds = current.seconds + (final.seconds if final else 0)
    return RunResult(
        editor=editor.name, mode=mode, batch_size=get_mode(mode).batch_size(batch_size),
        num_edits=len(records), pre=compute_metrics(pre, pre), current=metrics(current, len(records)),
        final=metrics(final, len(records)) if final else None, edit_seconds=round(edit_seconds, 4),
        edits_per_second=round(len(records) / edit_seconds, 3) if edit_seconds > 0 else float("inf"),
        peak_memory_mb=round(peak, 1), peak_memory_delta_mb=round(peak_delta, 1), restores=n_restores,
        scoring={"prompts": scored, "seconds": round(scoring_seconds, 3),
                 "prompts_per_second": round(scored / scoring_seconds, 1) if scoring_seconds else None},
        time_split={**{k: round(v, 3) for k, v in split.items()}, "scoring": round(scoring_seconds, 3)},
        config=asdict(editor.config), batches=per_batch, checkpoints=checkpoints,
    )


def pre_scores(model, tok, records: list[EditRecord], score: ScoreOptions | None = None) -> RawScores:
    """The unedited model's raw scores (compute once, share across editors and modes)."""
    return raw_scores(model, tok, records, score or ScoreOptions(), subject_probes(records), edited_neighbours(records))


__all__ = ["MODES", "Mode", "PeakMemory", "get_mode", "RunResult", "ScoreOptions", "batches_for", "pre_scores", "run_mode", "subset"]
