"""Every editor's editing throughput and peak memory, and the inference overhead of the bypass adapters.

    python bench/bench_editors.py                                  # testbed, all editors, batch sizes 1 10 100 1000
    python bench/bench_editors.py --editors memit memoe --sizes 1 10 100
    python bench/bench_editors.py --device cuda                    # the testbed on a GPU
    python bench/bench_editors.py --editors memit --set batched_targets=false   # targets one request at a time
    python bench/bench_editors.py --model random:llama3-8b --config-suffix llama3-8b --device cuda --dtype bfloat16 \\
        --sizes 1 10 100 --skip rome:100 --min-edits 3             # Llama-3-8B's shapes, random weights
    python bench/bench_editors.py --model /path/to/Meta-Llama-3-8B --config-suffix llama3-8b --dtype bfloat16

The edits, their prompts and the C0 text (its ``corpus.txt``) come from the ``--config`` testbed. ``--model``
swaps the model edited: ``testbed`` (default), a real model (a preset such as ``smollm2-135m``, a GGUF file or a local
checkpoint directory: edited with its own tokenizer, its per-model configs and C0 text, on the 200 CounterFact
records memoe ships), or
``random:SHAPE`` (``memoe.models.SHAPES``: Llama-3-8B's architecture with random weights, built on the device
in ``--dtype``; the testbed's token ids, so no download). On random weights the speeds and memory are the real
architecture's, edit quality means nothing, and target optimisation runs all its steps (a random model never
reaches the stop loss), so editing times are upper bounds.

Part 1, editing: for each editor and batch size B, ``apply`` on B edits (for B < ``--min-edits``, several
batches of B, restoring between them), timed with the editor's own clock; edits per second and peak memory
(resident set on CPU, allocator peak on CUDA). C0 statistics are computed (and timed) beforehand: a one-off
cost per model, not per edit. Each row says where the edit time went (the editors' ``info["time_split"]``:
targets, keys, solve; MEMoE's training). Part 2, inference: tokens per second of forward passes (fastest of ``--repeats``
passes) of the bare model against the same model with a MEMoE adapter and with CoachHooK hooks (10 edits each)
attached, on the records' request and paraphrase prompts in batches of 64. Prints Markdown tables (and writes
them with the raw figures to ``--output`` JSON). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from pathlib import Path

import torch

from memoe.batching import pad_batch
from memoe.config import load_config
from memoe.editors import REGISTRY, editor_class, make_editor
from memoe.evaluation.harness import PeakMemory, describe_machine, machine_info
from memoe.io import write_json
from memoe.resources import config_root
from memoe.testbed import TestbedConfig, build_testbed


class Bench:
    """The model under test, the testbed's edits, and how each editor is configured."""

    def __init__(self, model, tok, records, corpus: Path | None, config_suffix: str, overrides: dict, deadline: float,
                 model_key: str | None = None):
        self.model, self.tok, self.records, self.corpus, self.model_key = model, tok, records, corpus, model_key
        self.device = next(model.parameters()).device
        self.config_suffix, self.overrides, self.deadline = config_suffix, overrides, deadline
        self.notes: list[str] = []

    def config_path(self, name: str) -> str | None:
        if self.model_key and (config_root() / "editors" / self.model_key / f"{name}.yaml").exists():
            return str(config_root() / "editors" / self.model_key / f"{name}.yaml")  # the config made for this model
        for stem in ([f"{name}-{self.config_suffix}"] if self.config_suffix else []) + [name]:
            p = config_root() / "editors" / f"{stem}.yaml"
            if p.exists():
                return str(p)
        return None

    def editor(self, name: str):
        """``name`` with its config, the testbed's text as C0 corpus and the ``--set`` overrides, each where the
        editor's config has that key."""
        keys = {f.name for f in dataclasses.fields(editor_class(name).Config)}
        corpus = {"stats_corpus": str(self.corpus)} if self.corpus else {}  # a real model keeps its config's corpus
        over = {k: v for k, v in {**corpus, **self.overrides}.items() if k in keys}
        return make_editor(name, self.config_path(name), over)

    def time_left(self) -> bool:
        return time.time() < self.deadline


def edit_speed(b: Bench, name: str, sizes: list[int], min_edits: int, skip: set[str]) -> list[dict]:
    editor = b.editor(name)
    rows = []
    layers = list(getattr(editor.config, "layers", []))
    if hasattr(editor, "layer_covs"):  # C0 first: statistics are a one-off cost per model, not per edit
        t0 = time.perf_counter()
        with PeakMemory(b.device) as mem:
            editor.layer_covs(b.model, b.tok, layers)
        rows.append(dict(editor=name, what="C0", layers=layers, seconds=time.perf_counter() - t0, peak_mb=mem.peak_mb))
        print(f"{name:>10} C0 for layers {layers}: {rows[-1]['seconds']:.1f} s, peak {mem.peak_mb:.0f} MiB", flush=True)
    for size in sizes:
        n = max(size, min_edits)
        row = dict(editor=name, what="edit", batch=size, edits=n)
        if f"{name}:{size}" in skip:
            row["skipped"] = "--skip"
        elif n > len(b.records):
            row["skipped"] = f"only {len(b.records)} records"
        elif not b.time_left():
            row["skipped"] = "--deadline"
        if "skipped" in row:
            rows.append(row)
            continue
        seconds, peak, split = 0.0, 0.0, {}
        for start in range(0, n, size):
            with PeakMemory(b.device) as mem:
                result = editor.apply(b.model, b.tok, [r.request for r in b.records[start : start + size]])
            result.restore()
            seconds, peak = seconds + result.seconds, max(peak, mem.peak_mb)
            for part, sec in result.info.get("time_split", {}).items():
                split[part] = split.get(part, 0.0) + sec
        row.update(edits_per_s=n / seconds, seconds=seconds, peak_mb=peak, time_split=split)
        rows.append(row)
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in split.items() if v >= 0.05)
        print(f"{name:>10} batch {size:>5}: {n / seconds:8.3f} edits/s, peak {peak:.0f} MiB ({parts})", flush=True)
    return rows


def forward_seconds(model, batches, repeats: int) -> float:
    """The fastest of ``repeats`` passes over ``batches`` (the least disturbed by other work on the machine)."""
    times = []
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    with torch.no_grad():
        for ids, mask in batches[:2]:  # warm-up
            model(input_ids=ids, attention_mask=mask)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask)
            sync()
            times.append(time.perf_counter() - t0)
    return min(times)


def inference_overhead(b: Bench, repeats: int) -> list[dict]:
    records = b.records[:200]
    texts = [p for r in records for p in [r.request.text, *r.paraphrase_prompts]]
    seqs = [b.tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    batches = [pad_batch(seqs[i : i + 64], b.tok.pad_token_id, b.device) for i in range(0, len(seqs), 64)]
    n_tokens = sum(int(m.sum()) for _, m in batches)
    rows = [dict(model="bare model", seconds=forward_seconds(b.model, batches, repeats))]
    for name in ("memoe", "coachhook"):
        result = b.editor(name).apply(b.model, b.tok, [r.request for r in records[:10]])
        rows.append(dict(model=f"{name} (10 edits)", seconds=forward_seconds(b.model, batches, repeats)))
        result.restore()
    for r in rows:
        r.update(tokens_per_s=n_tokens / r["seconds"], overhead=r["seconds"] / rows[0]["seconds"] - 1)
    return rows


def load_bench(model: str, config: str, device: str | None, dtype: str, config_suffix: str, overrides: dict, deadline: float) -> tuple[Bench, dict]:
    from memoe.data import load_edit_dataset
    from memoe.models import default_device, load_model, model_key, random_model, resolve_dtype

    t0 = time.perf_counter()
    if model != "testbed" and not model.startswith("random:"):  # a real model edits real facts: memoe's CounterFact sample
        m, tok = load_model(model, dtype, device or default_device())
        info = dict(model=model, edits="the shipped CounterFact sample", dtype=dtype, load_seconds=round(time.perf_counter() - t0, 1),
                    parameters=sum(p.numel() for p in m.parameters()))
        return Bench(m, tok, load_edit_dataset("counterfact-sample").records, None, config_suffix, overrides, deadline,
                     model_key(model)), info
    tb = build_testbed(load_config(TestbedConfig, config), progress=True, verbose=False)
    device = device or default_device()
    t0 = time.perf_counter()
    if model == "testbed":
        m, tok = tb.model.to(device=device, dtype=resolve_dtype(dtype)), tb.tokenizer
    else:
        m, tok = random_model(model.split(":", 1)[1], resolve_dtype(dtype), device), tb.tokenizer
    if m.device.type == "cuda":
        torch.cuda.synchronize()
    info = dict(model=model, edits=f"the {tb.report['name']} testbed", dtype=dtype, load_seconds=round(time.perf_counter() - t0, 1),
                parameters=sum(p.numel() for p in m.parameters()))
    if m.device.type == "cuda":
        info["weights_mib"] = round(torch.cuda.memory_allocated(m.device) / 2**20)
    return Bench(m, tok, tb.dataset.records, tb.path / "corpus.txt", config_suffix, overrides, deadline), info


def parse_sets(items: list[str]) -> dict:
    """``KEY=VALUE`` options (VALUE read as YAML: numbers, booleans, lists) -> {key: value}."""
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(editors: list[str], sizes: list[int], min_edits: int, config: str, threads: int, repeats: int, model: str = "testbed",
         device: str | None = None, dtype: str = "float32", config_suffix: str = "", sets: dict | None = None,
         skip: list[str] | None = None, deadline: float = 0.0, output: str | None = None) -> dict:
    unknown = [k for k in (sets or {}) if not any(k in {f.name for f in dataclasses.fields(editor_class(n).Config)} for n in editors)]
    if unknown:
        raise SystemExit(f"error: --set {unknown}: no key of that name in the configs of {editors}")
    torch.set_num_threads(threads)
    torch.manual_seed(0)  # random:SHAPE weights, hence the C0 cache key, are the same every run
    b, info = load_bench(model, config, device, dtype, config_suffix, dict(sets or {}), time.time() + (deadline or 1e9))
    info["set"] = dict(sets or {})
    info["machine"] = describe_machine(machine_info(b.device))
    print(f"model {model} ({info['parameters'] / 1e6:,.1f}M parameters, {dtype}) on {info['machine']}: "
          f"loaded in {info['load_seconds']} s" + (f", weights {info['weights_mib']} MiB" if "weights_mib" in info else ""), flush=True)
    result: dict = {"info": info, "editing": [], "inference": [], "errors": []}

    def save() -> None:
        if output:
            write_json(output, result)

    for name in editors:
        try:
            result["editing"] += edit_speed(b, name, sizes, min_edits, set(skip or []))
        except Exception as e:  # one editor failing must not lose the others' figures
            traceback.print_exc()
            result["errors"].append(f"{name}: {type(e).__name__}: {e}")
        save()
    edits = [r for r in result["editing"] if r["what"] == "edit"]
    if edits:
        print(f"\nEditing, model {model} ({dtype}), edits from {info['edits']} ({info['machine']}); "
              "editor configs " + ", ".join(f"configs/{Path(p).relative_to(config_root())}" if (p := b.config_path(n))
                                            else f"{n}: defaults" for n in editors)
              + "".join(f", {k}={v}" for k, v in b.overrides.items()) + "\n")
        print("| editor | batch size | edits/s | peak memory (MiB) | time split (s) |\n|---|---|---|---|---|")
        for r in edits:
            split = ", ".join(f"{k} {v:.1f}" for k, v in r.get("time_split", {}).items() if v >= 0.05)
            cells = f"– ({r['skipped']}) | – | |" if "skipped" in r else f"{r['edits_per_s']:.3f} | {r['peak_mb']:.0f} | {split} |"
            print(f"| {r['editor']} | {r['batch']} | " + cells)
        for r in result["editing"]:
            if r["what"] == "C0":
                print(f"\nC0 statistics for {r['editor']} (layers {r['layers']}): {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MiB", end="")
        print()
    if repeats and b.time_left():
        try:
            result["inference"] = inference_overhead(b, repeats)
        except Exception as e:
            traceback.print_exc()
            result["errors"].append(f"inference: {type(e).__name__}: {e}")
        save()
        if result["inference"]:
            print(f"\nInference, fastest of {repeats} passes over the request and paraphrase prompts of 200 records ({info['machine']})\n")
            print("| model | tokens/s | overhead vs bare |\n|---|---|---|")
            for r in result["inference"]:
                print(f"| {r['model']} | {r['tokens_per_s']:,.0f} | {r['overhead']:+.1%} |")
    for e in result["errors"]:
        print(f"error: {e}")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editors", nargs="*", default=[n for n in REGISTRY if n != "ft"],
                   help="registered editors (default: every editor but the ft baseline; none: inference table only)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000], help="batch sizes (default: 1 10 100 1000)")
    p.add_argument("--min-edits", type=int, default=10, help="edits timed at least, as several batches when B is smaller (default: 10)")
    p.add_argument("--config", default=str(config_root() / "testbed" / "synthetic.yaml"),
                   help="testbed YAML: the edits and C0 text (and the model by default)")
    p.add_argument("--model", default="testbed", help="testbed (default), a preset (smollm2-135m), a .gguf file, a Hugging Face folder, "
                   "or random:SHAPE (llama3-8b, llama3-mini); a real model uses configs/editors/<model>/ where it has them")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype (default: float32)")
    p.add_argument("--config-suffix", default="", help="use configs/editors/<name>-<suffix>.yaml where it exists (e.g. llama3-8b)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every editor that has the key (e.g. batched_targets=false stats_samples=20000)")
    p.add_argument("--skip", nargs="*", default=[], help="EDITOR:SIZE pairs not to run (e.g. rome:100: ROME edits one at a time)")
    p.add_argument("--deadline", type=float, default=0.0, help="seconds after which no new measurement starts (0: none)")
    p.add_argument("--output", default=None, help="also write every figure to this JSON")
    p.add_argument("--repeats", type=int, default=5, help="inference passes (0: skip the inference table; default: 5)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    a = p.parse_args()
    main(a.editors, a.sizes, a.min_edits, a.config, a.threads, a.repeats, a.model, a.device, a.dtype, a.config_suffix,
         parse_sets(a.set), a.skip, a.deadline, a.output)
