"""CoachHooK's hook memory does not grow with the number of edits: bytes held after 10, 100 and 1,000 edits.

    python bench/bench_coachhook_memory.py                    # synthetic testbed, batches of 10 up to 1,000 edits
    python bench/bench_coachhook_memory.py --batch-size 100 --v-steps 5

Applies synthetic edits in consecutive batches with ``configs/editors/coachhook.yaml`` and prints, at 10, 100
and 1,000 edits, the bytes of the hook memory (D, Σ K Kᵀ and α per layer), the edit time so far and α. Not a test.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from memoe.config import load_config
from memoe.editors import make_editor
from memoe.resources import config_root
from memoe.testbed import TestbedConfig, build_testbed


def main(checkpoints: list[int], batch_size: int, v_steps: int, config: str, threads: int) -> None:
    torch.set_num_threads(threads)
    tb = build_testbed(load_config(TestbedConfig, config), progress=True)
    editor = make_editor("coachhook", None, {"v_steps": v_steps})
    records = tb.dataset.records[: max(checkpoints)]
    done, seconds, rows = 0, 0.0, []
    for start in range(0, len(records), batch_size):
        batch = [r.request for r in records[start : start + batch_size]]
        t0 = time.perf_counter()
        editor.apply(tb.model, tb.tokenizer, batch)
        seconds += time.perf_counter() - t0
        done += len(batch)
        if done in checkpoints:
            a = editor.adapter(tb.model)
            alpha = {k: round(float(l.alpha), 3) for k, l in a.layers.items()}
            rows.append((done, a.memory_bytes(), seconds, alpha))
            print(f"{done} edits: {a.memory_bytes():,} bytes, {seconds:.1f} s, alpha {alpha}", flush=True)
    print(f"\n{platform.machine()}, {torch.get_num_threads()} threads, batches of {batch_size}, v_steps {v_steps}\n")
    print("| edits | hook memory (bytes) | edit time (s) | alpha per layer |\n|---|---|---|---|")
    for n, b, s, alpha in rows:
        print(f"| {n:,} | {b:,} | {s:.1f} | {alpha} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[10, 100, 1000], help="edit counts to report")
    ap.add_argument("--batch-size", type=int, default=10, help="edits per batch (default: 10)")
    ap.add_argument("--v-steps", type=int, default=10, help="target optimisation steps (default: 10; quality is not measured here)")
    ap.add_argument("--config", default=str(config_root() / "testbed" / "synthetic.yaml"), help="testbed YAML")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    a = ap.parse_args()
    main(a.checkpoints, a.batch_size, a.v_steps, a.config, a.threads)
