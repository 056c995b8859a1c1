"""evaluate.py and train.py end to end on the tiny testbed."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import train  # noqa: E402

TINY = str(ROOT / "configs" / "testbed" / "tiny.yaml")


@pytest.fixture
def cache(tiny_testbed, tiny_cache, monkeypatch):
    monkeypatch.setenv("MEMOE_CACHE", str(tiny_cache))
    return tiny_cache


def test_evaluate_writes_every_field(cache, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = evaluate.main(["--editor", "ft", "--dataset", "synthetic", "--num-edits", "6", "--mode", "sequential-batch",
                        "--mode", "batch", "--batch-size", "3", "--batch-size", "6", "--testbed-config", TINY,
                        "--output", str(out), "--plot", "--no-progress", "--seed", "1"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(r["mode"], r["batch_size"]) for r in res["runs"]] == [("sequential-batch", 3), ("sequential-batch", 6), ("batch", 3), ("batch", 6)]
    for r in res["runs"]:
        for key in ("pre", "current", "final", "edit_seconds", "edits_per_second", "peak_memory_mb", "scoring", "restores"):
            assert key in r
        assert r["current"]["cf_efficacy"] is not None and r["pre"] == res["pre"]
        assert (r["final"] is None) == (r["mode"] == "batch")
    assert res["options"]["seed"] == 1 and res["dataset"]["num_edits"] == 6
    assert res["machine"]["device"] == "cpu" and res["machine"]["gpu"] is None  # where it ran, for the README
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| run |") and "pre-edit" in md and "ft sequential-batch b=3 (final)" in md
    for png in ("out-batch-size.png", "out-edits.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "prompts/s" in capsys.readouterr().out


def test_evaluate_yaml_config_with_overrides(cache, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"editors: [ft]\nnum_edits: 4\nmodes: [single]\ntestbed_config: {TINY}\nprogress: false\n")
    out = tmp_path / "o.json"
    assert evaluate.main(["--config", str(cfg), "--num-edits", "2", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dataset"]["num_edits"] == 2 and res["runs"][0]["mode"] == "single" and res["runs"][0]["restores"] == 2


def test_bad_options_are_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_edit: 4\n")
    assert evaluate.main(["--config", str(cfg)]) == 2
    assert "unknown config key 'num_edit'" in capsys.readouterr().err
    assert evaluate.main(["--num-edits", "0"]) == 2
    assert "'num_edits'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--mode", "parallel"])


def test_trace_tool(cache, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert evaluate.main(["--trace", "--trace-facts", "3", "--testbed-config", TINY, "--num-edits", "3",
                          "--output", str(out), "--no-progress"]) == 0
    res = json.loads((tmp_path / "t-trace.json").read_text())
    assert res["n_facts"] == 3 and "peak_mlp" in res
    assert (tmp_path / "t-trace.png").exists()
    assert "MLP peak" in capsys.readouterr().out


def train_args(tmp_path, *extra):
    return ["--testbed-config", TINY, "--num-edits", "6", "--output-dir", str(tmp_path / "ad"), "--no-progress",
            "--editor-config", str(tmp_path / "m.yaml"), "--log-dir", str(tmp_path / "logs"), *extra]


@pytest.fixture
def memoe_yaml(tmp_path):
    (tmp_path / "m.yaml").write_text("adapter: {layers: [0], num_experts: 4, rank: 16, scope: after_anchor}\ntrain: {lr: 0.02, max_steps: 120}\n")


def test_train_main_job_saves_and_scores_an_adapter(cache, tmp_path, capsys, memoe_yaml):
    assert train.main(train_args(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "recall requests" in text and "| pre-edit |" in text and "memoe, gate on" in text and "edits/s" in text
    res = json.loads((tmp_path / "ad" / "metrics.json").read_text())
    assert res["adapter"]["gate on"]["cf_efficacy"] == 1.0 and res["train"]["devices"] == 1
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    assert list((tmp_path / "logs").rglob("metrics.csv"))  # the CSV logger is on by default


def test_train_with_ddp_on_two_cpu_processes(cache, tmp_path, memoe_yaml):
    """The distributed path for real: Lightning launches a second process running train.py."""
    import os
    import subprocess

    env = {**os.environ, "MEMOE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *train_args(tmp_path, "--strategy", "ddp", "--devices", "2",
                           "--accelerator", "cpu")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "ad" / "metrics.json").read_text())
    assert res["train"]["devices"] == 2 and res["train"]["strategy"] == "DDPStrategy"
    assert res["adapter"]["gate on"]["cf_efficacy"] == 1.0  # the same quality as one process (previous test)
    assert res["adapter"]["gate on"]["cf_neighbourhood"] >= res["pre"]["cf_neighbourhood"] - 0.05


def test_run_time_errors_are_reported_not_raised(cache, tmp_path, capsys):
    rc = evaluate.main(["--editor", "nope", "--testbed-config", TINY, "--num-edits", "2", "--output", str(tmp_path / "x.json"), "--no-progress"])
    assert rc == 2 and "unknown editor 'nope'" in capsys.readouterr().err
    rc = evaluate.main(["--dataset", "counterfact", "--data-path", str(tmp_path / "missing.json"), "--no-progress"])
    assert rc == 2 and "missing.json" in capsys.readouterr().err


def test_device_option_moves_the_testbed(cache):
    from memoe.pipeline import EvalConfig, load_subject

    model, *_ = load_subject(EvalConfig(dataset="synthetic", num_edits=2, testbed_config=TINY, device="meta", progress=False))
    assert {p.device.type for p in model.parameters()} == {"meta"}  # (a GPU run passes cuda; meta needs none)
    model, *_ = load_subject(EvalConfig(dataset="synthetic", num_edits=2, testbed_config=TINY, progress=False))
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # the default: where it was built


def test_model_option_on_a_testbed_directory_edits_the_facts_it_learned(tiny_testbed):
    from memoe.pipeline import EvalConfig, load_subject

    # a synthetic world depends on its size: the tiny testbed's, not a fresh world of --num-edits facts
    _, _, ds, _ = load_subject(EvalConfig(dataset="synthetic", num_edits=3, model=str(tiny_testbed.path), device="cpu"))
    assert [r.request for r in ds.records] == [r.request for r in tiny_testbed.dataset.records[:3]]
    with pytest.raises(ValueError, match="testbed of dataset 'synthetic', not 'zsre'"):
        load_subject(EvalConfig(dataset="zsre", num_edits=3, model=str(tiny_testbed.path), device="cpu"))
    with pytest.raises(ValueError, match="exceeds the"):
        load_subject(EvalConfig(dataset="synthetic", num_edits=10**6, model=str(tiny_testbed.path), device="cpu"))


def test_model_option_names_a_corrupt_testbed_description(tiny_testbed, tmp_path):
    import shutil

    from memoe.pipeline import EvalConfig, load_subject

    copy = tmp_path / "tb"
    shutil.copytree(tiny_testbed.path, copy)
    (copy / "testbed.json").write_text('{"format": 1, "key": "x"')  # truncated
    with pytest.raises(ValueError, match=r"testbed.json: not a memoe testbed description"):
        load_subject(EvalConfig(dataset="synthetic", num_edits=3, model=str(copy), device="cpu"))
