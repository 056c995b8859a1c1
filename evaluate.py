"""Measure editors: every editor over the same edits in every requested mode, with the paper metrics.

    python evaluate.py --editor ft --dataset counterfact --num-edits 100 --mode sequential-batch --batch-size 10
    python evaluate.py --trace --dataset synthetic          # causal trace of the model: where facts live
    python evaluate.py --study batch-size --dataset counterfact   # a comparison study (configs/studies/)

Writes ``--output`` (JSON: per editor and mode the pre-edit, current and final metrics, edit time, edits per
second, peak memory, scoring throughput; per batch its time, efficacy and the editor's own figures such as
CoachHooK's α; the machine) and a Markdown table beside it; ``--plot`` adds PNG figures.
Without ``--model`` the editors run on the knowledge testbed of the dataset (built on first use, then cached).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memoe.config import ConfigError, load_config
from memoe.data import RecordError
from memoe.pipeline import DATASETS, EvalConfig, run_evaluation
from memoe.evaluation.harness import MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editor", action="append", dest="editors", metavar="NAME",
                   help="registered editor to run (repeatable; default: ft)")
    p.add_argument("--dataset", choices=DATASETS, help="edit dataset (default: synthetic)")
    p.add_argument("--data-path", help="file of the real dataset (default: ../shared/data or $MEMOE_DATA_DIR)")
    p.add_argument("--num-edits", type=int, help="number of edits, the first N records (default: 100)")
    p.add_argument("--mode", action="append", dest="modes", choices=MODES, help="editing mode (repeatable; default: sequential-batch)")
    p.add_argument("--batch-size", action="append", dest="batch_sizes", type=int, metavar="B",
                   help="batch size of the batch modes (repeatable: one run per size; default: 10)")
    p.add_argument("--config", help="YAML with any of these options (underscored keys); command-line options override it")
    p.add_argument("--seed", type=int, help="seed (default: 0)")
    p.add_argument("--output", help="result JSON path (default: runs/eval.json); the table goes to the same path with .md")
    p.add_argument("--plot", action="store_true", default=None, help="draw metrics against batch size / number of edits (PNG)")
    p.add_argument("--model", help="real model to edit instead of the testbed: a preset (smollm2-135m), a .gguf file or a "
                   "Hugging Face folder (a memoe testbed folder: the records it learned); editor configs come from "
                   "configs/editors/<model>/")
    p.add_argument("--known-only", action="store_true", default=None,
                   help="edit only records the unedited model knows (prefers the true target over the new one), the first --num-edits such")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of --model (default: float32)")
    p.add_argument("--device", help="device of --model (default: cuda if available, else cpu) or of the testbed (default: cpu)")
    p.add_argument("--testbed-config", help="testbed YAML (default: configs/testbed/<dataset>.yaml)")
    p.add_argument("--editor-config", action="append", default=[], metavar="NAME=PATH",
                   help="YAML config for one editor (default: configs/editors/<name>.yaml)")
    p.add_argument("--bad-records", choices=("error", "skip"), help="bad records in real data: error, or skip with a warning (default: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trace", action="store_true", help="run a causal trace of the model instead of editing")
    p.add_argument("--trace-facts", type=int, default=50, help="known facts averaged by --trace (default: 50)")
    p.add_argument("--trace-known", choices=("greedy", "prefers_true", "all"), default="greedy",
                   help="which facts --trace keeps: the greedy next token is the true target's first (default, ROME), "
                        "P(true) > P(new), or all")
    p.add_argument("--trace-samples", type=int, default=2, help="noise samples per fact (default: 2; ROME: 10)")
    p.add_argument("--trace-window", type=int, default=10, help="layers restored together for MLP and attention (default: 10, ROME)")
    p.add_argument("--study", metavar="NAME", help="run a comparison study: a name in configs/studies/ (batch-size, "
                   "layers, lifelong, ...) or a YAML path; --dataset, --data-path, --num-edits, --editor, --mode, "
                   "--batch-size, --model, --dtype, --device, --testbed-config, --seed and --output override it. "
                   "Rerunning the same command resumes an interrupted study")
    p.add_argument("--restart", action="store_true", help="with --study: discard an earlier result file and start over")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> EvalConfig:
    """Options (YAML, then command line on top) -> a validated :class:`EvalConfig`."""
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "editor_config", "no_progress", "study", "restart") and not k.startswith("trace")}
    if args.no_progress:
        overrides["progress"] = False
    if args.editor_config:
        overrides["editor_configs"] = editor_config_pairs(args.editor_config)
    return load_config(EvalConfig, args.config, overrides)


def editor_config_pairs(items: list[str]) -> dict[str, str]:
    """``--editor-config NAME=PATH`` options -> {name: path}."""
    pairs = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--editor-config expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        pairs[name] = path
    return pairs


def trace_pool(cfg: EvalConfig):
    """(model, tokenizer, candidate records) for --trace: every record of the dataset (the testbed's, or the real
    file's); for CounterFact on a real model also EasyEdit's 2,000-record file when it lies in the data folder,
    since a small model knows few facts well enough to trace."""
    from memoe.data import load_edit_dataset
    from memoe.data.loaders import DEFAULT_FILES, default_data_dir
    from memoe.models import load_model
    from memoe.pipeline import load_subject

    if not cfg.model or (Path(cfg.model).expanduser() / "testbed.json").is_file():
        model, tok, ds, tb = load_subject(cfg)
        return model, tok, (tb.dataset.records if tb else ds.records)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    records = load_edit_dataset(cfg.dataset, cfg.data_path, bad_records=cfg.bad_records, seed=cfg.seed).records
    extra = default_data_dir() / DEFAULT_FILES["counterfact-easyedit"]
    if cfg.dataset == "counterfact" and not cfg.data_path and extra.is_file():
        records = records + load_edit_dataset("counterfact-easyedit", str(extra), bad_records="skip").records
    return model, tok, records


def trace_main(cfg: EvalConfig, args: argparse.Namespace) -> None:
    import time

    from memoe.evaluation.known import select_known
    from memoe.io import write_json
    from memoe.trace import causal_trace, plot_trace

    model, tok, pool = trace_pool(cfg)
    t0 = time.perf_counter()
    pool = [r for r in pool if r.request.target_true]
    if args.trace_known == "all":
        facts, selection = pool[: args.trace_facts], {"rule": "all", "tried": min(len(pool), args.trace_facts)}
        selection["kept"] = len(facts)
    else:
        facts, selection = select_known(model, tok, pool, args.trace_facts, args.trace_known, cfg.score_batch_size)
    selection["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"trace: {selection['kept']} known facts ({selection['rule']}) among the first {selection['tried']} candidate "
          f"records ({selection['seconds']} s)", flush=True)
    if not facts:
        raise ValueError(f"no fact among {selection['tried']} records is known to the model under --trace-known "
                         f"{args.trace_known}; try --trace-known prefers_true or all")
    t0 = time.perf_counter()
    result = causal_trace(model, tok, [(r.request.prompt, r.request.subject, r.request.target_true) for r in facts],
                          samples=args.trace_samples, window=args.trace_window, progress=cfg.progress, seed=cfg.seed)
    result.selection = selection
    result.settings["seconds"] = round(time.perf_counter() - t0, 1)
    result.settings["model"] = cfg.model or "testbed"
    out = Path(cfg.output).with_name(Path(cfg.output).stem + "-trace")
    write_json(out.with_suffix(".json"), result.to_dict())
    plot_trace(result, str(out.with_suffix(".png")), title=f"causal trace, {cfg.model or 'testbed'}, {cfg.dataset}")
    print(f"p clean {result.p_clean:.3f}, corrupted {result.p_corrupt:.3f} over {result.n_facts} facts "
          f"({result.settings['seconds']} s)")
    for kind in result.effects:
        for pos, vals in result.effects[kind].items():
            print(f"{kind:<6} {pos:<14} " + " ".join("  nan " if v != v else f"{v:+.3f}" for v in vals))
    for kind in result.effects:
        print(f"peak {kind}: {result.peak(kind)}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def study_main(args: argparse.Namespace) -> int:
    from memoe.evaluation.study import load_study, run_study

    over = {"dataset": args.dataset, "data_path": args.data_path, "num_edits": args.num_edits, "editors": args.editors,
            "modes": args.modes, "batch_sizes": args.batch_sizes, "model": args.model, "dtype": args.dtype,
            "device": args.device, "testbed_config": args.testbed_config, "seed": args.seed, "output": args.output,
            "known_only": args.known_only}
    if args.no_progress:
        over["progress"] = False
    try:
        if args.editor_config:
            over["editor_configs"] = editor_config_pairs(args.editor_config)
        cfg = load_study(args.study, over)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run_study(cfg, restart=args.restart)
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed runs are kept in {cfg.output}; run the same command again to resume", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, RecordError, KeyError, IndexError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"wrote {cfg.output}, {Path(cfg.output).with_suffix('.md')}" + "".join(f", {p}" for p in result["plots"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.study:
        return study_main(args)
    try:
        cfg = setup(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.trace:
            trace_main(cfg, args)
            return 0
        result = run_evaluation(cfg)
    except (ConfigError, FileNotFoundError, RecordError, KeyError, IndexError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["testbed"]:
        t = result["testbed"]
        print(f"testbed {t['name']}: {t['parameters']:,} parameters, recall "
              + ", ".join(f"{k} {v['recall']:.3f}" for k, v in t["recall"].items()) + f"; knowledge at the {t['storage_site']}")
    print(result["markdown"])
    print(f"\nscoring: {result['pre_scoring']['prompts_per_second']} prompts/s (pre-edit pass)")
    for r in result["runs"]:
        print(f"{r['editor']} {r['mode']} b={r['batch_size']}: {r['edits_per_second']} edits/s, "
              f"peak memory {r['peak_memory_mb']} MiB, {r['scoring']['prompts_per_second']} prompts/s scored")
    print(f"wrote {cfg.output} and {Path(cfg.output).with_suffix('.md')}" + (f" and {', '.join(result['plots'])}" if result.get("plots") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
