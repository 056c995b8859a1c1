"""evaluate.py and train.py end to end on the tiny testbed."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import train  # noqa: E402

from .markers import needs_shared_data  # noqa: E402

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
    runs = list(res["runs"].values())
    assert [(r["mode"], r["batch_size"]) for r in runs] == [("sequential-batch", 3), ("sequential-batch", 6), ("batch", 3), ("batch", 6)]
    for r in runs:
        for key in ("pre", "current", "final", "edit_seconds", "edits_per_second", "peak_memory_mb", "scoring", "restores"):
            assert key in r
        assert r["current"]["cf_efficacy"] is not None and r["pre"] == res["pre"]
        assert (r["final"] is None) == (r["mode"] == "batch")
    assert res["options"]["edits"]["seed"] == 1 and res["dataset"]["num_edits"] == 6
    assert res["machine"]["device"] == "cpu" and res["machine"]["gpu"] is None  # where it ran, for the README
    p = res["protocol"]  # how the numbers were made
    assert p["generation"]["max_new_tokens"] == 50 and p["chat_template"] is None and "first records" in p["records"]["rule"]
    for key in ("gen_efficacy", "gen_paraphrase", "gen_neighbourhood", "cf_plus_neighbourhood", "prefixed_efficacy",
                "same_subject_agreement", "perplexity_ratio"):
        assert all(r["current"][key] is not None for r in runs), key
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| editor | mode | batch |") and "| run |" in md and "ft sequential-batch b=3 (final)" in md
    for png in ("out-batch-size.png", "out-edits.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "prompts/s" in capsys.readouterr().out


def test_evaluate_yaml_config_with_overrides(cache, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"edits: {{num_edits: 4, testbed_config: {TINY}}}\ngrid: {{editors: [ft], modes: [single]}}\nprogress: false\n")
    out = tmp_path / "o.json"
    assert evaluate.main(["--config", str(cfg), "--num-edits", "2", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"].values()
    assert res["dataset"]["num_edits"] == 2 and run["mode"] == "single" and run["restores"] == 2


def test_bad_options_are_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("edits: {num_edit: 4}\n")
    assert evaluate.main(["--config", str(cfg)]) == 2
    assert "unknown config key 'edits.num_edit'" in capsys.readouterr().err
    assert evaluate.main(["--num-edits", "0"]) == 2
    assert "'edits.num_edits': 0 is below the minimum 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--mode", "parallel"])


def test_trace_tool(cache, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert evaluate.main(["--trace", "--trace-facts", "3", "--testbed-config", TINY, "--num-edits", "3",
                          "--output", str(out), "--no-progress"]) == 0
    res = json.loads((tmp_path / "t-trace.json").read_text())
    assert res["n_facts"] == 3 and "peak_mlp" in res and "peak_attn" in res
    assert res["selection"]["rule"] == "greedy" and res["selection"]["kept"] == 3
    assert len(res["facts"]) == 3 and res["settings"]["samples"] == 2 and res["settings"]["window"] == 10
    assert (tmp_path / "t-trace.png").exists()
    assert "peak mlp" in capsys.readouterr().out


def test_locate_tool_finds_knowledge_neurons_and_draws_them_beside_a_trace(cache, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert evaluate.main(["--trace", "--trace-facts", "2", "--testbed-config", TINY, "--num-edits", "3", "--output", str(out),
                          "--no-progress"]) == 0
    assert evaluate.main(["--locate", "kn", "--locate-facts", "3", "--locate-steps", "5", "--locate-paraphrases", "1",
                          "--locate-trace", str(tmp_path / "t-trace.json"), "--testbed-config", TINY, "--num-edits", "3",
                          "--output", str(out), "--no-progress"]) == 0
    res = json.loads((tmp_path / "t-locate-kn.json").read_text())
    assert res["facts"] == 3 and len(res["facts_found"]) == 3 and res["settings"]["steps"] == 5
    assert all(f["prompts"] == 2 for f in res["facts_found"])  # the prompt and one paraphrase voted
    assert sum(res["per_layer"]) == res["neurons"] == sum(len(f["neurons"]) for f in res["facts_found"]) > 0
    assert res["trace_peaks"]["peak_mlp"]["layer"] in range(len(res["per_layer"]))
    assert (tmp_path / "t-locate-kn.png").exists()
    assert "most neurons at layer" in capsys.readouterr().out
    assert evaluate.main(["--locate", "kn", "--trace", "--testbed-config", TINY, "--output", str(out), "--no-progress"]) == 2


def test_known_only_is_recorded(cache, tmp_path):
    out = tmp_path / "k.json"
    assert evaluate.main(["--editor", "ft", "--testbed-config", TINY, "--num-edits", "3", "--mode", "batch",
                          "--batch-size", "3", "--known-only", "--output", str(out), "--no-progress"]) == 0
    sel = json.loads(out.read_text())["dataset"]["selection"]
    assert sel["rule"] == "prefers_true" and sel["kept"] == 3 and sel["tried"] >= 3


def test_real_model_without_its_own_config_is_told_where_to_add_one(tmp_path, capsys):
    from memoe.config import ConfigError
    from memoe.experiment import EditTarget
    from memoe.resources import editor_config_path

    assert str(editor_config_path("rome", EditTarget(model="smollm2-135m").config_key())).endswith("configs/editors/smollm2-135m/rome.yaml")
    with pytest.raises(ConfigError, match="configs/editors/mystery-7b/rome.yaml.*--editor-config rome=PATH.*smollm2-135m"):
        editor_config_path("rome", EditTarget(model=str(tmp_path / "mystery-7b")).config_key())
    assert editor_config_path("rome", EditTarget().config_key()).name == "rome.yaml"  # the testbed's


@pytest.mark.slow
@needs_shared_data
def test_trace_on_the_real_model(tmp_path, capsys):
    """ROME's protocol on SmolLM2: two facts it knows by greedy decoding, from the shared CounterFact file."""
    out = tmp_path / "r.json"
    assert evaluate.main(["--trace", "--model", "smollm2-135m", "--dataset", "counterfact", "--trace-facts", "2",
                          "--trace-samples", "1", "--output", str(out), "--no-progress"]) == 0
    res = json.loads((tmp_path / "r-trace.json").read_text())
    assert res["n_facts"] == 2 and res["selection"]["kept"] == 2 and res["selection"]["tried"] >= 2
    assert res["num_layers"] == 30 and res["p_clean"] > res["p_corrupt"]
    for f in res["facts"]:  # the clean last-layer state at the last token gives the clean probability back
        assert f["restored"]["hidden"][-1][-1] == pytest.approx(f["p_clean"], abs=1e-4)


@pytest.mark.slow
@needs_shared_data
def test_locate_on_the_real_model(tmp_path):
    """Knowledge neurons of one fact SmolLM2 knows: found, in the model's 30 layers, each with a positive attribution."""
    out = tmp_path / "r.json"
    assert evaluate.main(["--locate", "kn", "--model", "smollm2-135m", "--dataset", "counterfact", "--locate-facts", "1",
                          "--locate-paraphrases", "1", "--output", str(out), "--no-progress"]) == 0
    res = json.loads((tmp_path / "r-locate-kn.json").read_text())
    assert len(res["per_layer"]) == 30 and res["neurons"] > 0
    assert all(0 <= l < 30 and score > 0 for l, _, score, _ in res["facts_found"][0]["neurons"])


def train_args(tmp_path, *extra, compare="none"):
    return ["--model", "testbed", "--dataset", "synthetic", "--compare", compare, "--testbed-config", TINY, "--num-edits", "6",
            "--output-dir", str(tmp_path / "ad"), "--no-progress",
            "--editor-config", str(tmp_path / "m.yaml"), "--log-dir", str(tmp_path / "logs"), *extra]


@pytest.fixture
def memoe_yaml(tmp_path):
    (tmp_path / "m.yaml").write_text("method: memoe\nadapter: {layers: [0], num_experts: 4, rank: 16, scope: after_anchor}\n"
                                     "train: {lr: 0.02, max_steps: 120}\n")


def test_train_main_job_saves_and_scores_an_adapter(cache, tmp_path, capsys, memoe_yaml):
    assert train.main(train_args(tmp_path, compare="memit")) == 0
    text = capsys.readouterr().out
    assert "recall requests" in text and "| pre-edit |" in text and "memoe, gate on" in text and "edits/s" in text
    assert "| memit (one batch" in text
    res = json.loads((tmp_path / "ad" / "metrics.json").read_text())
    assert res["adapter"]["gate on"]["cf_efficacy"] == 1.0 and res["train"]["devices"] == 1
    memit = res["compared"]["memit"]  # scored on the same edits (the tiny testbed is too small for memit.yaml to flip them)
    assert memit["seconds"] > 0 and {"covariance", "targets", "keys", "solve"} <= set(memit["time_split"])
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    assert list((tmp_path / "logs").rglob("metrics.csv"))  # the CSV logger is on by default


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_train_max_steps_below_one_is_an_error(cache, tmp_path, capsys, memoe_yaml, steps):
    """``--max-steps 0`` used to be ignored (the config's steps ran) and ``-5`` crashed inside Lightning."""
    assert train.main(train_args(tmp_path, "--max-steps", steps)) == 2
    assert f"'max_steps': {steps} is below the minimum 1" in capsys.readouterr().err
    assert not (tmp_path / "ad").exists()


@pytest.mark.slow
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
    from memoe.experiment import EditTarget, load_subject

    model = load_subject(EditTarget(dataset="synthetic", num_edits=2, testbed_config=TINY, device="meta"), progress=False).model
    assert {p.device.type for p in model.parameters()} == {"meta"}  # (a GPU run passes cuda; meta needs none)
    model = load_subject(EditTarget(dataset="synthetic", num_edits=2, testbed_config=TINY), progress=False).model
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # the default: where it was built


def test_model_option_on_a_testbed_directory_edits_the_facts_it_learned(tiny_testbed):
    from memoe.errors import ConfigError, DataError
    from memoe.experiment import EditTarget, load_subject

    # a synthetic world depends on its size: the tiny testbed's, not a fresh world of --num-edits facts
    ds = load_subject(EditTarget(dataset="synthetic", num_edits=3, model=str(tiny_testbed.path), device="cpu")).dataset
    assert [r.request for r in ds.records] == [r.request for r in tiny_testbed.dataset.records[:3]]
    with pytest.raises(ConfigError, match="testbed of dataset 'synthetic', not 'zsre'"):
        load_subject(EditTarget(dataset="zsre", num_edits=3, model=str(tiny_testbed.path), device="cpu"))
    with pytest.raises(DataError, match="exceeds the"):
        load_subject(EditTarget(dataset="synthetic", num_edits=10**6, model=str(tiny_testbed.path), device="cpu"))


def test_model_option_names_a_corrupt_testbed_description(tiny_testbed, tmp_path):
    import shutil

    from memoe.errors import ConfigError
    from memoe.experiment import EditTarget, load_subject

    copy = tmp_path / "tb"
    shutil.copytree(tiny_testbed.path, copy)
    (copy / "testbed.json").write_text('{"format": 1, "key": "x"')  # truncated
    with pytest.raises(ConfigError, match=r"testbed.json: not a memoe testbed description"):
        load_subject(EditTarget(dataset="synthetic", num_edits=3, model=str(copy), device="cpu"))


def test_unknown_editor_fails_before_any_work(cache, tmp_path, capsys, monkeypatch):
    """``--editor ft --editor nosuch`` used to run ft to the end, then fail and write nothing."""
    import memoe.experiment

    monkeypatch.setattr(memoe.experiment, "load_subject", lambda *a, **kw: pytest.fail("loaded the model before checking editors"))
    out = tmp_path / "x.json"
    assert evaluate.main(["--editor", "ft", "--editor", "nosuch", "--testbed-config", TINY, "--output", str(out)]) == 2
    assert "nosuch" in capsys.readouterr().err and not out.exists()


def test_finished_runs_are_written_before_a_later_one_fails(cache, tmp_path, monkeypatch):
    import memoe.experiment

    real, calls = memoe.experiment.run_mode, []

    def second_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real(*a, **kw)

    monkeypatch.setattr(memoe.experiment, "run_mode", second_fails)
    out = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        evaluate.main(["--editor", "ft", "--testbed-config", TINY, "--num-edits", "3", "--mode", "batch",
                       "--batch-size", "3", "--batch-size", "1", "--output", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    assert res["complete"] is False and [(r["mode"], r["batch_size"]) for r in res["runs"].values()] == [("batch", 3)]


def test_batch_size_above_the_edits_is_labelled_by_the_batch_it_is(cache, tmp_path):
    out = tmp_path / "x.json"
    assert evaluate.main(["--editor", "ft", "--testbed-config", TINY, "--num-edits", "3", "--mode", "batch",
                          "--batch-size", "10", "--output", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] is True and [r["batch_size"] for r in res["runs"].values()] == [3]
    assert "ft batch b=3" in out.with_suffix(".md").read_text()


@needs_shared_data
def test_bad_records_error_is_honoured_when_a_testbed_is_built(tmp_path, capsys, monkeypatch):
    """``--bad-records error`` used to be ignored on the testbed path (the record was skipped, rc 0)."""
    from memoe.data.loaders import default_data_dir

    records = json.loads((default_data_dir() / "counterfact.json").read_text())[:3]
    records[1]["requested_rewrite"]["target_new"] = dict(records[1]["requested_rewrite"]["target_true"])  # a no-op edit
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    tb_yaml = tmp_path / "tb.yaml"
    tb_yaml.write_text((ROOT / "configs" / "testbed" / "tiny.yaml").read_text().replace("dataset: synthetic", "dataset: counterfact")
                       .replace("num_edits: 60", "num_edits: 3"))
    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path / "cache"))
    args = ["--editor", "ft", "--dataset", "counterfact", "--data-path", str(data), "--testbed-config", str(tb_yaml),
            "--num-edits", "2", "--output", str(tmp_path / "o.json"), "--no-progress"]
    assert evaluate.main([*args, "--bad-records", "error"]) == 2
    err = capsys.readouterr().err
    assert f"case_id={records[1]['case_id']!r}" in err and "error:" in err
    assert not (tmp_path / "cache" / "testbeds").exists()  # nothing was built


def test_missing_resume_checkpoint_is_a_one_line_error(cache, tmp_path, capsys, memoe_yaml):
    assert train.main(train_args(tmp_path, "--resume", str(tmp_path / "nope.json"))) == 2
    assert "no checkpoint at" in capsys.readouterr().err


@needs_shared_data
def test_num_edits_beyond_a_real_dataset_is_an_error(tmp_path):
    from memoe.data.loaders import default_data_dir
    from memoe.experiment import EditTarget, load_subject

    rows = json.loads((default_data_dir() / "counterfact.json").read_text())[:3]
    (tmp_path / "cf.json").write_text(json.dumps(rows))
    tiny = tmp_path / "tiny-hf"
    from transformers import LlamaForCausalLM

    from memoe.models import llama3_mini_config
    from tests.evaluation.fakes import word_tokenizer

    tok = word_tokenizer(["a"])
    LlamaForCausalLM(llama3_mini_config(vocab_size=len(tok))).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    with pytest.raises(ValueError, match="--num-edits 5 exceeds the 3 usable records"):
        load_subject(EditTarget(dataset="counterfact", data_path=str(tmp_path / "cf.json"), num_edits=5, model=str(tiny), device="cpu"))


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from memoe.cli import run_cli
    from memoe.errors import DataError

    def mistake(argv):
        raise DataError("record case_id=7, field 'prompt': no subject")

    def bug(argv):
        raise KeyError("internal")

    assert run_cli(mistake) == 2
    assert capsys.readouterr().err == "error: record case_id=7, field 'prompt': no subject\n"
    with pytest.raises(KeyError):  # not turned into "error: ..." and exit 2
        run_cli(bug)


def test_command_line_options_come_from_the_dataclasses():
    """Each option is declared once, as a field: the parser sets exactly the fields it names."""
    from memoe.cli import overrides

    p, cmd_opts, exp_opts = evaluate.parser()
    ns = p.parse_args(["--editor", "rome", "memit", "--batch-size", "1", "--batch-size", "16", "--no-progress",
                       "--score-batch-size", "8", "--editor-config", "rome=r.yaml", "--trace-window", "3"])
    assert overrides(ns, exp_opts) == {"grid": {"editors": ["rome", "memit"], "batch_sizes": [1, 16], "editor_configs": {"rome": "r.yaml"}},
                                       "progress": False, "scoring": {"batch_size": 8}}
    assert overrides(ns, cmd_opts) == {"trace_options": {"window": 3}}
    p, opts = train.parser()
    job = train.from_dict(train.TrainJob, overrides(p.parse_args(["--accelerator", "cpu", "--num-edits", "5"]), opts))
    assert job.trainer.accelerator == "cpu" and job.trainer.logger == "csv"  # the job's own trainer defaults stay
    assert job.edits.num_edits == 5


def test_the_main_job_edits_smollm2_with_the_shipped_records_by_default():
    """``python train.py``: the real model and the CounterFact sample memoe ships; ``--model testbed`` the testbed job.
    The help shows the job's own defaults, not those of a bare EditTarget."""
    from memoe.cli import options, overrides

    p, opts = train.parser()
    job = train.from_dict(train.TrainJob, overrides(p.parse_args([]), opts))
    assert (job.edits.model, job.edits.dataset, job.edits.num_edits, job.compare) == ("smollm2-135m", "counterfact-sample", 100, ["memit"])
    assert job.edits.config_key() == "smollm2-135m"
    job = train.from_dict(train.TrainJob, overrides(p.parse_args(["--model", "testbed", "--dataset", "synthetic"]), opts))
    assert job.edits.model is None and job.edits.is_testbed() and job.edits.config_key() is None
    shown = {o.flag: o.default for o in options(train.TrainJob)}
    assert shown["--model"] == "smollm2-135m" and shown["--dataset"] == "counterfact-sample"


def test_train_align_saves_the_lora_the_lte_editor_attaches(cache, tmp_path, capsys, tiny_testbed):
    from memoe.adapters.lora import lora_layers
    from memoe.editors import make_editor

    args = ["--align", "--testbed-config", TINY, "--num-edits", "6", "--align-source", "synthetic:40:60", "--align-max-steps", "3",
            "--align-batch-size", "4", "--align-output-dir", str(tmp_path / "lora"), "--no-progress", "--log-dir", str(tmp_path / "logs"),
            "--model", "testbed", "--dataset", "synthetic"]
    assert train.main(args) == 0
    assert "aligned on" in capsys.readouterr().out
    info = json.loads((tmp_path / "lora" / "alignment.json").read_text())["train"]
    assert info["steps"] == 3 and set(info["rows_by_kind"]) == {"in-scope", "out-of-scope", "plain"}
    tb = tiny_testbed
    result = make_editor("lte", overrides={"lora": str(tmp_path / "lora")}).apply(tb.model, tb.tokenizer, [tb.dataset[0].request])
    assert len(lora_layers(tb.model)) == 3 * tb.model.config.num_hidden_layers
    result.restore()
    assert not lora_layers(tb.model)
    assert train.main([*args[:6], "synthetic:40", *args[7:]]) == 2
    assert "--align-source 'synthetic:40': expected dataset:start:stop" in capsys.readouterr().err


@pytest.mark.slow
def test_train_align_with_ddp_on_two_cpu_processes(cache, tmp_path):
    """LTE's alignment through the same distributed path as the adapters: Lightning launches a second process."""
    import os
    import subprocess

    env = {**os.environ, "MEMOE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    args = ["--align", "--model", "testbed", "--dataset", "synthetic", "--testbed-config", TINY, "--num-edits", "6",
            "--strategy", "ddp", "--devices", "2", "--accelerator", "cpu",
            "--align-source", "synthetic:40:60", "--align-max-steps", "3", "--align-batch-size", "4",
            "--align-output-dir", str(tmp_path / "lora"), "--no-progress", "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "lora" / "alignment.json").read_text())["train"]
    assert info["devices"] == 2 and info["strategy"] == "DDPStrategy" and info["steps"] == 3
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
