"""One EasyEdit edit, timed, for ``bench_easyedit.py``. Runs under EasyEdit's own Python (its own venv), so it
imports nothing from memoe.

    python bench/easyedit_worker.py JOB.json

JOB.json (written by bench_easyedit.py): ``easyedit`` (the checkout), ``model_dir`` (a folder whose name holds
"llama", EasyEdit's dispatch), ``method`` (rome, memit or emmet), ``hparams`` (EasyEdit's hyperparameters, complete),
``requests``, ``prefixes`` (the context prefixes both frameworks use), ``stats`` (a safetensors file of C0 per
edit layer, ``C.<layer>``, normalised, with ``count.<layer>``), ``threads`` and ``out`` (a folder). Writes
``out/easyedit.json`` (seconds, CPU-seconds, peak resident memory during the edit) and ``out/easyedit-deltas.safetensors`` (the
change of every edited weight). Only ``apply_*_to_model`` is timed; EasyEdit's ``edit`` would also evaluate.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time
import types
from pathlib import Path


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Inert ``torchvision.*`` and ``timm.*`` modules: EasyEdit's package import pulls in its multimodal trainer,
    which imports both at module level; ROME, MEMIT and EMMET never call them, and PyPI's Linux torchvision is a
    CUDA build that breaks the import."""

    roots = ("torchvision", "timm")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: _inert(f"{spec.name}.{attr}")
        return module

    def exec_module(self, module):
        pass


def _inert(name: str):
    return type(name.rsplit(".", 1)[-1], (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The process's peak resident set during a block, sampled every 5 ms (as memoe's ``PeakMemory`` on a CPU)."""

    def __enter__(self):
        self.before = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    # transformers caches whether torchvision/timm exist; ask before the stubs make them look present
    from transformers.utils import import_utils

    import_utils.is_torchvision_available(), import_utils.is_timm_available()
    sys.meta_path.insert(0, _Stubs())
    sys.path.insert(0, job["easyedit"])
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = job["method"]
    main_mod = importlib.import_module(f"easyeditor.models.{method}.{method}_main")
    hp_mod = importlib.import_module(f"easyeditor.models.{method}.{method}_hparams")
    runningstats = importlib.import_module("easyeditor.util.runningstats")
    hparams_cls = next(getattr(hp_mod, n) for n in dir(hp_mod) if n.endswith("HyperParams") and n != "HyperParams")
    hparams = hparams_cls(**job["hparams"])

    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    tok.pad_token = tok.eos_token  # what EasyEdit's editor does for Llama models

    # C0: memoe's statistics in EasyEdit's own cache format, at the path its layer_stats reads (no dataset loaded)
    stats = load_file(job["stats"])
    model_name = job["model_dir"].rstrip("/").rsplit("/")[-1]
    for layer in hparams.layers:
        layer_name = hparams.rewrite_module_tmp.format(layer)
        stat = runningstats.CombinedStat(mom2=runningstats.SecondMoment())
        count = int(stats[f"count.{layer}"].item())
        stat.mom2.count, stat.mom2.mom2 = count, (stats[f"C.{layer}"].double() * count).float()
        path = Path(hparams.stats_dir) / model_name / f"{hparams.mom2_dataset}_stats" / (
            f"{layer_name}_{hparams.mom2_dtype}_mom2_{hparams.mom2_n_samples}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        runningstats.save_cached_state(str(path), stat, {"sample_size": hparams.mom2_n_samples})

    templates = [f"{p} {{}}" for p in job["prefixes"]]
    main_mod.CONTEXT_TEMPLATES_CACHE = ["{}"] + templates if method == "rome" else [["{}"], templates]
    apply = getattr(main_mod, f"apply_{method}_to_model")
    names = [f"{hparams.rewrite_module_tmp.format(layer)}.weight" for layer in hparams.layers]
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in names}

    groups = [[r] for r in job["requests"]] if method == "rome" else [job["requests"]]  # ROME: one at a time
    with torch.no_grad():  # page every weight in (they load lazily), so the peak measures the edit, not the load
        sum(float(p.sum()) for p in model.parameters())
    with PeakRSS() as mem:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for group in groups:
            apply(model, tok, group, hparams, copy=False, return_orig_weights=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    out = Path(job["out"])
    save_file({n: (params[n].detach() - originals[n]).contiguous() for n in names}, str(out / "easyedit-deltas.safetensors"))
    (out / "easyedit.json").write_text(json.dumps({
        "framework": "easyedit", "method": method, "edits": len(job["requests"]), "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2), "rss_before_mb": round(mem.before, 1), "peak_rss_mb": round(mem.peak, 1),
        "threads": job["threads"], "pid": os.getpid()}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
