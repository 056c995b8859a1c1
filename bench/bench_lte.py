"""LTE's costs on a real model: edits per second (index insertion) and what retrieval adds to every query.

    python bench/bench_lte.py                              # SmolLM2-135M, 1,000 CounterFact edits, 200 queries
    python bench/bench_lte.py --lora runs/lte-lora/smollm2-135m --edits 2000 --queries 400

Inserts the first ``--edits`` records of EasyEdit's CounterFact file into an ``lte`` editor's index (timing
``apply``, i.e. encoding the prompts and storing them), then scores ``--queries`` request prompts teacher-forced
(their new targets) on the bare model and with LTE attached (retrieval + the longer prompt), and prints the per-query
times and the overhead. Not a test: nothing is asserted. Run it alone: two torch jobs on two cores slow each other
down many times.
"""

from __future__ import annotations

import argparse
import time

import torch

from memoe.data import load_edit_dataset
from memoe.editors import make_editor
from memoe.editors.lte import attached_memory
from memoe.evaluation.harness import describe_machine, machine_info
from memoe.evaluation.scoring import score_pairs
from memoe.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a preset, GGUF file or model folder")
    p.add_argument("--dataset", default="counterfact-easyedit", help="edit dataset whose first records are inserted")
    p.add_argument("--edits", type=int, default=1000, help="edits inserted")
    p.add_argument("--queries", type=int, default=200, help="prompts scored bare and with retrieval")
    p.add_argument("--lora", default=None, help="aligned LoRA folder (default: retrieval alone)")
    p.add_argument("--encoder", default="minilm", choices=["minilm", "base"], help="retrieval encoder")
    p.add_argument("--batch", type=int, default=100, help="edits per apply")
    args = p.parse_args()
    model, tok = load_model(args.model, "float32", "cpu")
    records = load_edit_dataset(args.dataset, limit=args.edits, bad_records="skip").records
    requests = [r.request for r in records]
    print(f"{args.model}, {len(requests)} edits, encoder {args.encoder}, LoRA {args.lora or 'none'}; "
          f"{describe_machine(machine_info('cpu'))}")
    editor = make_editor("lte", overrides={"lora": args.lora, "encoder": args.encoder})
    first = editor.apply(model, tok, requests[:1])  # attaches the memory (encoder and LoRA load: once, not timed)
    t0 = time.perf_counter()
    results = [editor.apply(model, tok, requests[s : s + args.batch]) for s in range(1, len(requests), args.batch)]
    insert = time.perf_counter() - t0
    print(f"insertion: {len(requests) - 1} edits in {insert:.2f} s = {(len(requests) - 1) / insert:.0f} edits/s "
          f"(index of {len(attached_memory(model).index)})")
    qs = records[: args.queries]
    prompts, targets = [r.request.text for r in qs], [r.request.target_new for r in qs]
    t0 = time.perf_counter()
    score_pairs(model, tok, prompts, targets)
    with_lte = time.perf_counter() - t0
    t0 = time.perf_counter()
    attached_memory(model).retrieve(prompts)
    retrieval = time.perf_counter() - t0
    for r in reversed(results):
        r.restore()
    first.restore()
    t0 = time.perf_counter()
    score_pairs(model, tok, prompts, targets)
    bare = time.perf_counter() - t0
    n = len(prompts)
    print("| | ms per query |\n|---|---|")
    print(f"| bare model | {1000 * bare / n:.1f} |\n| with LTE | {1000 * with_lte / n:.1f} |\n| of which retrieval | "
          f"{1000 * retrieval / n:.1f} |")
    print(f"\noverhead: {with_lte / bare:.2f}x the bare model's time per query ({torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
