"""Experiments end to end on the tiny testbed: the plan, the JSON, tables and PNGs, layer sweeps, and resuming studies."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import memoe.experiment as exp_mod
from memoe.editors import make_editor
from memoe.editors.memoe import MEMoEEditor
from memoe.errors import UnknownNameError
from memoe.evaluation.tables import headline, run_label, winners
from memoe.experiment import EditTarget, Experiment, Grid, load_experiment, plan, run_experiment
from memoe.resources import config_root

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402

TINY = str(ROOT / "configs" / "testbed" / "tiny.yaml")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cache(tiny_testbed, tiny_cache, monkeypatch):
    monkeypatch.setenv("MEMOE_CACHE", str(tiny_cache))
    return tiny_cache


def write_study(tmp_path, edits: dict | None = None, **grid) -> Path:
    spec = {"name": "tiny", "edits": {"dataset": "synthetic", "testbed_config": TINY, "num_edits": 6, **(edits or {})},
            "grid": grid, "scoring": {"fluency_prompts": 0}, "progress": False, "plot": True, "output": str(tmp_path / "study.json")}
    path = tmp_path / "tiny-study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def summary(md: str) -> str:
    return md.split("\n\nEvery metric")[0]


def test_every_shipped_study_loads_and_plans():
    names = sorted(p.stem for p in (config_root() / "studies").glob("*.yaml"))
    assert {"batch-size", "layers", "lifelong"} <= set(names)
    for name in names:
        exp = load_experiment(name, study=True)
        runs, _ = plan(exp)
        assert runs, name
        assert exp.output.endswith(f"{exp.name}-{exp.edits.dataset}.json")


def test_plan_runs_a_batch_above_the_edits_once_as_one_batch_of_all():
    exp = Experiment(edits=EditTarget(num_edits=20), grid=Grid(editors=["memit", "rome"], modes=["batch", "single"], batch_sizes=[1, 16, 64]))
    runs, skipped = plan(exp)
    assert [r.key for r in runs] == ["memit batch b=1", "memit batch b=16", "memit batch b=20", "memit single b=1",
                                     "rome batch b=1", "rome batch b=16", "rome batch b=20", "rome single b=1"]
    assert skipped == []
    exp.grid.batch_sizes = [1, 20, 64]  # 64 would repeat the run at 20
    runs, skipped = plan(exp)
    assert [r.key for r in runs if r.editor == "memit"] == ["memit batch b=1", "memit batch b=20", "memit single b=1"]
    assert [(run_label(s), s["reason"]) for s in skipped] == [("memit batch b=64", "batch size above the 20 edits"),
                                                              ("rome batch b=64", "batch size above the 20 edits")]
    exp.grid.skip, exp.grid.editor_batch_sizes = {"memit batch b=20": "too slow here"}, {"rome": [1]}
    runs, skipped = plan(exp)
    assert [r.key for r in runs] == ["memit batch b=1", "memit single b=1", "rome batch b=1", "rome single b=1"]
    assert [(run_label(s), s["reason"]) for s in skipped][0] == ("memit batch b=20", "too slow here")
    exp.grid.skip, exp.grid.mode_batch_sizes = {}, {"batch": [20], "sequential-batch": [5]}
    exp.grid.modes = ["single", "batch", "sequential-batch"]
    runs, _ = plan(exp)
    assert [r.key for r in runs] == ["memit single b=1", "memit batch b=20", "memit sequential-batch b=5",
                                     "rome single b=1", "rome batch b=1", "rome sequential-batch b=1"]  # rome: its own [1]


def test_bad_study_options_are_named(capsys):
    assert evaluate.main(["--study", "batch-size", "--editor-config", "memoe"]) == 2
    assert "--editor-config expects NAME=VALUE, got 'memoe'" in capsys.readouterr().err
    assert evaluate.main(["--study", "batch-size", "--mode", "batch", "--batch-size", "0"]) == 2
    assert "'grid.batch_sizes': 0 is below the minimum 1" in capsys.readouterr().err


def test_unknown_study_and_editor_are_named(tmp_path):
    with pytest.raises(UnknownNameError, match="no study named 'nope'.*batch-size"):
        load_experiment("nope", study=True)
    with pytest.raises(UnknownNameError, match="unknown editor 'nosuch'"):
        load_experiment(str(write_study(tmp_path, editors=["nosuch"])), study=True)


def test_tiny_study_end_to_end(cache, tmp_path, capsys):
    path = write_study(tmp_path, editors=["ft", "memit"], modes=["batch", "sequential-batch"], batch_sizes=[3, 6, 64],
                       checkpoint_every=3,
                       editor_overrides={"memit": {"stats_samples": 2000, "v_steps": 20, "stats_cache": str(tmp_path / "c0")}})
    assert evaluate.main(["--study", str(path)]) == 0
    out = tmp_path / "study.json"
    res = json.loads(out.read_text())
    keys = [f"{e} {m} b={b}" for e in ("ft", "memit") for m in ("batch", "sequential-batch") for b in (3, 6)]
    assert res["complete"] and res["order"] == keys and list(res["runs"]) == keys
    assert {run_label(s) for s in res["skipped"]} == {f"{e} {m} b=64" for e in ("ft", "memit") for m in ("batch", "sequential-batch")}
    for _key, r in res["runs"].items():
        assert r["num_edits"] == 6 and r["current"]["cf_efficacy"] is not None and r["pre"] == res["pre"]
        if r["mode"] == "sequential-batch":
            # re-scored every 3 edits (batches of 6 pass both marks at once); the last is the final score
            assert [c["edits"] for c in r["checkpoints"]] == ([3, 6] if r["batch_size"] == 3 else [6])
            assert r["checkpoints"][-1]["metrics"]["cf_efficacy"] == r["final"]["cf_efficacy"]
        else:
            assert r["final"] is None and r["checkpoints"] == []
    assert res["runs"]["memit batch b=3"]["config"]["v_steps"] == 20  # the study's override reached the editor
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| editor | mode | batch |") and summary(md).count("\n| ft ") == 4 and summary(md).count("\n| memit ") == 4
    assert "| ft sequential-batch b=3 (final) |" in md  # every metric, below the summary
    assert "Best run per metric: cf_efficacy" in md
    assert "Skipped: ft batch b=64, ft sequential-batch b=64, memit batch b=64, memit sequential-batch b=64 (batch size above the 6 edits)" in md
    for suffix in ("-batch-size.png", "-edits.png"):
        png = tmp_path / f"study{suffix}"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert not (tmp_path / "study-layers.png").exists()
    assert md.strip() in capsys.readouterr().out  # the table is printed too
    best = winners(res)
    assert best["cf_efficacy"][1] == max(headline(r)["cf_efficacy"] for r in res["runs"].values())


def test_layer_sweep_edits_one_layer_per_run(cache, tmp_path):
    exp = load_experiment(str(write_study(tmp_path, editors=["ft"], modes=["batch"], batch_sizes=[6], layers=[0, 2])), study=True)
    res = run_experiment(exp, resume=True, log=lambda *_: None)
    assert [(r["layer"], r["config"]["layers"]) for r in res["runs"].values()] == [(0, [0]), (2, [2])]
    assert any(p.endswith("-layers.png") for p in res["plots"])
    assert res["markdown"].startswith("| editor | mode | batch | layer |")


def test_layer_override_changes_only_the_layers(tmp_path):
    """MEMoE keeps its layers inside ``adapter``: the sweep's override must not reset the other adapter keys."""
    ed = make_editor("memoe", str(ROOT / "configs" / "editors" / "memoe.yaml"), MEMoEEditor.layer_override([3]))
    assert ed.config.adapter.layers == [3] and ed.config.adapter.rank == 32 and ed.config.train.lr == 0.02


def test_interrupted_study_resumes_without_redoing_runs(cache, tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, editors=["ft"], modes=["batch", "sequential-batch"], batch_sizes=[2, 3])
    real, calls = exp_mod.run_mode, []

    def flaky(editor, model, tok, records, mode, batch_size, **kw):
        calls.append((mode, batch_size))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the third run
        return real(editor, model, tok, records, mode, batch_size, **kw)

    monkeypatch.setattr(exp_mod, "run_mode", flaky)
    assert evaluate.main(["--study", str(path)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    out = tmp_path / "study.json"
    first = json.loads(out.read_text())
    assert not first["complete"] and list(first["runs"]) == ["ft batch b=2", "ft batch b=3"]
    calls.clear()
    assert evaluate.main(["--study", str(path)]) == 0
    assert calls == [("sequential-batch", 2), ("sequential-batch", 3)]  # only the runs not yet done
    done = json.loads(out.read_text())
    assert done["complete"] and len(done["runs"]) == 4
    for key in first["runs"]:
        assert done["runs"][key] == first["runs"][key]  # kept, not redone
    # the same study from scratch gives the same metrics: resuming changes nothing
    monkeypatch.setattr(exp_mod, "run_mode", real)
    fresh = run_experiment(load_experiment(str(path), {"output": str(tmp_path / "fresh.json")}, study=True), log=lambda *_: None)
    for key, r in fresh["runs"].items():
        assert r["current"] == done["runs"][key]["current"] and r["final"] == done["runs"][key]["final"]


def test_resume_refuses_a_different_study_or_a_corrupt_file(cache, tmp_path, capsys):
    path = write_study(tmp_path, editors=["ft"], modes=["batch"], batch_sizes=[3])
    assert evaluate.main(["--study", str(path)]) == 0
    assert evaluate.main(["--study", str(path), "--num-edits", "4"]) == 2
    assert "holds a different experiment ('edits': {" in capsys.readouterr().err
    out = tmp_path / "study.json"
    out.write_text('{"definition": {')
    assert evaluate.main(["--study", str(path)]) == 2
    assert f"{out} is not a memoe result file" in capsys.readouterr().err
    assert out.read_text() == '{"definition": {'  # nothing lost: the user's file is left alone
    assert evaluate.main(["--study", str(path), "--restart"]) == 0
    assert json.loads(out.read_text())["complete"]


@pytest.mark.slow
def test_killed_study_resumes(cache, tmp_path):
    """A real kill (SIGKILL, no clean-up at all) between runs: the file stays valid and the rerun finishes it."""
    path = write_study(tmp_path, editors=["ft"], modes=["sequential-batch"], batch_sizes=[1, 2, 4, 8], edits={"num_edits": 8})
    out = tmp_path / "study.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), "--study", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 300, {}
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.exists():
                seen = json.loads(out.read_text())["runs"]  # every read is a whole file: writes are atomic
                if seen:
                    break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = json.loads(out.read_text())
    assert 1 <= len(killed["runs"]) < 4 and not killed["complete"], "the study should be killed midway"
    res = run_experiment(load_experiment(str(path), study=True), resume=True, log=lambda *_: None)
    assert res["complete"] and len(res["runs"]) == 4
    for key, r in killed["runs"].items():
        assert res["runs"][key] == r


def test_a_study_reruns_only_the_runs_whose_config_changed(cache, tmp_path, monkeypatch, capsys):
    """The result file stored config *paths*: a YAML edited between an interrupted run and its resumption mixed runs
    made under both settings, silently. It stores their contents now: the runs of an editor whose YAML changed run
    again, the other editors' runs are kept, an editor or batch size added to the grid just adds its runs, and a
    changed testbed config refuses the whole file."""
    ft_yaml = tmp_path / "ft.yaml"
    ft_yaml.write_text("method: ft\nlr: 0.005\nsteps: 5\n")
    path = write_study(tmp_path, editors=["ft", "kn"], modes=["batch"], batch_sizes=[3], editor_configs={"ft": str(ft_yaml)})
    assert evaluate.main(["--study", str(path)]) == 0
    out = tmp_path / "study.json"
    first = json.loads(out.read_text())
    stored = first["definition"]["config_contents"]
    assert stored["editor ft"] == {"method": "ft", "lr": 0.005, "steps": 5} and "testbed" in stored
    real, calls = exp_mod.run_mode, []
    monkeypatch.setattr(exp_mod, "run_mode", lambda editor, *a, **kw: calls.append(editor.name) or real(editor, *a, **kw))
    ft_yaml.write_text("method: ft\nlr: 0.5\nsteps: 1\n")
    assert evaluate.main(["--study", str(path)]) == 0
    assert calls == ["ft"] and "the settings of ft changed since its runs were made" in capsys.readouterr().out
    second = json.loads(out.read_text())
    assert second["runs"]["ft batch b=3"]["config"]["lr"] == 0.5 and second["runs"]["kn batch b=3"] == first["runs"]["kn batch b=3"]
    calls.clear()
    spec = yaml.safe_load(path.read_text())
    spec["grid"]["editors"].append("rome")
    path.write_text(yaml.safe_dump(spec))
    assert evaluate.main(["--study", str(path)]) == 0
    assert calls == ["rome"] and list(json.loads(out.read_text())["runs"]) == ["ft batch b=3", "kn batch b=3", "rome batch b=3"]
    calls.clear()
    spec["grid"]["editors"], spec["grid"]["batch_sizes"] = ["kn", "rome"], [3, 6]  # fewer editors, another batch size
    path.write_text(yaml.safe_dump(spec))
    assert evaluate.main(["--study", str(path)]) == 0
    assert calls == ["kn", "rome"]
    assert list(json.loads(out.read_text())["runs"]) == ["kn batch b=3", "kn batch b=6", "rome batch b=3", "rome batch b=6"]
    spec["edits"]["testbed_config"] = str(tmp_path / "tb.yaml")
    (tmp_path / "tb.yaml").write_text(Path(TINY).read_text())  # another testbed file: refused before anything loads
    path.write_text(yaml.safe_dump(spec))
    assert evaluate.main(["--study", str(path)]) == 2
    assert "holds a different experiment ('edits'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_wheel_install_runs_a_shipped_study(tiny_testbed_built, tiny_cache, tmp_path):
    """Configs and studies are package data: a wheel installed into a fresh venv, run outside the checkout, finds them."""
    import sysconfig

    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True, **kw)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path / "whl"))
    run(sys.executable, "-m", "venv", str(tmp_path / "venv"))
    py = tmp_path / "venv" / "bin" / "python"
    site = run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # the dependencies (torch, transformers ...) from this environment, without its editable memoe
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, (tmp_path / "whl").glob("memoe-*.whl")))
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import memoe, json; from memoe.experiment import load_experiment, run_experiment\n"
            "assert 'site-packages' in memoe.__file__, memoe.__file__\n"
            "exp = load_experiment('main', {'edits': {'dataset': 'synthetic', 'testbed_config': 'configs/testbed/tiny.yaml',"
            " 'num_edits': 2}, 'grid': {'editors': ['ft'], 'modes': ['batch'], 'batch_sizes': [2]}, 'progress': False,"
            " 'plot': False}, study=True)\n"
            "r = run_experiment(exp)\n"
            "print(json.dumps({'out': exp.output, 'complete': r['complete'], 'runs': list(r['runs'])}))")
    env = {**os.environ, "MEMOE_CACHE": str(tiny_cache), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    res = json.loads(run(str(py), "-c", code, cwd=work, env=env).stdout.strip().splitlines()[-1])
    assert res == {"out": "runs/studies/main-synthetic.json", "complete": True, "runs": ["ft batch b=2"]}
    assert (work / res["out"]).exists()
