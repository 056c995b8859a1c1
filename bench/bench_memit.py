"""MEMIT editing throughput and peak memory on the synthetic testbed, batched target optimisation on and off.

    python bench/bench_memit.py                       # batch sizes 1, 10, 100, 1000
    python bench/bench_memit.py --sizes 1 10 100 --unbatched-max 100

Prints a Markdown table: edits per second (wall time of ``apply``, C0 statistics cached beforehand) and peak
memory (resident set on CPU, allocator peak on CUDA) per batch size and mode. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from memoe.config import load_config
from memoe.editors import make_editor
from memoe.evaluation.harness import PeakMemory
from memoe.pipeline import CONFIG_DIR
from memoe.testbed import TestbedConfig, build_testbed


def main(sizes: list[int], unbatched_max: int, config: str, threads: int, v_steps: int) -> None:
    torch.set_num_threads(threads)
    tb = build_testbed(load_config(TestbedConfig, config), progress=True)
    records = tb.dataset.records
    device = next(tb.model.parameters()).device
    rows = []
    for batched in (True, False):
        editor = make_editor("memit", str(CONFIG_DIR / "editors" / "memit.yaml"), {"batched_targets": batched, "v_steps": v_steps})
        editor.stats(tb.model, tb.tokenizer, 0), editor.stats(tb.model, tb.tokenizer, 1)  # warm the C0 cache
        for n in sizes:
            if n > len(records):
                continue
            if not batched and n > unbatched_max:
                rows.append((n, batched, None, None))
                continue
            reqs = [r.request for r in records[:n]]
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                result = editor.apply(tb.model, tb.tokenizer, reqs)
                seconds = time.perf_counter() - t0
            result.restore()
            rows.append((n, batched, n / seconds, mem.peak_mb))
            print(f"batch {n:>5} {'batched' if batched else 'one-at-a-time':>13}: {n / seconds:8.2f} edits/s, "
                  f"peak {mem.peak_mb:.0f} MiB", flush=True)
    print(f"\nMEMIT on the synthetic testbed ({platform.machine()}, {torch.get_num_threads()} threads, {device}, "
          f"{v_steps} target steps at most)\n")
    print("| batch size | targets | edits/s | peak memory (MiB) |\n|---|---|---|---|")
    for n, batched, eps, peak in rows:
        mode = "batched" if batched else "one at a time"
        print(f"| {n} | {mode} | " + ("not run (over --unbatched-max) | – |" if eps is None else f"{eps:.2f} | {peak:.0f} |"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000], help="batch sizes (default: 1 10 100 1000)")
    p.add_argument("--unbatched-max", type=int, default=100, help="largest batch run one request at a time (default: 100)")
    p.add_argument("--config", default=str(CONFIG_DIR / "testbed" / "synthetic.yaml"), help="testbed YAML")
    p.add_argument("--v-steps", type=int, default=25, help="target-optimisation steps at most (default: 25, MEMIT's)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    a = p.parse_args()
    main(a.sizes, a.unbatched_max, a.config, a.threads, a.v_steps)
