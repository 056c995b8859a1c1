"""memoe beside EasyEdit: the same edits on the same model with the same settings, each framework in its own
process, timed and scored by one scorer.

    python bench/bench_easyedit.py --easyedit ~/EasyEdit --easyedit-python ~/easyedit-venv/bin/python
    python bench/bench_easyedit.py --easyedit ~/EasyEdit --easyedit-python ~/easyedit-venv/bin/python \\
        --method rome --edits 5

EasyEdit is not a memoe dependency: give its checkout (snapshot 14cea82 was measured) and the Python of a venv it
runs in (``../shared/design/easyedit-offline.md`` in the project says how to set one up offline). The model is a
real one memoe loads (default ``smollm2-135m``); EasyEdit reads memoe's float32 copy of it through a folder of links
whose name holds "llama" (EasyEdit dispatches on the name). Both get the first ``--edits`` records of the
CounterFact sample memoe ships, the layer(s), target steps, learning rate, KL weight, norm clamp and λ given here,
memoe's context prefixes for the method (``configs/editors/<model>/<method>.yaml``; EasyEdit's own randomly sampled
templates are replaced by them) and the same C0 (memoe's, written in EasyEdit's cache format, so neither computes
statistics in the timed part). Each framework runs alone, one after the other, with ``--threads`` torch threads;
only the edit is timed (EasyEdit: ``apply_<method>_to_model``; memoe: ``compute_deltas``), in seconds and
CPU-seconds, with the process's peak resident memory during the edit (sampled every 5 ms, weights paged in
beforehand) and that peak less the resident memory at the edit's start (the edit's own memory: the two processes
import different libraries). The weight changes both made are then scored by memoe's
teacher-forced metrics on the same unedited model. Prints a Markdown table and writes it with the raw figures to
``--output``. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

WORKER = Path(__file__).with_name("easyedit_worker.py")
EASYEDIT_HPARAMS = {"rome": "hparams/ROME/llama-7b.yaml", "memit": "hparams/MEMIT/llama-7b.yaml"}
METRICS = ("cf_efficacy", "cf_paraphrase", "cf_neighbourhood")


def memoe_overrides(method: str, layers: list[int], v_steps: int, v_lr: float, kl: float, clamp: float, lam: float) -> dict:
    over = {"layers": layers, "v_steps": v_steps, "v_lr": v_lr, "kl_factor": kl, "clamp_norm_factor": clamp}
    return {**over, "mom2_update_weight": lam} if method == "memit" else over


def easyedit_hparams(easyedit: Path, method: str, model_dir: Path, stats_dir: Path, layers: list[int], config,
                     v_steps: int, v_lr: float, kl: float, clamp: float, lam: float, samples: int) -> dict:
    """EasyEdit's shipped Llama hyperparameters with this comparison's settings on top (``config``: the model's)."""
    hp = yaml.safe_load((easyedit / EASYEDIT_HPARAMS[method]).read_text())
    hp = {k: _number(v) for k, v in hp.items()}
    hp.update(model_name=str(model_dir), stats_dir=str(stats_dir), device="cpu", layers=layers,
              v_num_grad_steps=v_steps, v_lr=v_lr, kl_factor=kl, clamp_norm_factor=clamp, v_loss_layer=config.num_hidden_layers - 1,
              mom2_n_samples=samples, model_parallel=False)
    if method == "memit":
        hp["mom2_update_weight"] = lam
    if config.tie_word_embeddings:  # no lm_head parameter of its own: EasyEdit reads the output matrix by this name
        hp["lm_head_module"] = "model.embed_tokens"
    return hp


def _number(value):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; EasyEdit's files are full of them."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def run_memoe(job: dict) -> None:
    """The memoe side (``--worker``): the same edit through memoe's editor, timed like EasyEdit's."""
    from safetensors.torch import save_file

    from memoe.data import load_edit_dataset
    from memoe.editors import make_editor
    from memoe.evaluation.harness import PeakMemory
    from memoe.models.loading import load_model

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model, tok = load_model(job["model"])
    records = load_edit_dataset(job["dataset"], limit=job["edits"]).records
    editor = make_editor(job["method"], None, job["overrides"], job["model_key"])
    editor.layer_covs(model, tok, sorted(editor.config.layers))  # C0 from memoe's cache, as EasyEdit reads its npz
    with torch.no_grad():  # page every weight in (they load lazily), so the peak measures the edit, not the load
        sum(float(p.sum()) for p in model.parameters())
    with PeakMemory("cpu") as mem:
        cpu0, t0 = time.process_time(), time.perf_counter()
        deltas, info = editor.compute_deltas(model, tok, [r.request for r in records])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out = Path(job["out"])
    save_file({k: v.contiguous() for k, v in deltas.items()}, str(out / "memoe-deltas.safetensors"))
    (out / "memoe.json").write_text(json.dumps({
        "framework": "memoe", "method": job["method"], "edits": len(records), "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2), "rss_before_mb": round(mem.peak_mb - mem.delta_mb, 1), "peak_rss_mb": round(mem.peak_mb, 1),
        "threads": job["threads"], "time_split": info.get("time_split")}, indent=1))


def linked_model_dir(source: Path, where: Path, name: str) -> Path:
    """A folder named ``name`` of links to ``source``'s files (EasyEdit picks its code path by the folder's name)."""
    folder = where / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        link = folder / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return folder


def score(model, tok, records, deltas_path: Path, pre) -> dict:
    """memoe's teacher-forced metrics with ``deltas_path``'s weight changes added, then the weights put back."""
    from safetensors.torch import load_file

    from memoe.evaluation.metrics import compute_metrics, raw_scores

    params = dict(model.named_parameters())
    deltas = load_file(str(deltas_path))
    originals = {n: params[n].detach().clone() for n in deltas}
    with torch.no_grad():
        for n, d in deltas.items():
            params[n].add_(d.to(params[n].dtype))
    try:
        return compute_metrics(raw_scores(model, tok, records), pre)
    finally:
        with torch.no_grad():
            for n, w in originals.items():
                params[n].copy_(w)


def main(easyedit: str, easyedit_python: str, method: str = "memit", edits: int = 20, layers: list[int] | None = None,
         v_steps: int = 25, v_lr: float = 0.1, kl: float = 0.0625, clamp: float = 4.0, lam: float = 500.0,
         threads: int = 1, model: str = "smollm2-135m", dataset: str = "counterfact-sample", skip_easyedit: bool = False,
         output: str | None = None) -> dict:
    from memoe.data import load_edit_dataset
    from memoe.editors import make_editor
    from memoe.evaluation.harness import describe_machine, machine_info
    from memoe.evaluation.metrics import compute_metrics, raw_scores
    from memoe.io import default_cache_dir, write_json
    from memoe.models.loading import load_model, model_key

    layers = layers or [3]
    ee_root = Path(easyedit).expanduser().resolve()
    if not (ee_root / "easyeditor").is_dir():
        raise SystemExit(f"--easyedit {easyedit}: no easyeditor/ package there (give the EasyEdit checkout)")
    key = model_key(model)
    m, tok = load_model(model)
    source = Path(m.config._name_or_path)
    if not (source / "config.json").is_file():
        raise SystemExit(f"--model {model}: EasyEdit needs a local model folder, and {source} is not one")
    records = load_edit_dataset(dataset, limit=edits).records
    if len(records) < edits:
        raise SystemExit(f"--edits {edits}: {dataset} has only {len(records)} records")
    over = memoe_overrides(method, layers, v_steps, v_lr, kl, clamp, lam)
    editor = make_editor(method, None, over, key)
    cfg = editor.config
    print(f"C0 for layers {layers} ({cfg.stats_samples} tokens of {cfg.stats_corpus}; computed once, then cached)", flush=True)
    covs = editor.layer_covs(m, tok, sorted(cfg.layers))

    work = Path(tempfile.mkdtemp(prefix="bench-easyedit-"))
    from safetensors.torch import save_file

    save_file({**{f"C.{l}": C.float().contiguous() for l, C in covs.items()},
               **{f"count.{l}": torch.tensor([cfg.stats_samples]) for l in covs}}, str(work / "stats.safetensors"))
    common = {"method": method, "edits": edits, "threads": threads, "out": str(work), "prefixes": cfg.context_prefixes}
    jobs = {"memoe": {**common, "model": model, "model_key": key, "dataset": dataset, "overrides": over}}
    if not skip_easyedit:
        model_dir = linked_model_dir(source, work, f"{source.name.split('-')[0].lower()}-llama-model")
        hp = easyedit_hparams(ee_root, method, model_dir, work / "stats", layers, m.config, v_steps,
                              v_lr, kl, clamp, lam, cfg.stats_samples)
        requests = [{"prompt": r.request.prompt, "subject": r.request.subject, "target_new": r.request.target_new,
                     "case_id": i} for i, r in enumerate(records)]
        jobs["easyedit"] = {**common, "easyedit": str(ee_root), "model_dir": str(model_dir), "hparams": hp,
                            "requests": requests, "stats": str(work / "stats.safetensors")}

    # the memoe side must find the model copy and C0 this process cached (the default cache folder is relative)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "MEMOE_CACHE": str(default_cache_dir().resolve())}
    for name, job in jobs.items():
        (work / f"{name}-job.json").write_text(json.dumps(job))
        cmd = ([easyedit_python, str(WORKER)] if name == "easyedit" else [sys.executable, __file__, "--worker"]) + [
            str(work / f"{name}-job.json")]
        print(f"{name}: {method}, {edits} edits, layers {layers}, {threads} thread(s) ...", flush=True)
        with open(work / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work).returncode
        if rc:
            tail = (work / f"{name}.log").read_text()[-3000:]
            raise SystemExit(f"the {name} run failed (exit {rc}); its log {work / f'{name}.log'} ends:\n{tail}")

    print("scoring both edits with memoe's metrics ...", flush=True)
    pre = raw_scores(m, tok, records)
    pre_metrics = compute_metrics(pre)
    rows = [{"framework": "pre-edit", **{k: pre_metrics[k] for k in METRICS}}]
    for name in jobs:
        res = json.loads((work / f"{name}.json").read_text())
        metrics = score(m, tok, records, work / f"{name}-deltas.safetensors", pre)
        rows.append({**res, **{k: metrics[k] for k in METRICS},
                     "edits_per_second": round(edits / res["seconds"], 4),
                     "edits_per_cpu_second": round(edits / res["cpu_seconds"], 4),
                     "edit_memory_mb": round(res["peak_rss_mb"] - res["rss_before_mb"], 1)})
    table = markdown(rows)
    print(table)
    out = {"settings": {"method": method, "edits": edits, "layers": layers, "v_steps": v_steps, "v_lr": v_lr, "kl": kl,
                        "clamp": clamp, "lambda": lam if method == "memit" else None, "threads": threads, "model": model,
                        "dataset": dataset, "prefixes": cfg.context_prefixes, "stats_samples": cfg.stats_samples,
                        "stats_corpus": editor.stats_corpus_used(m), "easyedit": str(ee_root)},
           "machine": (info := machine_info("cpu")), "machine_line": describe_machine(info), "rows": rows, "table": table, "work": str(work)}
    if output:
        write_json(output, out)
    return out


def markdown(rows: list[dict]) -> str:
    head = "| framework | Eff | Para | Nbhd | edit s | CPU-s | edits/s | edits/CPU-s | peak RSS MiB | edit's own MiB |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        f = lambda k, fmt="{:.3f}", r=r: fmt.format(r[k]) if r.get(k) is not None else "–"
        lines.append(f"| {r['framework']} | {f('cf_efficacy')} | {f('cf_paraphrase')} | {f('cf_neighbourhood')} | "
                     f"{f('seconds', '{:.1f}')} | {f('cpu_seconds', '{:.1f}')} | {f('edits_per_second', '{:.4f}')} | "
                     f"{f('edits_per_cpu_second', '{:.4f}')} | {f('peak_rss_mb', '{:.0f}')} | {f('edit_memory_mb', '{:.0f}')} |")
    done = {r["framework"]: r for r in rows}
    if "easyedit" in done and "memoe" in done:
        a, b = done["memoe"], done["easyedit"]
        lines.append(f"\nmemoe / EasyEdit: {b['seconds'] / a['seconds']:.2f}x the edits per second, "
                     f"{b['cpu_seconds'] / a['cpu_seconds']:.2f}x per CPU-second; peak resident memory "
                     f"{a['peak_rss_mb']:.0f} vs {b['peak_rss_mb']:.0f} MiB, of which the edit's own "
                     f"{a['edit_memory_mb']:.0f} vs {b['edit_memory_mb']:.0f} MiB.")
    return "\n".join(lines)


def cli(argv=None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return run_memoe(json.loads(Path(sys.argv[2]).read_text()))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--easyedit", required=True, help="the EasyEdit checkout (the folder holding easyeditor/)")
    p.add_argument("--easyedit-python", default=sys.executable, help="the Python of a venv EasyEdit runs in (default: this one)")
    p.add_argument("--method", choices=sorted(EASYEDIT_HPARAMS), default="memit", help="the editor both run (ROME: one edit at a time)")
    p.add_argument("--edits", type=int, default=20, help="the first N records of --dataset, edited as one batch (ROME: in turn)")
    p.add_argument("--layers", type=int, nargs="+", default=[3], help="edit layer(s); the target is set at the last")
    p.add_argument("--v-steps", type=int, default=25, help="target optimisation steps (at most)")
    p.add_argument("--v-lr", type=float, default=0.1, help="target optimisation learning rate")
    p.add_argument("--kl", type=float, default=0.0625, help="weight of the KL term of the target loss")
    p.add_argument("--clamp", type=float, default=4.0, help="||δ|| clamp, times ||h||")
    p.add_argument("--lam", type=float, default=500.0, help="MEMIT's λ (mom2_update_weight)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each framework's process")
    p.add_argument("--model", default="smollm2-135m", help="a preset, GGUF file or local model folder")
    p.add_argument("--dataset", default="counterfact-sample", help="edit records (default: the CounterFact sample memoe ships)")
    p.add_argument("--skip-easyedit", action="store_true", help="run memoe's side only")
    p.add_argument("--output", default=None, help="JSON file for the table and the raw figures")
    a = p.parse_args(argv)
    main(a.easyedit, a.easyedit_python, a.method, a.edits, a.layers, a.v_steps, a.v_lr, a.kl, a.clamp, a.lam,
         a.threads, a.model, a.dataset, a.skip_easyedit, a.output)


if __name__ == "__main__":
    cli()
