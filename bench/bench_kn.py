"""Knowledge-neuron attribution: memoe's batched, cached integrated gradients against the step-by-step definition.

    python bench/bench_kn.py                                   # SmolLM2-135M, 3 CounterFact prompts, every layer
    python bench/bench_kn.py --facts 5 --layers 0 4 8 --steps 20

For each prompt (the first ``--facts`` CounterFact records, their true target's first token), times
``memoe.locate.integrated_gradients`` (one cached one-token batch per group of layers) and
``reference_integrated_gradients`` (the whole prompt forward and backward once per step and layer, as the
reference implementations do), and prints both, the speed-up and the largest difference between their
attributions relative to the largest attribution. Not a test: nothing is asserted. Run it alone: two torch jobs on
two cores slow each other down many times.
"""

from __future__ import annotations

import argparse
import time

import torch

from memoe.data import load_edit_dataset
from memoe.evaluation.harness import describe_machine, machine_info
from memoe.locate import answer_token, integrated_gradients, reference_integrated_gradients
from memoe.models import load_model
from memoe.models.arch import model_parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a preset, GGUF file or model folder")
    p.add_argument("--dataset", default="counterfact", help="edit dataset whose first records are attributed")
    p.add_argument("--facts", type=int, default=3, help="prompts timed")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers attributed (default: all)")
    p.add_argument("--steps", type=int, default=20, help="Riemann steps m")
    args = p.parse_args()
    model, tok = load_model(args.model, "float32", "cpu")
    layers = args.layers or list(range(model_parts(model).num_layers))
    records = load_edit_dataset(args.dataset, limit=args.facts, bad_records="skip").records
    print(f"{args.model}, {len(layers)} layers, m = {args.steps}; {describe_machine(machine_info('cpu'))}, "
          f"{torch.get_num_threads()} torch threads")
    print("| prompt | tokens | memoe (s) | step by step (s) | speed-up | max rel. difference |\n|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for r in records:
        ids = tok(r.request.text, add_special_tokens=True)["input_ids"]
        answer = answer_token(tok, r.request.target_true)
        t0 = time.perf_counter()
        fast = integrated_gradients(model, ids, answer, layers, args.steps).scores
        t1 = time.perf_counter()
        slow = torch.stack([reference_integrated_gradients(model, ids, answer, l, args.steps) for l in layers])
        t2 = time.perf_counter()
        totals[0] += t1 - t0
        totals[1] += t2 - t1
        diff = ((fast - slow).abs().max() / slow.abs().max()).item()
        print(f"| {r.request.text[:40]} | {len(ids)} | {t1 - t0:.2f} | {t2 - t1:.2f} | {(t2 - t1) / (t1 - t0):.1f}x | {diff:.1e} |")
    print(f"\ntotal: memoe {totals[0]:.1f} s, step by step {totals[1]:.1f} s ({totals[1] / totals[0]:.1f}x)")


if __name__ == "__main__":
    main()
