"""The main job: build (or load) the knowledge testbed, edit it with the default editor, print the metrics.

    python train.py                      # default synthetic testbed, FT-L, 100 edits as 10 x 10 sequential batches

On the first run the testbed is pretrained (a few minutes on 2 CPU cores) and cached under ``.cache/memoe``;
later runs load it. The report card (recall and causal trace) and the metrics table are printed.
"""

from __future__ import annotations

import argparse
import sys

from memoe.config import load_config
from memoe.pipeline import EvalConfig, load_subject, run_evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editor", default="ft", help="registered editor to apply (default: ft)")
    p.add_argument("--dataset", default="synthetic", help="dataset whose testbed to use (default: synthetic)")
    p.add_argument("--num-edits", type=int, default=100, help="edits to apply (default: 100)")
    p.add_argument("--mode", default="sequential-batch", help="editing mode (default: sequential-batch)")
    p.add_argument("--batch-size", type=int, default=10, help="batch size (default: 10)")
    p.add_argument("--output", default="runs/train.json", help="result JSON (default: runs/train.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> EvalConfig:
    return load_config(EvalConfig, None, {
        "editors": [args.editor], "dataset": args.dataset, "num_edits": args.num_edits, "modes": [args.mode],
        "batch_sizes": [args.batch_size], "output": args.output, "progress": not args.no_progress,
    })


def main(argv: list[str] | None = None) -> int:
    from memoe.testbed import format_report

    cfg = setup(parse_args(argv))
    subject = load_subject(cfg)  # builds and caches the testbed on first use
    testbed = subject[3]
    print(format_report(testbed.report))
    print(f"(cached at {testbed.path})\n")
    result = run_evaluation(cfg, subject)
    print(result["markdown"])
    for r in result["runs"]:
        print(f"\n{r['editor']} {r['mode']} b={r['batch_size']}: {r['num_edits']} edits in {r['edit_seconds']:.1f} s "
              f"({r['edits_per_second']} edits/s), peak memory {r['peak_memory_mb']} MiB")
    print(f"wrote {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
