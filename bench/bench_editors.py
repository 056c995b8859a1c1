"""Every editor's editing throughput and peak memory, and the inference overhead of the bypass adapters.

    python bench/bench_editors.py                                  # all editors, batch sizes 1 10 100 1000
    python bench/bench_editors.py --editors memit memoe --sizes 1 10 100

Part 1, editing: for each editor and batch size B, ``apply`` on B synthetic edits (for B < ``--min-edits``,
several batches of B, restoring between them), timed with the editor's own clock; edits per second and peak
memory (resident set on CPU, allocator peak on CUDA; C0 statistics cached beforehand so they are not counted).
Part 2, inference: tokens per second of forward passes (fastest of ``--repeats`` passes) of the bare testbed
against the same model with a MEMoE adapter (trained on 10 edits) and with CoachHooK hooks (10 edits) attached,
on the records' request and paraphrase prompts in batches of 64. Prints Markdown tables. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from memoe.config import load_config
from memoe.editors import REGISTRY, make_editor
from memoe.evaluation.harness import PeakMemory
from memoe.pipeline import CONFIG_DIR, editor_config_path
from memoe.testbed import TestbedConfig, build_testbed
from memoe.evaluation.scoring import pad_batch


def edit_speed(tb, name: str, sizes: list[int], min_edits: int, device) -> list[tuple]:
    editor = make_editor(name, editor_config_path(name, {}))
    stats = getattr(editor, "layer_covs", None)
    if stats is not None:  # warm the C0 cache: statistics are a one-off cost per model, not per edit
        stats(tb.model, tb.tokenizer, list(getattr(editor.config, "layers", [])))
    rows, records = [], tb.dataset.records
    for b in sizes:
        n = max(b, min_edits)
        if n > len(records):
            rows.append((name, b, None, None))
            continue
        seconds, peak = 0.0, 0.0
        for start in range(0, n, b):
            with PeakMemory(device) as mem:
                result = editor.apply(tb.model, tb.tokenizer, [r.request for r in records[start : start + b]])
            result.restore()
            seconds, peak = seconds + result.seconds, max(peak, mem.peak_mb)
        rows.append((name, b, n / seconds, peak))
        print(f"{name:>10} batch {b:>5}: {n / seconds:8.3f} edits/s, peak {peak:.0f} MiB", flush=True)
    return rows


def forward_seconds(model, batches, repeats: int) -> float:
    """The fastest of ``repeats`` passes over ``batches`` (the least disturbed by other work on the machine)."""
    times = []
    with torch.no_grad():
        for ids, mask in batches[:2]:  # warm-up
            model(input_ids=ids, attention_mask=mask)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - t0)
    return min(times)


def inference_overhead(tb, repeats: int, device) -> list[tuple]:
    tok, records = tb.tokenizer, tb.dataset.records[:200]
    texts = [p for r in records for p in [r.request.text, *r.paraphrase_prompts]]
    seqs = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    batches = [pad_batch(seqs[i : i + 64], tok.pad_token_id, device) for i in range(0, len(seqs), 64)]
    n_tokens = sum(int(m.sum()) for _, m in batches)
    rows = [("bare model", forward_seconds(tb.model, batches, repeats))]
    for name in ("memoe", "coachhook"):
        editor = make_editor(name, editor_config_path(name, {}))
        result = editor.apply(tb.model, tok, [r.request for r in records[:10]])
        rows.append((f"{name} (10 edits)", forward_seconds(tb.model, batches, repeats)))
        result.restore()
    base = rows[0][1]
    return [(label, n_tokens / s, s / base - 1) for label, s in rows]


def main(editors: list[str], sizes: list[int], min_edits: int, config: str, threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    tb = build_testbed(load_config(TestbedConfig, config), progress=True)
    device = next(tb.model.parameters()).device
    rows = []
    for name in editors:
        rows += edit_speed(tb, name, sizes, min_edits, device)
    where = (f"{platform.machine()}, {torch.get_num_threads()} threads, {device}"
             + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    if rows:
        print(f"\nEditing on the {tb.report['name']} testbed ({where}); editor configs from configs/editors/\n")
        print("| editor | batch size | edits/s | peak memory (MiB) |\n|---|---|---|---|")
        for name, b, eps, peak in rows:
            print(f"| {name} | {b} | " + ("– (not enough records) | – |" if eps is None else f"{eps:.3f} | {peak:.0f} |"))
    if repeats:
        print(f"\nInference, fastest of {repeats} passes over the request and paraphrase prompts of 200 records ({where})\n")
        print("| model | tokens/s | overhead vs bare |\n|---|---|---|")
        for label, tps, over in inference_overhead(tb, repeats, device):
            print(f"| {label} | {tps:,.0f} | {over:+.1%} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editors", nargs="*", default=[n for n in REGISTRY if n != "ft"],
                   help="registered editors (default: every editor but the ft baseline; none: inference table only)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000], help="batch sizes (default: 1 10 100 1000)")
    p.add_argument("--min-edits", type=int, default=10, help="edits timed at least, as several batches when B is smaller (default: 10)")
    p.add_argument("--config", default=str(CONFIG_DIR / "testbed" / "synthetic.yaml"), help="testbed YAML")
    p.add_argument("--repeats", type=int, default=5, help="inference passes (0: skip the inference table; default: 5)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    a = p.parse_args()
    main(a.editors, a.sizes, a.min_edits, a.config, a.threads, a.repeats)
